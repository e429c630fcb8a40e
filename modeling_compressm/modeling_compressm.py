"""CompreSSM models: stacks of Linear Recurrent Units (LRU) whose per-layer state sizes shrink during training.

One LRU layer (complex diagonal recurrence, real input/output of width H, complex state of size N):

    lam = exp(-exp(nu_log) + i exp(theta_log)),  B~ = (B_re + i B_im) * exp(gamma_log)
    h_k = lam * h_{k-1} + B~ u_k,                y_k = Re(C h_k) + D * u_k

Block (pre-norm residual, as in the CompreSSM paper): x + Dropout(GLU(Dropout(GELU(LRU(Norm(x)))))),
GLU(z) = W1 z * sigmoid(W2 z).

Fast/slow path: `scan.lru_sequence` sends CUDA tensors to the fused Triton kernel when the `compressm_kernels` package
is installed, everything else to the torch scan. Reduction math lives in `reduction.py` (no nn code there).

Longer than 500 lines on purpose: one readable modeling file per model is the Hugging Face convention, and
`save_pretrained` copies it (with its flat sibling imports) for `trust_remote_code` loading.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from .configuration_compressm import CompreSSMConfig
from .events import HISTORY_FILE, ReductionEvent, coerce_events, history_problems, read_history, write_history
from .reduction import (
    ReductionError,
    balanced_truncation,
    gain_lower_bound,
    hankel_singular_values,
    hinf_error_bound,
    lru_parameters_from_system,
    truncate,
)
from .scan import lru_sequence

logger = logging.getLogger(__name__)


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
    def reset_parameters(self) -> None:
        """LRU initialisation: |lam| uniform (in area) on the ring [r_min, r_max], phase uniform on [0, max_phase],
        gamma = sqrt(1 - |lam|^2), B ~ N(0, 1/(2H)) per part, C ~ N(0, 1/N) per part, D ~ N(0, 1)."""
        n, h = self.state_dim, self.hidden_size
        device = self.nu_log.device
        u1 = torch.rand(n, device=device)
        u2 = torch.rand(n, device=device)
        modulus_sq = u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2
        self.nu_log.copy_(torch.log(-0.5 * torch.log(modulus_sq)))
        self.theta_log.copy_(torch.log(self.max_phase * u2 + 1e-8))
        modulus = torch.exp(-torch.exp(self.nu_log))
        self.gamma_log.copy_(torch.log(torch.sqrt(1 - modulus**2)))
        self.B_re.normal_(0.0, 1.0 / math.sqrt(2 * h))
        self.B_im.normal_(0.0, 1.0 / math.sqrt(2 * h))
        self.C_re.normal_(0.0, 1.0 / math.sqrt(n))
        self.C_im.normal_(0.0, 1.0 / math.sqrt(n))
        self.D.normal_(0.0, 1.0)

    SSM_PARAMETER_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")

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
        nu, theta, gamma = self.nu_log.float(), self.theta_log.float(), self.gamma_log.float()
        lam = torch.exp(torch.complex(-torch.exp(nu), torch.exp(theta)))
        B = torch.complex(self.B_re.float(), self.B_im.float()) * torch.exp(gamma)[:, None]
        C = torch.complex(self.C_re.float(), self.C_im.float())
        return lam, B, C, self.D.float()

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
    """x + Dropout(GLU(Dropout(GELU(LRU(Norm(x)))))), x: (batch, L, H). Supports gradient checkpointing (the cache is
    dropped while checkpointing, as for every transformers layer)."""

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
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        initial_state = _read_recurrent_state(past_key_values, self.layer_idx, self.lru.state_dim)
        mixed, final_state = self.lru(self.norm(hidden_states), initial_state=initial_state, step_mask=step_mask)
        if past_key_values is not None:
            _write_recurrent_state(past_key_values, self.layer_idx, final_state)
        mixed = self.dropout(F.gelu(mixed))
        value, gate = self.glu_proj(mixed).chunk(2, dim=-1)
        return residual + self.dropout(value * torch.sigmoid(gate))


class CompreSSMCache(DynamicCache):
    """Generation cache of a CompreSSM model: one recurrent state per layer (complex64 (batch, N_i), sizes may differ
    between layers) in linear-attention cache layers, plus the number of steps consumed so far (which `generate` asks
    for through `get_seq_length`). Beam search reorders the states through `reorder_cache`."""

    def __init__(self, config: CompreSSMConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self.seen_steps = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_steps

    def reset(self) -> None:
        super().reset()
        self.seen_steps = 0


def _read_recurrent_state(cache: Cache | None, layer_idx: int, state_dim: int) -> torch.Tensor | None:
    """State h (complex64 (batch, N)) that `cache` holds for this layer, or None before the first step."""
    if cache is None or layer_idx >= len(cache.layers) or not cache.has_previous_state(layer_idx):
        return None
    state = cache.layers[layer_idx].recurrent_states[0]
    if state.shape[-1] != state_dim:
        raise ValueError(
            f"cache of layer {layer_idx} holds a state of size {state.shape[-1]} but the layer has {state_dim} "
            "states: a cache cannot be reused across a reduction"
        )
    return state


def _write_recurrent_state(cache: Cache, layer_idx: int, state: torch.Tensor) -> None:
    cache.update_recurrent_state(state.detach(), layer_idx)
    cache.layers[layer_idx].has_previous_state[0] = True


class CompreSSMPreTrainedModel(PreTrainedModel):
    config_class = CompreSSMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CompreSSMBlock"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, CompreSSMLRU):
            module.reset_parameters()
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
        """
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
        self.reduction_history  # validates entries appended by hand before anything is written
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not os.path.isfile(save_directory):
            self._write_compressm_files(save_directory)
        return result

    def _write_compressm_files(self, directory) -> None:
        """Write `compressm_history.json` (atomically) and, when the model-card module is present, README.md and
        the HSV plot (the plot is drawn once per reduction event and reused by later saves)."""
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
        """`PreTrainedModel.from_pretrained`, restoring `reduction_history` when the checkpoint has one.

        An invalid `compressm_history.json` raises `events.HistoryError` naming the file and the field; the weights
        are intact, so moving that file away loads them without a history."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if pretrained_model_name_or_path is not None:
            history_path = os.path.join(str(pretrained_model_name_or_path), cls.HISTORY_FILE)
            if not os.path.isfile(history_path):
                try:
                    from transformers.utils import cached_file

                    history_path = cached_file(
                        pretrained_model_name_or_path,
                        cls.HISTORY_FILE,
                        _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False,
                        revision=kwargs.get("revision"),
                        cache_dir=kwargs.get("cache_dir"),
                        local_files_only=kwargs.get("local_files_only", False),
                    )
                except (OSError, ValueError):
                    history_path = None
            if history_path and os.path.isfile(history_path):
                history = read_history(history_path)  # HistoryError names the file and the field
                for problem in history_problems(history.events, model.config.state_dims):
                    logger.warning("CompreSSM: %s: %s", history_path, problem)
                model.reduction_history = history.events
        return model

    # ------------------------------------------------------------------------------------------------ reduction
    def lru_layers(self) -> list[CompreSSMLRU]:
        """The LRU modules in layer order."""
        return [module for module in self.modules() if isinstance(module, CompreSSMLRU)]

    @torch.no_grad()
    def hankel_singular_values(self) -> list[torch.Tensor]:
        """Hankel singular values of every layer: a list of float64 (N_i,) tensors, descending, on the model device."""
        return [hankel_singular_values(*layer.to_lti()[:3]) for layer in self.lru_layers()]

    @torch.no_grad()
    def set_state_dims(self, state_dims: list[int], initialise: bool = True) -> list:
        """Re-allocate the LRU layers at the given sizes and rewrite `config.state_dims`.

        Used to rebuild a model at a checkpoint's reduced sizes before loading its weights into it (e.g. when a
        Trainer resumes from a checkpoint saved after a reduction). Parameter objects are kept; their data changes.
        With `initialise` the re-allocated layers are freshly initialised, otherwise their values are undefined
        until the caller writes them (no random numbers are drawn).
        Returns one `optimizer_state.LayerChange` per re-allocated layer (for `repair_optimizer_state`).
        """
        from .optimizer_state import LayerChange

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
        self.config.state_dims = [layer.state_dim for layer in layers]
        return changes

    @torch.no_grad()
    def reduce(
        self,
        ranks: list[int | None],
        strict: bool = False,
        record: bool = True,
        optimizer=None,
        optimizer_state: str = "reset",
        balancings: list | None = None,
    ) -> list[dict]:
        """Shrink layers in place by balanced truncation and rewrite `config.state_dims`.

        Args:
            ranks: one entry per layer: the new state size, or None to leave the layer alone. A rank >= the current
                size leaves the layer as it is (a reduction never grows a layer).
            strict: raise the ReductionError of a failing layer instead of skipping it with a warning.
            record: append a "manual" `ReductionEvent` to `reduction_history` when a layer changed
                (CompreSSMReducer passes False and records its own, richer event).
            optimizer: the optimizer training this model (torch or accelerate's wrapper): the state of the reduced
                parameters is repaired through `optimizer_state.repair_optimizer_state(optimizer, changes,
                optimizer_state)`. Without it, the next `optimizer.step()` that finds old-shaped state for them raises
                `StaleOptimizerStateError` saying so.
            optimizer_state: repair mode, a name in `optimizer_state.OPTIMIZER_STATE_REPAIRS` ("reset" deletes it).
            balancings: per layer the `reduction.Balancing` already computed for this event (or None entries), so
                the factorisation that picked the ranks is not computed again.
        Returns:
            One dict per layer: {"layer", "old_dim", "new_dim", "status" ("reduced" | "unchanged" | "failed"),
            "error" (str or None), "hsv" (float64 tensor or None), "kept_energy", "hinf_bound" (2 * sum of the
            discarded HSVs), "hinf_bound_relative" (that bound over a lower bound of the layer's H-infinity gain, so
            an upper bound of the relative change of the layer's map) (floats or None), "change"
            (`optimizer_state.LayerChange` or None)}. Parameters of reduced layers keep their identity but change
            shape, and their gradients are dropped.
        """
        from .optimizer_state import LayerChange, optimizer_state_repair, repair_optimizer_state, watch_for_stale_state

        optimizer_state_repair(optimizer_state)  # unknown mode: fail before changing anything
        layers = self.lru_layers()
        if len(ranks) != len(layers):
            raise ValueError(f"ranks has {len(ranks)} entries, the model has {len(layers)} LRU layers")
        if balancings is not None and len(balancings) != len(layers):
            raise ValueError(f"balancings has {len(balancings)} entries, the model has {len(layers)} LRU layers")
        for index, rank in enumerate(ranks):
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ValueError(f"ranks[{index}] must be a positive int or None, got {rank!r}")
        report = []
        for index, (layer, rank) in enumerate(zip(layers, ranks)):
            entry = {"layer": index, "old_dim": layer.state_dim, "new_dim": layer.state_dim, "status": "unchanged",
                     "error": None, "hsv": None, "kept_energy": None, "hinf_bound": None,
                     "hinf_bound_relative": None, "change": None}
            report.append(entry)
            if rank is None or rank >= layer.state_dim:
                continue
            balancing = balancings[index] if balancings is not None else None
            try:
                if balancing is not None:
                    lam, B, C = balancing.lam, balancing.B, balancing.C
                    reduced = truncate(balancing, rank)
                else:
                    lam, B, C, _ = layer.to_lti()
                    reduced = balanced_truncation(lam, B, C, rank)
                previous = layer.load_system(reduced.lam, reduced.B, reduced.C)
            except ReductionError as error:
                if strict:
                    raise
                logger.warning("CompreSSM: layer %d not reduced (%d -> %d): %s", index, layer.state_dim, rank, error)
                entry.update(status="failed", error=str(error))
                continue
            hsv = reduced.hsv
            total = float(hsv.sum())
            gain = max(float(hsv[0]), gain_lower_bound(lam, B, C)) if total > 0 else 0.0  # <= the layer's H-inf norm
            bound = hinf_error_bound(hsv, rank)
            entry.update(
                new_dim=layer.state_dim,
                status="reduced",
                hsv=hsv,
                kept_energy=float(hsv[:rank].sum()) / total if total > 0 else 1.0,
                hinf_bound=bound,
                hinf_bound_relative=bound / gain if gain > 0 else 0.0,
                change=LayerChange(
                    layer=index,
                    parameters={name: getattr(layer, name) for name in layer.SSM_PARAMETER_NAMES},
                    previous=previous,
                    project=reduced.project,
                    lift=reduced.lift,
                ),
            )
        self.config.state_dims = [layer.state_dim for layer in layers]
        changes = [entry["change"] for entry in report if entry["change"] is not None]
        if changes:
            if optimizer is not None:
                repair_optimizer_state(optimizer, changes, optimizer_state)
            else:
                watch_for_stale_state({
                    f"layer {change.layer} {name}": parameter
                    for change in changes for name, parameter in change.parameters.items()
                })
        if record and any(entry["status"] != "unchanged" for entry in report):
            self.reduction_history.append(
                ReductionEvent(
                    step=None,
                    kind="manual",
                    policy="manual",
                    dims_before=[entry["old_dim"] for entry in report],
                    dims_after=list(self.config.state_dims),
                    status=[entry["status"] for entry in report],
                    errors=[entry["error"] for entry in report],
                    kept_energy=[1.0 if entry["kept_energy"] is None else entry["kept_energy"] for entry in report],
                    hinf_bound=[entry["hinf_bound"] for entry in report],
                    hinf_bound_relative=[entry["hinf_bound_relative"] for entry in report],
                    ranks_requested=[rank if rank is not None else None for rank in ranks],
                )
            )
        return report


@dataclass
class _Inputs:
    hidden_states: torch.Tensor
    step_mask: torch.Tensor | None


class CompreSSMModel(CompreSSMPreTrainedModel):
    """Backbone: token embedding (or Linear encoder when `config.input_dim` is set), LRU blocks, final norm."""

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
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings if self.embeddings is not None else self.encoder

    def set_input_embeddings(self, new_embeddings):
        if self.embeddings is None:
            self.encoder = new_embeddings
        else:
            self.embeddings = new_embeddings

    def _embed(self, input_ids, inputs_embeds, attention_mask) -> _Inputs:
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
            hidden_states = self.encoder(inputs_embeds.to(self.encoder.weight.dtype))
        elif input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
            hidden_states = self.embeddings(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be (batch, length, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}"
                )
            hidden_states = inputs_embeds
        step_mask = None
        if attention_mask is not None:
            length = hidden_states.shape[1]
            if attention_mask.dim() != 2 or attention_mask.shape[1] < length:
                raise ValueError(
                    f"attention_mask must be (batch, >= {length}), got shape {tuple(attention_mask.shape)}"
                )
            # During generation the mask covers past and new tokens: the new ones are the last `length` columns.
            step_mask = attention_mask[:, -length:].to(device=hidden_states.device, dtype=torch.bool)
            if bool(step_mask.all()):
                step_mask = None
        return _Inputs(hidden_states, step_mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """
        Args:
            input_ids: int64 (batch, L) token ids, or
            inputs_embeds: float (batch, L, H), or (batch, L, input_dim) when `config.input_dim` is set.
            attention_mask: (batch, L) 1 for real steps, 0 for padding (left or right; with a cache, the mask may cover
                past + new steps, its last L columns are used).
            past_key_values: a `CompreSSMCache(config)` holding one recurrent state per layer
                (complex64 (batch, N_i)); created when `use_cache` and None.
        Returns:
            BaseModelOutputWithPast(last_hidden_state (batch, L, H), past_key_values, hidden_states).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        inputs = self._embed(input_ids, inputs_embeds, attention_mask)
        if use_cache and past_key_values is None:
            past_key_values = CompreSSMCache(self.config)
        cache = past_key_values if use_cache else None

        hidden_states = inputs.hidden_states
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, step_mask=inputs.step_mask, past_key_values=cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if isinstance(cache, CompreSSMCache):
            cache.seen_steps += inputs.hidden_states.shape[1]
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=cache, hidden_states=all_hidden_states
        )


class CompreSSMForCausalLM(CompreSSMPreTrainedModel, GenerationMixin):
    """CompreSSMModel with a (tied) linear LM head; generation keeps one recurrent state per layer in the cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

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
        # generate() would build a plain DynamicCache, which cannot report a sequence length for state-only layers.
        if (
            model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        ):
            model_kwargs["past_key_values"] = CompreSSMCache(self.config)
            generation_config.cache_implementation = None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def create_masks_for_generate(self, config=None, inputs_embeds=None, attention_mask=None, **kwargs):
        """The recurrence needs no attention mask matrix: keep the 2-D (batch, steps) padding mask as it is."""
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """
        labels: int64 (batch, L), -100 ignored; shifted inside (predict token t+1 from positions <= t).
        Returns CausalLMOutputWithPast(loss, logits (batch, L or logits_to_keep, vocab) float32, past_key_values).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :]).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = (logits, outputs.past_key_values, outputs.hidden_states)
            output = tuple(v for v in output if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )


class CompreSSMForSequenceClassification(CompreSSMPreTrainedModel):
    """CompreSSMModel, pooling over time (masked mean as in the paper, or last real step), then a linear head."""

    def __init__(self, config: CompreSSMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CompreSSMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

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
        labels: int64 (batch,) class ids, float (batch,) for regression (num_labels=1), or float (batch, num_labels)
        for multi-label. Returns SequenceClassifierOutputWithPast(loss, logits float32 (batch, num_labels)).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state.float()  # (batch, L, H)
        if attention_mask is None:
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        else:
            mask = attention_mask[:, -hidden_states.shape[1] :].to(hidden_states.device, torch.float32)
        if self.config.pooling == "mean":
            pooled = (hidden_states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        else:
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions[None, :] * (mask > 0)).max(dim=1).values
            pooled = hidden_states[torch.arange(hidden_states.shape[0], device=mask.device), last]
        logits = self.score(pooled.to(self.score.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self._classification_loss(logits, labels.to(logits.device))
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
            self.config.problem_type = problem_type
        if problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if self.num_labels == 1 else F.mse_loss(
                logits, labels.float()
            )
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.float())


__all__ = [
    "CompreSSMPreTrainedModel",
    "CompreSSMModel",
    "CompreSSMForCausalLM",
    "CompreSSMForSequenceClassification",
    "CompreSSMLRU",
    "CompreSSMCache",
]
