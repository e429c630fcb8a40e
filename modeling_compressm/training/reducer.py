"""`CompreSSMReducer`: in-training balanced truncation for any training loop (plain PyTorch, accelerate, Trainer).

    settings = ReductionSettings(policy="tolerance", tau=0.05, interval=20, end_step=0.1)  # or settings.DEFAULTS
    reducer = CompreSSMReducer(model, optimizer, settings=settings, max_steps=2000)  # or keywords: tau=0.05, ...
    for step in range(1, max_steps + 1):
        loss = model(**batch).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        event = reducer.step(step)          # reduces in place when scheduled; a ReductionEvent or None

At an event the reducer factorises every layer once (`reduction.balance`), picks sizes from the Hankel singular
values (`schedule.RankPolicy`), truncates through `model.reduce` with those same factors, and then keeps the training
run consistent:

* parameters keep their identity (a reduction swaps fresh tensors into the same Parameter objects), so the optimizer
  keeps holding exactly the model's parameters, its param groups and their hyper-parameters are untouched, and so is
  any learning-rate scheduler; an autograd graph of the previous step that the loop still holds (`loss`) does not
  break the next backward;
* the optimizer state of the changed parameters is repaired by the function registered for `optimizer_state`
  (`optimizer_state.py`; "reset" deletes it);
* distributed wrappers (DDP; FSDP2's `fully_shard`, `fsdp_strategy.FSDP2Strategy`) go through a `distributed` strategy:
  rank 0 decides, every rank applies the same change, the wrapper is rebuilt (FSDP2: re-sharded into new Parameter
  objects, which take the old ones' places in the optimizer), collectives time out; a failure on rank 0 while
  deciding reaches the other ranks at once;
* a layer whose factorisation or truncation fails is left alone and the others still reduce;
* policy "rollback": every event is tentative until `resolve_pending(keep)` accepts it or restores the exact state
  before it (weights, sizes, optimizer state) and stops further reductions;
* `state_dict()` / `load_state_dict()` carry the history, the stop flag and a pending rollback check for resume.

No Trainer code and no reduction math live here (see `callback.py` and `reduction.py`). Over 500 lines because one
class holds an event's phases, the rollback snapshot and the resumable state, which share its private state; the
distributed phases are in `distributed.py` / `fsdp_strategy.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from ..events import ReductionEvent, coerce_events
from ..layer_reduction import LayerChange, LayerReduction
from ..reduction import ReductionError, balance
from .collectives import DistributedReductionError
from .distributed import compressm_model_of, strategy_for
from .optimizer_state import (
    unwatch_stale_state,
    unwrap_optimizer,
    watch_for_replaced_parameters,
)
from .settings import ReductionSettings, SettingsView, settings_from

logger = logging.getLogger(__name__)

STATE_FORMAT = "compressm-reducer"
STATE_VERSION = 1


__all__ = ["CompreSSMReducer", "PendingCheck", "compressm_model_of", "restore_sizes_and_history"]


def restore_sizes_and_history(
    model, state_dims: list[int], events: list[ReductionEvent], resize=None
) -> list[LayerChange]:
    """Give a CompreSSM model other state sizes and another history together, outside a reduction event: the one
    place of the training library that replaces `model.reduction_history` (resume from a checkpoint or a reducer
    state, the restored callback state, the best checkpoint before its weights load). An event's own records are
    appended by the reducer (`reduce_now`, `resolve_pending`).

    Args:
        model: the bare CompreSSM model.   state_dims: the sizes to give it (one positive int per LRU layer).
        events: the history it gets (`ReductionEvent`s or their dicts).
        resize: `resize(state_dims) -> list[LayerChange]` re-allocates the layers (a running reducer's
            `CompreSSMReducer.restore` passes its strategy-aware path: wrapper re-registered, optimizer state of the
            re-sized parameters deleted); None: `model.set_state_dims` (before training, or with no reducer).
    Returns:
        the LayerChanges of the re-allocated layers (freshly initialised: load the weights next); [] when the sizes
        already were `state_dims`.
    """
    changes = []
    if list(state_dims) != [layer.state_dim for layer in model.lru_layers()]:
        changes = (resize or model.set_state_dims)(list(state_dims))
    model.reduction_history = events
    return changes


@dataclass
class _DeciderFailed:
    """Sent instead of an outcome when the deciding rank raised, so the other ranks stop at once."""

    message: str


@dataclass
class _Outcome:
    """What the deciding rank did at an event (picklable: sent to the other ranks).

    layers: one `LayerReduction` per layer, as sent: `hsv` left out, and the `change` of a reduced layer holding only
    its basis maps (CPU `project` / `lift`; every rank fills in its own parameters).
    hsv: per layer the state HSVs (lists of floats) the sizes were picked from, or None where they failed.
    """

    layers: list[LayerReduction]
    hsv: list[list[float] | None]
    # The decider released the wrapper (strategy.before_change) to re-size layers; if then no layer was reduced
    # (every truncation failed), every rank must still re-register with it (after_change), or DDP is left without
    # its reducer and the next step fails.
    wrapper_released: bool = False


@dataclass
class PendingCheck:
    """Rollback policy: an event that is not accepted yet, and the exact state before it (CPU copies).

    event: the tentative ReductionEvent.   snapshot: {"state_dims", "model" (name -> tensor), "optimizer"
    (param index -> state dict)}.   metric_name / metric_before: the metric the check compares, when known.
    """

    event: ReductionEvent
    snapshot: dict
    metric_name: str | None = None
    metric_before: float | None = None


class CompreSSMReducer(SettingsView):
    """Shrink a CompreSSM model in place while it trains (see the module docstring for a loop).

    Args:
        model: a CompreSSM model, bare or wrapped (DistributedDataParallel, accelerate's prepared model,
            torch.compile), or sharded with FSDP2's `fully_shard`. Under torch.distributed with more than one process
            it must be the DDP-wrapped or the FSDP2-sharded model.
        optimizer: the optimizer training it (torch, or accelerate's AcceleratedOptimizer); None when there is none
            (an optimizer that was left out fails with `StaleOptimizerStateError` at its next step).
        settings: a `settings.ReductionSettings` (schedule, rank policy, optimizer-state mode, system, regularizer,
            collective timeout, ...), or its `to_dict()`; None: the keyword settings below, else `settings.DEFAULTS`.
        max_steps: length of the run in optimizer steps (needed when the schedule uses fractions).
        **shortcuts: instead of `settings`, its fields as keywords (`policy=`, `tau=`, `fraction=`, `interval=`, ...;
            `ReductionSettings.from_arguments`: policy None is "tolerance" if tau is given, "fixed" if fraction is
            given, else the default).
    The settings' fields read as attributes (`reducer.policy`, `reducer.schedule`, ...; `settings.SettingsView`).
    A regularizer (`settings.regularizer`) trains the model to be reducible: call `apply_regularizer(step)` between
    `loss.backward()` and `optimizer.step()`; refused (ValueError) for FSDP2-sharded models.
    """

    def __init__(self, model, optimizer=None, *, settings: ReductionSettings | dict | None = None,
                 max_steps: int | None = None, **shortcuts):
        self.settings = settings_from(settings, shortcuts, "CompreSSMReducer")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be None or a positive int, got {max_steps!r}")
        self.max_steps = max_steps

        self.wrapped_model = model
        self.model = compressm_model_of(model)
        self.rank_policy.check_budget(self.state_dims)
        self.optimizer = optimizer
        self.strategy = strategy_for(model, optimizer, self.collective_timeout)
        if optimizer is not None:
            self._check_optimizer(optimizer)
        if self.regularizer is not None and getattr(self.strategy, "shards_parameters", False):
            raise ValueError(
                "the reducibility regularizer needs each LRU layer's full parameters on every rank; this model is "
                "sharded (FSDP2): train without regularizer=, or without sharding"
            )
        self.stopped = False  # after a rollback: no further reductions
        self.pending: PendingCheck | None = None
        self.skipped_steps: list[int] = []  # scheduled events skipped while a rollback check was pending
        if max_steps is not None and not self.schedule.steps(max_steps):
            logger.warning(
                "CompreSSMReducer: the schedule (start_step=%r, end_step=%r, interval=%r) has no event in a run of %d "
                "steps: nothing will be reduced", self.start_step, self.end_step, self.interval, max_steps,
            )
            if self.regularizer is not None and self.regularizer.end_step is None:
                logger.warning("CompreSSMReducer: the reducibility regularizer's window ends at the last reduction "
                               "event, and there is none: it will not act (give it an end_step)")

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def state_dims(self) -> list[int]:
        return [layer.state_dim for layer in self.model.lru_layers()]

    @property
    def history(self) -> list[ReductionEvent]:
        """The model's reduction history (the same list object as `model.reduction_history`)."""
        return self.model.reduction_history

    def _check_optimizer(self, optimizer) -> None:
        inner = unwrap_optimizer(optimizer)
        held = {id(parameter) for group in inner.param_groups for parameter in group["params"]}
        ssm = [p for layer in self.model.lru_layers() for p in layer.ssm_parameters() if p.requires_grad]
        if ssm and not any(id(parameter) in held for parameter in ssm):
            raise ValueError(
                "the optimizer holds none of the model's SSM parameters: pass the optimizer that trains this model"
            )

    # ------------------------------------------------------------------------------------------------- events
    def scheduled_events(self) -> int:
        """Number of events the schedule holds in this run (at least 1; 1 when it cannot be resolved without
        max_steps). The "global" policy spreads its shrink to `final_fraction` over this many events."""
        if self.schedule.needs_max_steps and self.max_steps is None:
            return 1
        return max(1, len(self.schedule.steps(self.max_steps)))

    def apply_regularizer(self, step: int) -> float | None:
        """Add the reducibility regularizer's gradient to the SSM parameters' `.grad` (see `reducibility`): call it
        after `loss.backward()` (and gradient clipping), before `optimizer.step()`; `step` is the optimizer step about
        to be taken (1-based). Returns the penalty value when it was evaluated at this step, else None (also without
        a regularizer)."""
        if self.regularizer is None:
            return None
        events = self.schedule.steps(self.max_steps)
        return self.regularizer.apply(self.model, step, self.system, events[-1] if events else None)

    def is_due(self, step: int) -> bool:
        """Whether the schedule asks for an event after optimizer step `step` (ignores a pending check / stop).
        Raises ValueError when the schedule uses fractions of max_steps and the reducer was built without it."""
        if self.schedule.needs_max_steps and self.max_steps is None:
            raise ValueError(
                f"the schedule (start_step={self.schedule.start_step!r}, end_step={self.schedule.end_step!r}, "
                f"interval={self.schedule.interval!r}) uses fractions of the run's length: pass "
                "CompreSSMReducer(..., max_steps=...) or give absolute steps as ints"
            )
        return self.schedule.is_due(int(step), self.max_steps)

    def before_step(self, step: int) -> None:
        """Call before optimizer step `step`: nothing to do for LRU layers, whose HSVs come from their weights (the
        selective-SSM strategy, `selective_ssm_training.SelectiveSSMReducer`, starts collecting statistics here)."""

    def step(self, step: int) -> ReductionEvent | None:
        """Call after optimizer step `step` (1-based global step): reduce in place if an event is scheduled now.

        Returns the ReductionEvent, or None (no event scheduled, nothing changed, stopped after a rollback, or a
        rollback check still pending)."""
        if self.stopped or not self.is_due(step) or self.skip_while_pending(step):
            return None
        return self.reduce_now(step)

    def skip_while_pending(self, step: int) -> bool:
        """Rollback policy: True (with a warning naming both events) when the event due at `step` is skipped because
        the previous event still awaits its check; the skipped steps are kept in `skipped_steps`."""
        if self.pending is None:
            return False
        self.skipped_steps.append(int(step))
        logger.warning(
            "CompreSSMReducer: the reduction scheduled at step %s is skipped: the reduction at step %s still awaits "
            "its rollback check (resolve_pending / an evaluation between two events). Evaluate at least once between "
            "consecutive events so that none is skipped", step, self.pending.event.step,
        )
        return True

    def reduce_now(self, step: int | None = None, metric_before: float | None = None,
                   metric_name: str | None = None) -> ReductionEvent | None:
        """Run one reduction event now, scheduled or not.

        Args:
            step: the optimizer step to record (None outside a loop).
            metric_before / metric_name: rollback policy: the metric value the later check compares against.
        Returns:
            the ReductionEvent (also appended to `history`), or None when every layer was left as it was.
        """
        if self.stopped:
            raise RuntimeError("this reducer stopped after a rollback; it makes no further reductions")
        if self.pending is not None:
            raise RuntimeError("the previous event awaits its rollback check: call resolve_pending(keep) first")
        step = None if step is None else int(step)
        snapshot = self._take_snapshot() if self.policy == "rollback" else None
        started = time.perf_counter()
        dims_before = self.state_dims
        outcome, changes = self._reduce(step)
        if not any(layer.status != "unchanged" for layer in outcome.layers):
            return None
        event = ReductionEvent.from_layers(
            outcome.layers,
            step=step,
            kind="reduction",
            policy=self.policy,
            dims_before=dims_before,
            hsv=list(outcome.hsv) if self.log_hsv else None,
            wall_time_s=time.perf_counter() - started,
            tau=self.rank_policy.tau if self.policy != "fixed" else None,
            fraction=self.rank_policy.fraction if self.policy == "fixed" else None,
            metric_name=metric_name if metric_before is not None else None,
            metric_before=metric_before,
        )
        self.history.append(event)
        if snapshot is not None and changes:
            self.pending = PendingCheck(event, snapshot, metric_name, metric_before)
        return event

    def _reduce(self, step) -> tuple[_Outcome, list[LayerChange]]:
        """One event on every rank: decide (decider), share, apply, re-register, repair the optimizer."""
        model, strategy = self.model, self.strategy
        changes: list[LayerChange] = []
        with strategy.gathered(model):
            outcome = None
            if strategy.is_decider:
                try:
                    outcome, changes = self._decide_and_apply(step)
                except Exception as error:
                    outcome = _DeciderFailed(f"{type(error).__name__}: {error}")
                    with contextlib.suppress(Exception):  # tell the others, then raise the original error
                        strategy.share(outcome, "the reduction decision", step)
                    raise
            outcome = strategy.share(outcome, "the reduction decision", step)
            if isinstance(outcome, _DeciderFailed):
                raise DistributedReductionError(
                    f"CompreSSM reduction at step {step}: rank 0 failed while deciding it ({outcome.message}); "
                    "nothing was changed on this rank"
                )
            reduced = [result.layer for result in outcome.layers if result.reduced]
            rewrap = bool(reduced) or outcome.wrapper_released
            if rewrap and not strategy.is_decider:
                strategy.before_change(model)
                # the decider's sizes (its values arrive in share_parameters), with its basis maps for the optimizer
                resized = model.set_state_dims([result.new_dim for result in outcome.layers], initialise=False)
                changes = [
                    dataclasses.replace(change, project=outcome.layers[change.layer].change.project,
                                        lift=outcome.layers[change.layer].change.lift)
                    for change in resized
                ]
            if reduced:
                strategy.share_parameters(model, reduced, step)
        if rewrap:
            changes = self._after_change(changes, self.optimizer_state)
        return outcome, changes

    def _after_change(self, changes: list[LayerChange], mode: str) -> list[LayerChange]:
        """Every rank, after parameters changed shape: re-register with the wrapper, then repair the optimizer.

        A strategy that replaced Parameter objects (FSDP2 re-shards them) returns {old: new}; the changes then point at
        the model's current parameters (re-read from the layers) before the optimizer is repaired. Returns the
        changes as repaired."""
        replaced = self.strategy.after_change(self.model)
        if replaced:
            unwatch_stale_state(parameter for change in changes for parameter in change.parameters.values())
            if self.optimizer is None:  # an optimizer left out would go on training the replaced objects
                watch_for_replaced_parameters(replaced)
            layers = self.model.lru_layers()
            changes = [
                dataclasses.replace(
                    change, parameters={name: getattr(layers[change.layer], name) for name in change.parameters}
                )
                for change in changes
            ]
        self.strategy.repair_optimizer(self.optimizer, changes, mode, replaced)
        return changes

    def _resize(self, state_dims: list[int], initialise: bool) -> list[LayerChange]:
        """Every rank: re-allocate the LRU layers at `state_dims` through the strategy (FSDP2: on gathered full
        parameters, then re-sharded), re-register them, delete the optimizer state of re-sized parameters."""
        with self.strategy.gathered(self.model):
            self.strategy.before_change(self.model)
            changes = self.model.set_state_dims(list(state_dims), initialise=initialise)
        return self._after_change(changes, "reset")  # also when nothing changed: before_change released the wrapper

    def _decide_and_apply(self, step) -> tuple[_Outcome, list[LayerChange]]:
        """Deciding rank: balance each layer once, pick sizes, truncate with the same factors."""
        model = self.model
        layers = model.lru_layers()
        current = [layer.state_dim for layer in layers]
        balancings, errors = [], [None] * len(layers)
        for index, layer in enumerate(layers):
            try:
                balancings.append(balance(*layer.to_lti()[:3], self.system))
            except ReductionError as error:
                balancings.append(None)
                errors[index] = f"Hankel singular values failed: {error}"
                logger.warning("CompreSSMReducer: step %s: layer %d left at %d states (%s)", step, index,
                               current[index], errors[index])
        hsv = [balancing.state_hsv if balancing is not None else None for balancing in balancings]
        ranks = self.rank_policy.select(hsv, current, events=self.scheduled_events())
        targets = [rank if hsv[index] is not None and rank < current[index] else None for index, rank in enumerate(ranks)]
        results = [LayerReduction(index, dim, dim) for index, dim in enumerate(current)]
        released = any(target is not None for target in targets)
        if released:
            self.strategy.before_change(model)
            results = model.reduce(targets, record=False, balancings=balancings)
        sent, changes = [], []
        for index, result in enumerate(results):
            if errors[index] is not None:  # its HSVs failed: never truncated
                result = dataclasses.replace(result, status="failed", error=errors[index], kept_energy=None)
            elif result.status == "failed":
                logger.warning("CompreSSMReducer: step %s: layer %d left at %d states (reduction to %d failed: %s)",
                               step, index, current[index], targets[index], result.error)
            elif result.reduced:
                changes.append(result.change)
                self._report_layer(step, index, current[index], targets[index], hsv[index],
                                   result.hinf_bound_relative, result.kept_energy)
            basis = None
            if result.reduced:
                basis = LayerChange(index, {}, project=result.change.project.detach().cpu(),
                                    lift=result.change.lift.detach().cpu())
            sent.append(dataclasses.replace(result, rank_requested=ranks[index], hsv=None, change=basis))
        outcome = _Outcome(
            layers=sent,
            hsv=[values.tolist() if values is not None else None for values in hsv],
            wrapper_released=released,
        )
        return outcome, changes

    @staticmethod
    def _report_layer(step, index, old, new, hsv, relative, kept) -> None:
        if hsv is not None and not float(hsv[0]) > 0:
            logger.warning(
                "CompreSSMReducer: step %s: layer %d has only zero Hankel singular values (its B or C vanished, so its "
                "state-space branch outputs nothing): kept %d of its %d modes unchanged", step, index, new, old,
            )
        else:
            logger.info(
                "CompreSSMReducer: step %s: layer %d %d -> %d states, kept HSV energy %.4f, H-infinity error bound "
                "%.3g x the layer's gain", step, index, old, new, kept, relative,
            )

    # ----------------------------------------------------------------------------------------------- rollback
    def _take_snapshot(self) -> dict:
        """CPU copies of the weights, the sizes and the optimizer state (by parameter position)."""
        snapshot = {
            "state_dims": self.state_dims,
            "model": {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()},
            "optimizer": None,
        }
        if self.optimizer is not None:
            inner = unwrap_optimizer(self.optimizer)
            states, devices = {}, {}
            for position, parameter in enumerate(p for group in inner.param_groups for p in group["params"]):
                entry = inner.state.get(parameter)
                if entry:
                    states[position] = {
                        key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
                        for key, value in entry.items()
                    }
                    devices[position] = {
                        key: str(value.device) for key, value in entry.items() if isinstance(value, torch.Tensor)
                    }
            snapshot["optimizer"] = states
            snapshot["optimizer_devices"] = devices
        return snapshot

    def _restore_snapshot(self, snapshot: dict) -> list[int]:
        model = self.model
        dims_before = self.state_dims
        self._resize(snapshot["state_dims"], initialise=False)
        with torch.no_grad():  # after re-registering: under FSDP2 both sides are this rank's shards (DTensors)
            for name, tensor in model.state_dict().items():
                tensor.copy_(snapshot["model"][name].to(tensor.device))
        for parameter in model.parameters():
            parameter.grad = None
        if self.optimizer is not None and snapshot.get("optimizer") is not None:
            inner = unwrap_optimizer(self.optimizer)
            devices = snapshot.get("optimizer_devices") or {}
            parameters = [p for group in inner.param_groups for p in group["params"]]
            for position, parameter in enumerate(parameters):
                inner.state.pop(parameter, None)
                entry = snapshot["optimizer"].get(position)
                if entry:
                    where = devices.get(position, {})
                    inner.state[parameter] = {
                        key: value.to(where.get(key, parameter.device), copy=True)
                        if isinstance(value, torch.Tensor) else value
                        for key, value in entry.items()
                    }
        return dims_before

    def resolve_pending(self, keep: bool, step: int | None = None, *, metric_after: float | None = None,
                        relative_degradation: float | None = None) -> ReductionEvent | None:
        """Rollback policy: accept the pending event (`keep=True`) or restore the exact state before it and stop.

        Under torch.distributed rank 0's `keep` is used on every rank.
        Returns the "rollback" event when the event was undone, else None.
        """
        if self.pending is None:
            raise RuntimeError("no reduction awaits a rollback check")
        keep = self.strategy.share_flag(keep, "the rollback decision", step)
        pending, self.pending = self.pending, None
        event = pending.event
        if metric_after is not None:
            event.metric_after = float(metric_after)
        if relative_degradation is not None:
            event.relative_degradation = float(relative_degradation)
        if keep:
            event.verified = True
            return None
        dims_before = self._restore_snapshot(pending.snapshot)
        event.rolled_back = True
        self.stopped = True
        rollback = ReductionEvent(
            step=step,
            kind="rollback",
            policy=self.policy,
            dims_before=dims_before,
            dims_after=self.state_dims,
            metric_name=event.metric_name,
            metric_before=event.metric_before,
            metric_after=event.metric_after,
            relative_degradation=event.relative_degradation,
        )
        self.history.append(rollback)
        return rollback

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self, include_snapshot: bool = True) -> dict:
        """Everything a resumed run needs: sizes, history (event dicts), stop flag, pending rollback check.

        The pending check carries CPU tensors (weights and optimizer state before the event) unless
        `include_snapshot=False`. Save it with `torch.save` next to the model and optimizer state dicts."""
        pending = None
        if self.pending is not None:
            pending = {
                "event_index": next(
                    (index for index, event in enumerate(self.history) if event is self.pending.event), None
                ),
                "metric_name": self.pending.metric_name,
                "metric_before": self.pending.metric_before,
                "snapshot": self.pending.snapshot if include_snapshot else None,
                # FSDP2: the snapshot holds this rank's shards only
                "snapshot_rank": self.strategy.rank if self.strategy.snapshot_is_per_rank else None,
            }
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "state_dims": self.state_dims,
            "history": [event.to_dict() for event in self.history],
            "stopped": self.stopped,
            "pending": pending,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: re-sizes the model to the saved sizes (load the model and optimizer state dicts
        after this), sets the history, the stop flag and a pending rollback check."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a CompreSSMReducer state dict (expected format {STATE_FORMAT!r})")
        if not isinstance(state.get("version"), int) or state["version"] > STATE_VERSION:
            raise ValueError(f"unsupported CompreSSMReducer state version {state.get('version')!r}")
        events = coerce_events(state.get("history", []), source="reducer state")
        self.restore(state.get("state_dims"), events)
        self.stopped = bool(state.get("stopped", False))
        self.pending = None
        self.restore_pending(state.get("pending"))

    def restore(self, state_dims: list[int], events: list[ReductionEvent]) -> list[LayerChange]:
        """Give the model `state_dims` and the history `events` on every rank (`restore_sizes_and_history` through
        this reducer's strategy: re-sized layers freshly initialised, the wrapper re-registered, their optimizer state
        deleted). Used by `load_state_dict`, the callback's resume and best-model loading; the rollback re-sizes
        through the same `_resize`. Returns the LayerChanges ([] when the sizes were already `state_dims`)."""
        return restore_sizes_and_history(self.model, state_dims, events,
                                         lambda dims: self._resize(dims, initialise=True))

    def restore_pending(self, pending: dict | None, source: str = "the saved reducer state") -> None:
        """Re-arm a rollback check saved by `state_dict()` ({"event_index", "metric_name", "metric_before",
        "snapshot"}). Without its snapshot the event can no longer be undone: it is accepted and reductions stop,
        with a warning naming `source`."""
        if pending is None:
            return
        index = pending.get("event_index")
        owner = pending.get("snapshot_rank")
        if owner is not None and owner != self.strategy.rank and pending.get("snapshot") is not None:
            logger.warning(
                "CompreSSMReducer: %s holds the rollback snapshot of rank %d (per-rank shards under FSDP2), not of "
                "this rank %d: save the reducer state on every rank to keep the check", source, owner,
                self.strategy.rank,
            )
            pending = dict(pending, snapshot=None)
        if pending.get("snapshot") is None or index is None or not 0 <= index < len(self.history):
            logger.warning(
                "CompreSSMReducer: %s has a rollback check pending but not the state before that event: the event "
                "can no longer be undone, so it is accepted and reductions stop", source,
            )
            self.stopped = True
            return
        self.pending = PendingCheck(
            self.history[index], pending["snapshot"], pending.get("metric_name"), pending.get("metric_before")
        )
