"""The GPU benchmark scripts work before a GPU ever runs them: the one-call check script in its CPU dry run.

A GPU session gets one short call of `benchmarks/gpu_check.sh`; a typo or a broken code path would waste it. The dry
run executes every step of the script (kernel tests, scan benchmark, training benchmark with its batch search,
reduction event and torch.compile) at tiny sizes on CPU, with the kernels in triton's interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    pytest.importorskip("triton")
    results, out = tmp_path / "results", tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(results), OUT=str(out), OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    for name in ("kernel tests", "bench_scan", "bench_train"):
        assert f"=== {name}: OK" in log, log[-5000:]
    scan = json.loads(next(results.glob("scan_*_quick.json")).read_text())
    assert scan["meta"]["device_name"].startswith("cpu-")
    paths = {row["path"] for row in scan["shapes"]}
    assert {"triton_scan[sequential]", "triton_scan[chunked]", "triton_fused[chunked]", "torch_parallel"} <= paths
    train = json.loads(next(results.glob("train_*_dry-run.json")).read_text())
    assert [row["label"] for row in train["sizes"]] == ["full", "8 per layer", "tau=0.05 run"]
    assert train["sizes"][2]["state_dims"] == [12, 8]
    assert train["reduction_event"]["dims_after"] == [8, 8] and train["meta"]["batch"] >= 1
    assert "error" not in train["compile"] and train["compile"]["tokens_per_s"] > 0
    assert not train["errors"]
    copied = {p.name for p in out.iterdir()}
    assert {p.name for p in results.iterdir()} <= copied and any(n.endswith(".log") for n in copied)


def test_gpu_check_rejects_unknown_arguments():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--gpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage" in run.stderr


def test_hbm_peak_bandwidth_comes_from_the_device_name():
    from bench_scan import hbm_peak_gbps

    assert hbm_peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert hbm_peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert hbm_peak_gbps("NVIDIA H200") == 4800.0
    assert hbm_peak_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert hbm_peak_gbps("cpu-x86_64") is None
