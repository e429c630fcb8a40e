"""Resume from a checkpoint whose optimizer grouped the parameters differently.

A run that adds compression to checkpoints written without it (a plain `Trainer`, two groups: decay / no decay)
builds its optimizer over `optim.compressm_parameter_groups` (three groups: the LRU parameters get their own), and
torch's `Optimizer.load_state_dict` refuses the saved state ("different number of parameter groups"). The saved
state is per parameter, so it can be carried over when the saved parameter order is known: each candidate layout
(`layouts`: the groups a known optimizer builder made from this model) is tried, and the first whose group sizes
and per-parameter state shapes match the saved ones maps every saved entry to its parameter. The current groups keep
their own hyper-parameters (learning rate, weight decay); a `LambdaLR` scheduler (transformers' schedules) gets one
base learning rate per current group and continues at the saved step.

No Trainer code here: `CompreSSMTrainer._load_optimizer_and_scheduler` calls `load_regrouped_optimizer_state`.
"""

from __future__ import annotations

import logging

import torch

from .optimizer_state import unwrap_optimizer

logger = logging.getLogger(__name__)

__all__ = ["known_layouts", "load_regrouped_optimizer_state", "regroup_optimizer_state"]


def _group_sizes(param_groups) -> list[int]:
    return [len(group["params"]) for group in param_groups]


def _state_fits(entry: dict, parameter: torch.Tensor) -> bool:
    """Whether every per-element tensor of a saved state entry (exp_avg, momentum, ...) has the parameter's shape."""
    return all(
        value.shape == parameter.shape for value in entry.values() if isinstance(value, torch.Tensor) and value.dim()
    )


def regroup_optimizer_state(saved: dict, optimizer, layouts: dict[str, list[list[torch.Tensor]]]):
    """The saved optimizer state dict rewritten for `optimizer`'s parameter groups, or None when no layout fits.

    Args:
        saved: `optimizer.state_dict()` of the run that wrote the checkpoint ({"state": {index: {...}},
            "param_groups": [{"params": [index, ...], ...}]}).
        optimizer: the current optimizer (torch, or a wrapper with `.optimizer`).
        layouts: name -> the parameter groups (lists of parameters, in order) an optimizer builder would have made
            from the current model; the saved indices are read as positions in the first layout that fits.
    Returns:
        (state dict for `optimizer.load_state_dict`, the name of the layout used), or None.
    """
    inner = unwrap_optimizer(optimizer)
    saved_groups = saved["param_groups"]
    saved_state = saved["state"]
    current = inner.state_dict()
    position = {id(parameter): index for index, parameter in
                enumerate(parameter for group in inner.param_groups for parameter in group["params"])}
    for name, groups in layouts.items():
        if _group_sizes([{"params": group} for group in groups]) != _group_sizes(saved_groups):
            continue
        mapping = {
            saved_index: parameter
            for saved_group, group in zip(saved_groups, groups)
            for saved_index, parameter in zip(saved_group["params"], group)
        }
        if any(id(parameter) not in position for parameter in mapping.values()):
            continue
        if not all(_state_fits(entry, mapping[index]) for index, entry in saved_state.items() if index in mapping):
            continue
        if any(index not in mapping for index in saved_state):
            continue
        state = {position[id(mapping[index])]: entry for index, entry in saved_state.items()}
        return {"state": state, "param_groups": current["param_groups"]}, name
    return None


def known_layouts(model: torch.nn.Module, decay_parameter_names, weight_decay: float) -> dict:
    """The parameter groups known optimizer builders make from `model`: transformers' Trainer (parameters named in
    `decay_parameter_names` / the others), CompreSSMTrainer (`optim.compressm_parameter_groups`: decay / no decay /
    SSM), and one group over every trainable parameter. Name -> list of groups (lists of parameters, in order)."""
    from .optim import compressm_parameter_groups

    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    decay = set(decay_parameter_names)
    return {
        "transformers.Trainer's decay / no-decay groups": [
            [parameter for name, parameter in named if name in decay],
            [parameter for name, parameter in named if name not in decay],
        ],
        "CompreSSMTrainer's decay / no-decay / SSM groups": [
            group["params"] for group in compressm_parameter_groups(model, weight_decay, 1.0)
        ],
        "one group over all parameters": [[parameter for _, parameter in named]],
    }


def _continue_schedule(scheduler, saved_scheduler: dict, optimizer) -> bool:
    """Load a scheduler state saved for other groups: one base learning rate per current group (its
    `initial_lr`), the saved step; a LambdaLR sets every group's learning rate for that step. False when the
    scheduler is not a LambdaLR (its learning rates then follow from the next step on)."""
    inner = unwrap_optimizer(optimizer)
    base_lrs = [group.get("initial_lr", group["lr"]) for group in inner.param_groups]
    scheduler.load_state_dict({**saved_scheduler, "base_lrs": base_lrs, "_last_lr": list(base_lrs)})
    scheduler.base_lrs = base_lrs
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not isinstance(lambdas, list) or len(lambdas) != len(base_lrs):
        return False
    rates = [base * function(scheduler.last_epoch) for base, function in zip(base_lrs, lambdas)]
    for group, rate in zip(inner.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
    return True


def load_regrouped_optimizer_state(optimizer, scheduler, optimizer_file: str, scheduler_file: str | None,
                                   layouts: dict[str, list[list[torch.Tensor]]]) -> bool:
    """Load a checkpoint's optimizer (and scheduler) state into an optimizer with other parameter groups.

    Returns False, loading nothing, when the saved groups have the current sizes (the ordinary load applies). When
    no layout fits, the optimizer starts from fresh state, with a warning that says so. Logs what was done.
    """
    peek = torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=True)  # reads no tensor data
    inner = unwrap_optimizer(optimizer)
    saved_sizes, current_sizes = _group_sizes(peek["param_groups"]), _group_sizes(inner.param_groups)
    del peek
    if saved_sizes == current_sizes:
        return False
    saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)  # tensors in memory, not file-backed
    regrouped = regroup_optimizer_state(saved, optimizer, layouts)
    if regrouped is None:
        logger.warning(
            "CompreSSM resume: %s holds optimizer state for parameter groups of sizes %s, this run's optimizer has "
            "groups of sizes %s, and no known grouping (%s) maps one onto the other: the optimizer starts from fresh "
            "state (moments and step counts) at this step", optimizer_file, saved_sizes, current_sizes,
            ", ".join(layouts),
        )
    else:
        state_dict, layout = regrouped
        optimizer.load_state_dict(state_dict)
        logger.warning(
            "CompreSSM resume: %s was written by an optimizer with parameter groups of sizes %s (%s); this run groups "
            "them as %s: the saved state of all %d parameters was moved into the new groups, which keep their own "
            "learning rates and weight decay", optimizer_file, saved_sizes, layout, current_sizes, len(saved["state"]),
        )
    if scheduler_file is not None and scheduler is not None:
        saved_scheduler = torch.load(scheduler_file, map_location="cpu", weights_only=True)
        if not _continue_schedule(scheduler, saved_scheduler, optimizer):
            logger.warning(
                "CompreSSM resume: the learning-rate scheduler %s was restored at step %s with one base learning rate "
                "per new parameter group", type(scheduler).__name__, saved_scheduler.get("last_epoch"),
            )
    return True
