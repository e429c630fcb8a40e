"""CompreSSM Mamba (Mamba-1): transformers' Mamba with a state size per layer, state selection from data post hoc.

A Mamba-1 layer decays every (channel, state) pair at its own rate, so only selection keeps a reduced layer exact
(`mamba_reduction.py`): a layer reduced to r states is a stock `MambaMixer` of state size r (the kept columns of
`A_log`, the kept B and C rows of `x_proj`). The layers are transformers' `MambaMixer` and `MambaBlock` built with the
layer's state size; forward, scan, kernels and cache are transformers' own.

This file is copied with checkpoints for `trust_remote_code` loading: it imports only transformers, torch and its flat
siblings (`configuration_compressm_mamba.py`, `layer_reduction.py`, `mamba_reduction.py`, `mamba2_reduction.py`,
`selective_ssm_surgery.py` and `modeling_compressm_mamba2.py` with their own flat imports).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from transformers import MambaForCausalLM, MambaModel
from transformers import __version__ as transformers_version
from transformers.models.mamba import modeling_mamba as _mamba

from .configuration_compressm_mamba import CompreSSMMambaConfig
from .layer_reduction import LayerReduction
from .mamba2_reduction import hankel_singular_values
from .mamba_reduction import MambaGramianStatistics, MambaScanInputs
from .modeling_compressm_mamba2 import MISSING_FROM_TRANSFORMERS as MISSING_FROM_TRANSFORMERS_MAMBA2
from .selective_ssm_surgery import (
    build_backbone,
    calibration_statistics,
    check_statistics_arguments,
    converted_copy,
    normalise_ranks_and_keep,
    reduce_mixer,
    sliced_linear,
)

# transformers 5.x pieces this model runs on: the Mamba modules whose cache holds a state size per layer.
MISSING_FROM_TRANSFORMERS = [name for name in ("mamba_scan_forward", "causal_conv1d_forward") if not hasattr(_mamba, name)]
MISSING_FROM_TRANSFORMERS += [name for name in MISSING_FROM_TRANSFORMERS_MAMBA2 if name.startswith("cache_utils")]


def require_supported_transformers() -> None:
    """Raise ImportError naming what is missing when this transformers release lacks the Mamba pieces used here."""
    if MISSING_FROM_TRANSFORMERS:
        raise ImportError(
            f"CompreSSM Mamba models need transformers' 5.x Mamba modules and lazily allocated linear-attention cache "
            f"(found transformers {transformers_version}, missing {', '.join(MISSING_FROM_TRANSFORMERS)}); "
            "upgrade with `pip install -U transformers`"
        )


class CompreSSMMambaMixer(_mamba.MambaMixer):
    """A stock `MambaMixer` built with `config.state_dims[layer_idx]` states, plus in-place state selection."""

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int):
        require_supported_transformers()
        layer_config = copy.copy(config)
        layer_config.state_size = config.state_dims[layer_idx]
        super().__init__(layer_config, layer_idx=layer_idx, initialize_mixer_weights=False)

    def scan_inputs_of(self, x_proj_input: torch.Tensor, x_proj_output: torch.Tensor) -> MambaScanInputs:
        """The scan inputs (detached) from what `x_proj` saw: input (batch, length, channels) after conv1d + SiLU and
        padding mask, output (batch, length, time_step_rank + 2 * state)."""
        time_step, B, C = torch.split(
            x_proj_output.detach(), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        return MambaScanInputs(
            hidden_states=x_proj_input.detach(),
            time_step=time_step @ self.dt_proj.weight.detach().T,
            B=B,
            C=C,
            A=-torch.exp(self.A_log.detach().double()),
            time_step_bias=self.dt_proj.bias.detach(),
            D=self.D.detach(),
        )

    @torch.no_grad()
    def apply_selection(self, keep: list[list[int]]) -> dict:
        """Keep states `keep[0]` (the sorted indices of the one group, as `normalise_ranks_and_keep` gives them):
        columns of `A_log`, B and C rows of `x_proj`; the layer becomes a stock `MambaMixer` of state size
        len(keep[0]). Returns {parameter name within the mixer: function slicing a tensor of the old parameter's shape
        like the parameter} (for optimizer moments)."""
        keep = keep[0]
        device = self.A_log.device
        state_index = torch.as_tensor(keep, device=device)
        rank, rows = self.time_step_rank, self.ssm_state_size
        x_proj_index = torch.cat([
            torch.arange(rank, device=device), rank + state_index, rank + rows + state_index
        ])
        self.x_proj = sliced_linear(self.x_proj, x_proj_index)
        self.A_log = nn.Parameter(self.A_log[:, state_index].contiguous())
        self.ssm_state_size = self.config.state_size = len(keep)

        def slice_x_proj(tensor):
            return tensor[x_proj_index.to(tensor.device)]

        def slice_A_log(tensor):
            return tensor[:, state_index.to(tensor.device)].contiguous()

        return {"x_proj.weight": slice_x_proj, "A_log": slice_A_log}


class CompreSSMMambaBlock(_mamba.MambaBlock):
    """`MambaBlock` (norm → mixer → residual) with a `CompreSSMMambaMixer`."""

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = _mamba.MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMambaMixer(config, layer_idx=layer_idx)


class CompreSSMMambaPreTrainedModel(_mamba.MambaPreTrainedModel):
    config_class = CompreSSMMambaConfig
    config: CompreSSMMambaConfig
    _no_split_modules = ["CompreSSMMambaBlock"]

    def _mixers(self) -> list[CompreSSMMambaMixer]:
        return [module for module in self.modules() if isinstance(module, CompreSSMMambaMixer)]

    def attach_gramian_statistics(self, accept=None) -> tuple[list[MambaGramianStatistics], list]:
        """Forward hooks on each mixer's `x_proj` that accumulate the layer's float64 Gramian sums (P, Q of shape
        (1, r, r)) from every forward pass of this model for which `accept(hooked module)` is True (None: every
        pass); a pre-hook on the model reads each pass's `attention_mask` keyword so padding is excluded.

        transformers' fused CUDA training path (`mamba_inner_fn`, with mamba_ssm kernels) never calls `x_proj`, so
        no statistics accumulate there; the statistics' `count` stays 0.

        Returns:
            (one `MambaGramianStatistics` per layer (model order), the hook handles: remove them to stop)."""
        mixers = self._mixers()
        statistics = [MambaGramianStatistics() for _ in mixers]
        current = {}

        def read_mask(module, args, kwargs):
            current["attention_mask"] = kwargs.get("attention_mask")

        def hook_for(mixer, layer_statistics):
            def hook(module, args, output):
                if accept is not None and not accept(module):
                    return
                with torch.no_grad():
                    layer_statistics.update(mixer.scan_inputs_of(args[0], output), current.get("attention_mask"))

            return hook

        handles = [self.register_forward_pre_hook(read_mask, with_kwargs=True)]
        handles += [mixer.x_proj.register_forward_hook(hook_for(mixer, s)) for mixer, s in zip(mixers, statistics)]
        return statistics, handles

    @torch.no_grad()
    def gramian_statistics(self, calibration: Iterable) -> list[MambaGramianStatistics]:
        """Run `calibration` batches (token-id tensors or dicts with input_ids/attention_mask; eval mode, no cache) and
        accumulate each layer's float64 Gramian sums (P, Q of shape (1, r, r), padding excluded). One
        `MambaGramianStatistics` per layer."""
        return calibration_statistics(self, calibration)

    def hankel_singular_values(self, calibration: Iterable) -> list[torch.Tensor]:
        """Data-driven HSVs per layer: float64 (1, r_layer), descending (singular values of Q^1/2 P^1/2)."""
        return [hankel_singular_values(*stats.gramians()) for stats in self.gramian_statistics(calibration)]

    def reduce(self, ranks=None, calibration: Iterable | None = None, method: str = "select", keep=None,
               statistics=None) -> list[LayerReduction]:
        """Shrink each layer's state in place by selection (the only exact reduction of a Mamba-1 layer).

        Args:
            ranks: an int (every layer) or a list with one int or None (unchanged) per layer.
            calibration: iterable of batches (token-id tensors or dicts with input_ids/attention_mask); needed unless
                every reduced layer has an explicit `keep`.
            method: "select" only: the kept states are the first r pivots of a column-pivoted (rank-revealing) QR of
                Q^1/2 P^1/2 of the layer's data Gramians.
            keep: optional list with, per layer, None or the state indices to keep.
            statistics: instead of `calibration`, one `MambaGramianStatistics` per layer already accumulated.
        Returns:
            one `LayerReduction` per layer (the type the LRU model's `reduce` returns): layer, status ("reduced" /
            "unchanged"), old_dim, new_dim, rank_requested, method, hsv (float64 (1, old_dim) or None),
            predicted_error (E‖Δy‖² of the scan output, or None), relative_error, kept_energy (1 - relative_error),
            keep (kept indices or None) and, for a reduced layer, change: a `LayerChange` keyed by full parameter
            names whose `slicers` slice tensors of the old parameters' shapes.
        """
        if method != "select":
            raise ValueError(
                f"method must be 'select' for Mamba-1 layers, got {method!r}: their decay differs per channel and "
                "state, so a dense projection of the state (balanced truncation) is not exact; only selection is"
            )
        mixers = self._mixers()
        ranks, keep = normalise_ranks_and_keep(ranks, keep, [m.ssm_state_size for m in mixers], [1] * len(mixers))
        needs_statistics = any(r is not None and k is None for r, k in zip(ranks, keep))
        check_statistics_arguments(needs_statistics, calibration, statistics, len(mixers))
        if statistics is None:
            statistics = self.gramian_statistics(calibration) if calibration is not None else [None] * len(mixers)
        names = {mixer: name for name, mixer in self.named_modules() if isinstance(mixer, CompreSSMMambaMixer)}
        results = []
        for layer, mixer in enumerate(mixers):
            result = reduce_mixer(mixer, layer, ranks[layer], keep[layer], statistics[layer], names[mixer] + ".")
            if result.keep is not None:  # one group: report the kept indices as one list
                result.keep = result.keep[0]
            results.append(result)
            self.config.state_dims[layer] = mixer.ssm_state_size
        return results


class CompreSSMMambaModel(CompreSSMMambaPreTrainedModel, MambaModel):
    """`MambaModel` whose layers run the per-layer state sizes of `config.state_dims`."""

    def __init__(self, config: CompreSSMMambaConfig):
        require_supported_transformers()
        CompreSSMMambaPreTrainedModel.__init__(self, config)
        build_backbone(self, config, CompreSSMMambaBlock, _mamba.MambaRMSNorm)


class CompreSSMMambaForCausalLM(CompreSSMMambaPreTrainedModel, MambaForCausalLM):
    """`MambaForCausalLM` on a `CompreSSMMambaModel`; generation caches a (batch, intermediate, r_layer) state."""

    def __init__(self, config: CompreSSMMambaConfig):
        require_supported_transformers()
        CompreSSMMambaPreTrainedModel.__init__(self, config)
        self.backbone = CompreSSMMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_mamba(cls, model: MambaForCausalLM) -> CompreSSMMambaForCausalLM:
        """Convert a transformers `MambaForCausalLM` (same weights, dtype, device; identical logits)."""
        if not isinstance(model, MambaForCausalLM) or isinstance(model, CompreSSMMambaPreTrainedModel):
            raise TypeError(f"from_mamba expects a transformers MambaForCausalLM, got {type(model).__name__}")
        return converted_copy(model, cls, CompreSSMMambaConfig, ("state_dims",))


__all__ = [
    "CompreSSMMambaMixer",
    "CompreSSMMambaPreTrainedModel",
    "CompreSSMMambaModel",
    "CompreSSMMambaForCausalLM",
    "require_supported_transformers",
]
