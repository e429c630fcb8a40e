"""The `compressm` command line: a short training run prints the before/after table and saves the reduced model."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from modeling_compressm.cli import build_parser, main
from modeling_compressm.data import DigitsSequenceDataset, digits_collator, load_digits_sequences


def _table_dims(output: str) -> tuple[list[int], list[int]]:
    before, after = [], []
    for line in output.splitlines():
        match = re.match(r"^ (\d+)\s+\|\s+(\d+)\s+\|\s+(\d+)\s*$", line)
        if match:
            before.append(int(match.group(2)))
            after.append(int(match.group(3)))
    return before, after


def test_short_training_run_prints_table_and_saves(tmp_path, capsys):
    output_dir = tmp_path / "run"
    status = main(["train", "--max-steps", "40", "--tau", "0.1", "--output-dir", str(output_dir), "--no-progress",
                   "--seed", "3"])
    out = capsys.readouterr().out
    assert status == 0
    assert "preset digits | CompreSSM (tolerance, tau=0.1) | 40 steps | seed 3" in out
    assert re.search(r"layer\s+\| state dim before \| state dim after", out)
    before, after = _table_dims(out)
    assert before == [64, 64]
    assert len(after) == 2 and sum(after) < sum(before), out  # tau=0.1 reduces during steps 0..12
    assert re.search(rf"^ total\s+\| 128\s+\| {sum(after)}\s*$", out, re.M)
    accuracy = float(re.search(r"test accuracy : (\d\.\d{4})", out).group(1))
    loss = float(re.search(r"test loss\s+: (\d+\.\d{4})", out).group(1))
    assert 0.0 <= accuracy <= 1.0 and loss > 0
    assert re.search(r"train time\s+: \d+\.\d s", out)
    assert f"saved to      : {output_dir}" in out

    saved = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    assert saved.config.state_dims == after
    assert [event["dims_after"] for event in saved.reduction_history][-1] == after
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["dims_after"] == after and summary["max_steps"] == 40
    assert abs(summary["test_accuracy"] - accuracy) < 1e-4
    # the saved model reproduces the reported test accuracy
    _, test = DigitsSequenceDataset.splits(seed=0)
    with torch.no_grad():
        predictions = saved(inputs_embeds=test.inputs).logits.argmax(-1)
    assert abs((predictions == test.labels).float().mean().item() - accuracy) < 1e-4
    for name in ("config.json", "model.safetensors", "README.md", "compressm_history.json", "modeling_compressm.py"):
        assert (output_dir / name).exists(), name


def test_no_compress_keeps_sizes(tmp_path, capsys):
    status = main(["train", "--max-steps", "5", "--no-compress", "--output-dir", str(tmp_path / "base"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "no compression" in out and "reductions    : 0" in out
    assert _table_dims(out) == ([64, 64], [64, 64])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--tau", "1.5", "--max-steps", "2"], "tau must lie strictly between 0 and 1"),
        (["train", "--preset", "nope", "--max-steps", "2"], "unknown preset 'nope'; available presets: digits"),
        (["train", "--preset", "scifar", "--max-steps", "2"], "scifar needs CIFAR images"),
        (["train", "--max-steps", "0"], "max_steps must be a positive int"),
        (["train", "--state-dims", "8", "8", "8", "--max-steps", "2"], "state_dims has 3 entries"),
    ],
)
def test_bad_input_gives_clear_errors(argv, message, tmp_path, capsys):
    assert main(argv + ["--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()


def test_argparse_errors_and_defaults(capsys):
    with pytest.raises(SystemExit) as error:
        main(["train", "--policy", "magic"])
    assert error.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "2", "--max-steps", "3"])  # mutually exclusive
    args = build_parser().parse_args(["train"])
    assert (args.preset, args.policy, args.tau, args.output_dir, args.seed) == ("digits", "tolerance", 0.05, None, 0)
    assert main([]) == 2  # no command: help, failure status


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^digits\s+classifier\s+layers=2 H=32 state_dims=\[64, 64\]", out, re.M)
    assert re.search(r"^tiny\s+causal LM", out, re.M)


def test_causal_lm_preset_trains_on_the_offline_corpus(tmp_path, capsys):
    status = main(["train", "--preset", "lm-small", "--state-dims", "8", "--max-steps", "3", "--batch-size", "4",
                   "--output-dir", str(tmp_path / "lm"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "test perplexity:" in out
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architectures"] == ["CompreSSMForCausalLM"]


def test_digits_data():
    data = load_digits_sequences(seed=0)
    assert data["train"]["inputs"].shape == (1437, 64, 1) and data["test"]["inputs"].shape == (360, 64, 1)
    assert data["train"]["inputs"].dtype.name == "float32" and data["train"]["labels"].dtype.name == "int64"
    assert sorted(set(data["test"]["labels"].tolist())) == list(range(10))
    again = load_digits_sequences(seed=0)
    assert (again["test"]["labels"] == data["test"]["labels"]).all()
    assert abs(float(data["train"]["inputs"].mean())) < 1e-4  # normalised with train statistics
    batch = digits_collator([DigitsSequenceDataset("test")[i] for i in range(5)])
    assert batch["inputs_embeds"].shape == (5, 64, 1) and batch["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="split must be"):
        DigitsSequenceDataset("validation")
    with pytest.raises(ValueError, match="test_size"):
        load_digits_sequences(test_size=1.5)


def test_console_script_default_run(tmp_path):
    """`compressm train` with no arguments (the README's first command), in a fresh directory."""
    script = shutil.which("compressm", path=os.path.dirname(sys.executable)) or shutil.which("compressm")
    if script is None:
        pytest.fail("the `compressm` console script is not installed (pip install -e .)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([script, "train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before, after = _table_dims(result.stdout)
    assert before == [64, 64] and sum(after) < 128
    accuracy = float(re.search(r"test accuracy : (\d\.\d{4})", result.stdout).group(1))
    assert accuracy > 0.9, result.stdout  # the documented default reaches > 90% on the held-out digits
    saved = tmp_path / "compressm-digits"
    assert json.loads((saved / "config.json").read_text())["state_dims"] == after
    assert "it/s" in result.stderr or "s/it" in result.stderr  # the Trainer's progress bar


def test_rollback_policy_evaluates_on_a_validation_split_not_the_test_set(tmp_path, monkeypatch):
    from modeling_compressm import cli as cli_module

    import transformers

    seen_eval_sizes = []

    real_evaluate = transformers.Trainer.evaluate

    def recording_evaluate(self, eval_dataset=None, *args, **kwargs):
        seen_eval_sizes.append(len(eval_dataset if eval_dataset is not None else self.eval_dataset))
        return real_evaluate(self, eval_dataset, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", recording_evaluate)
    summary = cli_module.train_preset(policy="rollback", tau=0.1, max_steps=24, show_progress=False)
    _, test = DigitsSequenceDataset.splits(seed=0)
    # evaluations during training use the held-out tenth of the training split; the final one uses the test set
    assert seen_eval_sizes[-1] == len(test)
    assert seen_eval_sizes[:-1] and all(size == 1437 // 10 for size in seen_eval_sizes[:-1])
    assert summary["policy"] == "rollback"
