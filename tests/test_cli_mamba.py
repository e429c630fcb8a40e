"""`compressm reduce` on Mamba-2 and Mamba-1 checkpoints: calibration text from a local file (or the generated toy
corpus), ranks per layer or an energy rule, balanced projection or selection, the output folder (manifest, tokenizer,
model card), reloading and generating, and every bad input exiting 2 with one line and writing nothing."""

import hashlib
import os
import re

import pytest
import torch

from modeling_compressm import modeling_compressm_mamba as modeling1
from modeling_compressm import modeling_compressm_mamba2 as modeling2

if modeling2.MISSING_FROM_TRANSFORMERS or modeling1.MISSING_FROM_TRANSFORMERS:
    pytest.skip("this transformers release lacks the Mamba 5.x pieces; the models refuse there", allow_module_level=True)

from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM, Mamba2Config, Mamba2ForCausalLM  # noqa: E402

from modeling_compressm import (  # noqa: E402
    CompreSSMMamba2ForCausalLM,
    CompreSSMMambaForCausalLM,
    build_model_from_preset,
    byte_level_tokenizer,
)
from modeling_compressm.app.cli import main  # noqa: E402
from modeling_compressm.app.output_folder import MANIFEST_FILE  # noqa: E402
from modeling_compressm.app.selective_posthoc import CalibrationText, calibration_batches  # noqa: E402
from modeling_compressm.app.tokenization import save_tokenizer  # noqa: E402

VOCAB, STATE = 260, 8  # the byte-level tokenizer has 258 tokens
CORPUS = "".join(f"{index}: the selective scan keeps a small state and the reduction removes states.\n"
                 for index in range(40))
SMALL_CALIBRATION = ["--block-size", "16", "--calibration-batch-size", "2", "--calibration-batches", "3"]


def _stock_mamba2(seed=0) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    return Mamba2ForCausalLM(Mamba2Config(
        vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, state_size=STATE, n_groups=2, num_hidden_layers=2,
        chunk_size=8, expand=2, pad_token_id=257, bos_token_id=256, eos_token_id=256,
    )).eval()


def _stock_mamba(seed=0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    return MambaForCausalLM(MambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=STATE, num_hidden_layers=2, expand=2, time_step_rank=4,
        pad_token_id=257, bos_token_id=256, eos_token_id=256,
    )).eval()


def _save(model, folder, tokenizer=True):
    model.save_pretrained(folder)
    if tokenizer:
        save_tokenizer(byte_level_tokenizer(), str(folder))
    return folder


def _digests(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return str(path)


def _reduce(checkpoint, *arguments) -> int:
    return main(["reduce", str(checkpoint), *arguments])


def test_balanced_reduction_of_a_mamba2_checkpoint_with_per_layer_ranks(tmp_path, corpus, capsys):
    source = _save(CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()), tmp_path / "mamba2")
    before = _digests(source)
    target = tmp_path / "small"
    assert _reduce(source, "--dataset", corpus, "--ranks", "4", "6", *SMALL_CALIBRATION,
                   "--output-dir", str(target)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "state dims: [8, 8] -> [4, 6]" in out and "calibration: 3 batches of 2 x 16 tokens from" in out
    errors = [float(match.group(1)) for match in re.finditer(r"^\d+\s+\| 8 \| [46]\s+\| balanced \| \S+\s+\| (\S+)$",
                                                             out, re.M)]
    assert len(errors) == 2 and all(0 <= error < 1 for error in errors), out
    assert _digests(source) == before  # the source folder is untouched

    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert type(reloaded) is CompreSSMMamba2ForCausalLM and reloaded.config.state_dims == [4, 6]
    assert reloaded.config.channel_dims == [8, 8]  # balanced: N channels, projected to r
    # the command reduced exactly as model.reduce does on the same calibration batches
    expected = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()).eval()
    batches, _ = calibration_batches(CalibrationText(dataset=corpus, block_size=16, batch_size=2, batches=3),
                                     byte_level_tokenizer())
    expected.reduce([4, 6], calibration=batches, method="balanced")
    tokens = batches[0]
    with torch.no_grad():
        assert torch.allclose(reloaded(tokens).logits, expected(tokens).logits, atol=1e-6)
    assert {MANIFEST_FILE, "README.md", "tokenizer.json", "modeling_compressm_mamba2.py"} <= set(os.listdir(target))
    card = (target / "README.md").read_text()
    assert "- compressm" in card and "method: balanced; ranks: [4, 6]" in card and "| 1 | 8 | 6 |" in card

    assert main(["generate", str(target), "3: the", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("3: the")


def test_selection_by_energy_rule_in_place_gives_stock_mamba2_layers(tmp_path, capsys):
    source = _save(CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()), tmp_path / "mamba2")
    (source / "notes.txt").write_text("mine")
    assert _reduce(source, "--dataset", "synthetic", "--tau", "0.3", "--method", "select",
                   *SMALL_CALIBRATION) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(source)
    dims = reloaded.config.state_dims
    assert f"state dims: [8, 8] -> {dims}" in out and sum(dims) < 16 and "synthetic toy corpus" in out
    assert reloaded.config.channel_dims == dims  # selection: stock layers of the new size
    assert (source / "notes.txt").read_text() == "mine"
    generated = reloaded.generate(torch.tensor([[51, 52]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 5)


def test_a_transformers_mamba2_checkpoint_is_converted_and_reduced(tmp_path, corpus, capsys):
    source = _save(_stock_mamba2(), tmp_path / "stock")
    target = tmp_path / "small"
    assert _reduce(source, "--dataset", corpus, "--ranks", "4", *SMALL_CALIBRATION,
                   "--output-dir", str(target)) == 0, capsys.readouterr().err
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert type(reloaded) is CompreSSMMamba2ForCausalLM and reloaded.config.state_dims == [4, 4]


def test_mamba1_checkpoint_is_reduced_by_selection(tmp_path, corpus, capsys):
    source = _save(CompreSSMMambaForCausalLM.from_mamba(_stock_mamba()), tmp_path / "mamba")
    target = tmp_path / "small"
    assert _reduce(source, "--data-files", corpus, "--ranks", "5", "3", *SMALL_CALIBRATION,
                   "--output-dir", str(target)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "state dims: [8, 8] -> [5, 3]" in out and "select" in out
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert type(reloaded) is CompreSSMMambaForCausalLM and reloaded.config.state_dims == [5, 3]
    assert [tuple(block.mixer.A_log.shape) for block in reloaded.backbone.layers] == [(32, 5), (32, 3)]
    assert reloaded.generate(torch.tensor([[51, 52]]), max_new_tokens=3, do_sample=False).shape == (1, 5)
    assert "selection of the states" in (target / "README.md").read_text()


@pytest.mark.parametrize(
    "model, arguments, message",
    [
        ("mamba2", ["--ranks", "4"], r"needs calibration text: give --dataset FILE .*--dataset synthetic"),
        ("mamba2", ["--dataset", "{corpus}"], r"give --ranks \(new state sizes\) or --tau"),
        ("mamba2", ["--dataset", "{corpus}", "--ranks", "9"],
         r"--ranks: layer 0 has 8 states; its rank must lie in \[1, 8\], got 9"),
        ("mamba2", ["--dataset", "{corpus}", "--ranks", "4", "4", "4"],
         r"--ranks gives 3 values for a model of 2 layers"),
        ("mamba2", ["--dataset", "{corpus}", "--tau", "1.5"], r"tau must lie in \[0, 1\), got 1.5"),
        ("mamba2", ["--dataset", "{corpus}", "--ranks", "4", "--system", "real"], r"--system applies to CompreSSM LRU"),
        ("mamba2", ["--dataset", "{corpus}", "--ranks", "4", "--block-size", "1"], r"--block-size must be an int >= 2"),
        ("mamba2", ["--dataset", "{corpus}", "--ranks", "4", "--calibration-batches", "0"],
         r"--calibration-batches must be an int >= 1, got 0"),
        ("mamba2", ["--dataset", "{missing}", "--ranks", "4"], r"dataset file or folder '.*missing.txt' does not exist"),
        ("mamba2", ["--dataset", "{corpus}", "--ranks", "4", "--block-size", "100000"],
         r"holds \d+ tokens, fewer than one block of 100000"),
        ("mamba2-no-tokenizer", ["--dataset", "{corpus}", "--ranks", "4"], r"holds no tokenizer; pass --tokenizer"),
        ("mamba1", ["--dataset", "{corpus}", "--ranks", "4", "--method", "balanced"],
         r"method must be 'select' for Mamba-1 layers.*only selection is"),
        ("lru", ["--dataset", "{corpus}", "--tau", "0.1"], r"--dataset apply to Mamba-2 / Mamba checkpoints"),
        ("lru", ["--ranks", "4"], r"--ranks apply to Mamba-2 / Mamba checkpoints"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(model, arguments, message, tmp_path, corpus, capsys):
    builders = {
        "mamba2": lambda: CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()),
        "mamba2-no-tokenizer": lambda: CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()),
        "mamba1": lambda: CompreSSMMambaForCausalLM.from_mamba(_stock_mamba()),
        "lru": lambda: build_model_from_preset("tiny", seed=0),
    }
    source = _save(builders[model](), tmp_path / "ckpt", tokenizer=model != "mamba2-no-tokenizer")
    before = _digests(source)
    values = {"corpus": corpus, "missing": str(tmp_path / "missing.txt")}
    output_dir = tmp_path / "out"
    batching = SMALL_CALIBRATION[2:] if model != "lru" else []
    status = _reduce(source, *batching, *[argument.format(**values) for argument in arguments],
                     "--output-dir", str(output_dir))
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if line.startswith("compressm: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert not output_dir.exists() and _digests(source) == before
