"""Optimizer parameter groups for CompreSSM models: the SSM parameters get their own learning rate and no weight decay.

The reference implementation (camail-official/compressm) trains the LRU recurrence parameters (nu_log, theta_log,
gamma_log, B) with AdamW *without* weight decay and with a reduced learning rate (`ssm_lr_factor`, 0.1-0.5 per
task). Weight decay on `nu_log` / `theta_log` pulls the eigenvalue parametrisation towards a fixed point
(|lam| = exp(-1), phase 1) instead of towards "no recurrence", which is not what regularisation is meant to do.

    from modeling_compressm.optim import compressm_adamw, compressm_parameter_groups
    optimizer = compressm_adamw(model, learning_rate=3e-3, weight_decay=0.1, ssm_lr_factor=0.5)
    # or, for transformers.Trainer:  Trainer(..., optimizers=(optimizer, None))

Groups (empty ones are left out), each tagged with "name" and "lr_factor" so schedulers and reducers can find them:

    "decay"     every other trainable parameter (weight matrices, embeddings, D) -> weight_decay, lr
    "no_decay"  biases and normalisation weights (as transformers.Trainer does)  -> 0, lr
    "ssm"       LRU parameters named in `ssm_parameter_names`                     -> ssm_weight_decay, lr * ssm_lr_factor

A reduction (`model.reduce`, `CompreSSMCallback`) keeps the Parameter objects and only changes their shapes, so the
groups stay valid after it; only the optimizer *state* of reduced parameters has to be repaired.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .modeling_compressm import CompreSSMLRU

__all__ = [
    "LRU_PARAMETER_NAMES",
    "DEFAULT_SSM_PARAMETER_NAMES",
    "compressm_parameter_groups",
    "compressm_adamw",
]

# Every parameter an LRU layer owns.
LRU_PARAMETER_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D")
# The recurrence parameters the reference trains without weight decay and with lr * ssm_lr_factor.
DEFAULT_SSM_PARAMETER_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im")
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
