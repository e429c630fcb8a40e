"""Optimizer parameter groups for CompreSSM models: the SSM parameters get their own learning rate and no weight decay.

The reference implementation (camail-official/compressm) trains the LRU recurrence parameters (nu_log, theta_log,
gamma_log, B) with AdamW *without* weight decay and with a reduced learning rate (`ssm_lr_factor`, 0.1-0.5 per
task). Weight decay on `nu_log` / `theta_log` pulls the eigenvalue parametrisation towards a fixed point
(|lam| = exp(-1), phase 1) instead of towards "no recurrence", which is not what regularisation is meant to do.

    from modeling_compressm.training.optim import compressm_adamw, compressm_parameter_groups
    optimizer = compressm_adamw(model, learning_rate=3e-3, weight_decay=0.1, ssm_lr_factor=0.5)
    # or, for transformers.Trainer:  Trainer(..., optimizers=(optimizer, None))

Groups (empty ones are left out), each tagged with "name" and "lr_factor" so schedulers and reducers can find them:

    "decay"     every other trainable parameter (weight matrices, embeddings, D) -> weight_decay, lr
    "no_decay"  biases and normalisation weights (as transformers.Trainer does)  -> 0, lr
    "ssm"       LRU parameters named in `ssm_parameter_names`                     -> ssm_weight_decay, lr * ssm_lr_factor

A reduction (`model.reduce`, `CompreSSMCallback`) keeps the Parameter objects and only changes their shapes, so the
groups stay valid after it; only the optimizer *state* of reduced parameters has to be repaired. Importing this
module registers the repair mode `optimizer_state="project"` (`project_optimizer_state`): instead of deleting the
Adam moments of a reduced layer it carries them through the reduction's change of basis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..modeling_compressm import CompreSSMLRU
from .optimizer_state import LayerChange, register_optimizer_state_repair, reset_optimizer_state

__all__ = [
    "LRU_PARAMETER_NAMES",
    "DEFAULT_SSM_PARAMETER_NAMES",
    "DEFAULT_SSM_LR_FACTOR",
    "compressm_parameter_groups",
    "compressm_adamw",
    "project_optimizer_state",
]

# Every parameter an LRU layer owns.
LRU_PARAMETER_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D")
# The recurrence parameters the reference trains without weight decay and with lr * ssm_lr_factor.
DEFAULT_SSM_PARAMETER_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im")
# The SSM learning-rate factor of CompreSSMTrainer's default optimizer and of the CLI's. Measured in the LM study
# (benchmarks/results/, docs/callback.md): 0.5 (the reference uses 0.1-0.5) left
# the full-size model unchanged within noise and made the compressed runs worse against small-from-scratch, and
# factors below 1 trained worse at a learning rate below the best one; so 1.0 (no weight decay is what remains).
DEFAULT_SSM_LR_FACTOR = 1.0
# Parameter-name patterns transformers.Trainer exempts from weight decay (matched on the lower-cased full name).
_NO_DECAY_NAME_PATTERNS = tuple(
    re.compile(pattern) for pattern in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)


def _is_norm_module(module: nn.Module) -> bool:
    """LayerNorm / GroupNorm / RMSNorm-like modules (by type, or by a class name ending in "Norm")."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    return type(module).__name__.lower().endswith("norm")


def _check_number(name: str, value, minimum: float = 0.0, strictly_positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (strictly_positive and value <= 0):
        bound = f"> {minimum}" if strictly_positive else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def compressm_parameter_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    ssm_lr_factor: float = 1.0,
    *,
    learning_rate: float | None = None,
    ssm_weight_decay: float = 0.0,
    ssm_parameter_names: Iterable[str] = DEFAULT_SSM_PARAMETER_NAMES,
) -> list[dict]:
    """Split the trainable parameters of `model` into torch optimizer parameter groups.

    Args:
        model: any nn.Module holding `CompreSSMLRU` layers (a CompreSSM model, possibly inside a wrapper).
        weight_decay: decoupled weight decay of the "decay" group (>= 0).
        ssm_lr_factor: learning-rate multiplier of the "ssm" group (> 0).
        learning_rate: base learning rate. When given, every group carries an explicit "lr" (lr * lr_factor);
            required when `ssm_lr_factor != 1` (a group-level lr is the only way torch optimizers scale one group).
        ssm_weight_decay: weight decay of the "ssm" group (default 0, as in the reference implementation).
        ssm_parameter_names: LRU attribute names that form the "ssm" group; a subset of `LRU_PARAMETER_NAMES`.
            LRU parameters not named here fall into "decay" like any other weight.
    Returns:
        list of dicts {"name": "decay" | "no_decay" | "ssm", "params": list[nn.Parameter], "weight_decay": float,
        "lr_factor": float, ["lr": float]}; every trainable parameter appears in exactly one group (tied parameters
        once), frozen parameters in none; empty groups are left out. Parameters keep `model.named_parameters()`
        order inside each group.
    Raises:
        ValueError: bad numbers, unknown names in `ssm_parameter_names`, a factor without a learning rate, or a model
            without trainable parameters.
    """
    weight_decay = _check_number("weight_decay", weight_decay)
    ssm_weight_decay = _check_number("ssm_weight_decay", ssm_weight_decay)
    ssm_lr_factor = _check_number("ssm_lr_factor", ssm_lr_factor, strictly_positive=True)
    if learning_rate is not None:
        learning_rate = _check_number("learning_rate", learning_rate, strictly_positive=True)
    elif ssm_lr_factor != 1.0:
        raise ValueError(
            f"ssm_lr_factor={ssm_lr_factor} needs the base learning_rate (the SSM group gets lr * ssm_lr_factor)"
        )
    if isinstance(ssm_parameter_names, str):
        raise ValueError(f"ssm_parameter_names must be a collection of names, got the string {ssm_parameter_names!r}")
    ssm_names = tuple(ssm_parameter_names)
    unknown = sorted(set(ssm_names) - set(LRU_PARAMETER_NAMES))
    if unknown:
        raise ValueError(f"unknown LRU parameter names {unknown}; choose from {LRU_PARAMETER_NAMES}")

    ssm_ids: set[int] = set()
    no_decay_ids: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, CompreSSMLRU):
            ssm_ids.update(id(getattr(module, name)) for name in ssm_names)
        if _is_norm_module(module):
            no_decay_ids.update(id(parameter) for parameter in module.parameters(recurse=False))
    members: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "ssm": []}
    for name, parameter in model.named_parameters():  # de-duplicates tied parameters
        if not parameter.requires_grad:
            continue
        if id(parameter) in ssm_ids:
            members["ssm"].append(parameter)
        elif id(parameter) in no_decay_ids or any(pattern.search(name.lower()) for pattern in _NO_DECAY_NAME_PATTERNS):
            members["no_decay"].append(parameter)
        else:
            members["decay"].append(parameter)
    if not any(members.values()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters")

    settings = {"decay": (weight_decay, 1.0), "no_decay": (0.0, 1.0), "ssm": (ssm_weight_decay, ssm_lr_factor)}
    groups = []
    for name, params in members.items():
        if not params:
            continue
        decay, factor = settings[name]
        group = {"name": name, "params": params, "weight_decay": decay, "lr_factor": factor}
        if learning_rate is not None:
            group["lr"] = learning_rate * factor
        groups.append(group)
    return groups


def compressm_adamw(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.0,
    ssm_lr_factor: float = 1.0,
    *,
    ssm_weight_decay: float = 0.0,
    ssm_parameter_names: Iterable[str] = DEFAULT_SSM_PARAMETER_NAMES,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **adamw_kwargs,
) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over `compressm_parameter_groups(model, ...)` (see there for the groups).

    Extra keyword arguments (e.g. `fused=True`, `foreach=False`) go to `torch.optim.AdamW`. The returned optimizer
    works with any LR scheduler (LambdaLR scales each group's own initial lr, so the SSM factor is kept) and with
    `transformers.Trainer(..., optimizers=(optimizer, None))`.
    """
    groups = compressm_parameter_groups(
        model, weight_decay, ssm_lr_factor, learning_rate=learning_rate, ssm_weight_decay=ssm_weight_decay,
        ssm_parameter_names=ssm_parameter_names,
    )
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kwargs)


# ------------------------------------------------------------------------------------ optimizer state across a reduction
# State entries that average gradients (map linearly) and that average squared gradients (map as variances).
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
_STATE_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")


def _split_state(state: dict, old_shape: torch.Size) -> tuple[dict, dict, dict] | None:
    """(first moments, second moments, other entries) of one parameter's state; None if some tensor entry of the old
    shape is of an unknown kind (it cannot be mapped)."""
    first, second, other = {}, {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == old_shape:
            if key in _FIRST_MOMENTS:
                first[key] = value
            elif key in _SECOND_MOMENTS:
                second[key] = value
            else:
                return None
        else:
            other[key] = value
    return first, second, other


def _map_pair(first_re, first_im, second_re, second_im, left=None, right=None):
    """Map the moments of a complex matrix X = X_re + i X_im through X -> M1 X + M2 conj(X) (left, a pair (M1, M2),
    M2 None for a complex-linear map) or X -> X R1 + conj(X) R2 (right, a pair (R1, R2)).

    First moments map linearly. Second moments map as the variances of the image of independent entries: with
    Y = M1 X + M2 conj(X), Re Y = Re(M1 + M2) Re X + Im(M2 - M1) Im X and Im Y = Im(M1 + M2) Re X + Re(M1 - M2) Im X,
    so var(Re Y) = Re(M1 + M2)^2 var(Re X) + Im(M2 - M1)^2 var(Im X), and likewise for Im Y.
    """
    def squares(first, second):  # the squared real coefficients of (Re, Im) of the image
        second = torch.zeros_like(first) if second is None else second
        total, difference = first + second, first - second
        return total.real.square(), difference.imag.square(), total.imag.square(), difference.real.square()

    out = ({}, {}, {}, {})
    for key in first_re:
        value = torch.complex(first_re[key].double(), first_im[key].double())
        if left is not None:
            value = left[0] @ value + (left[1] @ value.conj() if left[1] is not None else 0)
        if right is not None:
            value = value @ right[0] + (value.conj() @ right[1] if right[1] is not None else 0)
        out[0][key], out[1][key] = value.real, value.imag
    for key in second_re:
        re, im = second_re[key].double(), second_im[key].double()
        if left is not None:
            re_re, re_im, im_re, im_im = squares(*left)
            re, im = re_re @ re + re_im @ im, im_re @ re + im_im @ im
        if right is not None:
            re_re, re_im, im_re, im_im = squares(*right)
            re, im = re @ re_re + im @ re_im, re @ im_re + im @ im_im
        out[2][key], out[3][key] = re, im
    return out


def _halves(matrix: torch.Tensor, dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M1, M2) of a map on [X; conj X] (`matrix.shape[dim]` == 2n, a real-map reduction) or (M, None) of a
    complex-linear map (== n)."""
    return tuple(torch.split(matrix, n, dim)) if matrix.shape[dim] == 2 * n else (matrix, None)


@torch.no_grad()
def project_optimizer_state(optimizer: torch.optim.Optimizer, changes: list[LayerChange]) -> None:
    """Repair mode "project": carry the optimizer state of reduced layers through the change of basis.

    With `project` (r, N) and `lift` (N, r) of the reduction (new B~ = project @ old B~, new C = old C @ lift) and the
    input gains g = exp(gamma_log) before/after (the stored B is B~ / g); a real-map reduction gives `project`
    (r, 2N) and `lift` (2N, r) on [B~; conj B~] and [C, conj C], mapped as the real-linear maps they are:

    * B_re/B_im: first moments (exp_avg, momentum_buffer) map by diag(1/g_new) @ project @ diag(g_old); second
      moments (exp_avg_sq, max_exp_avg_sq) as the variances of that linear image (see `_map_pair`);
    * C_re/C_im: likewise through `lift` on the right;
    * nu_log, theta_log, gamma_log (one value per state, no linear relation between old and new states): every new
      state gets the average of the old states' moments weighted by their participation |project_ij * lift_ji|;
    * scalar entries (Adam's `step`) are kept, so bias correction continues where it was.

    The moments are mapped as displacements of the parameters (like the parameters themselves), which keeps Adam's
    update direction m / sqrt(v) consistent with the new basis. A layer is reset instead (its state deleted, as mode
    "reset" does) when it was re-allocated rather than reduced, when some of its SSM parameters have no state yet, or
    when a state entry is of a kind not listed above.
    """
    for change in changes:
        parameters = change.parameters
        states = {name: optimizer.state.get(parameters[name]) for name in _STATE_NAMES if name in parameters}
        usable = (change.project is not None and change.lift is not None and len(states) == len(_STATE_NAMES)
                  and all(states.values()) and all(name in change.previous for name in _STATE_NAMES))
        split = {}
        if usable:
            for name, state in states.items():
                split[name] = _split_state(state, change.previous[name].shape)
                usable = usable and split[name] is not None
        if not usable:
            reset_optimizer_state(optimizer, [change])
            continue
        device = parameters["B_re"].device
        project = change.project.to(device=device, dtype=torch.complex128)
        lift = change.lift.to(device=device, dtype=torch.complex128)
        gain_old = torch.exp(change.previous["gamma_log"].to(device=device, dtype=torch.float64))
        gain_new = torch.exp(parameters["gamma_log"].detach().to(torch.float64))
        n = gain_old.shape[0]
        gains = (gain_old.repeat(project.shape[1] // n)[None, :] / gain_new[:, None]).to(torch.complex128)
        b_map, c_map = _halves(project * gains, 1, n), _halves(lift, 0, n)
        weights = (project * lift.T).abs()
        weights = weights[:, :n] + weights[:, n:] if weights.shape[1] == 2 * n else weights
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-300)  # (r, N), rows sum to 1
        new_states = {}
        for (re_name, im_name), maps in ((("B_re", "B_im"), {"left": b_map}), (("C_re", "C_im"), {"right": c_map})):
            (first_re, second_re, other_re), (first_im, second_im, other_im) = split[re_name], split[im_name]
            mapped = _map_pair(first_re, first_im, second_re, second_im, **maps)
            new_states[re_name] = {**other_re, **mapped[0], **mapped[2]}
            new_states[im_name] = {**other_im, **mapped[1], **mapped[3]}
        for name in ("nu_log", "theta_log", "gamma_log"):
            first, second, other = split[name]
            new_states[name] = {**other, **{key: weights @ value.double() for key, value in {**first, **second}.items()}}
        for name, state in new_states.items():
            parameter = parameters[name]
            optimizer.state[parameter] = {
                key: (value.to(dtype=parameter.dtype).contiguous() if torch.is_tensor(value) and value.dim() > 0
                      else value)
                for key, value in state.items()
            }
