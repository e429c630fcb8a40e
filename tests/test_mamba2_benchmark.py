"""The Mamba-2 reduction-error benchmark runs end to end at tiny sizes (so a long run cannot fail on a typo)."""

import json
import sys
from pathlib import Path

import pytest

from modeling_compressm import modeling_compressm_mamba2 as modeling2

if modeling2.MISSING_FROM_TRANSFORMERS:
    pytest.skip(f"this transformers release lacks the Mamba-2 5.x pieces ({modeling2.MISSING_FROM_TRANSFORMERS})", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_reduction_error_benchmark_dry_run(tmp_path):
    import mamba2_reduction_error

    summary = mamba2_reduction_error.main([
        "--state", "8", "--ranks", "4", "--steps", "2", "--seq-len", "32", "--batch", "2",
        "--calibration-batches", "1", "--eval-batches", "1", "--results-dir", str(tmp_path), "--tag", "_dry",
    ])
    assert [item["rank"] for item in summary] == [4]
    written = json.loads(next(tmp_path.glob("mamba2_reduction_error_N8_seed0_dry_*.json")).read_text())
    methods = {row["method"] for row in written["rows"]}
    assert {"balanced", "select_qr", "select_ghost", "select_random_0"} <= methods
    assert all(row["state_dims"] == [4, 4] for row in written["rows"])
    assert next(tmp_path.glob("*.md")).read_text().startswith("# Mamba-2 reduction")


def test_in_training_benchmark_dry_run(tmp_path):
    import mamba2_in_training

    mamba2_in_training.main([
        "--state", "8", "--rank", "4", "--steps", "4", "--reduce-at", "2", "--window", "1", "--seq-len", "32",
        "--batch", "2", "--eval-batches", "1", "--results-dir", str(tmp_path),
    ])
    rows = [json.loads(line) for line in next(tmp_path.glob("mamba2_in_training_*.jsonl")).read_text().splitlines()]
    assert [(row["arm"], row["state_dims"]) for row in rows] == [
        ("full", [8, 8]), ("balanced", [4, 4]), ("select", [4, 4]), ("small", [4, 4])
    ]
    assert "| 0 |" in next(tmp_path.glob("mamba2_in_training_*.md")).read_text()


def test_step_time_benchmark_dry_run(tmp_path):
    import mamba2_step_time

    medians = mamba2_step_time.main([
        "--state", "16", "--ranks", "8", "--hidden", "32", "--heads", "4", "--chunk", "16", "--seq-len", "32",
        "--batch", "2", "--warmup", "1", "--repeats", "1", "--results-dir", str(tmp_path),
    ])
    assert set(medians) == {"stock r=16", "stock r=8", "select r=8", "balanced r=8"}
    written = json.loads(next(tmp_path.glob("mamba2_step_time_N16_*.json")).read_text())
    assert written["meta"]["threads"] >= 1 and written["meta"]["date"] and written["meta"]["device"].startswith("CPU")
    assert set(written["scan_median_ms"]) == set(medians)
    assert "| 8 |" in next(tmp_path.glob("mamba2_step_time_N16_*.md")).read_text()
