"""Presets in hub_configs/: every file is a valid CompreSSMConfig, the small ones build working models, the paper
presets have the paper's sizes, and the folder ships inside the built wheel."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM, CompreSSMForSequenceClassification
from modeling_compressm.app.presets import (
    PRESETS_DIR,
    build_model_from_preset,
    list_presets,
    load_preset,
    model_class_for_config,
    preset_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"tiny", "lm-small", "lm-base", "smnist", "scifar", "digits"}
SMALL = {"tiny", "digits", "smnist", "lm-small"}


def test_every_repository_preset_is_listed():
    repo_files = {path.stem for path in (REPO_ROOT / "hub_configs").glob("*.json")}
    assert repo_files == EXPECTED
    assert set(list_presets()) == EXPECTED
    assert {path.stem for path in PRESETS_DIR.glob("*.json")} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_loads_with_from_json_file_and_load_preset(name):
    from_file = CompreSSMConfig.from_json_file(str(preset_path(name)))
    loaded = load_preset(name)
    assert from_file.state_dims == loaded.state_dims
    assert len(loaded.state_dims) == loaded.num_hidden_layers
    raw = json.loads(preset_path(name).read_text())
    assert raw["model_type"] == "compressm"
    for key, value in raw.items():
        if key != "model_type":
            assert getattr(loaded, key) == value, key
    # round trip through the config's own serialisation
    assert CompreSSMConfig.from_dict(loaded.to_dict()).state_dims == loaded.state_dims


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_builds_a_model(name):
    config = load_preset(name)
    model_class = model_class_for_config(config)
    expected_class = CompreSSMForSequenceClassification if config.input_dim is not None else CompreSSMForCausalLM
    assert model_class is expected_class
    if name not in SMALL:  # large presets: build on the meta device (shapes only, no memory, no init cost)
        with torch.device("meta"):
            model = model_class(config)
        assert [layer.state_dim for layer in model.lru_layers()] == config.state_dims
        assert sum(parameter.numel() for parameter in model.parameters()) > 1_000_000
        return
    model = build_model_from_preset(name, seed=0).eval()
    assert model.config.state_dims == config.state_dims
    with torch.no_grad():
        if config.input_dim is not None:
            logits = model(inputs_embeds=torch.randn(2, 16, config.input_dim)).logits
            assert logits.shape == (2, config.num_labels)
        else:
            logits = model(input_ids=torch.randint(0, config.vocab_size, (2, 16))).logits
            assert logits.shape == (2, 16, config.vocab_size)
    assert torch.isfinite(logits).all()


def test_paper_presets_match_the_paper():
    smnist = load_preset("smnist")
    assert (smnist.num_hidden_layers, smnist.state_dims, smnist.hidden_size) == (1, [256], 8)
    assert (smnist.input_dim, smnist.num_labels) == (1, 10)
    scifar = load_preset("scifar")
    assert (scifar.num_hidden_layers, scifar.state_dims, scifar.hidden_size) == (6, [384] * 6, 512)
    assert (scifar.input_dim, scifar.num_labels) == (3, 10)
    digits = load_preset("digits")
    assert (digits.input_dim, digits.num_labels, digits.num_hidden_layers) == (1, 10, 2)


def test_overrides_and_errors():
    assert load_preset("digits", state_dims=16).state_dims == [16, 16]
    assert load_preset("digits", num_hidden_layers=3).state_dims == [64, 64, 64]
    assert load_preset(str(preset_path("tiny"))).hidden_size == 16  # a path to a JSON file works too
    with pytest.raises(ValueError, match="unknown preset 'nope'.*digits"):
        load_preset("nope")
    with pytest.raises(ValueError, match="state_dims"):
        load_preset("digits", state_dims=[8])
    with pytest.raises(ValueError, match="does not exist"):
        load_preset("/nonexistent/preset.json")


def test_bad_preset_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preset(str(bad))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_preset(str(other))


def test_wheel_ships_the_presets(tmp_path):
    """A non-editable install gets hub_configs/ as modeling_compressm/hub_configs (package data)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("compressm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in EXPECTED:
        assert f"modeling_compressm/hub_configs/{preset}.json" in names
    assert "modeling_compressm/app/cli.py" in names and "modeling_compressm/app/presets.py" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    ).decode()
    assert "compressm = modeling_compressm.app.cli:main" in entry_points
