"""`CompreSSMReducer`'s strategy for models sharded with FSDP2 (`fully_shard`): `FSDP2Strategy`, registered with
`distributed.register_strategy` when the package is imported (it imports torch.distributed.fsdp only when a model is
checked: `fsdp.is_fsdp2`).

At an event, on every rank (call order in `distributed.py`):
    gathered        `fsdp.full_lru_parameters(model, src=0)`: full LRU parameters; rank 0 balances, picks sizes and
                    reduces while the others wait for its outcome (shared on the strategy's gloo group); on leaving,
                    rank 0's result is broadcast and re-sharded into fresh FSDP parameters on every rank;
    after_change    {old sharded parameter: new one};
    repair_optimizer
                    the new parameters take the old ones' places in the optimizer (in place), and the state of the
                    reduced ones is repaired by the `optimizer_state` mode: "reset" keeps none; any other mode runs on
                    full tensors (`repair_on_full_state`): the old moments are gathered from their shards, the mode
                    sees what it would see in one process (state of old shape, the new full values, the basis maps),
                    and every rank keeps its shard of the result.
A rollback snapshot (`model.state_dict()` copies) holds this rank's shards, restored after re-sharding to the same
sizes (`snapshot_is_per_rank`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .collectives import DistributedReductionError
from .distributed import CollectiveStrategy, compressm_model_of, register_strategy
from .fsdp import FullParameterSession, check_fsdp_param_api, fsdp_classes, full_lru_parameters, gather_shards, is_fsdp2
from .optimizer_state import (
    optimizer_state_repair,
    repair_optimizer_state,
    replace_parameters_in_optimizer,
    reset_optimizer_state,
    unwrap_optimizer,
)
from .settings import DEFAULTS

__all__ = ["FSDP2Strategy", "repair_on_full_state"]


# ---------------------------------------------------------------------------------------- sharded <-> full
def _shard_placement(value, what: str):
    """(mesh dimension, Shard placement) of a DTensor sharded on one tensor dim (replicated on any other mesh dim)."""
    shards = [(mesh_dim, placement) for mesh_dim, placement in enumerate(value.placements) if placement.is_shard()]
    if len(shards) != 1 or not all(p.is_shard() or p.is_replicate() for p in value.placements):
        raise DistributedReductionError(f"{what}: unsupported DTensor layout {value.placements}")
    return shards[0]


def _full_tensor(value, what: str, timeout: timedelta):
    """A DTensor's full value on every rank (timed all-gather of its shards); any other value as it is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return value
    mesh_dim, placement = _shard_placement(value, what)
    return gather_shards(value.to_local(), placement.dim, value.shape[placement.dim],
                          value.device_mesh.get_group(mesh_dim), what, timeout)


def _shard_like(full: torch.Tensor, like, what: str):
    """This rank's shard of `full` as a DTensor laid out like the DTensor `like` (same mesh, placements, shape)."""
    from torch.distributed.tensor import DTensor

    mesh_dim, placement = _shard_placement(like, what)
    group = like.device_mesh.get_group(mesh_dim)
    dim, size = placement.dim, full.shape[placement.dim]
    chunk = -(-size // dist.get_world_size(group))
    start = min(dist.get_rank(group) * chunk, size)
    local = full.narrow(dim, start, min(chunk, size - start)).to(like.to_local().device).contiguous()
    if local.shape != like.to_local().shape:
        raise DistributedReductionError(f"{what}: shard {tuple(local.shape)} does not match the parameter's "
                                        f"{tuple(like.to_local().shape)}")
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=full.shape,
                              stride=full.stride())


# ------------------------------------------------------------------------------------ optimizer state
class _FullStateOptimizer:
    """Stands in for the torch optimizer while an optimizer-state repair mode runs on full tensors.

    state: full stand-in parameter -> its state (full tensors).   param_groups: the optimizer's groups (same
    hyper-parameters), listing each stand-in where its sharded parameter is.   defaults: the optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stand_ins: dict):
        self.state = defaultdict(dict)
        self.defaults = optimizer.defaults
        self.param_groups = [
            {**group, "params": [stand_ins.get(id(parameter), parameter) for parameter in group["params"]]}
            for group in optimizer.param_groups
        ]


def repair_on_full_state(optimizer: torch.optim.Optimizer, changes: list, repair, old_states: dict,
                          full_values: dict, timeout: timedelta) -> None:
    """Run `repair(optimizer, changes)` on full tensors, identically on every rank, and keep this rank's shards.

    Args:
        optimizer: the torch optimizer, already holding the new sharded parameters.
        changes: LayerChanges whose `parameters` are the new sharded parameters (same order on every rank).
        repair: an optimizer-state repair function (`optimizer_state.OPTIMIZER_STATE_REPAIRS`).
        old_states: id(new sharded parameter) -> the state its old parameter had (sharded tensors) or None.
        full_values: (layer, name) -> full new value of each new parameter (`FullParameterSession.full_values`).
    """
    stand_ins, full_changes, pairs = {}, [], []
    gathered_states = {}
    for change in sorted(changes, key=lambda change: change.layer):
        full_parameters = {}
        for name, sharded in change.parameters.items():
            if (change.layer, name) not in full_values:
                raise DistributedReductionError(f"no full value of LRU layer {change.layer} parameter {name!r}")
            full = nn.Parameter(full_values[(change.layer, name)].detach().clone(), requires_grad=sharded.requires_grad)
            full_parameters[name] = stand_ins[id(sharded)] = full
            pairs.append((full, sharded, f"LRU layer {change.layer} {name}"))
            state = old_states.get(id(sharded))
            if state:
                gathered_states[full] = {
                    key: _full_tensor(state[key], f"all-gather of the optimizer state {key!r} of LRU layer "
                                                  f"{change.layer} {name}", timeout)
                    for key in sorted(state)
                }
        full_changes.append(dataclasses.replace(change, parameters=full_parameters))
    stand_in = _FullStateOptimizer(optimizer, stand_ins)
    stand_in.state.update(gathered_states)
    repair(stand_in, full_changes)
    for full, sharded, what in pairs:
        state = stand_in.state.get(full)
        optimizer.state.pop(sharded, None)
        if state:
            optimizer.state[sharded] = {
                key: _shard_like(value, sharded, f"optimizer state {key!r} of {what}")
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == full.shape else value
                for key, value in state.items()
            }


# ------------------------------------------------------------------------------------------- the strategy
class FSDP2Strategy(CollectiveStrategy):
    """`CompreSSMReducer` strategy for models sharded with `fully_shard` (see the module docstring). Built by the
    reducer on every rank: checks the FSDP2 internals it relies on and reshards modules left unsharded by an
    evaluation forward, so the reducer sees the parameters the optimizer holds."""

    snapshot_is_per_rank = True
    shards_parameters = True  # each rank holds shards: refused by what needs full parameters (the regularizer)

    def __init__(self, model, optimizer=None, timeout: float = DEFAULTS.collective_timeout):
        check_fsdp_param_api()  # an unknown torch fails here, before training, not at the first event
        super().__init__(timeout)
        self.session: FullParameterSession | None = None
        FSDPModule, _, _ = fsdp_classes()
        for module in compressm_model_of(model).modules():  # after an evaluation forward (reshard_after_forward=False)
            if isinstance(module, FSDPModule):              # the modules hold unsharded parameters, not the optimizer's
                module.reshard()

    @contextlib.contextmanager
    def gathered(self, model):
        self.session = None
        with full_lru_parameters(model, src=0, timeout=self.timeout) as session:
            yield
        self.session = session

    def after_change(self, model) -> dict:
        return dict(self.session.replaced) if self.session is not None else {}

    def repair_optimizer(self, optimizer, changes: list, mode: str, replaced: dict) -> None:
        session, self.session = self.session, None  # drop the full values when done
        if optimizer is None:
            return
        repair = optimizer_state_repair(mode)
        inner = unwrap_optimizer(optimizer)
        old_states = {id(new): inner.state.get(old) for old, new in replaced.items()}
        replace_parameters_in_optimizer(optimizer, replaced)  # state of re-sized parameters dropped
        if repair is reset_optimizer_state or not changes:
            repair_optimizer_state(optimizer, changes, mode)
            return
        repair_on_full_state(inner, changes, repair, old_states, session.full_values if session else {}, self.timeout)
