"""CompreSSM Mamba-2: transformers' Mamba-2 with a state size per layer, data-driven state reduction post hoc.

A reduced layer keeps N channels of B and C through in_proj, conv1d and SiLU, then (balanced reduction) projects
B̃ = W B and C̃ = Vᵀ C per group, so the selective scan and the recurrent cache state run at r (shape (batch, heads,
head_dim, r)); a layer reduced by selection is a stock Mamba-2 layer of state size r. The layers subclass transformers'
`Mamba2Mixer` and use its conv, scan and cache functions (transformers 5.x API); the mixer's forward never calls the
fused `mamba2_split_conv1d_scan_combined` path, whose kernels would skip the projection.

This file is copied with checkpoints for `trust_remote_code` loading: it imports only transformers, torch and its flat
siblings `configuration_compressm_mamba2.py`, `layer_reduction.py`, `mamba2_reduction.py` and
`selective_ssm_surgery.py`.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from transformers import Mamba2ForCausalLM, Mamba2Model
from transformers import __version__ as transformers_version
from transformers.models.mamba2 import modeling_mamba2 as _mamba2

from .configuration_compressm_mamba2 import CompreSSMMamba2Config
from .layer_reduction import LayerReduction
from .mamba2_reduction import (
    GramianStatistics,
    ScanInputs,
    balanced_projection,
    hankel_singular_values,
    predicted_error,
    rank_for_output_energy,
)
from .selective_ssm_surgery import (
    build_backbone,
    calibration_statistics,
    check_statistics_arguments,
    converted_copy,
    normalise_ranks_and_keep,
    reduce_mixer,
    sliced_depthwise_conv,
    sliced_linear,
)

# transformers 5.x pieces this model runs on; older releases (e.g. 4.56) keep the Mamba-2 cache at one state size.
_REQUIRED = ("Mamba2Mixer", "Mamba2Block", "causal_conv1d_forward", "mamba2_scan_forward", "apply_mask_to_padding_states")
MISSING_FROM_TRANSFORMERS = [name for name in _REQUIRED if not hasattr(_mamba2, name)]
try:
    from transformers.cache_utils import LinearAttentionLayer as _LinearAttentionLayer  # noqa: F401 - feature probe
except ImportError:
    MISSING_FROM_TRANSFORMERS.append("cache_utils.LinearAttentionLayer")


def require_supported_transformers() -> None:
    """Raise ImportError naming what is missing when this transformers release lacks the Mamba-2 pieces used here."""
    if MISSING_FROM_TRANSFORMERS:
        raise ImportError(
            f"CompreSSM Mamba-2 models need transformers' 5.x Mamba-2 modules and lazily allocated linear-attention "
            f"cache (found transformers {transformers_version}, missing {', '.join(MISSING_FROM_TRANSFORMERS)}); "
            "upgrade with `pip install -U transformers`"
        )


def gpu_kernel_state_width(state_size: int) -> int:
    """State width the mamba_ssm Triton SSD kernels compute with: `max(next power of two, 16)` (their
    BLOCK_SIZE_DSTATE; the extra lanes are masked). A state of r < 16 costs those kernels as much as 16."""
    return max(16, 1 << (state_size - 1).bit_length())


def cuda_scan_kernels_in_use(model: nn.Module) -> bool:
    """True when `model` runs on CUDA where transformers routes the Mamba-2 scan to compiled kernels: mamba_ssm is
    installed (transformers calls its kernels for CUDA inputs) or the model uses Hub kernels (`use_kernels`)."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return False
    return importlib.util.find_spec("mamba_ssm") is not None or bool(getattr(model, "use_kernels", False))


def warn_if_padded_on_gpu_kernels(model: nn.Module, state_dims: dict[int, int]) -> None:
    """One warning naming the layers ({layer: new r}) whose state size the CUDA kernels pad (see
    `gpu_kernel_state_width`); nothing off CUDA or without those kernels."""
    padded = [(layer, r, gpu_kernel_state_width(r)) for layer, r in state_dims.items()
              if r != gpu_kernel_state_width(r)]
    if padded and cuda_scan_kernels_in_use(model):
        listed = ", ".join(f"layer {layer}: r={r} runs as {width}" for layer, r, width in padded)
        warnings.warn(
            f"the CUDA Mamba-2 scan kernels (mamba_ssm) pad the state to max(next power of two, 16), so these "
            f"reduced sizes buy no speed over the padded width ({listed}); choose r among 16, 32, 64, ... on GPU, "
            "or run the torch path, where the cost follows r",
            UserWarning,
            stacklevel=3,
        )


class Mamba2ScanInputs(nn.Module):
    """Identity on what the mixer feeds its scan, so forward hooks can read it (Gramian statistics).

    forward(hidden_states (batch, length, heads*head_dim), B, C (batch, length, groups*r), dt (batch, length, heads),
    attention_mask (batch, length) or None) returns (hidden_states, B, C, dt) unchanged."""

    def forward(self, hidden_states, B, C, dt, attention_mask=None):
        return hidden_states, B, C, dt


class CompreSSMMamba2Mixer(_mamba2.Mamba2Mixer):
    """A `Mamba2Mixer` whose in_proj/conv1d produce `channel_state_size` (N) B/C channels per group and whose scan runs
    at `ssm_state_size` (r). With r < N it holds `state_projection_in` W (groups, r, N) and `state_projection_out`
    V (groups, N, r): the scan receives B̃ = W B and C̃ = Vᵀ C."""

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int, project: bool | None = None):
        require_supported_transformers()
        channels, states = config.channel_dims[layer_idx], config.state_dims[layer_idx]
        layer_config = copy.copy(config)
        layer_config.state_size = channels
        super().__init__(layer_config, layer_idx=layer_idx, initialize_mixer_weights=False)
        self.channel_state_size = channels
        self.ssm_state_size = states
        self.scan_inputs = Mamba2ScanInputs()
        project = states < channels if project is None else project
        if project:
            self.state_projection_in = nn.Parameter(torch.empty(self.n_groups, states, channels))
            self.state_projection_out = nn.Parameter(torch.empty(self.n_groups, channels, states))
            self.reset_state_projection()
        else:
            self.register_parameter("state_projection_in", None)
            self.register_parameter("state_projection_out", None)

    @torch.no_grad()
    def reset_state_projection(self) -> None:
        """W = [I_r 0], V = Wᵀ in every group (keeps the first r channels)."""
        if self.state_projection_in is None:
            return
        eye = torch.eye(self.ssm_state_size, self.channel_state_size, dtype=self.state_projection_in.dtype)
        self.state_projection_in.copy_(eye.expand_as(self.state_projection_in))
        self.state_projection_out.copy_(eye.T.expand_as(self.state_projection_out))

    def project_states(self, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, length, groups*N) B, C → (batch, length, groups*r) W B and Vᵀ C (identity without a projection)."""
        if self.state_projection_in is None:
            return B, C
        batch, length, _ = B.shape
        B = B.view(batch, length, self.n_groups, self.channel_state_size)
        C = C.view(batch, length, self.n_groups, self.channel_state_size)
        B = torch.einsum("blgn,grn->blgr", B, self.state_projection_in.to(B.dtype))
        C = torch.einsum("blgn,gnr->blgr", C, self.state_projection_out.to(C.dtype))
        return B.reshape(batch, length, -1), C.reshape(batch, length, -1)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None, **kwargs):
        """hidden_states (batch, length, hidden) → (batch, length, hidden); reads/updates `cache` (conv state with
        N channels per group, recurrent state (batch, heads, head_dim, r)). Always the torch/kernelizable path."""
        dtype = hidden_states.dtype
        hidden_states = _mamba2.apply_mask_to_padding_states(hidden_states, attention_mask)
        gate, conv_input, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        conv_output = _mamba2.causal_conv1d_forward(
            self.conv1d, conv_input.transpose(1, 2), cache, self.layer_idx, activation=self.activation, **kwargs
        )
        conv_output = _mamba2.apply_mask_to_padding_states(conv_output.transpose(1, 2), attention_mask)
        bc_width = self.n_groups * self.channel_state_size
        scan_hidden, B, C = torch.split(conv_output, [self.intermediate_size, bc_width, bc_width], dim=-1)
        B, C = self.project_states(B, C)
        scan_hidden, B, C, dt = self.scan_inputs(scan_hidden, B, C, dt, attention_mask)
        scan_output = _mamba2.mamba2_scan_forward(self, scan_hidden, B, C, dt, cache, **kwargs)
        scan_output = self.norm(scan_output, gate)
        return self.out_proj(scan_output.to(dtype))

    def scan_inputs_of(self, hidden_states, B, C, dt) -> ScanInputs:
        """Bundle the scan inputs seen by `scan_inputs` with this layer's parameters (detached) for the math module."""
        return ScanInputs(
            hidden_states=hidden_states.detach(),
            B=B.detach(),
            C=C.detach(),
            dt=dt.detach(),
            A=-torch.exp(self.A_log.detach().double()),
            dt_bias=self.dt_bias.detach(),
            D=self.D.detach(),
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            n_groups=self.n_groups,
            dt_limit=tuple(self.time_step_limit),
        )

    # --- in-place reduction (called by the model's `reduce`) ---

    @torch.no_grad()
    def apply_projection(self, V: torch.Tensor, W: torch.Tensor) -> None:
        """Compose a projection of the current r-dim state: V (groups, r, r'), W (groups, r', r), W V = I → r'."""
        dtype, device = self.in_proj.weight.dtype, self.in_proj.weight.device
        V, W = V.to(dtype=dtype, device=device), W.to(dtype=dtype, device=device)
        if self.state_projection_in is not None:
            W, V = W @ self.state_projection_in, self.state_projection_out @ V
        self.state_projection_in = nn.Parameter(W.contiguous())
        self.state_projection_out = nn.Parameter(V.contiguous())
        self.ssm_state_size = W.shape[1]

    @torch.no_grad()
    def apply_selection(self, keep: list[list[int]]) -> dict:
        """Keep state channels `keep[g]` of group g (sorted, equal lengths): slices W/V if projected, else the B and C
        rows of in_proj and channels of conv1d, giving a stock Mamba-2 layer of state size len(keep[0]).

        Returns {parameter name within the mixer: function slicing a tensor of the old parameter's shape like the
        parameter} (for optimizer moments)."""
        rank = len(keep[0])
        if self.state_projection_in is not None:
            rows = torch.stack([torch.as_tensor(k) for k in keep]).to(self.state_projection_in.device)
            groups = torch.arange(self.n_groups, device=rows.device)[:, None]

            def slice_in(tensor):  # (groups, r, N) → rows keep[g] of group g
                return tensor[groups, rows]

            def slice_out(tensor):  # (groups, N, r) → columns keep[g] of group g
                return tensor.transpose(1, 2)[groups, rows].transpose(1, 2).contiguous()

            self.state_projection_in = nn.Parameter(slice_in(self.state_projection_in))
            self.state_projection_out = nn.Parameter(slice_out(self.state_projection_out))
            self.ssm_state_size = rank
            return {"state_projection_in": slice_in, "state_projection_out": slice_out}
        n, groups, inner = self.channel_state_size, self.n_groups, self.intermediate_size
        b_channels = [inner + g * n + i for g in range(groups) for i in keep[g]]
        c_channels = [inner + groups * n + g * n + i for g in range(groups) for i in keep[g]]
        conv_channels = list(range(inner)) + b_channels + c_channels
        proj_rows = (
            list(range(inner))
            + [inner + c for c in conv_channels]
            + list(range(inner + self.conv_dim, inner + self.conv_dim + self.num_heads))
        )
        proj_index = torch.as_tensor(proj_rows, device=self.in_proj.weight.device)
        conv_index = torch.as_tensor(conv_channels, device=self.conv1d.weight.device)
        self.in_proj = sliced_linear(self.in_proj, proj_index)
        self.conv1d = sliced_depthwise_conv(self.conv1d, conv_index)
        self.conv_dim = len(conv_channels)
        self.channel_state_size = self.ssm_state_size = rank

        def slice_rows(index):
            return lambda tensor: tensor[index.to(tensor.device)]

        slicers = {"in_proj.weight": slice_rows(proj_index), "conv1d.weight": slice_rows(conv_index)}
        if self.in_proj.bias is not None:
            slicers["in_proj.bias"] = slice_rows(proj_index)
        if self.conv1d.bias is not None:
            slicers["conv1d.bias"] = slice_rows(conv_index)
        return slicers


class CompreSSMMamba2Block(_mamba2.Mamba2Block):
    """`Mamba2Block` (norm → mixer → residual) with a `CompreSSMMamba2Mixer`."""

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = _mamba2.Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMamba2Mixer(config, layer_idx=layer_idx)


class CompreSSMMamba2PreTrainedModel(_mamba2.Mamba2PreTrainedModel):
    config_class = CompreSSMMamba2Config
    config: CompreSSMMamba2Config
    _no_split_modules = ["CompreSSMMamba2Block"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CompreSSMMamba2Mixer) and module.state_projection_in is not None:
            from transformers import initialization as init

            eye = torch.eye(module.ssm_state_size, module.channel_state_size)
            init.copy_(module.state_projection_in, eye.expand_as(module.state_projection_in))
            init.copy_(module.state_projection_out, eye.T.expand_as(module.state_projection_out))

    def _mixers(self) -> list[CompreSSMMamba2Mixer]:
        return [module for module in self.modules() if isinstance(module, CompreSSMMamba2Mixer)]

    def attach_gramian_statistics(self, accept=None) -> tuple[list[GramianStatistics], list]:
        """Forward hooks on each mixer's `scan_inputs` that accumulate the layer's float64 Gramian sums of the states
        the scan runs now (size r per layer) from every forward pass for which `accept(hooked module)` is True
        (None: every pass), padding excluded, inputs detached.

        Returns:
            (one `GramianStatistics` per layer (model order), the hook handles: remove them to stop)."""
        mixers = self._mixers()
        statistics = [GramianStatistics() for _ in mixers]
        handles = [
            mixer.scan_inputs.register_forward_hook(_statistics_hook(mixer, stats, accept))
            for mixer, stats in zip(mixers, statistics)
        ]
        return statistics, handles

    @torch.no_grad()
    def gramian_statistics(self, calibration: Iterable) -> list[GramianStatistics]:
        """Run `calibration` batches (eval mode, no cache, moved to the model's device) and accumulate each layer's
        float64 Gramian sums of the states the scan runs now (size r per layer). Returns one `GramianStatistics` per
        layer."""
        return calibration_statistics(self, calibration)

    def hankel_singular_values(self, calibration: Iterable) -> list[torch.Tensor]:
        """Data-driven HSVs per layer: float64 (groups, r_layer), descending, from `calibration` batches."""
        return [hankel_singular_values(*stats.gramians()) for stats in self.gramian_statistics(calibration)]

    def reduce(
        self, ranks=None, calibration: Iterable | None = None, method: str = "balanced", keep=None, statistics=None,
        tolerance: float | None = None,
    ) -> list[LayerReduction]:
        """Shrink the scan state of each layer in place.

        Args:
            ranks: an int (every layer) or a list with one int or None (unchanged) per layer.
            calibration: iterable of batches (token-id tensors or dicts with input_ids/attention_mask); needed unless
                every reduced layer has an explicit `keep`.
            method: "balanced" (square-root balancing of the data Gramians: the layer keeps N conv channels and
                projects B, C to r) or "select" (keep r state channels picked by pivoted QR of Q^1/2 P^1/2: a stock
                Mamba-2 layer of state size r).
            keep: optional list with, per layer, None or the state indices to select (one list for all groups, or one
                per group); a layer with `keep` is reduced by selection to len(keep) states.
            statistics: instead of `calibration`, one `GramianStatistics` per layer already accumulated (e.g. from
                training batches by forward hooks on each mixer's `scan_inputs`).
            tolerance: instead of `ranks`, pick per layer the smallest r whose predicted scan-output error
                Σ_{i>r} σ_i² is at most tolerance · Σσ² (`rank_for_output_energy`); layers where that r is not smaller
                than the current size stay unchanged.
        Returns:
            one `LayerReduction` per layer (the type the LRU model's `reduce` returns): layer, status ("reduced" /
            "unchanged"), old_dim, new_dim, rank_requested, method, hsv (float64 (groups, old_dim) or None),
            predicted_error (E‖Δy‖² of the scan output, or None), relative_error (predicted_error / Σσ², or None),
            kept_energy (1 - relative_error), keep (selected indices per group, or None) and, for a reduced layer,
            change: a `LayerChange` keyed by full parameter names, whose `slicers` slice tensors of a selected
            parameter's old shape (selection) and whose other parameters are new (balanced projections).
        """
        if method not in ("balanced", "select"):
            raise ValueError(f"method must be 'balanced' or 'select', got {method!r}")
        mixers = self._mixers()
        layers = len(mixers)
        ranks, keep = normalise_ranks_and_keep(
            ranks, keep, [mixer.ssm_state_size for mixer in mixers], [mixer.n_groups for mixer in mixers]
        )
        if tolerance is not None and any(r is not None for r, k in zip(ranks, keep) if k is None):
            raise ValueError("pass ranks or tolerance, not both")
        needs_statistics = tolerance is not None or any(r is not None and k is None for r, k in zip(ranks, keep))
        check_statistics_arguments(needs_statistics, calibration, statistics, layers)
        if statistics is None:
            statistics = self.gramian_statistics(calibration) if calibration is not None else [None] * layers
        if tolerance is not None:
            for layer, mixer in enumerate(mixers):
                if keep[layer] is None:
                    hsv = hankel_singular_values(*statistics[layer].gramians())
                    rank = rank_for_output_energy(hsv, tolerance)
                    ranks[layer] = rank if rank < mixer.ssm_state_size else None
        names = {mixer: name for name, mixer in self.named_modules() if isinstance(mixer, CompreSSMMamba2Mixer)}
        results = []
        for layer, mixer in enumerate(mixers):
            project = _project_balanced if method == "balanced" else None
            results.append(
                reduce_mixer(mixer, layer, ranks[layer], keep[layer], statistics[layer], names[mixer] + ".", project)
            )
            self.config.state_dims[layer] = mixer.ssm_state_size
            self.config.channel_dims[layer] = mixer.channel_state_size
        warn_if_padded_on_gpu_kernels(self, {entry.layer: entry.new_dim for entry in results if entry.reduced})
        return results


def _statistics_hook(mixer: CompreSSMMamba2Mixer, statistics: GramianStatistics, accept=None):
    def hook(module, args, output):
        if accept is not None and not accept(module):
            return
        with torch.no_grad():
            mask = args[4] if len(args) > 4 else None
            statistics.update(mixer.scan_inputs_of(*output), mask)

    return hook


def _project_balanced(mixer, gramians, hsv, rank: int) -> tuple[float, list[str]]:
    """Balanced reduction of one mixer (`selective_ssm_surgery.reduce_mixer`'s `project`): the layer keeps its N conv
    channels and projects B, C to `rank`; returns (predicted error, names of the new projection parameters)."""
    V, W, _ = balanced_projection(*gramians, rank)
    mixer.apply_projection(V, W)
    return predicted_error(hsv, rank), ["state_projection_in", "state_projection_out"]


class CompreSSMMamba2Model(CompreSSMMamba2PreTrainedModel, Mamba2Model):
    """`Mamba2Model` whose layers run the per-layer state sizes of `config.state_dims`."""

    def __init__(self, config: CompreSSMMamba2Config):
        require_supported_transformers()
        CompreSSMMamba2PreTrainedModel.__init__(self, config)
        build_backbone(self, config, CompreSSMMamba2Block, _mamba2.Mamba2RMSNorm)


class CompreSSMMamba2ForCausalLM(CompreSSMMamba2PreTrainedModel, Mamba2ForCausalLM):
    """`Mamba2ForCausalLM` on a `CompreSSMMamba2Model`; generation caches a (batch, heads, head_dim, r_layer) state."""

    def __init__(self, config: CompreSSMMamba2Config):
        require_supported_transformers()
        CompreSSMMamba2PreTrainedModel.__init__(self, config)
        self.backbone = CompreSSMMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_mamba2(cls, model: Mamba2ForCausalLM) -> CompreSSMMamba2ForCausalLM:
        """Convert a transformers `Mamba2ForCausalLM` (same weights, dtype, device; identical logits)."""
        if not isinstance(model, Mamba2ForCausalLM):
            raise TypeError(f"from_mamba2 expects a transformers Mamba2ForCausalLM, got {type(model).__name__}")
        return converted_copy(model, cls, CompreSSMMamba2Config, ("state_dims", "channel_dims"))


__all__ = [
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2PreTrainedModel",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2ForCausalLM",
    "require_supported_transformers",
]
