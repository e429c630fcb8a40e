"""benchmarks/lm_study.py at toy sizes: the corpus is pinned, the 4-arm protocol logs what the report needs, the
state rescaling after a reduction keeps the model's function and the optimizer's update, and the report states the
targets from the numbers."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lm_study  # noqa: E402
import lm_study_report  # noqa: E402
from tasks import one_thread  # noqa: E402,F401 (fixture)

TOY = ["--steps", "8", "--state-dims", "8", "--hidden", "8", "--seq-len", "16", "--batch-size", "2",
       "--eval-blocks", "4", "--seeds", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_corpus_split_is_deterministic_and_recorded():
    train, held_out, record = lm_study.stdlib_files()
    again = lm_study.stdlib_files()[2]
    assert record["sha256"] == again["sha256"] and len(record["files"]) == len(train) + len(held_out)
    assert not {path.name for path in train} & {path.name for path in held_out}
    assert {item["split"] for item in record["files"]} == {"train", "eval"}
    corpus = lm_study.load_corpus("bytes")
    assert corpus.vocab_size == 256 and len(corpus.train_tokens) == record["train_bytes"] + len(train) - 1


def test_event_steps_spread_over_the_window():
    assert lm_study.event_steps(800, 0.025, 0.1, 4) == [20, 40, 60, 80]
    assert lm_study.event_steps(800, 0.0, 0.1, 1) == [80]


def test_equal_norm_rescaling_keeps_the_function_and_rescales_the_moments():
    corpus = lm_study.load_corpus("bytes")
    task = lm_study.LMTask(corpus, hidden_size=8, num_layers=1, seq_len=16, batch_size=2, eval_blocks=2)
    model = task.make_model([6], seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = task.batch(torch.Generator().manual_seed(0))
    model(**batch).loss.backward()
    optimizer.step()
    layer = model.lru_layers()[0]
    with torch.no_grad():
        layer.B_re.mul_(3.0)  # unequal norms, as after a balanced truncation
        layer.C_re.div_(3.0)
        layer.C_im.div_(3.0)
        layer.B_im.mul_(3.0)
    before = model(**batch).logits
    moment_b = optimizer.state[layer.B_re]["exp_avg"].clone()
    scale = lm_study.equalise_state_norms(layer, optimizer)
    torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-5)
    b_norm = torch.complex(layer.B_re, layer.B_im).norm(dim=1)
    c_norm = torch.complex(layer.C_re, layer.C_im).norm(dim=0)
    torch.testing.assert_close(b_norm, c_norm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(optimizer.state[layer.B_re]["exp_avg"], moment_b * scale[:, None].float())


def test_compare_logs_every_arm_and_report_checks_the_targets(tmp_path):
    log = tmp_path / "runs.jsonl"
    lm_study.main(["compare", "--task", "bytes", *TOY, "--recipes", "default", "--posthoc-steps", "2",
                   "--log", str(log)])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    by_arm = {row["arm"]: row for row in rows}
    assert set(by_arm) == {"baseline", "compressm[default]", "small-scratch", "posthoc-truncation",
                           "posthoc-finetune"}
    compressed = by_arm["compressm[default]"]
    assert sum(compressed["dims_after"]) == 8  # final_fraction 0.5 of 2 x 8 states
    assert by_arm["small-scratch"]["dims_before"] == compressed["dims_after"]
    assert by_arm["posthoc-truncation"]["dims_after"] == compressed["dims_after"]
    assert compressed["state_time"] < by_arm["baseline"]["state_time"] == 8 * 16
    assert all(event["mapped"] == [True, True] for event in compressed["events"])  # moments carried over
    assert len(compressed["train_loss"]) == 8 and compressed["corpus_sha256"] == lm_study.stdlib_files()[2]["sha256"]

    lm_study.RESULTS_DIR, saved = tmp_path, lm_study.RESULTS_DIR
    try:
        lm_study.main(["report", "--log", str(log), "--date", "test"])
    finally:
        lm_study.RESULTS_DIR = saved
    markdown = next(tmp_path.glob("lm_study_*_test.md")).read_text()
    payload = json.loads(next(tmp_path.glob("lm_study_*_test.json")).read_text())
    assert "| compressm[default] |" in markdown and "issue 14 targets" in markdown
    verdict = payload["compare"][0]["verdict"]
    assert verdict["seeds"] == 1 and verdict["targets_met"] is False  # one seed can never meet them
    assert payload["corpus"]["sha256"] == lm_study.stdlib_files()[2]["sha256"]


def test_package_default_arm_runs_the_shipped_reducer_and_the_overview_lists_it(tmp_path):
    log = tmp_path / "runs.jsonl"
    toy = [*TOY[:TOY.index("--steps")], *TOY[TOY.index("--steps") + 2:]]
    lm_study.main(["compare", "--task", "bytes", *toy, "--steps", "40", "--recipes", "package-default",
                   "--posthoc-steps", "0", "--log", str(log)])
    rows = {row["arm"]: row for row in map(json.loads, log.read_text().splitlines())}
    compressed = rows["compressm[package-default]"]
    # settings.DEFAULTS in a 40-step run: events at 2.5/5/7.5/10% = steps 1-4, half of the 16 states left
    assert [event["step"] for event in compressed["events"]] == [1, 2, 3, 4]
    assert sum(compressed["dims_after"]) == 8
    lines, _ = lm_study_report.build_report(list(rows.values()))
    overview = lines[lines.index(next(line for line in lines if line.startswith("### Overview"))) + 4]
    assert overview.startswith("| bytes | `package-default` (")
