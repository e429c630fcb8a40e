"""CompreSSM models: stacks of Linear Recurrent Units (LRU) whose per-layer state sizes shrink during training.

One LRU layer (complex diagonal recurrence, real input/output of width H, complex state of size N):

    lam = exp(-exp(nu_log) + i exp(theta_log)),  B~ = (B_re + i B_im) * exp(gamma_log)
    h_k = lam * h_{k-1} + B~ u_k,                y_k = Re(C h_k) + D * u_k

Block (pre-norm residual, as in the CompreSSM paper): x + Dropout(GLU(Dropout(GELU(LRU(Norm(x)))))),
GLU(z) = W1 z * sigmoid(W2 z).

Fast/slow path: `scan.lru_sequence` sends CUDA tensors to the fused Triton kernel when the `compressm_kernels` package
is installed, everything else to the torch scan. Reduction math lives in `reduction.py` (no nn code there).

Generation keeps one recurrent state per layer in a `CompreSSMCache`; `forward` takes it as `cache` (transformers >=
5.24) or `past_key_values` (earlier releases). Padded steps (attention_mask 0) feed nothing into the recurrence and
hold the state. The forward never reads tensor data on accelerators or while torch.compile / torch.export trace:
value checks of inputs (mask entries, token ids, empty classifier rows) run on CPU tensors in eager mode only.

Longer than 500 lines on purpose: one readable modeling file per model is the Hugging Face convention, and
`save_pretrained` copies it (with its flat sibling imports) for `trust_remote_code` loading.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import sys

import torch
import torch.nn.functional as F
import torch.utils._pytree as _pytree
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from .configuration_compressm import CompreSSMConfig
from .layer_reduction import LayerChange, LayerReduction
from .events import (
    HISTORY_FILE,
    HistoryError,
    ReductionEvent,
    coerce_events,
    history_problems,
    read_history,
    weights_disagreement,
    write_history,
)
from .reduction import (
    ReductionError,
    balance,
    balanced_truncation,
    check_system,
    gain_lower_bound,
    hinf_error_bound,
    lru_parameters_from_system,
    truncate,
)
from .scan import host_reads_are_free, lru_sequence

# `reduction` imports `real_map` lazily; importing it here too puts it among the modeling file's own relative imports,
# which is all that transformers < 5 copies into its module cache when it loads a remote-code checkpoint from a folder.
from .real_map import balance_real_map as _balance_real_map  # noqa: F401

logger = logging.getLogger(__name__)
_warn_once = functools.lru_cache(maxsize=None)(logger.warning)


class CompreSSMRMSNorm(nn.Module):
    """RMSNorm over the last dimension: x / rms(x) * weight, computed in fp32. x: (..., H)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * hidden_states).to(dtype)


def _make_norm(config: CompreSSMConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return CompreSSMRMSNorm(config.hidden_size, eps=config.norm_eps)


class CompreSSMLRU(nn.Module):
    """Linear Recurrent Unit with complex diagonal state of size `state_dim`.

    Parameters are real tensors (safetensors has no complex dtype), kept in fp32:
        nu_log, theta_log, gamma_log: (N,)     B_re, B_im: (N, H)     C_re, C_im: (H, N)     D: (H,)
    """

    def __init__(self, hidden_size: int, state_dim: int, r_min: float = 0.9, r_max: float = 0.999, max_phase: float = 6.28):
        super().__init__()
        self.hidden_size = hidden_size
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self.nu_log = nn.Parameter(torch.empty(state_dim))
        self.theta_log = nn.Parameter(torch.empty(state_dim))
        self.gamma_log = nn.Parameter(torch.empty(state_dim))
        self.B_re = nn.Parameter(torch.empty(state_dim, hidden_size))
        self.B_im = nn.Parameter(torch.empty(state_dim, hidden_size))
        self.C_re = nn.Parameter(torch.empty(hidden_size, state_dim))
        self.C_im = nn.Parameter(torch.empty(hidden_size, state_dim))
        self.D = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    @property
    def state_dim(self) -> int:
        return self.nu_log.shape[0]

    def ssm_parameters(self) -> list[nn.Parameter]:
        """The parameters that a reduction replaces (all but D)."""
        return [self.nu_log, self.theta_log, self.gamma_log, self.B_re, self.B_im, self.C_re, self.C_im]

    @torch.no_grad()
    def reset_parameters(self, names: list[str] | tuple[str, ...] | None = None) -> None:
        """LRU initialisation: |lam| uniform (in area) on the ring [r_min, r_max], phase uniform on [0, max_phase],
        gamma = sqrt(1 - |lam|^2), B ~ N(0, 1/(2H)) per part, C ~ N(0, 1/N) per part, D ~ N(0, 1).

        Args:
            names: initialise only these parameters (names in PARAMETER_NAMES; default: all). The others keep their
                values; a fresh gamma_log is computed from the layer's nu_log, kept or new (from a fresh draw while
                the kept nu_log is not loaded yet).
        """
        names = self.PARAMETER_NAMES if names is None else tuple(names)
        unknown = sorted(set(names) - set(self.PARAMETER_NAMES))
        if unknown:
            raise KeyError(f"{unknown} are not parameters of CompreSSMLRU ({self.PARAMETER_NAMES})")
        n, h = self.state_dim, self.hidden_size
        # Draw where the initialised tensors live: transformers < 5 initialises missing tensors while the loaded
        # ones still wait on the meta device.
        targets = [getattr(self, name) for name in names]
        device = next((tensor.device for tensor in targets if not tensor.is_meta), self.nu_log.device)
        u1 = torch.rand(n, device=device)
        u2 = torch.rand(n, device=device)
        modulus_sq = u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2
        nu_log = torch.log(-0.5 * torch.log(modulus_sq))
        if "nu_log" in names:
            self.nu_log.copy_(nu_log)
        if "theta_log" in names:
            self.theta_log.copy_(torch.log(self.max_phase * u2 + 1e-8))
        if "gamma_log" in names:
            kept_nu_log = nu_log if self.nu_log.is_meta and not self.gamma_log.is_meta else self.nu_log
            modulus = torch.exp(-torch.exp(kept_nu_log))
            self.gamma_log.copy_(torch.log(torch.sqrt(1 - modulus**2)))
        for name, std in (("B_re", 1.0 / math.sqrt(2 * h)), ("B_im", 1.0 / math.sqrt(2 * h)),
                          ("C_re", 1.0 / math.sqrt(n)), ("C_im", 1.0 / math.sqrt(n)), ("D", 1.0)):
            if name in names:
                getattr(self, name).normal_(0.0, std)

    SSM_PARAMETER_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")
    PARAMETER_NAMES = SSM_PARAMETER_NAMES + ("D",)

    @torch.no_grad()
    def assign_parameters(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Give SSM parameters new values of any state size, keeping the Parameter objects.

        Each parameter gets a fresh tensor under the same object (`torch.utils.swap_tensors`), so optimizers and
        module references stay valid, and an autograd graph of an earlier step that is still alive (a training loop
        that still holds `loss`) cannot hand the next backward its gradient accumulator, which remembers the old
        shape; hooks registered on the parameter (`register_hook`, `register_post_accumulate_grad_hook`) keep firing.
        Where other holders of the tensor forbid the swap (a DDP reducer that is about to be rebuilt), the value is
        set through `.data`, passing through another dtype first: `set_data` drops the cached gradient accumulator
        only when the dtype changes. Gradients of the assigned parameters are dropped.

        Args:
            values: name (in SSM_PARAMETER_NAMES) -> tensor of the new shape (converted to the parameter's
                dtype/device).
        Returns:
            name -> the previous values (the old tensors, not copies).
        """
        previous = {}
        for name, value in values.items():
            if name not in self.SSM_PARAMETER_NAMES:
                raise KeyError(f"{name!r} is not an SSM parameter of CompreSSMLRU ({self.SSM_PARAMETER_NAMES})")
            parameter = getattr(self, name)
            previous[name] = parameter.detach()
            new_value = value.detach().to(device=parameter.device, dtype=parameter.dtype).contiguous()
            replacement = nn.Parameter(new_value, requires_grad=parameter.requires_grad)
            replacement.__dict__.update(parameter.__dict__)  # attributes set on the parameter survive the swap
            try:
                torch.utils.swap_tensors(parameter, replacement)
                for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):
                    registered = getattr(parameter, hooks, None)
                    if registered:  # tensor hooks stay with the object: register them with its new autograd identity
                        setattr(parameter, hooks, registered)
            except RuntimeError:
                other = torch.float64 if parameter.dtype != torch.float64 else torch.float32
                parameter.data = new_value.to(other)
                parameter.data = new_value
            parameter.grad = None
        return previous

    @torch.no_grad()
    def resize_state(self, state_dim: int, initialise: bool = True) -> dict[str, torch.Tensor]:
        """Re-allocate the SSM parameters at `state_dim` states (Parameter objects kept) and, with `initialise`,
        re-initialise them; without, their values are undefined until written (no random numbers are drawn).
        Returns the previous values (name -> tensor)."""
        shapes = {
            "nu_log": (state_dim,), "theta_log": (state_dim,), "gamma_log": (state_dim,),
            "B_re": (state_dim, self.hidden_size), "B_im": (state_dim, self.hidden_size),
            "C_re": (self.hidden_size, state_dim), "C_im": (self.hidden_size, state_dim),
        }
        previous = self.assign_parameters({name: torch.empty(shape) for name, shape in shapes.items()})
        if initialise:
            self.reset_parameters()
        return previous

    def to_lti(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer as a linear time-invariant system, differentiable w.r.t. the parameters.

        Returns:
            lam complex64 (N,), B complex64 (N, H) with the gain exp(gamma_log) included, C complex64 (H, N),
            D float32 (H,).
        """
        lam, B, C = self.system_from_parameters(
            self.nu_log, self.theta_log, self.gamma_log, self.B_re, self.B_im, self.C_re, self.C_im
        )
        return lam, B, C, self.D.float()

    @staticmethod
    def system_from_parameters(nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im):
        """(lam complex64 (N,), B complex64 (N, H) with the gain exp(gamma_log), C complex64 (H, N)) of LRU parameter
        tensors nu_log, theta_log, gamma_log (N,), B_re, B_im (N, H), C_re, C_im (H, N) (any float dtype), e.g. taken
        from a state dict."""
        nu, theta, gamma = nu_log.float(), theta_log.float(), gamma_log.float()
        lam = torch.exp(torch.complex(-torch.exp(nu), torch.exp(theta)))
        B = torch.complex(B_re.float(), B_im.float()) * torch.exp(gamma)[:, None]
        C = torch.complex(C_re.float(), C_im.float())
        return lam, B, C

    @staticmethod
    def parameters_from_system(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> dict[str, torch.Tensor]:
        """LRU parameter values (float64) of the diagonal system lam (r,), B (r, H) gain included, C (H, r).
        Raises ReductionError if the system is not representable (|lam| >= 1, zero modulus, non-finite)."""
        nu_log, theta_log, gamma_log, B_normalised = lru_parameters_from_system(lam, B)
        C = C.detach().to(torch.complex128)
        return {
            "nu_log": nu_log,
            "theta_log": theta_log,
            "gamma_log": gamma_log,
            "B_re": B_normalised.real,
            "B_im": B_normalised.imag,
            "C_re": C.real,
            "C_im": C.imag,
        }

    @torch.no_grad()
    def load_system(self, lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replace the SSM parameters by those of the diagonal system (lam (r,), B (r, H) gain included, C (H, r)).

        The Parameter objects are kept (see `assign_parameters`); their gradients are dropped. Raises ReductionError
        if the system is not representable, before anything changes. Returns the previous values (name -> tensor).
        """
        return self.assign_parameters(self.parameters_from_system(lam, B, C))

    def forward(
        self,
        hidden_states: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        step_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (batch, L, H) -> (y (batch, L, H) same dtype, final state complex64 (batch, N))."""
        lam, B, C, D = self.to_lti()
        return lru_sequence(hidden_states, lam, B, C, D, initial_state=initial_state, step_mask=step_mask)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, state_dim={self.state_dim}"


class CompreSSMBlock(GradientCheckpointingLayer):
    """x + Dropout(GLU(Dropout(GELU(LRU(Norm(x)))))), x: (batch, L, H). Supports gradient checkpointing (the model
    runs without a cache while checkpointing, as every transformers model does)."""

    def __init__(self, config: CompreSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = _make_norm(config)
        self.lru = CompreSSMLRU(
            config.hidden_size, config.state_dims[layer_idx], config.r_min, config.r_max, config.max_phase
        )
        self.glu_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        step_mask: torch.Tensor | None = None,
        cache: CompreSSMCache | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        initial_state = cache.get_state(self.layer_idx) if cache is not None else None
        mixed, final_state = self.lru(self.norm(hidden_states), initial_state=initial_state, step_mask=step_mask)
        if cache is not None:
            cache.set_state(self.layer_idx, final_state)
        mixed = self.dropout(F.gelu(mixed))
        value, gate = self.glu_proj(mixed).chunk(2, dim=-1)
        return residual + self.dropout(value * torch.sigmoid(gate))


# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`. Outputs are built
# with the field name of the installed release; `forward` accepts both names.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CompreSSMStateLayer:
    """The recurrent state of one block in a `CompreSSMCache`: complex64 (batch, N_i), or None before the first step."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        self.state: torch.Tensor | None = None

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state[indices]

    def get_max_length(self) -> int:
        return -1


class CompreSSMCache(Cache):
    """Generation cache of a CompreSSM model: one recurrent state per layer (complex64 (batch, N_i); the sizes differ
    between layers after a reduction) and the number of steps consumed so far (`get_seq_length`, padded steps included).

    The cache is self-contained (it does not build on the linear-attention cache layers of transformers, whose interface
    changes between releases): `get_state(i)` / `set_state(i, state)` read and write layer i, beam search reorders the
    states through `reorder_cache`. A recurrent state cannot be rolled back, so `crop` (assisted decoding) is refused.
    """

    is_compileable = False

    def __init__(self, config: CompreSSMConfig | None = None, *, state_dims: list[int] | None = None):
        if (config is None) == (state_dims is None):
            raise ValueError("create a CompreSSMCache from the model config (or from its state_dims)")
        state_dims = list(config.state_dims if config is not None else state_dims)
        super().__init__(layers=[CompreSSMStateLayer() for _ in state_dims])
        self.state_dims = state_dims
        self.seen_steps = 0

    # ----------------------------------------------------------------------------------------------- state access
    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        """The state h after the last consumed step (complex64 (batch, N_i)), or None before the first step."""
        return self.layers[layer_idx].state

    def set_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.layers[layer_idx].state = state.detach()

    def check_compatible(self, state_dims: list[int], batch_size: int) -> None:
        """Raise ValueError unless this cache can continue a model with these layer sizes on a batch of this size."""
        if len(self.layers) != len(state_dims):
            raise ValueError(f"the cache holds {len(self.layers)} layers but the model has {len(state_dims)}")
        for index, (layer, dim) in enumerate(zip(self.layers, state_dims)):
            if layer.state is None:
                continue
            if layer.state.shape[-1] != dim:
                raise ValueError(
                    f"cache of layer {index} holds a state of size {layer.state.shape[-1]} but the layer has {dim} "
                    "states: a cache cannot be reused across a reduction"
                )
            if layer.state.shape[0] != batch_size:
                raise ValueError(
                    f"the cache holds states for a batch of {layer.state.shape[0]} sequences but the input has "
                    f"{batch_size}"
                )

    # ----------------------------------------------------------------------------- the Cache interface of generate
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_steps

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_steps + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        return all(layer.state is not None for layer in layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_steps = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "a CompreSSM cache holds one recurrent state per layer and cannot be rolled back to an earlier step "
            "(assisted / speculative decoding is not supported)"
        )

    def update(self, *args, **kwargs):
        raise NotImplementedError("a CompreSSM cache holds recurrent states, not attention keys and values")

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        return all(layer.state is not None for layer in self.layers)

    @property
    def batch_size(self) -> int:
        return next((layer.state.shape[0] for layer in self.layers if layer.state is not None), -1)

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    @property
    def max_cache_len(self) -> int:
        return -1

    def __repr__(self) -> str:
        return f"CompreSSMCache(state_dims={self.state_dims}, seen_steps={self.seen_steps})"


def _flatten_cache(cache: CompreSSMCache):
    return [layer.state for layer in cache.layers], (tuple(cache.state_dims), cache.seen_steps)


def _flatten_cache_with_keys(cache: CompreSSMCache):
    states, context = _flatten_cache(cache)
    return [(_pytree.SequenceKey(index), state) for index, state in enumerate(states)], context


def _unflatten_cache(states, context) -> CompreSSMCache:
    state_dims, seen_steps = context
    cache = CompreSSMCache(state_dims=list(state_dims))
    for layer, state in zip(cache.layers, states):
        layer.state = state
    cache.seen_steps = seen_steps
    return cache


# torch.export / torch.compile see the cache as a container of its states (a forward returns it).
_pytree.register_pytree_node(
    CompreSSMCache,
    _flatten_cache,
    _unflatten_cache,
    serialized_type_name=f"{__name__}.CompreSSMCache",
    flatten_with_keys_fn=_flatten_cache_with_keys,
)


def _resolve_cache_argument(cache: CompreSSMCache | None, past_key_values: CompreSSMCache | None):
    """`forward` takes the cache as `cache` (transformers >= 5.24) or `past_key_values` (earlier releases)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache either as `cache` or as `past_key_values`, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, CompreSSMCache):
        raise TypeError(
            f"the cache of a CompreSSM model must be a CompreSSMCache (one recurrent state per layer), got "
            f"{type(cache).__name__}; create one with CompreSSMCache(model.config) or let the model create it"
        )
    return cache


def _dtensor_type():
    """torch's DTensor class if it was imported (a process that never imported it holds no DTensor), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _weights_file(location, subfolder: str, names: list[str]) -> str:
    """The weights file under a local checkpoint folder that holds the first of `names` found in its shard index (the
    single weights file when unsharded), for error messages; the location itself where that cannot be told (a Hub
    id, a `state_dict` given to from_pretrained)."""
    if location is None:
        return "the state_dict given to from_pretrained"
    folder = os.path.join(str(location), subfolder)
    if not os.path.isdir(folder):
        return str(location)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as handle:
                    weight_map = json.load(handle)["weight_map"]
                return os.path.join(folder, next(weight_map[name] for name in names if name in weight_map))
            except (OSError, ValueError, KeyError, TypeError, StopIteration):
                return index_path
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, single)):
            return os.path.join(folder, single)
    return folder


def _layer_of(name: str) -> str:
    """" (layer i)" for a parameter name inside block i, else ""."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return f" (layer {match.group(1)})" if match else ""


def _warn_about_initialised_lru_tensors(model: nn.Module, missing_keys, weights_file) -> None:
    """Warn, naming them, when from_pretrained initialised LRU tensors that the weights file lacks: the other tensors
    of those layers kept their saved values, so such a layer no longer computes what was trained."""
    lru_names = {
        f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, CompreSSMLRU)
        for name in CompreSSMLRU.PARAMETER_NAMES
    }
    initialised = sorted(name for name in missing_keys if name in lru_names)
    if initialised:
        logger.warning(
            "CompreSSM: %s lacks %d LRU tensor(s): %s. Only these were initialised afresh; the other tensors of the "
            "same layer(s) keep their saved values, so those layers no longer compute what was trained. If the file "
            "was damaged, load an intact copy (an earlier checkpoint or the original upload).",
            weights_file(initialised[0]), len(initialised), ", ".join(name + _layer_of(name) for name in initialised),
        )


@torch.no_grad()
def _check_loaded_weights(model: nn.Module, weights_file) -> None:
    """Raise ValueError naming the weights file, tensor and layer for a loaded floating-point tensor with NaN or
    infinite values, or an LRU layer with an eigenvalue of modulus |λ| = exp(-exp(nu_log)) >= 1 as float32 computes
    it (a state that never decays). Tensors on the meta device (offloaded) are not read."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            first = [int(index) for index in torch.nonzero(~finite)[0]]
            raise ValueError(
                f"{weights_file(name)}: tensor {name!r}{_layer_of(name)} holds {int((~finite).sum())} NaN or infinite "
                f"value(s) (the first at index {first}): the weights are damaged. Load an intact copy (an earlier "
                "checkpoint or the original upload)"
            )
    for prefix, module in model.named_modules():
        if isinstance(module, CompreSSMLRU) and not module.nu_log.is_meta:
            modulus = torch.exp(-torch.exp(module.nu_log.detach().float()))
            if bool((modulus >= 1).any()):
                state = int(torch.argmax(modulus))
                name = f"{prefix}.nu_log"
                raise ValueError(
                    f"{weights_file(name)}: tensor {name!r}{_layer_of(name)} gives state {state} an eigenvalue of "
                    f"modulus |λ| = exp(-exp(nu_log)) = {float(modulus[state]):.9g} (nu_log = "
                    f"{float(module.nu_log[state]):.6g}); an LRU layer needs |λ| < 1 (float32 rounds |λ| to 1 once "
                    "nu_log < -16.6), or its state never decays. The weights are damaged or were trained past "
                    "stability: load an intact copy or an earlier checkpoint"
                )


class CompreSSMPreTrainedModel(PreTrainedModel):
    config_class = CompreSSMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CompreSSMBlock"]
    _is_stateful = True
    # forward has no graph break and no host-device synchronisation (tested with torch.compile(fullgraph=True)).
    _can_compile_fullgraph = True

    def __init__(self, config: CompreSSMConfig, *args, **kwargs):
        config.check_values()  # values set after the config was made (a NaN norm_eps, ...) are refused here
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, CompreSSMLRU):
            # While from_pretrained loads, transformers marks every loaded tensor `_is_hf_initialized`: initialise only
            # the tensors the checkpoint lacks, so one missing tensor does not replace the layer's loaded ones.
            module.reset_parameters([
                name for name in module.PARAMETER_NAMES
                if not getattr(getattr(module, name), "_is_hf_initialized", False)
            ])
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (CompreSSMRMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    HISTORY_FILE = HISTORY_FILE

    @property
    def reduction_history(self) -> list[ReductionEvent]:
        """Reduction events (`events.ReductionEvent`, appended by `model.reduce`, CompreSSMReducer and
        CompreSSMCallback); saved as `compressm_history.json` next to the weights and reloaded by `from_pretrained`."""
        if "_reduction_history" not in self.__dict__:
            self.__dict__["_reduction_history"] = []
        events = self.__dict__["_reduction_history"]
        if not all(isinstance(event, ReductionEvent) for event in events):  # dicts appended by hand: validate them
            events[:] = coerce_events(list(events), source="model.reduction_history")
        return events

    @reduction_history.setter
    def reduction_history(self, events) -> None:
        """Replace the history by a list of ReductionEvents or event dicts (validated: HistoryError names the entry)."""
        if not isinstance(events, (dict, str, bytes)):
            events = list(events)
        self.__dict__["_reduction_history"] = coerce_events(events, source="reduction_history")

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the reduction history and a model card for reduced models.

        With remote code registered, `auto_map` lists AutoConfig, AutoModel, AutoModelForCausalLM and
        AutoModelForSequenceClassification, so any of the Auto classes loads the checkpoint with trust_remote_code.

        Distributed: the history and card are written where transformers writes the weights (`is_main_process` and
        global rank 0), and run no collective: the card's Hankel singular values come from the `state_dict` being
        saved when one is passed, so the accelerate recipe `accelerator.unwrap_model(model).save_pretrained(dir,
        state_dict=accelerator.get_state_dict(model), is_main_process=accelerator.is_main_process)` works for DDP and
        FSDP2 alike. A model sharded with FSDP2 (DTensor parameters) must be given its gathered `state_dict`; it is
        saved under its own class (not FSDP2's "FSDP<class>"), so `architectures`, `auto_map` and the copied
        modeling files are those of the unsharded model.
        """
        state_dict = kwargs.get("state_dict", args[1] if len(args) > 1 else None)
        is_main_process = kwargs.get("is_main_process", args[0] if args else True)
        dtensor = _dtensor_type()
        sharded_state = dtensor is not None and state_dict is not None and any(
            isinstance(value, dtensor) for value in state_dict.values()
        )
        if sharded_state or (state_dict is None and self._has_sharded_parameters()):
            raise ValueError(
                "the weights to save are sharded (FSDP2 / DTensor): pass the gathered full weights, e.g. "
                "save_pretrained(dir, state_dict=accelerator.get_state_dict(model), is_main_process=...) or "
                "state_dict=torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True, cpu_offload=True)) (a collective: run it on every rank)"
            )
        with self._as_own_class():
            return self._save_with_compressm_files(save_directory, args, kwargs, state_dict, is_main_process)

    def _save_with_compressm_files(self, save_directory, args, kwargs, state_dict, is_main_process):
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            config_module = type(self.config).__module__.split(".")[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoConfig", f"{config_module}.{type(self.config).__name__}")
            for auto_class, class_name in (
                ("AutoModel", "CompreSSMModel"),
                ("AutoModelForCausalLM", "CompreSSMForCausalLM"),
                ("AutoModelForSequenceClassification", "CompreSSMForSequenceClassification"),
            ):
                auto_map.setdefault(auto_class, f"{module}.{class_name}")
            self.config.auto_map = auto_map
        self._check_history_matches_weights()  # before anything is written
        rank_zero = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
            torch.distributed.get_rank() == 0
        )
        writes = is_main_process and rank_zero
        if writes and state_dict is not None:
            self._cache_card_spectrum(state_dict)  # before transformers empties the dict while writing it
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if writes and not os.path.isfile(save_directory):
            self._write_compressm_files(save_directory)
        return result

    def _check_history_matches_weights(self) -> None:
        """Raise HistoryError unless `reduction_history` is valid (entries appended by hand are validated) and agrees
        with the model's state sizes: saved together, a history that disagrees makes a folder that cannot be loaded."""
        disagreement = weights_disagreement(self.reduction_history, self.config.state_dims)
        if disagreement is not None:
            where, problem = disagreement
            raise HistoryError(
                "model.reduction_history", where,
                f"{problem}: the history does not describe this model's weights (were sizes changed without an "
                "event, e.g. by set_state_dims?). Set model.reduction_history to the events that lead to "
                "config.state_dims, or to [] to save without a history; nothing was written",
            )

    @contextlib.contextmanager
    def _as_own_class(self):
        """A library that subclasses the model at run time (FSDP2's `fully_shard` makes "FSDP<class>", defined in
        torch) must not become the saved architecture: transformers names `architectures`, `auto_map` and the
        modeling file to copy after `type(model)`. Present the CompreSSM class for the duration of a save (a save runs
        no forward or state-dict hook of that subclass)."""
        runtime_class = type(self)
        own_class = next(
            klass for klass in runtime_class.__mro__
            if issubclass(klass, CompreSSMPreTrainedModel) and not klass.__module__.startswith("torch.")
        )
        if own_class is runtime_class:
            yield
            return
        self.__class__ = own_class
        try:
            yield
        finally:
            self.__class__ = runtime_class

    def _has_sharded_parameters(self) -> bool:
        """Whether parameters are DTensors (FSDP2 / tensor parallel): their values need collectives."""
        dtensor = _dtensor_type()
        return dtensor is not None and any(isinstance(parameter, dtensor) for parameter in self.parameters())

    def _cache_card_spectrum(self, state_dict: dict) -> None:
        """Compute the card's Hankel singular values from `state_dict` (no collective) and cache them for the card."""
        try:
            from .model_card import card_spectrum
        except ImportError:  # remote-code copies may lack the optional model-card module
            return
        card_spectrum(self, state_dict)

    def _write_compressm_files(self, directory) -> None:
        """Write `compressm_history.json` (atomically) and, when the model-card module is present, README.md and
        the HSV plot (the plot is drawn once per reduction event and reused by later saves; see `card_spectrum` for
        where its Hankel singular values come from)."""
        write_history(os.path.join(directory, self.HISTORY_FILE), self.reduction_history, self.config.state_dims)
        try:
            from .model_card import write_model_card
        except ImportError:  # remote-code copies may lack the optional model-card module
            write_model_card = None
        if write_model_card is not None:
            write_model_card(self, directory)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        """Hub upload (push_to_hub / save_pretrained(push_to_hub=True)): transformers replaces README.md with the
        Hub's card (or a placeholder) and, with push_to_hub=True, uploads before save_pretrained returns; write the
        history and the CompreSSM card (unless the Hub card is the user's own) into the folder before uploading."""
        self._write_compressm_files(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with checks of what was loaded and the reduction history restored.

        - A weight with NaN or infinite values, or an LRU layer with an eigenvalue modulus |λ| >= 1, raises ValueError
          naming the weights file, the tensor and the layer.
        - Tensors the weights file lacks are initialised, and only those (the loaded tensors of the same LRU layer
          keep their values); a warning names the missing LRU tensors.
        - `compressm_history.json`, when the checkpoint has one, becomes `reduction_history`. A history that is
          invalid, is not a file, or disagrees with the weights (other layer count or state sizes) raises
          `events.HistoryError` naming the file and the field; the weights are intact, so moving that file away
          loads them without a history. With `ignore_mismatched_sizes=True` (layers re-initialised at other sizes on
          purpose) a disagreeing history is left out with a warning instead.
        """
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        subfolder = kwargs.get("subfolder") or ""

        def weights_file(name: str) -> str:
            return _weights_file(pretrained_model_name_or_path, subfolder, [name, f"{cls.base_model_prefix}.{name}"])

        _warn_about_initialised_lru_tensors(model, loading_info.get("missing_keys") or (), weights_file)
        _check_loaded_weights(model, weights_file)
        history_path = cls._history_file(pretrained_model_name_or_path, subfolder, kwargs)
        if history_path is not None:
            history = read_history(history_path)  # HistoryError names the file and the field
            disagreement = weights_disagreement(history.events, model.config.state_dims, history.state_dims)
            if disagreement is not None and kwargs.get("ignore_mismatched_sizes"):
                # Layers re-initialised at the requested sizes on purpose: the checkpoint's history is not theirs.
                logger.warning(
                    "CompreSSM: %s: %s: %s; not restored (ignore_mismatched_sizes re-initialised the layers whose "
                    "sizes differ, so the model starts without a history)", history_path, *disagreement,
                )
            elif disagreement is not None:
                where, problem = disagreement
                raise HistoryError(
                    history_path, where,
                    f"{problem}: this history describes other weights. Move it away to load the weights without a "
                    f"history, or put back the {cls.HISTORY_FILE} saved with these weights",
                )
            else:
                for problem in history_problems(history.events, model.config.state_dims):
                    logger.warning("CompreSSM: %s: %s", history_path, problem)
                model.reduction_history = history.events
        return (model, loading_info) if wants_loading_info else model

    @classmethod
    def _history_file(cls, pretrained_model_name_or_path, subfolder: str, kwargs: dict) -> str | None:
        """The path of the checkpoint's history (beside its weights; from the Hub cache for a Hub id), or None if it
        has none. Something of that name that is not a file (a folder) is returned too, for read_history to refuse."""
        if pretrained_model_name_or_path is None:
            return None
        local_path = os.path.join(str(pretrained_model_name_or_path), subfolder, cls.HISTORY_FILE)
        if os.path.lexists(local_path):
            return local_path
        try:
            from transformers.utils import cached_file

            path = cached_file(
                pretrained_model_name_or_path,
                cls.HISTORY_FILE,
                subfolder=subfolder,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                revision=kwargs.get("revision"),
                cache_dir=kwargs.get("cache_dir"),
                local_files_only=kwargs.get("local_files_only", False),
                token=kwargs.get("token"),
                proxies=kwargs.get("proxies"),
            )
        except (OSError, ValueError):
            return None
        return path if path and os.path.lexists(path) else None

    # ------------------------------------------------------------------------------------------------ reduction
    def lru_layers(self) -> list[CompreSSMLRU]:
        """The LRU modules in layer order."""
        return [module for module in self.modules() if isinstance(module, CompreSSMLRU)]

    @torch.no_grad()
    def hankel_singular_values(self, state_dict: dict | None = None, system: str = "real") -> list[torch.Tensor]:
        """Hankel singular values of every layer per LRU state: a list of float64 (N_i,) tensors, descending, on the
        model device (on the tensors' device with `state_dict`); see `reduction.Balancing.state_hsv`.

        Args:
            state_dict: compute them from these tensors (the model's parameter names, e.g. the gathered state dict of
                a sharded model) instead of the parameters; ValueError if a layer's tensor is missing.
            system: "real" (default): of the layer's real map u -> Re(C h), its 2N HSVs summed in consecutive pairs
                (so N_i values whose sum is the real map's HSV sum); "complex": of the complex map (the paper's).
        """
        check_system(system)
        if state_dict is None:
            return [balance(*layer.to_lti()[:3], system).state_hsv for layer in self.lru_layers()]
        values = []
        for prefix, module in self.named_modules():
            if isinstance(module, CompreSSMLRU):
                names = [f"{prefix}.{name}" for name in CompreSSMLRU.SSM_PARAMETER_NAMES]
                missing = [name for name in names if name not in state_dict]
                if missing:
                    raise ValueError(f"state_dict lacks {missing[0]!r} (and {len(missing) - 1} more LRU tensors)")
                lam, B, C = CompreSSMLRU.system_from_parameters(*(state_dict[name] for name in names))
                values.append(balance(lam, B, C, system).state_hsv)
        return values

    @torch.no_grad()
    def set_state_dims(self, state_dims: list[int], initialise: bool = True) -> list:
        """Re-allocate the LRU layers at the given sizes and rewrite `config.state_dims`.

        Used to rebuild a model at a checkpoint's reduced sizes before loading its weights into it (e.g. when a
        Trainer resumes from a checkpoint saved after a reduction). Parameter objects are kept; their data changes.
        With `initialise` the re-allocated layers are freshly initialised, otherwise their values are undefined
        until the caller writes them (no random numbers are drawn).
        Returns one `LayerChange` per re-allocated layer (for the training library's optimizer repair).
        """
        layers = self.lru_layers()
        if len(state_dims) != len(layers):
            raise ValueError(f"state_dims has {len(state_dims)} entries, the model has {len(layers)} LRU layers")
        for index, dim in enumerate(state_dims):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"state_dims[{index}] must be a positive int, got {dim!r}")
        changes = []
        for index, (layer, dim) in enumerate(zip(layers, state_dims)):
            if dim == layer.state_dim:
                continue
            previous = layer.resize_state(dim, initialise=initialise)
            parameters = {name: getattr(layer, name) for name in layer.SSM_PARAMETER_NAMES}
            changes.append(LayerChange(layer=index, parameters=parameters, previous=previous))
        self.sync_state_dims()
        return changes

    def sync_state_dims(self) -> None:
        """Write the layers' sizes into `config.state_dims`: the one place that does, after any change of size (here,
        and in the training library when FSDP2 re-registers sharded LRU parameters, whose global shapes give the
        sizes)."""
        self.config.state_dims = [layer.state_dim for layer in self.lru_layers()]

    @torch.no_grad()
    def reduce(
        self,
        ranks: list[int | None],
        strict: bool = False,
        record: bool = True,
        balancings: list | None = None,
        system: str = "real",
    ) -> list[LayerReduction]:
        """Shrink layers in place by balanced truncation and rewrite `config.state_dims`.

        A pure model transform: an optimizer that trains this model still holds state of the old shapes for the
        reduced parameters. While training, use `modeling_compressm.reduce_with_optimizer(model, ranks, optimizer)`
        (the training library), which calls this and repairs that state, or `CompreSSMReducer`.

        Args:
            ranks: one entry per layer: the new state size, or None to leave the layer alone. A rank >= the current
                size leaves the layer as it is (a reduction never grows a layer).
            strict: raise the ReductionError of a failing layer instead of skipping it with a warning.
            record: append a "manual" `ReductionEvent` to `reduction_history` when a layer changed
                (CompreSSMReducer passes False and records its own, richer event).
            balancings: per layer the `reduction.Balancing` already computed for this event (or None entries), so
                the factorisation that picked the ranks is not computed again (each carries its own system).
            system: "real" (default): balanced truncation of the layer's real map u -> Re(C h), at most `ranks[i]`
                LRU states (a conjugate pair or a real pole is one); "complex": of the complex map (the paper's).
        Returns:
            One `LayerReduction` per layer (status "reduced" | "unchanged" | "failed", sizes, the HSVs as a float64
            tensor, kept energy, H-infinity bounds, and for reduced layers the `LayerChange` with the basis maps).
            Parameters of reduced layers keep their identity but change shape, and their gradients are dropped.
        """
        check_system(system)
        layers = self.lru_layers()
        if len(ranks) != len(layers):
            raise ValueError(f"ranks has {len(ranks)} entries, the model has {len(layers)} LRU layers")
        if balancings is not None and len(balancings) != len(layers):
            raise ValueError(f"balancings has {len(balancings)} entries, the model has {len(layers)} LRU layers")
        for index, rank in enumerate(ranks):
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ValueError(f"ranks[{index}] must be a positive int or None, got {rank!r}")
        results = [
            self._reduce_layer(index, layer, rank, balancings[index] if balancings is not None else None, system,
                               strict)
            for index, (layer, rank) in enumerate(zip(layers, ranks))
        ]
        self.sync_state_dims()
        if record and any(result.status != "unchanged" for result in results):
            self.reduction_history.append(
                ReductionEvent.from_layers(
                    results, step=None, kind="manual", policy="manual",
                    kept_energy=[1.0 if result.kept_energy is None else result.kept_energy for result in results],
                )
            )
        return results

    @staticmethod
    def _reduce_layer(index: int, layer: CompreSSMLRU, rank, balancing, system: str, strict: bool) -> LayerReduction:
        """Truncate one layer to at most `rank` states (None or >= its size: left alone); see `reduce`."""
        result = LayerReduction(layer=index, old_dim=layer.state_dim, new_dim=layer.state_dim, rank_requested=rank)
        if rank is None or rank >= layer.state_dim:
            return result
        try:
            if balancing is not None:
                lam, B, C = balancing.lam, balancing.B, balancing.C
                reduced = truncate(balancing, rank)
            else:
                lam, B, C, _ = layer.to_lti()
                reduced = balanced_truncation(lam, B, C, rank, system)
            previous = layer.load_system(reduced.lam, reduced.B, reduced.C)
        except ReductionError as error:
            if strict:
                raise
            logger.warning("CompreSSM: layer %d not reduced (%d -> %d): %s", index, layer.state_dim, rank, error)
            result.status, result.error, result.kept_energy = "failed", str(error), None
            return result
        hsv = reduced.hsv
        total = float(hsv.sum())
        gain = max(float(hsv[0]), gain_lower_bound(lam, B, C, system=reduced.system)) if total > 0 else 0.0
        bound = hinf_error_bound(hsv, reduced.order)  # gain <= the layer's H-inf norm, bound >= its change
        result.new_dim, result.status, result.hsv = layer.state_dim, "reduced", hsv
        result.kept_energy = float(hsv[: reduced.order].sum()) / total if total > 0 else 1.0
        result.hinf_bound, result.hinf_bound_relative = bound, bound / gain if gain > 0 else 0.0
        result.change = LayerChange(
            layer=index,
            parameters={name: getattr(layer, name) for name in layer.SSM_PARAMETER_NAMES},
            previous=previous,
            project=reduced.project,
            lift=reduced.lift,
        )
        return result


# Generation bookkeeping that transformers may pass to `forward` and that a recurrence does not use.
_IGNORED_FORWARD_KWARGS = ("cache_position", "position_ids", "output_attentions")


def _accepted_kwargs(kwargs: dict, accepted: tuple[str, ...] = ()) -> dict:
    """Return the entries of `kwargs` named in `accepted`, drop `_IGNORED_FORWARD_KWARGS`, and raise TypeError for any
    other name: an argument this model does not understand (a misspelt or renamed one) must not vanish silently."""
    unknown = sorted(set(kwargs) - set(accepted) - set(_IGNORED_FORWARD_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown} for a CompreSSM model")
    if kwargs.get("output_attentions"):
        raise ValueError("CompreSSM models have no attention layers, so there are no attentions to output")
    return {name: kwargs[name] for name in accepted if name in kwargs}


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Out-of-vocabulary ids raise ValueError naming the vocabulary size (checked where the read is free: CPU tensors
    in eager mode; on accelerators the embedding lookup itself fails)."""
    if input_ids.numel() == 0 or not host_reads_are_free(input_ids):
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, {vocab_size - 1}] (config.vocab_size = {vocab_size}), got ids from {low} to "
            f"{high}"
        )


def _step_mask(
    attention_mask: torch.Tensor | None, batch_size: int, length: int, past_steps: int, device: torch.device
) -> torch.Tensor | None:
    """Step mask bool (batch, L) from an attention_mask (batch, L) or, with a cache, (batch, past + L), 1 = real step.

    Shapes are always checked; the values (0/1 only) where the check is free (CPU tensors in eager mode). Elsewhere a
    nonzero entry counts as a real step.
    """
    if attention_mask is None:
        return None
    lengths = (length,) if past_steps == 0 else (length, past_steps + length)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] not in lengths:
        expected = " or ".join(f"({batch_size}, {n})" for n in lengths)
        raise ValueError(
            f"attention_mask must be a 2-D padding mask of shape {expected} (batch, steps"
            f"{' covering the cached and the new steps' if past_steps else ''}), got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool and host_reads_are_free(attention_mask):
        invalid = (attention_mask != 0) & (attention_mask != 1)
        if bool(invalid.any()):
            raise ValueError(
                "attention_mask must hold only 1 (real step) and 0 (padding), found "
                f"{attention_mask[invalid][0].item()!r}; pass the 2-D padding mask, not additive attention biases"
            )
    return attention_mask[:, -length:].to(device=device, dtype=torch.bool)


class CompreSSMModel(CompreSSMPreTrainedModel):
    """Backbone: token embedding (or Linear encoder when `config.input_dim` is set), LRU blocks, final norm."""

    accepts_loss_kwargs = False  # computes no loss: the Trainer must not pass num_items_in_batch here

    def __init__(self, config: CompreSSMConfig):
        super().__init__(config)
        if config.input_dim is None:
            self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.encoder = None
        else:
            self.embeddings = None
            self.encoder = nn.Linear(config.input_dim, config.hidden_size)
        self.layers = nn.ModuleList(CompreSSMBlock(config, index) for index in range(config.num_hidden_layers))
        self.norm_f = _make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings if self.embeddings is not None else self.encoder

    def set_input_embeddings(self, new_embeddings):
        if self.embeddings is None:
            self.encoder = new_embeddings
        else:
            self.embeddings = new_embeddings

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Token ids int64 (batch, L) or inputs_embeds float (batch, L, H | input_dim) -> hidden states (batch, L, H)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if self.encoder is not None:
            if input_ids is not None:
                raise ValueError(
                    f"this model encodes continuous inputs (config.input_dim={self.config.input_dim}): pass them as "
                    "inputs_embeds of shape (batch, length, input_dim), not input_ids"
                )
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.input_dim:
                raise ValueError(
                    f"inputs_embeds must be (batch, length, {self.config.input_dim}), got {tuple(inputs_embeds.shape)}"
                )
            return self.encoder(inputs_embeds.to(self.encoder.weight.dtype))
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
            _check_token_ids(input_ids, self.embeddings.num_embeddings)
            return self.embeddings(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, length, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: CompreSSMCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: CompreSSMCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """
        Args:
            input_ids: int64 (batch, L) token ids in [0, vocab_size), or
            inputs_embeds: float (batch, L, H), or (batch, L, input_dim) when `config.input_dim` is set.
            attention_mask: (batch, L) 1 for real steps, 0 for padding (left or right). With a cache that has consumed
                P steps it may also be (batch, P + L), as `generate` passes it; its last L columns are used. A padded
                step feeds nothing into the recurrence and leaves the state as it was; its output is read from that
                held state. A row without any real step is allowed here (its outputs are those of the state it
                starts from); `CompreSSMForSequenceClassification` refuses such rows.
            cache: a `CompreSSMCache` holding one recurrent state per layer (complex64 (batch, N_i)) and the number of
                steps consumed, continued and updated in place; created when `use_cache` and None. Also accepted
                under its pre-5.24 name `past_key_values`.
            use_cache: return the cache (default: `config.use_cache` in eval mode, or when a cache is passed).
        Returns:
            BaseModelOutputWithPast(last_hidden_state (batch, L, H), cache (named `past_key_values` before transformers
            5.24), hidden_states: embeddings, each block's output, and the final normed output).
        """
        _accepted_kwargs(kwargs)
        cache = _resolve_cache_argument(cache, past_key_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            _warn_once("CompreSSM: gradient checkpointing runs without a cache (use_cache=False)")
            use_cache = False
        if not use_cache:
            cache = None
        elif cache is None:
            cache = CompreSSMCache(self.config)

        hidden_states = self._embed(input_ids, inputs_embeds)
        batch_size, length = hidden_states.shape[:2]
        past_steps = cache.seen_steps if cache is not None else 0
        if cache is not None:
            cache.check_compatible([block.lru.state_dim for block in self.layers], batch_size)
        step_mask = _step_mask(attention_mask, batch_size, length, past_steps, hidden_states.device)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, step_mask=step_mask, cache=cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if cache is not None:
            cache.seen_steps += length
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{_CACHE_FIELD: cache}
        )


class CompreSSMForCausalLM(CompreSSMPreTrainedModel, GenerationMixin):
    """CompreSSMModel with a (tied) linear LM head; generation keeps one recurrent state per layer in the cache.

    Loss contract of the HF Trainer: with `num_items_in_batch` (the number of target tokens in the whole accumulated,
    all-rank batch) the loss is the summed token loss divided by it, so gradient accumulation and data parallelism give
    the update of one large batch.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    accepts_loss_kwargs = True

    def __init__(self, config: CompreSSMConfig):
        super().__init__(config)
        if config.input_dim is not None:
            raise ValueError("CompreSSMForCausalLM needs token inputs: set config.input_dim=None")
        self.model = CompreSSMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.model.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` gets a `CompreSSMCache` (a DynamicCache or static cache cannot hold recurrent states)."""
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if user_cache is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported: a CompreSSM "
                    "model keeps one recurrent state per layer in a CompreSSMCache (leave cache_implementation unset)"
                )
            model_kwargs[_CACHE_FIELD] = CompreSSMCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """Inputs of one generation step: the steps the cache has not consumed yet (every step without a cache).

        The new steps are found from the cache's step count, not from generate's slicing hints (`cache_position`,
        `next_sequence_length`), which differ between transformers releases; the cache arrives as `cache` (>= 5.24) or
        `past_key_values`. The sequence so far is as long as the attention mask (generate extends it by one column per
        new token); without a mask it is `input_ids`, preceded by the prompt embeddings when the prompt was given as
        `inputs_embeds` only (then generate's `input_ids` holds the generated tokens alone). So generate can also
        continue from a cache returned by an earlier call, given the whole sequence so far.
        """
        cache = _resolve_cache_argument(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        consumed = cache.seen_steps if cache is not None else 0
        if attention_mask is not None:
            total = attention_mask.shape[1]
        elif inputs_embeds is not None and cache is None and input_ids.shape[1] > 0:
            raise ValueError("generating from inputs_embeds without a cache needs the attention_mask of all steps")
        elif inputs_embeds is not None and input_ids.shape[1] <= consumed:
            total = inputs_embeds.shape[1] + input_ids.shape[1]  # input_ids holds the generated tokens only
        else:
            total = input_ids.shape[1]
        model_inputs = {"attention_mask": attention_mask, "cache": cache}
        if inputs_embeds is not None and consumed == 0:
            # The prompt is given as embeddings: read them, followed (without a cache) by the tokens generated so far.
            generated = total - inputs_embeds.shape[1]
            if generated > 0:
                generated_embeds = self.get_input_embeddings()(input_ids[:, -generated:]).to(inputs_embeds.dtype)
                inputs_embeds = torch.cat([inputs_embeds, generated_embeds], dim=1)
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            unseen = total - consumed
            if not 0 < unseen <= input_ids.shape[1]:
                raise ValueError(
                    f"the cache has consumed {consumed} steps and the sequence has {total}: to continue from a cache, "
                    "pass the whole sequence so far (or the new tokens with an attention_mask covering all steps)"
                )
            model_inputs["input_ids"] = input_ids[:, -unseen:]
        for name in ("use_cache", "logits_to_keep", "output_hidden_states"):
            if name in kwargs:
                model_inputs[name] = kwargs[name]
        return model_inputs

    def create_masks_for_generate(self, config=None, inputs_embeds=None, attention_mask=None, **kwargs):
        """The recurrence needs no attention mask matrix: keep the 2-D (batch, steps) padding mask as it is."""
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: CompreSSMCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: CompreSSMCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """
        Inputs as in `CompreSSMModel.forward`, plus:
            labels: int64 (batch, L), -100 ignored; shifted inside (predict token t+1 from positions <= t).
            logits_to_keep: compute logits for the last k positions only (0: all), or for the given indices.
            num_items_in_batch (keyword): number of target tokens over the whole accumulated (and all-rank) batch,
                passed by the Trainer; the loss is then the summed token loss divided by it. `shift_labels` and
                `ignore_index` are passed on to transformers' causal-LM loss as well.
        Returns:
            CausalLMOutputWithPast(loss, logits float32 (batch, L or logits_to_keep, vocab), cache (named
            `past_key_values` before transformers 5.24), hidden_states).
        """
        loss_kwargs = _accepted_kwargs(kwargs, ("num_items_in_batch", "shift_labels", "ignore_index"))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=_resolve_cache_argument(cache, past_key_values),
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :]).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        cache = getattr(outputs, _CACHE_FIELD)
        if not return_dict:
            output = tuple(v for v in (logits, cache, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{_CACHE_FIELD: cache}
        )


class CompreSSMForSequenceClassification(CompreSSMPreTrainedModel):
    """CompreSSMModel, pooling over time (masked mean as in the paper, or last real step), then a linear head.

    Padding: without an attention_mask, token inputs equal to `config.pad_token_id` count as padding (transformers'
    convention for decoder classifiers), both in the recurrence and in the pooling. A row without any real step has
    nothing to pool: on CPU tensors in eager mode this raises ValueError; on accelerators and under torch.compile /
    torch.export (where checking would synchronise or trace a data-dependent branch) the row's logits are NaN, never
    silent zeros.

    Loss contract of the HF Trainer: with `num_items_in_batch` (labels other than -100 over the whole accumulated,
    all-rank batch) the loss is the summed loss divided by it, for every problem type, so gradient accumulation and
    data parallelism give the update of one large batch.
    """

    accepts_loss_kwargs = True

    def __init__(self, config: CompreSSMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CompreSSMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.model.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """
        Inputs as in `CompreSSMModel.forward` (no cache), plus:
            labels: int64 (batch,) class ids (-100 ignored), float (batch,) for regression (num_labels=1), or float
                (batch, num_labels) for multi-label.
            num_items_in_batch (keyword): passed by the Trainer; the loss is the summed loss divided by it.
        Returns:
            SequenceClassifierOutputWithPast(loss, logits float32 (batch, num_labels), hidden_states).
        """
        loss_kwargs = _accepted_kwargs(kwargs, ("num_items_in_batch",))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if attention_mask is None and input_ids is not None and self.config.pad_token_id is not None:
            attention_mask = (input_ids != self.config.pad_token_id).to(torch.long)
        elif attention_mask is None and self.config.input_dim is None and self.config.pad_token_id is not None:
            _warn_once(
                "CompreSSMForSequenceClassification: padding cannot be detected in inputs_embeds (pad_token_id marks "
                "it only in input_ids), so every step is pooled as real; pass the attention_mask of a padded batch"
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = self._pool(outputs.last_hidden_state.float(), attention_mask)
        logits = self.score(pooled.to(self.score.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self._classification_loss(logits, labels.to(logits.device), **loss_kwargs)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def _pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden_states float32 (batch, L, H), attention_mask (batch, L) or None -> pooled float32 (batch, H)."""
        if attention_mask is None:
            return hidden_states.mean(dim=1) if self.config.pooling == "mean" else hidden_states[:, -1]
        real = attention_mask.to(device=hidden_states.device, dtype=torch.bool)
        counts = real.sum(dim=1)
        if host_reads_are_free(counts) and bool((counts == 0).any()):
            rows = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(
                f"row(s) {rows} of the batch have no real step (attention_mask all 0, or only pad_token_id tokens): "
                "there is nothing to classify"
            )
        if self.config.pooling == "mean":
            # A row without real steps divides 0 by 0: NaN logits rather than silent zeros.
            return (hidden_states * real[..., None]).sum(dim=1) / counts[:, None]
        positions = torch.arange(real.shape[1], device=real.device)
        last = (positions[None, :] * real).max(dim=1).values
        pooled = hidden_states[torch.arange(hidden_states.shape[0], device=real.device), last]
        return pooled.masked_fill((counts == 0)[:, None], float("nan"))

    def _classification_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss over the labels (-100 ignored for class ids), or summed loss / num_items_in_batch."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
            self.config.problem_type = problem_type
        reduction = "mean" if num_items_in_batch is None else "sum"
        if problem_type == "regression":
            if self.num_labels == 1:
                loss = F.mse_loss(logits.view(-1), labels.float().view(-1), reduction=reduction)
            else:
                loss = F.mse_loss(logits, labels.float(), reduction=reduction)
        elif problem_type == "single_label_classification":
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), reduction=reduction)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction=reduction)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss


__all__ = [
    "CompreSSMPreTrainedModel",
    "CompreSSMModel",
    "CompreSSMForCausalLM",
    "CompreSSMForSequenceClassification",
    "CompreSSMLRU",
    "CompreSSMCache",
]
