"""Reducing a CompreSSM model that is sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Distributed plumbing only: no reduction math lives here (that is `reduction.py`, driven through the model's
`reduce` / the layers' `load_system`), and no policy (that is the reducer's). `CompreSSMReducer` drives FSDP2 models
through `fsdp_strategy.FSDP2Strategy`, whose gathered phase is `full_lru_parameters`.

Under FSDP2 every parameter is a DTensor sharded on dim 0 across the ranks, owned by an `FSDPParam` of the
`FSDPParamGroup` of the module `fully_shard` was applied to (a block, or the root). A reduction changes the shape
of an LRU layer's parameters, which FSDP2 has no API for: the sharding metadata (`_orig_size`, padded shard size,
DTensor spec) and the all-gather buffers of an `FSDPParam` are sized once. `full_lru_parameters` therefore

1. gathers, on every rank, the full value of every LRU parameter (own all-gather of each rank's padded shard, in
   the parameter's original dtype, so a bf16 `MixedPrecisionPolicy` does not round them) and registers it on its
   module as a plain `nn.Parameter`, so `model.hankel_singular_values()`, `model.reduce(...)`,
   `layer.load_system(...)` and `model.set_state_dims(...)` work unchanged inside the `with` block;
2. on leaving the block, lets the ranks agree that none of them failed, takes the parameters that changed (shape
   or value) on rank `src`, broadcasts them, and gives each changed parameter a fresh `FSDPParam` in the same slot
   of the same group (re-sharded with the same placement and mesh); unchanged parameters get their old sharded
   DTensor back (with its gradient and optimizer state);
3. swaps the replaced parameters in the optimizer's param groups in place
   (`optimizer_state.replace_parameters_in_optimizer`: same optimizer object, so an LR scheduler and accelerate's
   `AcceleratedOptimizer` stay attached; hyper-parameters kept); the state of a parameter whose shape changed is
   dropped, the state of every other parameter is kept.

Every collective here waits with a timeout (`collectives.py`) and raises `DistributedReductionError` naming the step
that did not complete, so a stopped or crashed rank gives a clear error instead of a hang.

Functions:
    is_fsdp2(model)                                   -> bool
    full_lru_parameters(model, optimizer, src, ...)   context manager -> FullParameterSession
    gather_lru_systems(model, ...)                    -> list of (lam, B, C) full systems, identical on every rank
    apply_reduced_systems(model, systems, ...)        -> FullParameterSession (systems of rank `src` win)
    gather_shards(local, dim, full_size, group, ...)  -> a dim-0-style sharded tensor's full value (timed all-gather)
    fsdp_classes(), check_fsdp_param_api()            the FSDP2 internals this module relies on, checked

Tested with torch 2.13 (CPU, gloo, 2 processes). The FSDP2 internals this relies on are checked at use and a
`DistributedReductionError` says so if a torch release changed them.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .collectives import (
    DEFAULT_TIMEOUT,
    DistributedReductionError,
    timed_all_gather,
    timed_broadcast,
    timed_broadcast_object,
)
from .distributed import compressm_model_of
from .optimizer_state import replace_parameters_in_optimizer, unwatch_stale_state

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedReductionError",
    "FullParameterSession",
    "is_fsdp2",
    "full_lru_parameters",
    "gather_lru_systems",
    "apply_reduced_systems",
    "gather_shards",
    "fsdp_classes",
    "check_fsdp_param_api",
]

# --------------------------------------------------------------------------------------------- torch internals
def fsdp_classes():
    """(FSDPModule, FSDPParam, TrainingState) of this torch, or raise a DistributedReductionError."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    except ImportError as error:  # torch < 2.6 keeps FSDP2 under torch.distributed._composable
        raise DistributedReductionError(
            f"reducing an FSDP2 model needs torch >= 2.6 (found {torch.__version__}): {error}"
        ) from error
    return FSDPModule, FSDPParam, TrainingState


def is_fsdp2(model: nn.Module) -> bool:
    """Whether `model` (or a module inside it) was sharded with FSDP2's `fully_shard`. Imports nothing: a process
    that never imported torch.distributed.fsdp holds no FSDP2 module."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


# ------------------------------------------------------------------------------------------------- the slots
@dataclass
class _Slot:
    """One LRU parameter: where it lives in the model and in FSDP, and its gathered full value."""

    layer: int
    name: str
    module: nn.Module
    group: object  # FSDPParamGroup
    position: int  # index in group.fsdp_params
    fsdp_param: object  # FSDPParam
    sharded: nn.Parameter  # the DTensor parameter registered before the session
    full: torch.Tensor | None = None  # gathered full value (plain tensor, original dtype, FSDP device)


def _fsdp_param_slots(model: nn.Module) -> dict[tuple[int, str], tuple[object, int, object]]:
    """(id(module), param_name) -> (FSDPParamGroup, index, FSDPParam) for every parameter FSDP2 manages."""
    FSDPModule, _, _ = fsdp_classes()
    found, seen_groups = {}, set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]:
            if group is None or id(group) in seen_groups:
                continue
            seen_groups.add(id(group))
            for position, fsdp_param in enumerate(group.fsdp_params):
                info = fsdp_param._module_info
                found[(id(info.module), info.param_name)] = (group, position, fsdp_param)
    return found


def _collect_slots(model: nn.Module) -> list[_Slot]:
    managed = _fsdp_param_slots(model)
    slots = []
    for layer_index, layer in enumerate(model.lru_layers()):
        for name in list(layer._parameters):
            key = (id(layer), name)
            if key not in managed:
                raise DistributedReductionError(
                    f"LRU layer {layer_index} parameter {name!r} is not managed by FSDP2 (ignored_params?): shard "
                    "the blocks or the model with fully_shard so every LRU parameter is sharded"
                )
            group, position, fsdp_param = managed[key]
            if fsdp_param._module_info.shared_modules:
                raise DistributedReductionError(f"LRU layer {layer_index} parameter {name!r} is shared between modules")
            tensor_parallel = getattr(fsdp_param, "_unsharded_dtensor_spec", None) is not None
            if tensor_parallel or getattr(fsdp_param, "is_dtensor", False):
                raise DistributedReductionError(
                    f"LRU layer {layer_index} parameter {name!r} is a DTensor before FSDP (tensor parallel): "
                    "not supported"
                )
            mesh_info = fsdp_param.mesh_info
            if not hasattr(mesh_info, "shard_process_group"):
                raise DistributedReductionError(
                    f"LRU layer {layer_index} parameter {name!r} is replicated, not sharded "
                    f"({type(mesh_info).__name__})"
                )
            # FSDP's sharded DTensor, not whatever is registered now (an unsharded group registers its all-gathered
            # parameters, whose storage the reshard before the gather frees)
            slots.append(_Slot(layer_index, name, layer, group, position, fsdp_param, fsdp_param.sharded_param))
    return slots


def gather_shards(local: torch.Tensor, dim: int, full_size: int, group, what: str, timeout: timedelta) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` (torch.chunk layout, as FSDP2 and DTensor's Shard use: rank i holds
    rows [i * c, (i + 1) * c) with c = ceil(full_size / world), the last ones short or empty), on every rank."""
    chunk = -(-full_size // dist.get_world_size(group))
    if local.shape[dim] != chunk:  # pad to the common size of the all-gather
        padded_shape = list(local.shape)
        padded_shape[dim] = chunk
        padded = local.new_zeros(padded_shape)
        padded.narrow(dim, 0, local.shape[dim]).copy_(local)
        local = padded
    pieces = timed_all_gather(local.contiguous(), group, what, timeout)
    return torch.cat(pieces, dim=dim).narrow(dim, 0, full_size).contiguous()


def _gather_full(slot: _Slot, timeout: timedelta) -> torch.Tensor:
    """Full value of a sharded parameter on every rank, from each rank's padded shard (timed all-gather)."""
    fsdp_param = slot.fsdp_param
    shard_dim = fsdp_param.fsdp_placement.dim
    local = fsdp_param._sharded_param_data.view(fsdp_param.padded_sharded_param_size).to(fsdp_param.device)
    return gather_shards(local, shard_dim, fsdp_param._orig_size[shard_dim], fsdp_param.mesh_info.shard_process_group,
                          f"all-gather of LRU layer {slot.layer} parameter {slot.name!r}", timeout)


def _register(module: nn.Module, name: str, parameter: nn.Parameter) -> None:
    module._parameters[name] = parameter


_FSDP_PARAM_ARGUMENTS = ("param", "module_info", "mesh_info", "post_forward_mesh_info", "device", "shard_placement_fn",
                         "mp_policy", "offload_policy")


def check_fsdp_param_api() -> None:
    """Fail before any collective if this torch's FSDPParam constructor is not the one `_new_fsdp_param` calls."""
    _, FSDPParam, _ = fsdp_classes()
    accepted = inspect.signature(FSDPParam.__init__).parameters
    required = {name for name, p in accepted.items() if name != "self" and p.default is inspect.Parameter.empty}
    if not set(_FSDP_PARAM_ARGUMENTS) <= set(accepted) or not required <= set(_FSDP_PARAM_ARGUMENTS):
        raise DistributedReductionError(
            f"this torch ({torch.__version__}) changed FSDP2's FSDPParam constructor ({list(accepted)[1:]}); "
            "re-sharding a resized parameter is tested with torch 2.13"
        )


def _new_fsdp_param(slot: _Slot, full: torch.Tensor):
    """A fresh FSDPParam for `full` in the slot's group, with the old one's placement, meshes and policies.

    The FSDPParam constructor shards `full` (its dim-0 chunk for this rank, padded) and registers the sharded DTensor
    parameter on the module.
    """
    _, FSDPParam, _ = fsdp_classes()
    old, group = slot.fsdp_param, slot.group
    placement, mesh_info = old.fsdp_placement, old.mesh_info
    parameter = nn.Parameter(full.to(old.device).contiguous(), requires_grad=slot.sharded.requires_grad)
    if mesh_info is group.mesh_info:
        shard_placement_fn = (lambda _param: placement) if placement.dim != 0 else None
    else:
        from torch.distributed.fsdp._fully_shard._fsdp_common import ShardPlacementResult

        def shard_placement_fn(_param):
            return ShardPlacementResult(placement=placement, mesh_info=mesh_info)

    arguments = {  # keep in step with _FSDP_PARAM_ARGUMENTS
        "param": parameter,
        "module_info": old._module_info,
        "mesh_info": group.mesh_info,
        "post_forward_mesh_info": old.post_forward_mesh_info,
        "device": old.device,
        "shard_placement_fn": shard_placement_fn,
        "mp_policy": old.mp_policy,
        "offload_policy": group.offload_policy,
    }
    new = FSDPParam(**arguments)
    new._param_fqn = old._param_fqn
    return new


# --------------------------------------------------------------------------------------------- the session
@dataclass
class FullParameterSession:
    """What `full_lru_parameters` did. Filled when the `with` block exits without error.

    replaced: old sharded parameter -> new sharded parameter, for every LRU parameter that changed on rank `src`.
    changed_layers: indices of the LRU layers with at least one replaced parameter (same on every rank).
    state_dims: the LRU state sizes after the session (same on every rank).
    full_values: (layer index, parameter name) -> full value of each replaced parameter (as rank `src` left it,
        identical on every rank, on the FSDP device).
    """

    src: int
    replaced: dict = field(default_factory=dict)
    changed_layers: list = field(default_factory=list)
    state_dims: list = field(default_factory=list)
    full_values: dict = field(default_factory=dict)


def _check_groups_idle(slots: list[_Slot]) -> None:
    _, _, TrainingState = fsdp_classes()
    for slot in {id(slot.group): slot for slot in slots}.values():
        group = slot.group
        if group._training_state != TrainingState.IDLE:
            raise DistributedReductionError(
                f"cannot reduce while FSDP is inside forward/backward (group {group._module_fqn!r} is in "
                f"{group._training_state.name}): run the reduction after optimizer.step(), between training steps"
            )
        if not group.is_sharded:  # e.g. the root after an evaluation forward (reshard_after_forward=False)
            group.reshard()
    for slot in slots:
        if slot.module._parameters[slot.name] is not slot.sharded:
            raise DistributedReductionError(
                f"LRU layer {slot.layer} parameter {slot.name!r} is not FSDP's sharded parameter after resharding "
                "(was it replaced outside FSDP?)"
            )


def _check_same_layout(slots: list[_Slot], process_group, device, timeout: timedelta) -> None:
    """Every rank must hold the same LRU parameter shapes, or the gathers would mix different models."""
    layout = [len(slots)] + [size for slot in slots for size in (slot.layer, *slot.fsdp_param._orig_size)]
    count = torch.tensor([len(layout)], dtype=torch.int64, device=device)
    counts = timed_all_gather(count, process_group, "start of the reduction (layout check)", timeout)
    if any(int(other.item()) != len(layout) for other in counts):
        raise DistributedReductionError(
            f"ranks hold different LRU layouts (parameter shape lists of lengths {[int(c.item()) for c in counts]})"
        )
    mine = torch.tensor(layout, dtype=torch.int64, device=device)
    layouts = timed_all_gather(mine, process_group, "start of the reduction (layout check)", timeout)
    if any(not torch.equal(other, mine) for other in layouts):
        raise DistributedReductionError(
            f"ranks hold differently shaped LRU parameters (rank {dist.get_rank()}: "
            f"{[(slot.layer, slot.name, tuple(slot.fsdp_param._orig_size)) for slot in slots]}); every rank must hold "
            "the same model (resume every rank from the same checkpoint)"
        )


def _changed(slot: _Slot, current: torch.Tensor) -> bool:
    if current.shape != slot.full.shape or current.dtype != slot.full.dtype:
        return True
    return not torch.equal(current.detach(), slot.full)


@contextlib.contextmanager
def full_lru_parameters(
    model: nn.Module,
    optimizer=None,
    *,
    src: int = 0,
    timeout: timedelta = DEFAULT_TIMEOUT,
    process_group=None,
) -> Iterator[FullParameterSession]:
    """Give every LRU parameter of an FSDP2 model its full value for the duration of a `with` block.

    All ranks must enter and leave the block together (it runs collectives). Inside, the LRU parameters are plain
    full tensors, identical on every rank, so the single-process code runs unchanged (`model.hankel_singular_values`,
    `model.reduce`, `layer.load_system`, `model.set_state_dims`); the other parameters stay sharded. On a normal
    exit the LRU parameters as rank `src` left them are broadcast, re-sharded and registered on every rank (what
    the other ranks did to them is overwritten), `config.state_dims` is rewritten, and `optimizer` (torch or
    accelerate's wrapper; optional) is repaired in place by `optimizer_state.replace_parameters_in_optimizer`. If
    any rank raises in the block, every rank restores the parameters as they were and raises.

    Call it between training steps (after `optimizer.step()`), not between forward and backward.

    Args:
        model: the CompreSSM model sharded with `fully_shard` (blocks and/or root), bare or inside a wrapper.
        optimizer: optional optimizer holding the model's parameters; repaired in place.
        src: global rank whose changes are kept.
        timeout: limit of each collective.
        process_group: the group of all ranks taking part (default: the world).
    Yields:
        FullParameterSession, filled on exit.
    Raises:
        DistributedReductionError: a rank timed out / crashed / failed in the block, the ranks hold different
            layouts, or the model cannot be handled (unsharded LRU parameters, tensor parallel, unknown torch).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedReductionError("full_lru_parameters needs an initialised torch.distributed process group")
    model = compressm_model_of(model)
    check_fsdp_param_api()
    session = FullParameterSession(src=src)
    slots = _collect_slots(model)
    if not slots:
        raise DistributedReductionError("the model has no LRU layers")
    device = slots[0].fsdp_param.device
    _check_groups_idle(slots)
    _check_same_layout(slots, process_group, device, timeout)

    def forget_full_parameters() -> None:  # reduce_with_optimizer(optimizer=None) in the block watches them
        unwatch_stale_state(slot.module._parameters[slot.name] for slot in slots)

    def restore_sharded() -> None:
        forget_full_parameters()
        for slot in slots:
            _register(slot.module, slot.name, slot.sharded)
        model.sync_state_dims()  # the sizes of the sharded parameters put back: those before the block

    try:
        for slot in slots:
            slot.full = _gather_full(slot, timeout)
        for slot in slots:
            # a copy: slot.full stays the reference that tells what the block changed (in place or by swapping .data)
            _register(slot.module, slot.name, nn.Parameter(slot.full.clone(), requires_grad=slot.sharded.requires_grad))
    except BaseException:
        restore_sharded()
        raise

    failure: BaseException | None = None
    try:
        yield session
    except BaseException as error:  # noqa: BLE001 - every rank must learn about it before anyone re-raises
        failure = error

    # 1. did every rank get through the block?
    try:
        flags = timed_all_gather(
            torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=device), process_group,
            "end of the reduction (agreement)", timeout,
        )
    except DistributedReductionError:
        restore_sharded()
        if failure is not None:
            raise failure
        raise
    failed_ranks = [rank for rank, flag in enumerate(flags) if int(flag.item())]
    if failed_ranks:
        restore_sharded()
        if failure is not None:
            raise failure
        raise DistributedReductionError(
            f"rank(s) {failed_ranks} failed during the reduction; the LRU parameters were restored on every rank"
        )

    try:
        # 2. which parameters did rank `src` change?
        changes = None
        if dist.get_rank() == src:
            changes = []
            for index, slot in enumerate(slots):
                current = slot.module._parameters[slot.name]
                if _changed(slot, current):
                    changes.append((index, tuple(current.shape), str(current.dtype).removeprefix("torch.")))
        changes = timed_broadcast_object(
            changes, src, process_group, device, "broadcast of the reduced layout", timeout
        )
        # 3. their new values, from rank `src`
        new_values = {}
        for index, shape, dtype in changes:
            slot = slots[index]
            if dist.get_rank() == src:
                value = slot.module._parameters[slot.name].detach().to(device).contiguous()
            else:
                value = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            what = f"broadcast of LRU layer {slot.layer} parameter {slot.name!r}"
            timed_broadcast(value, src, process_group, what, timeout)
            new_values[index] = value
    except BaseException:
        restore_sharded()
        raise

    # 4. re-shard: a fresh FSDPParam for each changed parameter, the old sharded DTensor for the others
    forget_full_parameters()
    touched_groups = {}
    for index, slot in enumerate(slots):
        if index in new_values:
            slot.fsdp_param._post_load_hook_handle.remove()  # it would re-pad the new parameter to the old size
            new = _new_fsdp_param(slot, new_values[index])  # registers the new sharded parameter on the module
            slot.group.fsdp_params[slot.position] = new
            session.replaced[slot.sharded] = new.sharded_param
            session.full_values[(slot.layer, slot.name)] = new_values[index]
            touched_groups[id(slot.group)] = slot.group
        else:
            _register(slot.module, slot.name, slot.sharded)
    for group in touched_groups.values():
        group._init_mp_dtypes()
    session.changed_layers = sorted({slots[index].layer for index in new_values})
    model.sync_state_dims()
    session.state_dims = list(model.config.state_dims)
    if optimizer is not None:
        replace_parameters_in_optimizer(optimizer, session.replaced)


# ------------------------------------------------------------------------------------------- conveniences
def gather_lru_systems(
    model: nn.Module, *, timeout: timedelta = DEFAULT_TIMEOUT, process_group=None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The full LTI system of every LRU layer of an FSDP2 model, on every rank (collective).

    Returns:
        one (lam complex64 (N,), B complex64 (N, H) with the input gain, C complex64 (H, N)) per layer, detached,
        as `CompreSSMLRU.to_lti` gives them; identical on every rank.
    """
    with full_lru_parameters(model, timeout=timeout, process_group=process_group):
        with torch.no_grad():
            layers = compressm_model_of(model).lru_layers()
            systems = [tuple(tensor.detach().clone() for tensor in layer.to_lti()[:3]) for layer in layers]
    return systems


def apply_reduced_systems(
    model: nn.Module,
    systems: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None,
    optimizer=None,
    *,
    src: int = 0,
    timeout: timedelta = DEFAULT_TIMEOUT,
    process_group=None,
) -> FullParameterSession:
    """Load reduced systems into the LRU layers of an FSDP2 model and re-shard them (collective).

    Args:
        systems: on rank `src`, one entry per LRU layer: None (unchanged) or (lam (r,), B (r, H) with the input gain,
            C (H, r)), e.g. a `reduction.ReducedSystem`; other ranks may pass the same or None (rank `src` wins).
        optimizer: repaired in place (see `optimizer_state.replace_parameters_in_optimizer`).
    Returns:
        the FullParameterSession (replaced parameters, changed layers, new state sizes).
    Raises:
        ReductionError (on rank `src`, re-raised there; the other ranks raise DistributedReductionError) if a system
        cannot be represented; nothing is changed on any rank in that case.
    """
    unwrapped = compressm_model_of(model)
    with full_lru_parameters(unwrapped, optimizer, src=src, timeout=timeout, process_group=process_group) as session:
        if systems is not None:
            layers = unwrapped.lru_layers()
            if len(systems) != len(layers):
                raise ValueError(f"systems has {len(systems)} entries, the model has {len(layers)} LRU layers")
            for layer, system in zip(layers, systems):
                if system is not None:
                    layer.load_system(*system[:3])
    return session
