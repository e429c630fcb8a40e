"""In-training state reduction of CompreSSM Mamba-2 and Mamba (Mamba-1) models: Gramian statistics from training
batches (forward hooks, no extra forward passes), optimizer-state repair after a reduction, `SelectiveSSMReducer` (the
selective-SSM strategy `CompreSSMCallback` runs for these models: the settings' schedule and rank policies on the
data-driven HSVs) and the one-shot `SelectiveSSMReductionCallback`.

Glue only: the math lives in `mamba2_reduction.py` / `mamba_reduction.py`, the hooks and the in-place layer surgery in
the modeling files (`attach_gramian_statistics`, `reduce`).
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from transformers import TrainerCallback

from ..events import ReductionEvent
from ..mamba2_reduction import hankel_singular_values
from .distributed import distributed_world_size
from .settings import DEFAULTS, ReductionSettings, SettingsView, settings_from

logger = logging.getLogger(__name__)


class SelectiveSSMGramianCollector:
    """Accumulates each layer's float64 Gramian statistics from the forward passes the model runs anyway.

    `start(model)` attaches the model's statistics hooks (`attach_gramian_statistics`: Mamba-2 mixers' `scan_inputs`,
    Mamba-1 mixers' `x_proj`), counting training-mode passes only (inputs detached; forwards recomputed by activation
    checkpointing during backward are not counted again); `stop()` removes the hooks; `statistics` holds one
    statistics object per layer (model order)."""

    def __init__(self):
        self.statistics: list = []
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, model: torch.nn.Module) -> None:
        self.stop()
        attach = getattr(model, "attach_gramian_statistics", None)
        if attach is None:
            raise ValueError(f"{type(model).__name__} is not a CompreSSM Mamba-2 or Mamba model (no "
                             "attach_gramian_statistics); convert it with from_mamba2 / from_mamba")
        statistics, handles = attach(accept=_training_forward)
        if not statistics:
            for handle in handles:
                handle.remove()
            raise ValueError(f"{type(model).__name__} has no Mamba mixer layers to collect statistics from")
        self.statistics, self._handles = statistics, handles

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _training_forward(module: torch.nn.Module) -> bool:
    """Count a hooked pass: the model is training and autograd is not re-running the forward in backward."""
    return module.training and not _in_backward()


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes forwards)."""
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    return current_task is not None and current_task() != -1


def repair_optimizer(optimizer: torch.optim.Optimizer, old_parameters: dict, model: torch.nn.Module,
                     results: list) -> None:
    """Point `optimizer` at the parameters `model.reduce` created, carrying their per-parameter state.

    Args:
        optimizer: the torch optimizer (an accelerate wrapper is unwrapped) whose param_groups held `old_parameters`.
        old_parameters: {full name: parameter} of the model taken before `reduce`.
        model: the reduced model.
        results: the `LayerReduction`s `reduce` returned. A selected parameter's state tensors of the old parameter's
            shape (Adam's exp_avg, exp_avg_sq, ...) are sliced exactly like the parameter (`LayerChange.slicers`);
            scalars (step) are kept. A replaced parameter (a new balanced projection) starts with empty state in the
            group of its layer's in_proj. Each group's parameters end up in the model's order (as an optimizer built
            for the reduced model holds them, so its saved state loads into a resumed run's optimizer).
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)
    changes = [result.change for result in results if result.change is not None]
    sliced = {name: slicer for change in changes for name, slicer in change.slicers.items()}
    replaced = {name for change in changes for name in change.parameters if name not in change.slicers}
    current = dict(model.named_parameters())
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name in sorted(set(sliced) | replaced):
        new = current[name]
        old = old_parameters.get(name)
        if old is not None and old is new:
            continue
        state = optimizer.state.pop(old, {}) if old is not None else {}
        group = group_of.get(id(old)) if old is not None else None
        if group is None:  # a new projection: join the group of the same layer's in_proj
            group = group_of.get(id(current[name.rsplit(".", 1)[0] + ".in_proj.weight"]))
        if group is None:
            raise ValueError(f"optimizer holds no parameter group for {name} (nor for its layer's in_proj.weight)")
        if name in sliced:
            optimizer.state[new] = {
                key: sliced[name](value) if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }
        params = group["params"]
        if old is not None and any(p is old for p in params):
            params[next(i for i, p in enumerate(params) if p is old)] = new
        else:
            params.append(new)
        group_of[id(new)] = group
    # Each group in the model's parameter order, as an optimizer built for the reduced model (a resumed run loading
    # this optimizer's saved state) lists them: saved state is matched to parameters by position.
    position = {id(parameter): index for index, parameter in enumerate(current.values())}
    for group in optimizer.param_groups:
        group["params"].sort(key=lambda parameter: position.get(id(parameter), len(position)))


class SelectiveSSMReductionCallback(TrainerCallback):
    """Reduce a CompreSSM Mamba-2 or Mamba (Mamba-1) model once during `Trainer.train`.

    Statistics are collected from the training batches of steps [start_step, start_step + window_steps); at the end of
    step start_step + window_steps - 1 the model is reduced to `ranks` with `method` and the optimizer is repaired.
    method: "balanced" or "select"; None: the model's default ("balanced" for Mamba-2, "select" for Mamba-1, which
    refuses "balanced" when training begins). `self.results` holds the `LayerReduction`s `reduce` returned (None
    before the event)."""

    def __init__(self, ranks, start_step: int = 0, window_steps: int = 1, method: str | None = None):
        if window_steps < 1 or start_step < 0:
            raise ValueError(f"need start_step >= 0 and window_steps >= 1, got {start_step} and {window_steps}")
        self.ranks, self.method = ranks, method
        self.start_step, self.end_step = start_step, start_step + window_steps
        self.collector = SelectiveSSMGramianCollector()
        self.results: list | None = None

    def _method(self) -> dict:
        return {} if self.method is None else {"method": self.method}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:  # the model's own refusal of a method (Mamba-1: select only) before any step
            model.reduce(None, **self._method())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.start_step and self.results is None and not self.collector.active:
            self.collector.start(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # global_step already counts the finished step here
        if state.global_step != self.end_step or not self.collector.active:
            return
        statistics = _window_statistics(self.collector, f"steps [{self.start_step}, {self.end_step})")
        old_parameters = dict(model.named_parameters())
        self.results = model.reduce(self.ranks, statistics=statistics, **self._method())
        if optimizer is not None:
            repair_optimizer(optimizer, old_parameters, model, self.results)

    def on_train_end(self, args, state, control, **kwargs):
        self.collector.stop()


def is_selective_ssm_model(model) -> bool:
    """Whether `model` (bare, or wrapped by accelerate / torch.compile) is a CompreSSM Mamba-2 or Mamba model: one
    that collects Gramian statistics (`attach_gramian_statistics`) and so is reduced by `SelectiveSSMReducer`."""
    return _selective_model_of(model) is not None


def _selective_model_of(model):
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "attach_gramian_statistics") and hasattr(model, "reduce"):
            return model
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
    return None


class SelectiveSSMReducer(SettingsView):
    """The selective-SSM strategy of `CompreSSMCallback` (and of any loop): in-training reduction of a CompreSSM
    Mamba-2 or Mamba (Mamba-1) model with the settings' schedule and rank policy.

        reducer = SelectiveSSMReducer(model, optimizer, settings=ReductionSettings(...), max_steps=2000)
        for step in range(1, max_steps + 1):
            reducer.before_step(step)       # starts the statistics hooks when step is in a window before an event
            loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
            event = reducer.step(step)      # reduces in place when scheduled; a ReductionEvent or None

    Statistics: the training batches of the `statistics_steps` optimizer steps ending with an event's step
    (`SelectiveSSMGramianCollector`: forward hooks, float64, no extra passes). Sizes: the settings' `rank_policy`
    ("global", "tolerance", "fixed"; gate, min_dim, total_budget) applied to per-layer values Σ_g σ_{g,i}² (the
    predicted scan-output energy of state i summed over the layer's groups: the policies' HSV sums become shares of
    that energy). Reduction: the model's own `reduce(ranks, statistics=..., method=settings.selective_method or the
    model's default)`, which rewrites `config.state_dims`; the optimizer is repaired by `repair_optimizer` (selection
    slices Adam moments exactly; new balanced projections start with empty state).

    Refused (ValueError here, before training): policy "rollback", a reducibility `regularizer`, `system` other than
    the default (data-driven HSVs have no LTI system to choose), `optimizer_state` other than "reset" (the repair is
    `repair_optimizer`'s), a model under torch.distributed with more than one process, and a method the model
    refuses (Mamba-1: "select" only).

    Attributes: model (the CompreSSM Mamba model), history (this run's ReductionEvents; each
    event's `extra` holds "methods", the method per layer, and "statistics_positions", the token positions per layer
    its statistics came from), results (the `LayerReduction`s of the last event), stopped
    and pending (always False / None: no rollback), collector.
    """

    writes_model_card = False  # the LRU model card (HSV spectrum of the weights) does not apply

    def __init__(self, model, optimizer=None, *, settings: ReductionSettings | dict | None = None,
                 max_steps: int | None = None, **shortcuts):
        self.settings = settings_from(settings, shortcuts, "SelectiveSSMReducer")
        self.model = _selective_model_of(model)
        if self.model is None:
            raise TypeError(f"expected a CompreSSM Mamba-2 or Mamba model, got {type(model).__name__}")
        _check_settings(self.settings)
        if distributed_world_size() > 1:
            raise ValueError("in-training reduction of Mamba models runs in one process only (no DDP / FSDP yet): "
                             "train on one process, or reduce post hoc with model.reduce")
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.rank_policy.check_budget(self.state_dims)
        self.model.reduce(None, **self._method())  # the model's own refusal of a method, before any step
        self.collector = SelectiveSSMGramianCollector()
        self.stopped, self.pending, self.skipped_steps = False, None, []
        self.results: list | None = None  # the LayerReductions of the last event
        # kept here: the Mamba models have no reduction_history (their checkpoints do not carry one yet)
        self.history: list[ReductionEvent] = []

    @property
    def state_dims(self) -> list[int]:
        return list(self.model.config.state_dims)

    def _method(self) -> dict:
        method = self.settings.selective_method
        return {} if method is None else {"method": method}

    def scheduled_events(self) -> int:
        return max(1, len(self.schedule.steps(self.max_steps)))

    def is_due(self, step: int) -> bool:
        return self.schedule.is_due(int(step), self.max_steps)

    def skip_while_pending(self, step: int) -> bool:
        return False

    def apply_regularizer(self, step: int) -> None:
        return None

    def before_step(self, step: int) -> None:
        """Call before optimizer step `step` (1-based): attach the statistics hooks if `step` lies in the window of
        `statistics_steps` steps that ends with a scheduled event."""
        if self.collector.active:
            return
        window = self.settings.statistics_steps
        if any(event - window < step <= event for event in self.schedule.steps(self.max_steps)):
            self.collector.start(self.model)

    def step(self, step: int) -> ReductionEvent | None:
        """Call after optimizer step `step`: reduce in place if an event is scheduled now (a ReductionEvent or None)."""
        return self.reduce_now(step) if self.is_due(step) else None

    def reduce_now(self, step: int | None = None, metric_before=None, metric_name=None) -> ReductionEvent | None:
        """Reduce now from the statistics collected since the window began; None when no layer changed. Raises
        RuntimeError when no statistics were collected (the hooks never ran or a layer saw no training batch)."""
        collector = self.collector
        statistics = _window_statistics(
            collector, f"the {self.settings.statistics_steps} step(s) up to step {step} (before_step(step) not called?)"
        )
        started = time.perf_counter()
        dims_before = self.state_dims
        energies = [_state_energies(stats) for stats in statistics]
        ranks = self.rank_policy.select(energies, dims_before, events=self.scheduled_events())
        targets = [rank if rank < dim else None for rank, dim in zip(ranks, dims_before)]
        collector.statistics = []
        if all(target is None for target in targets):
            return None
        old_parameters = dict(self.model.named_parameters())
        results = self.model.reduce(targets, statistics=statistics, **self._method())
        if self.optimizer is not None:
            repair_optimizer(self.optimizer, old_parameters, self.model, results)
        event = ReductionEvent.from_layers(
            results, step=step, kind="reduction", policy=self.policy, dims_before=dims_before,
            hsv=[values.tolist() for values in energies] if self.log_hsv else None,
            wall_time_s=time.perf_counter() - started,
            tau=self.rank_policy.tau if self.policy == "tolerance" else None,
            fraction=self.rank_policy.fraction if self.policy == "fixed" else None,
            extra={"methods": [result.method for result in results],
                   "statistics_positions": [int(stats.count) for stats in statistics]},
        )
        self.results = results
        self.history.append(event)
        logger.info("SelectiveSSMReducer: step %s: state sizes %s -> %s", step, dims_before, self.state_dims)
        return event

    def state_dict(self, include_snapshot: bool = True) -> dict:
        """Sizes, history and stop flag, in `CompreSSMReducer.state_dict`'s format (never a pending check)."""
        return {"format": "compressm-reducer", "version": 1, "state_dims": self.state_dims,
                "history": [event.to_dict() for event in self.history], "stopped": False, "pending": None}


def check_selective_resume(model, checkpoint_dir) -> list[int]:
    """Resume of a CompreSSM Mamba model (`prepare_model_for_resume`, `CompreSSMTrainer`): the model must already have
    the checkpoint's state sizes (load it with `from_pretrained(checkpoint)`; Mamba layers are not re-sized in place).
    Returns the sizes; ValueError naming the checkpoint's config.json and both sizes otherwise."""
    model = _selective_model_of(model)
    path = os.path.join(os.fspath(checkpoint_dir), "config.json")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle).get("state_dims")
    if saved is not None and list(saved) != list(model.config.state_dims):
        raise ValueError(
            f"{path}: the checkpoint has state_dims {list(saved)}, the model {list(model.config.state_dims)}; Mamba "
            "models are not re-sized to a checkpoint in place: load the model with from_pretrained(checkpoint) and "
            "pass it to the Trainer, then resume"
        )
    return list(model.config.state_dims)


def _window_statistics(collector: SelectiveSSMGramianCollector, window: str) -> list:
    """Stop `collector` and return its per-layer statistics; RuntimeError naming `window` when a layer got none."""
    collector.stop()
    statistics = collector.statistics
    empty = [layer for layer, stats in enumerate(statistics) if stats.count == 0]
    if not statistics or empty:
        raise RuntimeError(
            f"no Gramian statistics reached layers {empty or 'any'} in {window}: the training forward did not pass "
            "the hooked modules (e.g. transformers' fused Mamba-1 CUDA training path, mamba_inner_fn, skips x_proj); "
            "train without the mamba_ssm kernels during the window"
        )
    return statistics


def _state_energies(statistics) -> torch.Tensor:
    """float64 (r,) descending: Σ over the layer's groups of σ_{g,i}², from one layer's Gramian statistics."""
    hsv = hankel_singular_values(*(gramian.cpu() for gramian in statistics.gramians()))
    return (hsv.to(torch.float64) ** 2).sum(dim=0)


def _check_settings(settings: ReductionSettings) -> None:
    """Refuse the settings that do not apply to selective SSMs (ValueError naming the field and what to do)."""
    refused = {
        "policy": settings.policy == "rollback",
        "regularizer": settings.regularizer is not None,
        "system": settings.system != DEFAULTS.system,
        "optimizer_state": settings.optimizer_state != DEFAULTS.optimizer_state,
    }
    reasons = {
        "policy": "policy='rollback' is not supported for Mamba models: use 'global', 'tolerance' or 'fixed'",
        "regularizer": "the reducibility regularizer acts on LRU layers only: leave regularizer=None for Mamba models",
        "system": f"system={settings.system!r}: Mamba HSVs come from data Gramians, there is no LTI system to choose; "
                  "leave system at its default",
        "optimizer_state": f"optimizer_state={settings.optimizer_state!r}: Mamba reductions repair the optimizer "
                           "themselves (selection slices Adam moments exactly); leave optimizer_state at its default",
    }
    for field, is_refused in refused.items():
        if is_refused:
            raise ValueError(f"ReductionSettings.{field}: {reasons[field]}")


__all__ = ["SelectiveSSMGramianCollector", "SelectiveSSMReducer", "SelectiveSSMReductionCallback",
           "check_selective_resume", "is_selective_ssm_model", "repair_optimizer"]
