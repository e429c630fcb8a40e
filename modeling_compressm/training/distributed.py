"""The distributed side of a reduction, as strategies the reducer core calls in a fixed order.

A reduction must leave every rank with the same model: one rank decides (HSVs, ranks, balanced truncation), the
others take its result, and the wrapper that syncs gradients learns that parameters changed shape. The reducer
(`reducer.py`) runs, on every rank:

    with strategy.gathered(model):             # full layer parameters available (FSDP2: gathered from the shards)
        decider: balance layers, pick ranks; strategy.before_change(); model.reduce(...)
        outcome = strategy.share(outcome)      # the decider's outcome (sizes, statuses, basis maps) on every rank
        others:  strategy.before_change(); allocate the new sizes
        strategy.share_parameters(model, layers)   # the decider's new parameter values on every rank
    replaced = strategy.after_change(model)    # re-register with the wrapper; {old: new} if Parameters were replaced
    strategy.repair_optimizer(optimizer, changes, mode, replaced)   # changes re-read from the model if replaced

Re-sizing outside an event (rollback; `CompreSSMReducer.restore`: resume from a reducer state, best-model loading)
runs `set_state_dims` inside the same `gathered` / `before_change` / `after_change` / `repair_optimizer` frame on
every rank.

Strategies:
    LocalStrategy   one process: bare model, accelerate without distribution, torch.compile.
    DDPStrategy     torch DistributedDataParallel (also what accelerate prepares for multi-process DDP): collectives
                    on a dedicated gloo group whose operations time out (`collective_timeout`), DDP's gradient
                    buckets rebuilt in place after the change.
    FSDP2Strategy   models sharded with `fully_shard` (also what accelerate prepares with its FSDP2 plugin), in
                    `fsdp_strategy.py`: registered when the package is imported (`register_strategy`), imports FSDP
                    only when a model is checked.
More plug in with `register_strategy(matches, factory)`. FSDP1 (`FullyShardedDataParallel`) is refused with a message.

Collectives go through `collectives.py` (shared with the FSDP2 helpers): one that does not complete within the
timeout raises `DistributedReductionError` naming the rank, the step and what it waited for, instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import sys

import torch
import torch.distributed as dist

from .collectives import DistributedReductionError, timed_broadcast, timed_broadcast_object
from .optimizer_state import repair_optimizer_state, replace_parameters_in_optimizer, unwrap_optimizer
from .settings import DEFAULTS

__all__ = [
    "DistributedReductionError",
    "ReductionStrategy",
    "LocalStrategy",
    "CollectiveStrategy",
    "DDPStrategy",
    "register_strategy",
    "strategy_for",
    "find_wrapper",
    "wrapper_chain",
    "compressm_model_of",
    "rebuild_ddp_reducer",
    "distributed_world_size",
]


def distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def wrapper_chain(model):
    """model, model.module, model._orig_mod, ... (DDP / accelerate / torch.compile wrappers), outermost first."""
    chain, seen = [model], 0
    while seen < 8:
        inner = getattr(chain[-1], "module", None) or getattr(chain[-1], "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        chain.append(inner)
        seen += 1
    return chain


def compressm_model_of(model):
    """The CompreSSM model inside DDP / accelerate / torch.compile wrappers (TypeError if there is none). FSDP2's
    `fully_shard` does not wrap: a sharded model is its own CompreSSM model."""
    for module in reversed(wrapper_chain(model)):  # innermost first: torch.compile forwards attribute lookups
        if hasattr(module, "lru_layers") and hasattr(module, "reduce") and hasattr(module, "set_state_dims"):
            return module
    raise TypeError(
        f"expected a CompreSSM model (or a DDP / accelerate / torch.compile wrapper of one), got {type(model).__name__}"
    )


def find_wrapper(model, wrapper_type):
    """The first module of `wrapper_type` in the wrapper chain of `model`, or None."""
    for module in wrapper_chain(model):
        if isinstance(module, wrapper_type):
            return module
    return None


def rebuild_ddp_reducer(ddp_model) -> bool:
    """Rebuild the gradient buckets of a `DistributedDataParallel` module after parameters changed shape.

    DDP sizes its gradient buckets from the parameter shapes at construction. This rebuilds the reducer on the same
    DDP object (training loops hold that object, so it cannot be replaced), as `DistributedDataParallel.__setstate__`
    does, after checking that all ranks hold the same shapes. Returns False if `ddp_model` is not DDP.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        return False
    _release_ddp_reducer(ddp_model)
    parameters, expect_sparse_gradient = ddp_model._build_params_for_reducer()
    try:
        from torch.distributed.utils import _verify_param_shape_across_processes

        _verify_param_shape_across_processes(ddp_model.process_group, parameters)
    except ImportError:  # pragma: no cover - older torch
        pass
    param_to_name_mapping = ddp_model._build_debug_param_to_name_mapping(parameters)
    ddp_model._ddp_init_helper(parameters, expect_sparse_gradient, param_to_name_mapping, ddp_model.static_graph)
    if ddp_model.static_graph:
        ddp_model.reducer._set_static_graph()
        ddp_model.logger._set_static_graph()
    ddp_model._has_rebuilt_buckets = False
    return True


def _release_ddp_reducer(ddp_model) -> None:
    # The reducer holds the parameters and their gradient accumulators, which remember the old shapes; they must die
    # before parameters are swapped and before a new reducer asks for accumulators.
    if getattr(ddp_model, "reducer", None) is not None or getattr(ddp_model, "logger", None) is not None:
        ddp_model.logger = None
        ddp_model.reducer = None
        gc.collect()


class ReductionStrategy:
    """Base strategy: one process, nothing to share (see the module docstring for the call order).

    is_decider: this rank decides the events.   rank: this process's rank.   snapshot_is_per_rank: a rollback
    snapshot (`model.state_dict()` copies) holds only this rank's shards (FSDP2), not the full model."""

    is_decider = True
    rank = 0
    snapshot_is_per_rank = False

    @contextlib.contextmanager
    def gathered(self, model):
        yield

    def before_change(self, model) -> None:
        pass

    def share(self, value, what: str, step):
        return value

    def share_parameters(self, model, layers: list[int], step) -> None:
        pass

    def after_change(self, model) -> dict:
        return {}

    def repair_optimizer(self, optimizer, changes: list, mode: str, replaced: dict) -> None:
        """Put replaced Parameters in place in the optimizer (`replaced`: {old: new}), then repair the state of the
        changed parameters (`changes`: LayerChanges holding the model's current parameters) with mode `mode`.

        The repair sees what it sees in one process: the state of old shape under each changed parameter (moved
        from the object it replaced)."""
        if optimizer is None:
            return
        if replaced:
            inner = unwrap_optimizer(optimizer)
            changed = {id(parameter) for change in changes for parameter in change.parameters.values()}
            carried = {new: inner.state[old] for old, new in replaced.items()
                       if id(new) in changed and old in inner.state}
            replace_parameters_in_optimizer(optimizer, replaced)
            inner.state.update(carried)
        repair_optimizer_state(optimizer, changes, mode)

    def share_flag(self, flag: bool, what: str, step) -> bool:
        return bool(self.share(bool(flag), what, step))


class LocalStrategy(ReductionStrategy):
    """Single process."""


class CollectiveStrategy(ReductionStrategy):
    """Several processes, rank 0 decides: `share` broadcasts rank 0's value on a gloo group of the strategy's own
    (CPU collectives with a timeout, whatever backend the gradients use: NCCL, gloo)."""

    def __init__(self, timeout: float = DEFAULTS.collective_timeout):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs an initialised torch.distributed process group")
        self.timeout = datetime.timedelta(seconds=float(timeout))
        self.rank = dist.get_rank()
        self.is_decider = self.rank == 0
        self.group = dist.new_group(backend="gloo", timeout=self.timeout)

    def share(self, value, what: str, step):
        return timed_broadcast_object(value, 0, self.group, "cpu", f"{what} of the reduction at step {step}",
                                      self.timeout)


class DDPStrategy(CollectiveStrategy):
    """DistributedDataParallel: rank 0 decides; collectives on a gloo group with a timeout; DDP rebuilt after."""

    def __init__(self, ddp_model, timeout: float = DEFAULTS.collective_timeout):
        super().__init__(timeout)
        self.ddp_model = ddp_model

    def before_change(self, model) -> None:
        _release_ddp_reducer(self.ddp_model)

    def share_parameters(self, model, layers: list[int], step) -> None:
        lru = model.lru_layers()
        for index in layers:
            for name in lru[index].SSM_PARAMETER_NAMES:
                parameter = getattr(lru[index], name)
                host = parameter.detach().to("cpu", copy=True).contiguous()
                timed_broadcast(host, 0, self.group, f"layer {index} {name} of the reduction at step {step}",
                                self.timeout)
                if not self.is_decider:
                    with torch.no_grad():
                        parameter.copy_(host.to(parameter.device))

    def after_change(self, model) -> dict:
        rebuild_ddp_reducer(self.ddp_model)
        return {}


# ------------------------------------------------------------------------------------------------------ registry
_STRATEGIES: list = []


def register_strategy(matches, factory) -> None:
    """Use `factory(wrapped_model, optimizer, timeout_seconds) -> ReductionStrategy` for models where
    `matches(wrapped_model)` is true (checked before the built-in DDP and single-process strategies, most recent
    registration first). The optimizer (torch or accelerate's wrapper, or None) is the reducer's, for strategies that
    need it beyond `repair_optimizer`."""
    _STRATEGIES.insert(0, (matches, factory))


def _uses_fsdp1(model) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:  # never imported: nothing can be sharded with it
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return find_wrapper(model, FullyShardedDataParallel) is not None or any(
        isinstance(module, FullyShardedDataParallel) for module in wrapper_chain(model)[-1].modules()
    )


def strategy_for(model, optimizer=None, timeout: float = DEFAULTS.collective_timeout) -> ReductionStrategy:
    """The strategy for a (possibly wrapped) model; raises with what to do where none fits."""
    from torch.nn.parallel import DistributedDataParallel

    for matches, factory in _STRATEGIES:
        if matches(model):
            return factory(model, optimizer, timeout)
    ddp = find_wrapper(model, DistributedDataParallel)
    if ddp is not None:
        return DDPStrategy(ddp, timeout)
    if _uses_fsdp1(model):
        raise NotImplementedError(
            "this model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters cannot change shape: "
            "shard it with FSDP2 instead (torch.distributed.fsdp.fully_shard, or accelerate's "
            "FullyShardedDataParallelPlugin(fsdp_version=2)); see docs/fsdp.md"
        )
    world = distributed_world_size()
    if world > 1:
        raise RuntimeError(
            f"torch.distributed runs with {world} processes but the model given to the reducer is not wrapped in "
            "DistributedDataParallel: pass the wrapped model (e.g. CompreSSMReducer(ddp_model, optimizer)), so that "
            "every rank applies the same reduction and DDP's gradient buckets are rebuilt"
        )
    return LocalStrategy()
