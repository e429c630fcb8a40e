"""Shared pieces of reducing selective-SSM layers (Mamba-2 and Mamba-1) in place: argument checks of `reduce`, the
calibration loop, slicing of linear / depthwise-conv layers to kept rows, conversion from transformers' models.

Part of the remote-code bundle (copied with checkpoints): imports only torch and its flat siblings
`mamba2_reduction.py` and `layer_reduction.py`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layer_reduction import LayerChange, LayerReduction
from .mamba2_reduction import (
    hankel_singular_values,
    normalise_keep,
    projection_error,
    select_states,
    selection_projection,
)


def sliced_linear(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new Linear holding the output rows `index` (LongTensor) of `linear` (same device and dtype)."""
    new = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[index])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[index])
    return new


def sliced_depthwise_conv(conv: nn.Conv1d, index: torch.Tensor) -> nn.Conv1d:
    """A new depthwise Conv1d holding the channels `index` (LongTensor) of `conv` (same device and dtype)."""
    new = nn.Conv1d(
        len(index), len(index), kernel_size=conv.kernel_size[0], groups=len(index),
        padding=conv.padding[0], bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight.copy_(conv.weight[index])
    if conv.bias is not None:
        new.bias.copy_(conv.bias[index])
    return new


def mixer_change(layer: int, prefix: str, mixer: nn.Module, previous: dict, slicers: dict,
                 replaced: list[str]) -> LayerChange:
    """The `LayerChange` of a Mamba mixer reduced in place, keyed by full parameter names (`prefix` + the name within
    the mixer). previous: {name within the mixer: Parameter} taken before the reduction; slicers: {name: function
    slicing a tensor of the previous parameter's shape} of the sliced parameters; replaced: names of the parameters
    replaced without a slicing relation."""
    current = dict(mixer.named_parameters())
    names = [*slicers, *replaced]
    return LayerChange(
        layer=layer,
        parameters={prefix + name: current[name] for name in names},
        previous={prefix + name: previous[name] for name in names if name in previous},
        slicers={prefix + name: slicer for name, slicer in slicers.items()},
    )


def record_reduction(result: LayerReduction, new_dim: int, change: LayerChange) -> None:
    """Mark `result` (with its hsv and predicted_error set, where known) as reduced to `new_dim` by `change`; fills
    relative_error = predicted_error / Σσ² and kept_energy = 1 - relative_error (None where unknown)."""
    total = float(result.hsv.pow(2).sum()) if result.hsv is not None else 0.0
    if result.predicted_error is not None and total:
        result.relative_error = result.predicted_error / total
        result.kept_energy = 1.0 - result.relative_error
    else:
        result.kept_energy = None
    result.status, result.new_dim, result.change = "reduced", new_dim, change


def reduce_mixer(mixer: nn.Module, layer: int, rank, keep, statistics, prefix: str, project=None) -> LayerReduction:
    """Reduce one Mamba-2 or Mamba-1 mixer in place to `rank` states; returns its `LayerReduction`.

    keep: None or the state indices to select, one sorted list per group (`normalise_ranks_and_keep`); statistics: the
    layer's accumulated Gramian statistics (None where `keep` is given); prefix: the mixer's name in the model plus
    ".". With `keep`, or without `project`, the layer is reduced by selection (`keep`, else the first `rank` pivots of
    `select_states`) through `mixer.apply_selection(keep)`; otherwise `project(mixer, gramians, hsv, rank)` projects
    its state in place and returns (predicted error, names of the replaced parameters). The (groups, r, r) math runs
    on CPU; the mixer's apply_* methods move results to the layer's device."""
    before = mixer.ssm_state_size
    gramians = tuple(g.cpu() for g in statistics.gramians()) if statistics is not None else None
    hsv = hankel_singular_values(*gramians) if gramians is not None else None
    result = LayerReduction(layer=layer, old_dim=before, new_dim=before, rank_requested=rank, hsv=hsv)
    if rank is None or (rank == before and keep is None):
        return result
    previous = dict(mixer.named_parameters())
    if keep is not None or project is None:
        if keep is None:
            keep = select_states(*gramians, rank)
        if gramians is not None:
            result.predicted_error = projection_error(*gramians, *selection_projection(keep, before))
        result.method, result.keep = "select", keep
        slicers, replaced = mixer.apply_selection(keep), []
    else:
        result.predicted_error, replaced = project(mixer, gramians, hsv, rank)
        result.method, slicers = "balanced", {}
    record_reduction(result, mixer.ssm_state_size, mixer_change(layer, prefix, mixer, previous, slicers, replaced))
    return result


def model_inputs(batch) -> dict:
    """A calibration batch (LongTensor of ids, or a mapping with input_ids/inputs_embeds/attention_mask) → kwargs."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if hasattr(batch, "keys"):
        inputs = {key: batch[key] for key in ("input_ids", "inputs_embeds", "attention_mask") if key in batch}
        if "input_ids" in inputs or "inputs_embeds" in inputs:
            return inputs
    raise TypeError(
        "calibration batches must be LongTensors of token ids (batch, length) or mappings with `input_ids` "
        f"(and optionally `attention_mask`), got {type(batch).__name__}"
    )


def normalise_ranks_and_keep(ranks, keep, state_sizes: list[int], groups: list[int]) -> tuple[list, list]:
    """`reduce`'s ranks and keep as one entry per layer (layers with `keep` get rank len(keep)); ValueError naming the
    layer for a wrong count, a rank outside [1, current size] or a rank that contradicts keep. Keeps are normalised
    to sorted index lists per group (`normalise_keep`)."""
    layers = len(state_sizes)
    ranks = [ranks] * layers if ranks is None or isinstance(ranks, int) else list(ranks)
    keep = [None] * layers if keep is None else list(keep)
    if len(ranks) != layers or len(keep) != layers:
        raise ValueError(f"ranks and keep need one entry per layer ({layers}), got {len(ranks)} and {len(keep)}")
    for layer, (size, layer_groups) in enumerate(zip(state_sizes, groups)):
        if keep[layer] is not None:
            keep[layer] = normalise_keep(keep[layer], layer_groups, size)
            if ranks[layer] is not None and ranks[layer] != len(keep[layer][0]):
                raise ValueError(f"layer {layer}: ranks gives {ranks[layer]} but keep selects {len(keep[layer][0])}")
            ranks[layer] = len(keep[layer][0])
        if ranks[layer] is not None and not 1 <= ranks[layer] <= size:
            raise ValueError(f"layer {layer}: rank must lie in [1, {size}] (its current state size), got {ranks[layer]}")
    return ranks, keep


def check_statistics_arguments(needs_statistics: bool, calibration, statistics, layers: int) -> None:
    """ValueError unless exactly the Gramian source `reduce` needs was given (calibration batches or per-layer
    statistics, not both)."""
    if needs_statistics and calibration is None and statistics is None:
        raise ValueError("reduce needs calibration batches (or an explicit keep for every reduced layer)")
    if statistics is not None and calibration is not None:
        raise ValueError("pass calibration batches or accumulated statistics, not both")
    if statistics is not None and len(statistics) != layers:
        raise ValueError(f"statistics needs one GramianStatistics per layer ({layers}), got {len(statistics)}")


@torch.no_grad()
def run_calibration(model: nn.Module, calibration: Iterable) -> None:
    """Forward each calibration batch through `model` in eval mode without cache, moved to the model's device; the
    train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        for batch in calibration:
            inputs = {key: value.to(model.device) for key, value in model_inputs(batch).items()}
            model(**inputs, use_cache=False)
    finally:
        model.train(was_training)


def calibration_statistics(model: nn.Module, calibration: Iterable) -> list:
    """The per-layer Gramian statistics of `model` (a Mamba-2 / Mamba model with `attach_gramian_statistics`) over
    the `calibration` batches (`run_calibration`); the hooks are removed afterwards."""
    statistics, handles = model.attach_gramian_statistics()
    try:
        run_calibration(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def converted_copy(model: nn.Module, model_class, config_class, own_fields: tuple[str, ...]) -> nn.Module:
    """`model_class(config_class(**model's config))` holding `model`'s weights, dtype, device and train/eval mode
    (strict state-dict load: the same parameter names and shapes). `own_fields`: config keys of the new class that the
    source config must not pass on (they default from it)."""
    settings = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", *own_fields):
        settings.pop(key, None)
    converted = model_class(config_class(**settings)).to(device=model.device, dtype=model.dtype)
    converted.load_state_dict(model.state_dict(), strict=True)
    converted.train(model.training)
    return converted


def build_backbone(model: nn.Module, config, block_class, norm_class) -> None:
    """Fill a Mamba/Mamba-2 backbone (`model`, already through `PreTrainedModel.__init__`) as transformers' own
    `__init__` does, with `block_class(config, layer_idx)` per layer (the per-layer state sizes), then `post_init`."""
    model.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
    model.layers = nn.ModuleList([block_class(config, layer_idx=index) for index in range(config.num_hidden_layers)])
    model.gradient_checkpointing = False
    model.norm_f = norm_class(config.hidden_size, eps=config.layer_norm_epsilon)
    model._register_load_state_dict_pre_hook(model.load_hook)
    model.post_init()
