"""Named model presets: the JSON files of the repository's `hub_configs/` folder.

The folder ships inside the pip package as `modeling_compressm.hub_configs`, so presets load from any installation
(editable or not) without network access.

    from modeling_compressm.presets import load_preset, build_model_from_preset
    config = load_preset("digits")                      # CompreSSMConfig
    model = build_model_from_preset("tiny", seed=0)     # CompreSSMForCausalLM with the preset's sizes
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .configuration_compressm import CompreSSMConfig

__all__ = ["PRESETS_DIR", "list_presets", "preset_path", "load_preset", "model_class_for_config", "build_model_from_preset"]


def _find_presets_dir() -> Path:
    try:  # installed package (wheel or editable): modeling_compressm.hub_configs
        from importlib import resources

        folder = resources.files("modeling_compressm.hub_configs")
        candidate = Path(str(folder))
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    candidate = Path(__file__).resolve().parent.parent / "hub_configs"  # source checkout
    if candidate.is_dir():
        return candidate
    raise FileNotFoundError(
        "CompreSSM presets not found: neither the package data `modeling_compressm.hub_configs` nor a "
        "`hub_configs/` folder next to the package exists; reinstall the package"
    )


PRESETS_DIR = _find_presets_dir()


def list_presets() -> list[str]:
    """Sorted names of the available presets (file names without `.json`)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def preset_path(name: str) -> Path:
    """Path of the JSON file of preset `name`; ValueError naming the available presets when it does not exist."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"preset name must be a non-empty string, got {name!r}")
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(list_presets())}")
    return path


def load_preset(name: str, **overrides) -> CompreSSMConfig:
    """The CompreSSMConfig of preset `name` (or of a path to a JSON file), with keyword `overrides` applied.

    Overrides go through the config's validation, e.g. `load_preset("digits", state_dims=32)`.
    """
    path = Path(name) if isinstance(name, (str, os.PathLike)) and str(name).endswith(".json") else preset_path(name)
    if not path.is_file():
        raise ValueError(f"preset file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"preset file {str(path)!r} is not valid JSON: {error}") from error
    if values.get("model_type", CompreSSMConfig.model_type) != CompreSSMConfig.model_type:
        raise ValueError(f"preset {str(path)!r} has model_type {values['model_type']!r}, expected 'compressm'")
    values.pop("model_type", None)
    if "num_hidden_layers" in overrides and "state_dims" not in overrides:
        # keep the per-layer size of the preset when only the depth changes
        dims = values.get("state_dims", 64)
        values["state_dims"] = dims[0] if isinstance(dims, list) else dims
    values.update(overrides)
    return CompreSSMConfig(**values)


def model_class_for_config(config: CompreSSMConfig):
    """The model class named by `config.architectures` (CausalLM for token models, SequenceClassification for
    continuous-input classifiers when `architectures` is unset)."""
    from . import modeling_compressm as modeling

    names = getattr(config, "architectures", None) or (
        ["CompreSSMForSequenceClassification"] if config.input_dim is not None else ["CompreSSMForCausalLM"]
    )
    name = names[0]
    if name not in modeling.__all__ or not hasattr(modeling, name):
        raise ValueError(f"architectures[0]={name!r} is not a CompreSSM model class ({', '.join(modeling.__all__)})")
    return getattr(modeling, name)


def build_model_from_preset(name: str, seed: int | None = None, **overrides):
    """A freshly initialised model for preset `name` (class chosen by `model_class_for_config`)."""
    import torch

    config = load_preset(name, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return model_class_for_config(config)(config)
