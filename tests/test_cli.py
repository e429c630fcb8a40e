"""The `compressm` command line: training on the offline digits and on your own text (local files, a tokenizer trained
here with the `tokenizers` library or the shipped byte-level one), the intercepted Hub upload and loading it in a
process without this package, post-hoc `reduce` and `generate`, resume, classification, and every bad input.

Runs use the smallest settings that still exercise a reduction; nothing here is timed (subprocesses get generous
limits that only guard against hangs). Over 500 lines because each command path and each bad input is one end-to-end
case, and the cases share the module's trained model and data fixtures."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fake_hub import install_fake_hub
from without_package import BLOCK_PACKAGE
from modeling_compressm.app.cli import build_parser, main
from modeling_compressm.app.data import DigitsSequenceDataset, digits_collator, load_digits_sequences
from modeling_compressm.app.output_folder import MANIFEST_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 1800  # subprocesses: a guard against hangs, not a speed requirement
REMOTE_CODE_FILES = {"modeling_compressm.py", "configuration_compressm.py", "reduction.py", "real_map.py", "scan.py",
                     "model_card.py", "events.py", "layer_reduction.py"}
LM_OUTPUT_FILES = REMOTE_CODE_FILES | {
    "config.json", "generation_config.json", "model.safetensors", "compressm_history.json", "README.md",
    "hsv_spectrum.png", "tokenizer.json", "tokenizer_config.json", "train_summary.json",
}
CORPUS = "".join(
    f"{index}: the state space model keeps a small hidden state and the balanced truncation removes states.\n"
    for index in range(120)
)
TINY_LM = ["--preset", "tiny", "--block-size", "32", "--batch-size", "8", "--max-steps", "12", "--start-step", "0",
           "--end-step", "0.5", "--interval", "3", "--tau", "0.2", "--no-progress"]


def _table_dims(output: str) -> tuple[list[int], list[int]]:
    before, after = [], []
    for line in output.splitlines():
        match = re.match(r"^ (\d+)\s+\|\s+(\d+)\s+\|\s+(\d+)\s*$", line)
        if match:
            before.append(int(match.group(2)))
            after.append(int(match.group(3)))
    return before, after


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A local corpus, a BPE tokenizer trained on it with the `tokenizers` library (no pad token), a datasets cache."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train([str(corpus)], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(root / "tokenizer")
    rows = [{"text": f"review {index}: " + ("great fun " if index % 2 else "dull plot ") * 3,
             "label": "pos" if index % 2 else "neg"} for index in range(80)]
    (root / "reviews.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"root": root, "corpus": str(corpus), "tokenizer": str(root / "tokenizer"),
            "reviews": str(root / "reviews.jsonl"), "cache": str(root / "datasets-cache")}


@pytest.fixture(scope="module")
def trained_lm(text_data, tmp_path_factory):
    """ONE `compressm train` command (the README's own-data example): local text file + tokenizer trained here,
    reduced while training, then pushed to an intercepted Hub."""
    output_dir = tmp_path_factory.mktemp("lm") / "tiny-lm"
    with pytest.MonkeyPatch.context() as patch:
        hub = install_fake_hub(patch)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(["train", "--dataset", text_data["corpus"], "--tokenizer", text_data["tokenizer"], *TINY_LM,
                           "--cache-dir", text_data["cache"], "--output-dir", str(output_dir), "--push-to-hub",
                           "--hub-model-id", "someone/tiny-lm", "--hub-private"])
    return {"status": status, "out": stdout.getvalue(), "err": stderr.getvalue(), "dir": output_dir, "hub": hub}


def test_one_command_trains_a_reduced_lm_on_a_text_file_with_a_trained_tokenizer(trained_lm, text_data):
    assert trained_lm["status"] == 0, trained_lm["out"] + trained_lm["err"]
    out, folder = trained_lm["out"], trained_lm["dir"]
    before, after = _table_dims(out)
    assert before == [8, 8] and sum(after) < sum(before)
    assert "vocab_size 64 of preset 'tiny' -> 320" in trained_lm["err"]  # the vocabulary follows the tokenizer
    for label in ("eval loss", "eval perplexity", "bits per byte "):
        assert re.search(rf"^{label}\s*: \d+\.\d+$", out, re.M), label
    assert set(os.listdir(folder)) == LM_OUTPUT_FILES | {MANIFEST_FILE}  # + which files compressm wrote
    assert not [name for name in os.listdir(folder.parent) if name.startswith(".")]  # no staging folder left

    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["dims_after"] == after and summary["dims_before"] == [8, 8] and summary["vocab_size"] == 320
    assert summary["eval_perplexity"] == pytest.approx(torch.exp(torch.tensor(summary["eval_loss"])).item(), rel=1e-5)
    assert 0 < summary["bits_per_byte"] < summary["eval_loss"] / 0.693 * 1.0  # BPE: fewer tokens than bytes
    blocks, batches_per_epoch = summary["train_examples"], -(-summary["train_examples"] // 8)
    epochs, rest = divmod(12, batches_per_epoch)
    assert summary["tokens_seen"] == 32 * (epochs * blocks + min(rest * 8, blocks)) and summary["tokens_per_second"] > 0
    assert summary["train_seconds"] > 0 and summary["threads"] >= 1
    assert {event["step"] for event in summary["events"]} <= {3, 6}  # --interval 3 up to --end-step 0.5 of 12
    card = (folder / "README.md").read_text()
    assert "## Training" in card and text_data["corpus"] in card and "eval bits per byte" in card
    assert f"| state dims | {[8, 8]} -> {after} |" in card

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.state_dims == after and model.config.vocab_size == len(tokenizer) == 320
    assert tokenizer.eos_token_id == model.config.eos_token_id


def test_push_uploads_the_output_folder_in_one_commit(trained_lm):
    assert trained_lm["status"] == 0, trained_lm["err"]
    hub, folder = trained_lm["hub"], trained_lm["dir"]
    assert hub.repos == [("someone/tiny-lm", True)] * 2  # --hub-private; created before training, then by the upload
    (commit,) = hub.commits
    assert commit["repo_id"] == "someone/tiny-lm"
    assert set(commit["files"]) == LM_OUTPUT_FILES
    for name in LM_OUTPUT_FILES:  # exactly the saved bytes: our card, not transformers' placeholder
        assert commit["files"][name] == (folder / name).read_bytes(), name
    assert "pushed to     : someone/tiny-lm" in trained_lm["out"]


REMOTE_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    r"""
    import json
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder = sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    # the tokenizer is a standard fast tokenizer; the flag only spares transformers' question about the model config
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    generator = pipeline("text-generation", model=folder, trust_remote_code=True)
    text = generator("7: the state", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tokenizer("7: the state", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": logits}, os.path.join(sys.argv[3], "remote.pt"))
    print(json.dumps({
        "model": type(model).__module__ + "." + type(model).__name__,
        "tokenizer": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
        "state_dims": model.config.state_dims,
        "generated": text,
        "loaded": sorted(n for n in sys.modules if n.split(".")[0] in ("modeling_compressm", "compressm_kernels")),
    }))
    """
)


def test_pushed_files_load_offline_without_the_package(trained_lm, tmp_path):
    """What the Hub received loads with AutoModelForCausalLM (trust_remote_code), AutoTokenizer and
    pipeline("text-generation") in a fresh offline process where `modeling_compressm` cannot be imported."""
    assert trained_lm["status"] == 0, trained_lm["err"]
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name, content in trained_lm["hub"].commits[0]["files"].items():
        (uploaded / name).write_bytes(content)
    script = tmp_path / "load.py"
    script.write_text(REMOTE_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(REPO_ROOT), str(uploaded), str(tmp_path)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["tokenizer"].startswith("transformers.tokenization_utils")  # no custom tokenizer code
    assert report["model"].startswith("transformers_modules.") and report["model"].endswith(".CompreSSMForCausalLM")
    assert report["state_dims"] == json.loads((trained_lm["dir"] / "config.json").read_text())["state_dims"]
    assert report["generated"].startswith("7: the state") and len(report["generated"]) > len("7: the state")
    local = AutoModelForCausalLM.from_pretrained(trained_lm["dir"]).eval()
    remote = torch.load(tmp_path / "remote.pt")
    with torch.no_grad():
        torch.testing.assert_close(local(input_ids=remote["ids"]).logits, remote["logits"], rtol=0, atol=0)


def test_generate_prints_a_continuation(trained_lm, capsys):
    assert trained_lm["status"] == 0, trained_lm["err"]
    assert main(["generate", str(trained_lm["dir"]), "3: the", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    model = AutoModelForCausalLM.from_pretrained(trained_lm["dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_lm["dir"])
    ids = tokenizer("3: the", return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                               pad_token_id=tokenizer.eos_token_id)[0], skip_special_tokens=True)
    assert printed == expected and printed.startswith("3: the") and len(printed) > len("3: the")
    assert main(["generate", str(trained_lm["dir"]), "x", "--max-new-tokens", "0"]) == 2
    assert "max new tokens must be a positive int" in capsys.readouterr().err


def test_reduce_a_saved_model_post_hoc(trained_lm, tmp_path, capsys):
    assert trained_lm["status"] == 0, trained_lm["err"]
    source = trained_lm["dir"]
    dims = json.loads((source / "config.json").read_text())["state_dims"]
    target = tmp_path / "smaller"
    assert main(["reduce", str(source), "--tau", "0.5", "--output-dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"layer \| N \| rank \| kept energy \| σ max \| largest dropped σ \| dropped energy", out)
    ranks = [int(match.group(2)) for match in re.finditer(r"^(\d+)\s+\| \d+\s+\| (\d+)\s+\|", out, re.M)]
    new_dims = json.loads((target / "config.json").read_text())["state_dims"]
    assert len(ranks) == 2 and new_dims == [min(rank, dim) for rank, dim in zip(ranks, dims)]
    assert sum(new_dims) < sum(dims) and f"state dims: {dims} -> {new_dims}" in out
    assert json.loads((source / "config.json").read_text())["state_dims"] == dims  # the source is untouched
    assert set(os.listdir(target)) == LM_OUTPUT_FILES | {MANIFEST_FILE}  # tokenizer and summary carried over
    summary = json.loads((target / "train_summary.json").read_text())
    assert summary["posthoc_reductions"] == [{"tau": 0.5, "min_dim": 1, "dims_before": dims, "dims_after": new_dims}]
    card = (target / "README.md").read_text()
    assert "during training and afterwards (post hoc" in card and "### Post-hoc reduction" in card
    assert f"| tau=0.5 | {dims} -> {new_dims} |" in card
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert reloaded.config.state_dims == new_dims and reloaded.reduction_history[-1]["policy"] == "manual"
    assert AutoTokenizer.from_pretrained(target)("abc")["input_ids"] == AutoTokenizer.from_pretrained(source)("abc")[
        "input_ids"]
    # in place, and errors
    assert main(["reduce", str(target), "--tau", "0.9"]) == 0
    capsys.readouterr()
    assert sum(json.loads((target / "config.json").read_text())["state_dims"]) <= sum(new_dims)
    assert main(["reduce", str(tmp_path), "--tau", "0.1"]) == 2
    assert "is not a saved model folder (no config.json)" in capsys.readouterr().err
    assert main(["reduce", str(target), "--tau", "1.0"]) == 2
    assert "tau must lie in [0, 1), got 1.0" in capsys.readouterr().err


def test_bytes_tokenizer_on_jsonl_and_resume_from_checkpoint(text_data, tmp_path, capsys):
    """A run interrupted at its checkpoint and resumed ends where the uninterrupted run ends."""
    common = ["train", "--dataset", text_data["reviews"], "--tokenizer", "bytes", *TINY_LM, "--max-steps", "8",
              "--cache-dir", text_data["cache"]]
    assert main(common + ["--output-dir", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "train_summary.json").read_text())
    assert main(common + ["--output-dir", str(tmp_path / "part"), "--save-steps", "4"]) == 0
    checkpoints = tmp_path / "part-checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-4", "checkpoint-8"]
    shutil.rmtree(checkpoints / "checkpoint-8")  # as if the run had stopped after step 4
    assert main(common + ["--output-dir", str(tmp_path / "part"), "--resume-from-checkpoint", "last"]) == 0
    resumed = json.loads((tmp_path / "part" / "train_summary.json").read_text())
    out = capsys.readouterr().out
    assert resumed["resumed_from"] == str(checkpoints / "checkpoint-4") and resumed["resumed_at_step"] == 4
    assert full["resumed_from"] is None and (full["steps_run"], resumed["steps_run"]) == (8, 4)
    assert resumed["dims_after"] == full["dims_after"] and resumed["events"] == full["events"]
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5), out
    assert resumed["vocab_size"] == 258 and resumed["tokenizer_name"].startswith("bytes")
    assert AutoTokenizer.from_pretrained(tmp_path / "part")("é")["input_ids"] == [195, 169]


def test_classification_on_own_data(text_data, tmp_path, capsys):
    argv = ["train", "--dataset", text_data["reviews"], "--task", "classification", "--label-column", "label",
            "--tokenizer", "bytes", *TINY_LM, "--learning-rate", "0.01", "--cache-dir", text_data["cache"],
            "--output-dir", str(tmp_path / "clf")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"^eval accuracy : (\d\.\d{4})$", out, re.M).group(1))
    before, after = _table_dims(out)
    assert sum(after) < sum(before)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "clf")
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.state_dims == after
    rows = [json.loads(line) for line in Path(text_data["reviews"]).read_text().splitlines()]
    held_out = json.loads((tmp_path / "clf" / "train_summary.json").read_text())["eval_examples"]
    assert held_out == 8 and 0.0 <= accuracy <= 1.0
    batch = tokenizer([row["text"] for row in rows], padding=True, truncation=True, max_length=32,
                      return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    assert predictions.shape == (80,)


@pytest.fixture
def offline(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dataset", "{reviews}", "--text-column", "body"],
         r"has no column 'body' in its training split \(columns: text, label\); name the right one with --text-column"),
        (["--dataset", "{empty}"], r"dataset file '.*empty.txt' is empty; give a file with rows of text"),
        (["--dataset", "{corpus}", "--block-size", "100000"],
         r"the train split holds \d+ tokens, fewer than one block of 100000: lower --block-size or give more text"),
        (["--dataset", "{reviews}", "--task", "classification", "--tokenizer", "{tokenizer}"],
         r"the tokenizer has no pad token, which classification batches need: pass --pad-token TOKEN"),
        (["--dataset", "someone/not-cached"], r"dataset 'someone/not-cached' is not a local file or folder and is not "
                                              r"in the datasets cache, and the Hugging Face Hub cannot be reached"),
        (["--dataset", "{corpus}", "--tokenizer", "someone/no-tokenizer"],
         r"tokenizer 'someone/no-tokenizer' is not a local folder .*offline mode is on \(HF_HUB_OFFLINE=1\)"),
        (["--dataset", "{corpus}", "--push-to-hub"],
         r"--push-to-hub needs the Hugging Face Hub, but offline mode is on \(HF_HUB_OFFLINE=1\)"),
        (["--dataset", "{corpus}", "--report-to", "nonsense"], r"unknown --report-to 'nonsense'; choose from none"),
        (["--dataset", "{corpus}", "--resume-from-checkpoint", "{root}"],
         r"is not a Trainer checkpoint folder \(no trainer_state.json\); give a checkpoint-N folder or 'last'"),
        (["--dataset", "{corpus}", "--preset", "digits"], r"preset 'digits' takes continuous inputs \(input_dim=1\)"),
        (["--tokenizer", "bytes", "--preset", "digits"], r"--tokenizer apply to text: add --dataset, or use a causal"),
        (["--dataset", "{corpus}", "--interval", "0"],
         r"interval must be an int >= 1 or a float fraction of the run in \(0, 1\], got 0"),
        (["--dataset", "{corpus}", "--tau", "1.5"], r"tau must be a number in \[0, 1\), got 1.5"),
        (["--dataset", "{corpus}", "--start-step", "10", "--end-step", "5"],
         r"the end step \(5\) comes before the start step \(10\)"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(arguments, message, text_data, offline, tmp_path, capsys):
    (text_data["root"] / "empty.txt").write_text("")
    values = {key: text_data[key] for key in ("reviews", "corpus", "tokenizer", "root")}
    values["empty"] = str(text_data["root"] / "empty.txt")
    arguments = [argument.format(**values) for argument in arguments]
    output_dir = tmp_path / "out"
    status = main(["train", *arguments, "--max-steps", "2", "--cache-dir", text_data["cache"], "--no-progress",
                   "--output-dir", str(output_dir)])
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if line.startswith("compressm: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert not output_dir.exists() and os.listdir(tmp_path) == []


def test_an_output_folder_with_other_files_is_not_replaced(text_data, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    argv = ["train", "--dataset", text_data["corpus"], *TINY_LM, "--max-steps", "2", "--cache-dir",
            text_data["cache"], "--output-dir", str(folder)]
    assert main(argv) == 2
    assert "already holds files that are not a CompreSSM model" in capsys.readouterr().err
    assert os.listdir(folder) == ["notes.txt"]
    assert main(argv + ["--overwrite-output-dir"]) == 0
    assert (folder / "notes.txt").read_text() == "keep me" and "config.json" in os.listdir(folder)
    assert main(argv) == 0  # an earlier CompreSSM output is written again, the user's files kept
    assert (folder / "notes.txt").read_text() == "keep me"
    assert not [name for name in os.listdir(tmp_path) if name != "mine"]


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
    assert re.search(r"train time\s+: \d+\.\d s \(total \d+\.\d s, \d+ torch threads?, cpu\)", out)
    assert f"saved to      : {output_dir}" in out

    saved = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    assert saved.config.state_dims == after
    assert [event["dims_after"] for event in saved.reduction_history][-1] == after
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["dims_after"] == after and summary["max_steps"] == 40
    assert abs(summary["test_accuracy"] - accuracy) < 1e-4
    assert summary["tokens_per_second"] > 0 and summary["threads"] == torch.get_num_threads()
    # the saved model reproduces the reported test accuracy
    _, test = DigitsSequenceDataset.splits(seed=0)
    with torch.no_grad():
        predictions = saved(inputs_embeds=test.inputs).logits.argmax(-1)
    assert abs((predictions == test.labels).float().mean().item() - accuracy) < 1e-4
    for name in ("config.json", "model.safetensors", "README.md", "compressm_history.json", "modeling_compressm.py"):
        assert (output_dir / name).exists(), name
    card = (output_dir / "README.md").read_text()
    assert "sklearn digits" in card and f"| test accuracy | {round(accuracy, 4)}" in card


def test_no_compress_keeps_sizes(tmp_path, capsys):
    status = main(["train", "--max-steps", "5", "--no-compress", "--output-dir", str(tmp_path / "base"),
                   "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "no compression" in out and "reductions    : 0" in out
    assert _table_dims(out) == ([64, 64], [64, 64])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--tau", "1.5", "--max-steps", "2"], "tau must be a number in [0, 1), got 1.5"),
        (["train", "--preset", "nope", "--max-steps", "2"], "unknown preset 'nope'; available presets: digits"),
        (["train", "--preset", "scifar", "--max-steps", "2"], "scifar needs CIFAR images"),
        (["train", "--max-steps", "0"], "max_steps must be a positive int"),
        (["train", "--state-dims", "8", "8", "8", "--max-steps", "2"], "state_dims has 3 entries"),
        (["train", "--policy", "fixed", "--fraction", "1.5", "--max-steps", "2"], "fraction must be a number"),
        (["train", "--total-budget", "1", "--max-steps", "2"], "total_budget"),
        (["train", "--final-fraction", "0.5", "--max-steps", "2"], "applies to the global policy, not 'tolerance'"),
        (["train", "--policy", "global", "--final-fraction", "1.5", "--max-steps", "2"],
         "final_fraction must be a number strictly between 0 and 1"),
        (["train", "--ssm-lr-factor", "0", "--max-steps", "2"], "ssm_lr_factor must be positive"),
        (["train", "--reducibility-weight", "0", "--max-steps", "2"],
         "ReducibilityRegularizer.weight must be a positive number, got 0.0"),
        pytest.param(["train", "--tf32", "--max-steps", "2"], "--tf32 needs an NVIDIA GPU of compute capability 8.0",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")),
    ],
)
def test_bad_input_gives_clear_errors(argv, message, tmp_path, capsys):
    assert main(argv + ["--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_global_policy_keeps_the_final_fraction_of_the_total_state(tmp_path, capsys, monkeypatch):
    """--policy global spreads the shrink over the scheduled events so that --final-fraction of the total is left;
    --ssm-lr-factor reaches the optimizer the recipe builds."""
    import modeling_compressm.app.recipe as recipe

    seen = {}
    build = recipe.build_optimizer

    def spy(model, **kwargs):
        seen.update(kwargs)
        return build(model, **kwargs)

    monkeypatch.setattr(recipe, "build_optimizer", spy)
    status = main(["train", "--policy", "global", "--final-fraction", "0.25", "--ssm-lr-factor", "0.5",
                   "--max-steps", "60", "--output-dir", str(tmp_path / "g"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    before, after = _table_dims(out)
    assert sum(before) == 128 and abs(sum(after) - 32) <= 3, after  # a quarter, up to per-event rounding
    assert seen["ssm_lr_factor"] == 0.5


def test_debug_environment_adds_the_traceback_to_an_error(tmp_path, capsys, monkeypatch):
    argv = ["train", "--tau", "1.5", "--max-steps", "2", "--output-dir", str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("COMPRESSM_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "tau must be a number in [0, 1), got 1.5" in err


def test_tau_zero_is_accepted_like_the_callback_does(tmp_path, capsys):
    assert main(["train", "--tau", "0", "--max-steps", "3", "--output-dir", str(tmp_path / "t0"), "--no-progress"]) == 0
    assert "tau=0" in capsys.readouterr().out


def test_argparse_errors_and_defaults(capsys):
    with pytest.raises(SystemExit) as error:
        main(["train", "--policy", "magic"])
    assert error.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "2", "--max-steps", "3"])  # mutually exclusive
    with pytest.raises(SystemExit):
        main(["train", "--eval-split", "test", "--validation-fraction", "0.1"])
    with pytest.raises(SystemExit):
        main(["train", "--interval", "often"])
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "overrides" not in help_text and "exclusive with --epochs" in help_text
    args = build_parser().parse_args(["train", "--interval", "0.1", "--end-step", "300"])
    assert (args.interval, args.end_step) == (0.1, 300) and type(args.end_step) is int
    args = build_parser().parse_args(["train"])
    assert (args.preset, args.policy, args.tau, args.output_dir, args.seed) == (None, "tolerance", 0.05, None, 0)
    assert (args.tokenizer, args.text_column, args.task, args.split) == (None, "text", "causal-lm", "train")
    assert main([]) == 2  # no command: help, failure status


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^digits\s+classifier\s+layers=2 H=32 state_dims=\[64, 64\]", out, re.M)
    assert re.search(r"^tiny\s+causal LM", out, re.M)


def test_reducibility_weight_trains_with_the_regulariser_while_the_reductions_run(tmp_path, capsys, monkeypatch):
    """--reducibility-weight W adds W x the penalty's gradient in the reductions' window (and says so in the run's
    summary); without it the regulariser never runs."""
    from modeling_compressm.training.reducibility import ReducibilityRegularizer

    applied = []
    apply = ReducibilityRegularizer.apply

    def spy(self, model, step, system, last_event_step):
        value = apply(self, model, step, system, last_event_step)
        applied.append((self.weight, step, value))
        return value

    monkeypatch.setattr(ReducibilityRegularizer, "apply", spy)
    argv = ["train", "--max-steps", "20", "--tau", "0.1", "--no-progress"]
    assert main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    assert applied == []
    assert main([*argv, "--reducibility-weight", "0.05", "--output-dir", str(tmp_path / "reg")]) == 0
    out = capsys.readouterr().out
    assert "reducibility regulariser weight" in out and "0.05" in out
    assert {weight for weight, _, _ in applied} == {0.05}
    evaluated = [value for _, _, value in applied if value is not None]
    assert evaluated and all(value > 0 for value in evaluated), applied


def test_causal_lm_preset_trains_on_the_offline_corpus(tmp_path, capsys):
    """`tiny` (vocab 64) trains: its vocabulary follows the byte-level tokenizer, which is saved with it."""
    status = main(["train", "--preset", "tiny", "--max-steps", "3", "--batch-size", "4", "--block-size", "16",
                   "--output-dir", str(tmp_path / "lm"), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "eval perplexity:" in captured.out and "data synthetic toy corpus" in captured.out
    assert "vocab_size 64 of preset 'tiny' -> 258" in captured.err
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert config["architectures"] == ["CompreSSMForCausalLM"] and config["vocab_size"] == 258
    assert len(AutoTokenizer.from_pretrained(tmp_path / "lm")) == 258


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
    """`compressm train` (the README's first command) in a fresh directory, shortened to 30 steps: the default
    preset, output folder, progress bar and thread setting (OMP_NUM_THREADS unset)."""
    from modeling_compressm.app.run_settings import default_num_threads

    script = shutil.which("compressm", path=os.path.dirname(sys.executable)) or shutil.which("compressm")
    if script is None:
        pytest.fail("the `compressm` console script is not installed (pip install -e .)")
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([script, "train", "--max-steps", "30", "--tau", "0.1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before, after = _table_dims(result.stdout)
    assert before == [64, 64] and sum(after) < 128
    saved = tmp_path / "compressm-digits"
    assert json.loads((saved / "config.json").read_text())["state_dims"] == after
    assert "it/s" in result.stderr or "s/it" in result.stderr  # the Trainer's progress bar
    threads = default_num_threads()
    assert f"{threads} torch thread{'s' if threads != 1 else ''}, cpu)" in result.stdout


def test_rollback_policy_evaluates_on_a_validation_split_not_the_test_set(tmp_path, monkeypatch):
    from modeling_compressm.app import recipe

    import transformers

    seen_eval_sizes = []

    real_evaluate = transformers.Trainer.evaluate

    def recording_evaluate(self, eval_dataset=None, *args, **kwargs):
        seen_eval_sizes.append(len(eval_dataset if eval_dataset is not None else self.eval_dataset))
        return real_evaluate(self, eval_dataset, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", recording_evaluate)
    summary = recipe.train_preset(policy="rollback", tau=0.1, max_steps=24, show_progress=False)
    _, test = DigitsSequenceDataset.splits(seed=0)
    # evaluations during training use the held-out tenth of the training split; the final one uses the test set
    assert seen_eval_sizes[-1] == len(test)
    assert seen_eval_sizes[:-1] and all(size == 1437 // 10 for size in seen_eval_sizes[:-1])
    assert summary["policy"] == "rollback"
