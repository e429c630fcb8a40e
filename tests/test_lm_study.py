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


REDUCIBLE_TOY = ["--steps", "40", "--state-dims", "8", "--hidden", "8", "--seq-len", "16", "--batch-size", "2",
                 "--eval-blocks", "4", "--seeds", "0"]


def test_reducible_protocol_adds_an_arm_to_the_log_without_rerunning_logged_runs(tmp_path):
    import lm_study_reducible

    log = tmp_path / "runs.jsonl"
    lm_study_reducible.main(["run", "--task", "bytes", *REDUCIBLE_TOY, "--posthoc-steps", "2",
                             "--arms", "full", "compressm-real-reg", "small", "small-reg", "--log", str(log)])
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["arm"] for row in first] == ["full", "compressm-real-reg", "small", "small-reg"]
    lm_study_reducible.main(["run", "--task", "bytes", *REDUCIBLE_TOY, "--arms", "compressm-complex-reg", "small",
                             "small-reg", "--log", str(log)])
    added = [json.loads(line) for line in log.read_text().splitlines()][len(first):]
    complex_reg = added[0]
    assert complex_reg["arm"] == "compressm-complex-reg" and complex_reg["knobs"]["system"] == "complex"
    assert complex_reg["knobs"]["reducibility"] == lm_study_reducible.REGULARIZER_WEIGHT
    # the small-from-scratch arms run at its sizes only where the log does not hold that run already
    logged = {(row["arm"], tuple(row["dims_after"])) for row in first}
    expected = [arm for arm in ("small", "small-reg") if (arm, tuple(complex_reg["dims_after"])) not in logged]
    assert [row["arm"] for row in added[1:]] == expected
    text = lm_study_reducible.report([*first, *added], "bytes")
    assert "| compressm-real-reg vs compressm-complex-reg | - |" in text
    assert "| compressm-real-reg vs full | - |" in text


def test_reducible_report_counts_higher_accuracy_as_better():
    import lm_study_reducible

    def row(arm, accuracy, dims):
        return {"arm": arm, "seed": 0, "accuracy": accuracy, "dims_after": dims, "state_time": 1, "state_time_full": 2,
                "device": "cpu", "threads": 1, "max_steps": 10}

    text = lm_study_reducible.report([row("compressm-real-reg", 0.9, [3, 3]), row("small", 0.8, [3, 3]),
                                      row("small", 0.99, [4, 2])], "permuted-digits")
    assert "| arm | accuracy mean ± std |" in text
    assert "| compressm-real-reg vs small | compressm-real-reg | +0.1000 | +0.1000 | 1/1 |" in text


def test_posthoc_scipy_reference_reproduces_the_layer_and_the_package_truncation():
    import copy

    import posthoc_vs_scipy

    corpus = lm_study.load_corpus("bytes")
    task = lm_study.LMTask(corpus, hidden_size=8, num_layers=2, seq_len=16, batch_size=2, eval_blocks=2)
    model = task.make_model([6, 6], seed=0)
    ids = task.eval_ids
    with torch.no_grad():
        full_logits = model(input_ids=ids).logits
        for reduce in (posthoc_vs_scipy.balanced_truncation, posthoc_vs_scipy.singular_perturbation):
            dense = copy.deepcopy(model)
            for block in dense.model.layers:  # at full order (12 real states) both are the layer itself
                lam, B, C, D = posthoc_vs_scipy.layer_system(block.lru)
                system = reduce(*posthoc_vs_scipy.real_realisation(lam, B, C), D, 12)
                block.lru = posthoc_vs_scipy.DenseStateSpaceLayer(*system)
            torch.testing.assert_close(dense(input_ids=ids).logits, full_logits, rtol=1e-4, atol=1e-5)
        package = copy.deepcopy(model)
        package.reduce([3, 3], strict=True, record=False, system="real")
        scipy_model, orders = posthoc_vs_scipy.reduce_with_scipy(model, 3, "scipy-real")
        assert all(order <= 6 for order in orders)
        torch.testing.assert_close(scipy_model(input_ids=ids).logits, package(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
        assert (package(input_ids=ids).logits - full_logits).abs().max() > 1e-3  # the truncation did change it


def test_posthoc_report_states_the_gap_and_the_target():
    import posthoc_vs_scipy

    common = {"task": "bytes", "device": "cpu", "threads": 1, "torch": "t", "scipy": "s", "date": "d",
              "state_dims": 128, "max_steps": 800, "eval_blocks": 4}
    rows = [{**common, "seed": seed, "rank": rank, "method": method, "bpb": bpb, "real_orders": None}
            for seed, offset in ((0, 0.0), (1, 0.03))
            for rank, method, bpb in ((128, "full", 2.0), (32, "package-real", 2.2 + offset),
                                      (32, "scipy-real", 2.2))]
    text = posthoc_vs_scipy.report(rows)
    assert "+0.000000, +0.030000; worst +0.030000: target missed" in text
