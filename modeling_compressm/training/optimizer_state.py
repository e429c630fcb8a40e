"""Optimizer state across a change of state size: one repair function per mode, and a guard against stale state.

A reduction replaces the values of an LRU layer's SSM parameters (nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im)
by those of a smaller system in another basis; the Parameter objects stay the same, so an optimizer keeps pointing
at them, but whatever state it holds for them (Adam's moments) has the old shape and the old basis.

* `repair_optimizer_state(optimizer, changes, mode)` fixes that through the function registered for `mode`:
  "reset" deletes the state of the changed parameters (the optimizer re-initialises it at its next step). Further
  modes (e.g. mapping B/C moments through `LayerChange.project` / `lift`) plug in with
  `register_optimizer_state_repair(name, function)`; the reducer loop does not change.
* `watch_for_stale_state(parameters)`: when a model was reduced without its optimizer, the next `optimizer.step()`
  that finds old-shaped state for those parameters raises `StaleOptimizerStateError` saying what to do, instead of
  a tensor-size error from inside the optimizer. `watch_for_replaced_parameters(parameters)` does the same for
  Parameter objects that a distributed wrapper replaced (FSDP2 re-sharding): an optimizer still holding one would
  silently train a parameter that is no longer in the model.
* `replace_parameters_in_optimizer(optimizer, mapping)`: for distributed wrappers that must create new Parameter
  objects (FSDP2 re-sharding), put the new ones in the old ones' place in their param groups, keeping group
  hyper-parameters (same optimizer object, so LR schedulers and accelerate's wrapper stay attached).

Part of the training library: the model (`model.reduce`) changes sizes and returns `LayerReduction`s; repairing an
optimizer is `reduce_with_optimizer` here, or the reducer's job.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..layer_reduction import LayerChange, LayerReduction

__all__ = [
    "LayerChange",
    "reduce_with_optimizer",
    "StaleOptimizerStateError",
    "OPTIMIZER_STATE_REPAIRS",
    "register_optimizer_state_repair",
    "optimizer_state_repair",
    "repair_optimizer_state",
    "reset_optimizer_state",
    "unwrap_optimizer",
    "replace_parameters_in_optimizer",
    "watch_for_stale_state",
    "unwatch_stale_state",
    "watch_for_replaced_parameters",
]


class StaleOptimizerStateError(RuntimeError):
    """The optimizer holds state of the old shape for a parameter that a reduction shrank."""


def unwrap_optimizer(optimizer):
    """The torch optimizer that owns `.state` (accelerate's AcceleratedOptimizer wraps it as `.optimizer`)."""
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


def reset_optimizer_state(optimizer: torch.optim.Optimizer, changes: list[LayerChange]) -> None:
    """Mode "reset": delete the state (moments, step) of every changed parameter; the optimizer starts it afresh.

    Re-diagonalisation mixes the states, so slicing the old moments would be wrong."""
    for change in changes:
        for parameter in change.parameters.values():
            optimizer.state.pop(parameter, None)


OPTIMIZER_STATE_REPAIRS: dict[str, Callable[[torch.optim.Optimizer, list[LayerChange]], None]] = {
    "reset": reset_optimizer_state,
}


def register_optimizer_state_repair(name: str, function: Callable) -> None:
    """Make `function(torch_optimizer, changes: list[LayerChange]) -> None` available as optimizer_state=`name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    OPTIMIZER_STATE_REPAIRS[name] = function


def optimizer_state_repair(name: str) -> Callable:
    """The repair function registered for `name`; ValueError listing the known modes otherwise."""
    if name not in OPTIMIZER_STATE_REPAIRS:
        raise ValueError(f"optimizer_state must be one of {sorted(OPTIMIZER_STATE_REPAIRS)}, got {name!r}")
    return OPTIMIZER_STATE_REPAIRS[name]


def repair_optimizer_state(optimizer, changes: list[LayerChange], mode: str = "reset") -> None:
    """Repair the optimizer state of the changed parameters with the function registered for `mode`.

    Args:
        optimizer: a torch optimizer or a wrapper with `.optimizer` (accelerate); None does nothing.
        changes: one LayerChange per changed layer.   mode: a name in OPTIMIZER_STATE_REPAIRS.
    """
    repair = optimizer_state_repair(mode)
    if optimizer is None or not changes:
        return
    repair(unwrap_optimizer(optimizer), changes)
    unwatch_stale_state(parameter for change in changes for parameter in change.parameters.values())


def replace_parameters_in_optimizer(optimizer, mapping: dict) -> int:
    """Put new Parameter objects in place of old ones in the optimizer, in place.

    Each old parameter in the param groups is replaced by its new one at the same position (param groups, their
    hyper-parameters and the optimizer object stay, so an LR scheduler and accelerate's `AcceleratedOptimizer` stay
    attached). The state of a parameter whose shape is unchanged moves to the new parameter; the state of one whose
    shape changed (e.g. Adam moments of a reduced layer) is dropped and starts afresh at the next step (or is set by
    an optimizer-state repair afterwards).

    Args:
        optimizer: torch optimizer or wrapper with `.optimizer`.   mapping: {old Parameter: new Parameter}.
    Returns:
        how many param-group entries were replaced.
    """
    if not mapping:
        return 0
    inner = unwrap_optimizer(optimizer)
    by_id = {id(old): new for old, new in mapping.items()}
    replaced = 0
    for group in inner.param_groups:
        for index, parameter in enumerate(group["params"]):
            new = by_id.get(id(parameter))
            if new is not None and new is not parameter:
                group["params"][index] = new
                replaced += 1
    for old, new in mapping.items():
        if new is old:
            continue
        state = inner.state.pop(old, None)
        if state and old.shape == new.shape:
            inner.state[new] = state
    return replaced


# --------------------------------------------------------------------------------------------- stale-state guard
# id -> watched Parameter (while alive: a model dropped after a post-hoc reduction must not live on here), and its name
_STALE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_STALE_NAMES: dict[int, str] = {}
_REPLACED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> replaced Parameter (while alive)
_HOOK = None


def _check_stale_state(optimizer, args, kwargs):
    """Global optimizer step pre-hook: raise for watched parameters whose state has another shape, and for
    parameters that a reduction replaced by new objects."""
    if _REPLACED:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if _REPLACED.get(id(parameter)) is parameter:
                    raise StaleOptimizerStateError(
                        f"{type(optimizer).__name__} holds a parameter of shape {tuple(parameter.shape)} that a "
                        "reduction replaced by a new Parameter object (FSDP2 re-shards reduced layers), so it would "
                        "train a parameter the model no longer uses. Pass the optimizer to the reduction "
                        "(CompreSSMReducer(model, optimizer)) so it is updated in place."
                    )
    if not _STALE:
        return None
    for key, parameter in list(_STALE.items()):
        name = _STALE_NAMES.get(key, "a reduced parameter")
        state = optimizer.state.get(parameter) if hasattr(optimizer.state, "get") else None
        if not state:
            continue
        for state_name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                raise StaleOptimizerStateError(
                    f"{type(optimizer).__name__} holds {state_name!r} of shape {tuple(value.shape)} for {name}, which "
                    f"a reduction changed to {tuple(parameter.shape)}. Pass the optimizer to the reduction "
                    "(reduce_with_optimizer(model, ranks, optimizer=optimizer) or CompreSSMReducer(model, optimizer)) so its state "
                    "is repaired, or delete that state (optimizer.state.pop(parameter)) yourself."
                )
        _STALE.pop(key, None)  # state matches the new shape: nothing left to watch
        _STALE_NAMES.pop(key, None)
    return None


def unwatch_stale_state(parameters) -> None:
    """Stop watching these parameters (their optimizer state was repaired, or they left the model)."""
    for parameter in parameters:
        _STALE.pop(id(parameter), None)
        _STALE_NAMES.pop(id(parameter), None)


def _register_hook() -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_check_stale_state)


def watch_for_stale_state(named_parameters: dict) -> None:
    """Watch parameters that were reduced without their optimizer (name -> Parameter); see the module docstring."""
    for key in [key for key in _STALE_NAMES if key not in _STALE]:  # names of parameters that died
        del _STALE_NAMES[key]
    for name, parameter in named_parameters.items():
        _STALE[id(parameter)] = parameter
        _STALE_NAMES[id(parameter)] = name
    _register_hook()


def watch_for_replaced_parameters(parameters) -> None:
    """Watch Parameter objects that left the model (replaced by new ones) while no optimizer was repaired: an
    optimizer step that still holds one raises StaleOptimizerStateError. Held weakly (a dropped parameter is
    forgotten)."""
    for parameter in parameters:
        _REPLACED[id(parameter)] = parameter
    _register_hook()


def reduce_with_optimizer(
    model, ranks: list[int | None], optimizer=None, optimizer_state: str = "reset", **reduce_arguments
) -> list[LayerReduction]:
    """`model.reduce(ranks, **reduce_arguments)` for a model that is training: the optimizer state of the reduced
    parameters is repaired with the mode `optimizer_state` (a name in OPTIMIZER_STATE_REPAIRS; "reset" deletes it).

    Args:
        model: a CompreSSM model (`CompreSSMPreTrainedModel`), unwrapped.
        ranks: per layer the new state size or None, as for `model.reduce`.
        optimizer: the optimizer training the model (torch or accelerate's wrapper). None: the reduced parameters are
            watched instead, and the next `optimizer.step()` of any optimizer that still holds old-shaped state for
            them raises `StaleOptimizerStateError` saying what to do.
        optimizer_state: the repair mode; an unknown one raises ValueError before the model changes.
        reduce_arguments: `strict`, `record`, `balancings`, `system` of `model.reduce`.
    Returns:
        `model.reduce`'s list of `LayerReduction` (one per layer).
    """
    optimizer_state_repair(optimizer_state)  # unknown mode: fail before changing anything
    results = model.reduce(ranks, **reduce_arguments)
    changes = [result.change for result in results if result.change is not None]
    if not changes:
        return results
    if optimizer is not None:
        repair_optimizer_state(optimizer, changes, optimizer_state)
    else:
        watch_for_stale_state({
            f"layer {change.layer} {name}": parameter
            for change in changes for name, parameter in change.parameters.items()
        })
    return results
