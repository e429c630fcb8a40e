"""Named model presets: the JSON files of the repository's `hub_configs/` folder.

The folder ships inside the pip package as `modeling_compressm.hub_configs`, so presets load from any installation
(editable or not) without network access.

    from modeling_compressm.app.presets import load_preset, build_model_from_preset
    config = load_preset("digits")                      # CompreSSMConfig
    model = build_model_from_preset("tiny", seed=0)     # CompreSSMForCausalLM with the preset's sizes
    model = build_model_for_tokenizer("tiny", tokenizer) # vocabulary and special token ids from the tokenizer
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..configuration_compressm import CompreSSMConfig

__all__ = [
    "PRESETS_DIR",
    "list_presets",
    "preset_path",
    "load_preset",
    "model_class_for_config",
    "build_model_from_preset",
    "build_model_for_tokenizer",
]

logger = logging.getLogger(__name__)
TASKS = ("causal-lm", "classification")
# config entries a model built for a tokenizer does not inherit (serialisation bookkeeping, labels of another task)
_NOT_CARRIED_OVER = ("model_type", "transformers_version", "auto_map", "id2label", "label2id", "num_labels",
                     "architectures")


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
    from .. import modeling_compressm as modeling

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


def build_model_for_tokenizer(
    preset: str | CompreSSMConfig,
    tokenizer,
    *,
    task: str = "causal-lm",
    labels: list[str] | None = None,
    seed: int | None = None,
    **overrides,
):
    """A freshly initialised token model whose vocabulary follows `tokenizer`.

    The config's `vocab_size` becomes `len(tokenizer)` (a preset with another vocabulary is resized, and a warning
    says so), and its bos/eos/pad token ids are the tokenizer's. The pad id is left unset when it equals the eos or bos
    id (the embedding's `padding_idx` would freeze that token's embedding).

    Args:
        preset: preset name, path of a preset JSON file, or a `CompreSSMConfig` (not modified).
        tokenizer: any transformers tokenizer.
        task: "causal-lm" (`CompreSSMForCausalLM`) or "classification" (`CompreSSMForSequenceClassification`).
        labels: class names for "classification" (index = label id); at least two.
        seed: torch seed for the initialisation (None: the current RNG state).
        overrides: config fields, e.g. `state_dims=[32, 32]`.
    Returns:
        the model (its config's `architectures` names its class).
    """
    import torch

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(preset, CompreSSMConfig):
        name = "the given config"
        values = {key: value for key, value in preset.to_dict().items() if key not in _NOT_CARRIED_OVER}
        if "num_hidden_layers" in overrides and "state_dims" not in overrides:
            values["state_dims"] = values["state_dims"][0]
        values.update(overrides)
    else:
        name = f"preset {os.path.splitext(os.path.basename(str(preset)))[0]!r}"
        values = {key: value for key, value in load_preset(preset, **overrides).to_dict().items()
                  if key not in _NOT_CARRIED_OVER}
    if values.get("input_dim") is not None:
        raise ValueError(
            f"{name} takes continuous inputs (input_dim={values['input_dim']}); text needs a token preset such as "
            "tiny, lm-small or lm-base"
        )
    vocab_size = len(tokenizer)
    if values.get("vocab_size", 256) != vocab_size:
        logger.warning(
            "model vocabulary resized to follow the tokenizer: vocab_size %d of %s -> %d (len(tokenizer))",
            values.get("vocab_size", 256), name, vocab_size,
        )
    values["vocab_size"] = vocab_size
    special = {tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
    values["bos_token_id"] = tokenizer.bos_token_id
    values["eos_token_id"] = tokenizer.eos_token_id
    values["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id not in special else None
    if task == "causal-lm":
        values["architectures"] = ["CompreSSMForCausalLM"]
    else:
        if not labels or len(labels) < 2:
            raise ValueError(f"classification needs at least two labels, got {labels!r}")
        values["architectures"] = ["CompreSSMForSequenceClassification"]
        values["id2label"] = {index: str(label) for index, label in enumerate(labels)}
        values["label2id"] = {str(label): index for index, label in enumerate(labels)}
    config = CompreSSMConfig(**values)
    if seed is not None:
        torch.manual_seed(seed)
    return model_class_for_config(config)(config)
