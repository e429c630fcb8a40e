"""In-training compression for the Hugging Face `Trainer`: `CompreSSMCallback`, `CompreSSMTrainer`,
`prepare_model_for_resume`.

The callback only orchestrates: it asks the model for its Hankel singular values (`model.hankel_singular_values`),
picks new sizes with `rank_selection.select_ranks`, and shrinks the model with `model.reduce`. Around that it keeps
the training run consistent:

* optimizer: `reduce` keeps the Parameter objects but changes their shapes and basis, so the optimizer state of the
  reduced SSM parameters (Adam moments, step) is deleted; every other parameter keeps its state.
* logging: metrics go through `Trainer.log`, so `report_to` integrations, `log_history` and printers all see them.
  The callback finds its Trainer by itself when training starts (or use `callback.bind(trainer)` /
  `CompreSSMTrainer`).
* distributed data parallel: rank 0 computes the HSVs, picks the sizes and reduces; the other ranks re-allocate the
  same sizes and receive the reduced parameters by broadcast; then the DDP reducer (gradient buckets) of the running
  `trainer.model_wrapped` is rebuilt in place, the way DDP itself does when it is unpickled.
* resume: checkpoints hold the reduced `state_dims`. The Trainer loads weights into the model *before* any callback
  runs, so the model must be re-sized first: `CompreSSMTrainer` does it itself; with a plain `Trainer` call
  `prepare_model_for_resume(model, checkpoint)` before `trainer.train(resume_from_checkpoint=checkpoint)`.
* history: every event is appended to `callback.history` and to `model.reduction_history`, which
  `save_pretrained` (and so every Trainer checkpoint) writes as `compressm_history.json`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .modeling_compressm import CompreSSMPreTrainedModel
from .rank_selection import POLICIES, select_ranks
from .reduction import ReductionError

logger = logging.getLogger(__name__)

HISTORY_FILE = CompreSSMPreTrainedModel.HISTORY_FILE


# ----------------------------------------------------------------------------------------------------- helpers
def _unwrap_model(model):
    """The CompreSSM model inside DDP / accelerate / compile wrappers."""
    seen = 0
    while not hasattr(model, "lru_layers") and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model, seen = inner, seen + 1
    if not (hasattr(model, "lru_layers") and hasattr(model, "reduce") and hasattr(model, "hankel_singular_values")):
        raise TypeError(
            f"CompreSSMCallback needs a CompreSSM model (with lru_layers/hankel_singular_values/reduce), got "
            f"{type(model).__name__}"
        )
    return model


def _unwrap_optimizer(optimizer):
    """The torch optimizer that owns `.state` (accelerate's AcceleratedOptimizer wraps it as `.optimizer`)."""
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _broadcast_object(value):
    """`value` from rank 0 on every rank (identity without torch.distributed)."""
    if not _distributed():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


@contextlib.contextmanager
def _preserve_control_flags(trainer):
    """Nested `trainer.log` / `trainer.evaluate` calls clear `control.should_log` / `should_evaluate`, which would make
    the Trainer skip the logging or evaluation it had scheduled for this step; put the flags back afterwards."""
    control = trainer.control
    saved = {name: getattr(control, name) for name in ("should_log", "should_evaluate", "should_save")}
    try:
        yield
    finally:
        for target in {id(control): control, id(trainer.control): trainer.control}.values():
            for name, value in saved.items():
                setattr(target, name, value)


def rebuild_ddp_reducer(ddp_model) -> bool:
    """Rebuild the gradient buckets of a `DistributedDataParallel` module after parameters changed shape.

    DDP sizes its gradient buckets from the parameter shapes at construction; after `model.reduce` the SSM
    parameters are smaller, so the old buckets are wrong. This rebuilds the reducer on the same DDP object (the
    Trainer's training loop holds that object in a local variable, so it cannot be replaced), exactly as
    `DistributedDataParallel.__setstate__` does, after checking that all ranks hold the same shapes.

    Returns:
        True if `ddp_model` is a DDP module and was rebuilt, False if it is not DDP (nothing to do).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        return False
    parameters, expect_sparse_gradient = ddp_model._build_params_for_reducer()
    try:
        from torch.distributed.utils import _verify_param_shape_across_processes

        _verify_param_shape_across_processes(ddp_model.process_group, parameters)
    except ImportError:  # pragma: no cover - older torch
        pass
    param_to_name_mapping = ddp_model._build_debug_param_to_name_mapping(parameters)
    # The old reducer holds the parameters' AccumulateGrad nodes, which remember the old shapes; they must die
    # before the new reducer asks for them, or backward rejects the smaller gradients ("invalid gradient").
    ddp_model.logger = None
    ddp_model.reducer = None
    gc.collect()
    ddp_model._ddp_init_helper(parameters, expect_sparse_gradient, param_to_name_mapping, ddp_model.static_graph)
    if ddp_model.static_graph:
        ddp_model.reducer._set_static_graph()
        ddp_model.logger._set_static_graph()
    ddp_model._has_rebuilt_buckets = False
    return True


def _read_checkpoint_dims(checkpoint_dir: str) -> tuple[list[int], list[dict]]:
    config_path = os.path.join(str(checkpoint_dir), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in checkpoint {checkpoint_dir!r}: cannot read its state_dims")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    dims = config.get("state_dims")
    if not isinstance(dims, list) or not all(isinstance(dim, int) and dim >= 1 for dim in dims):
        raise ValueError(f"checkpoint {checkpoint_dir!r} has no valid state_dims in config.json (got {dims!r})")
    events: list[dict] = []
    history_path = os.path.join(str(checkpoint_dir), HISTORY_FILE)
    if os.path.isfile(history_path):
        with open(history_path, encoding="utf-8") as handle:
            events = list(json.load(handle).get("events", []))
    return dims, events


def prepare_model_for_resume(model, checkpoint_dir: str) -> list[int]:
    """Re-size `model` to the state sizes of a checkpoint so `Trainer.train(resume_from_checkpoint=...)` can load it.

    Reads `state_dims` from `<checkpoint_dir>/config.json`, calls `model.set_state_dims` (layers whose size changes
    are re-allocated; the checkpoint weights then overwrite them) and restores `model.reduction_history` from
    `compressm_history.json`. Call it before the Trainer creates its optimizer, i.e. before `trainer.train`.

    Args:
        model: a CompreSSM model (possibly wrapped in DDP).   checkpoint_dir: a Trainer checkpoint folder.
    Returns:
        the state sizes the model now has (list of ints).
    """
    model = _unwrap_model(model)
    dims, events = _read_checkpoint_dims(checkpoint_dir)
    model.set_state_dims(dims)
    model.reduction_history = events
    return list(model.config.state_dims)


class CompreSSMTrainer(Trainer):
    """`Trainer` that resumes from checkpoints saved after a reduction and binds every `CompreSSMCallback`.

    Before loading a checkpoint's weights (resume or `load_best_model_at_end`), the model is re-sized to the
    checkpoint's `state_dims` and its reduction history is restored; otherwise identical to `Trainer`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bind_compressm_callbacks()

    def _bind_compressm_callbacks(self) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CompreSSMCallback):
                callback.bind(self)

    def add_callback(self, callback):
        super().add_callback(callback)
        self._bind_compressm_callbacks()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        prepare_model_for_resume(model if model is not None else self.model, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        checkpoint = self.state.best_model_checkpoint
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "config.json")):
            dims, _ = _read_checkpoint_dims(checkpoint)
            model = _unwrap_model(self.model)
            if dims != list(model.config.state_dims):
                model.set_state_dims(dims)
                rebuild_ddp_reducer(self.model_wrapped)
        return super()._load_best_model()

    def _load_callback_state(self):
        super()._load_callback_state()  # may replace callbacks by fresh instances
        self._bind_compressm_callbacks()


# ---------------------------------------------------------------------------------------------------- callback
class CompreSSMCallback(TrainerCallback, ExportableState):
    """Shrink a CompreSSM model during `Trainer` training by balanced truncation (arXiv 2510.02823).

    Every `interval` optimizer steps from `start_step` to `end_step` (inclusive, global_step > 0), the callback
    computes each layer's Hankel singular values, picks new state sizes and reduces the model in place.

    Args:
        policy: "tolerance" (keep (1 - tau) of each layer's HSV energy), "fixed" (remove `fraction` of each layer's
            states per event) or "rollback" (tolerance ranks, but each event is checked at the next evaluation and
            undone, ending all further reductions, if `rollback_metric` degraded by more than `rollback_tolerance`).
        tau: energy tolerance in [0, 1) for "tolerance" / "rollback".
        fraction: share of states removed per event by "fixed", in (0, 1).
        start_step: first global step (int >= 0) at which a reduction may happen.
        end_step: last such step: an int is an absolute step, a float in (0, 1] a fraction of `max_steps`
            (default 0.1: the first 10% of training, as in the paper).
        interval: steps between reduction events (int >= 1).
        gate: a layer is reduced only if its new size is < gate * current size (default 0.95, the paper's 5% rule).
        min_dim: least state size a reduction may produce.
        total_budget: optional total state size over all layers; the budget is shared by HSV energy
            (`rank_selection.budget_ranks`) and each layer gets at most min(policy size, budget size).
        rollback_metric: evaluation metric compared by "rollback" ("eval_" is prefixed if missing).
        rollback_tolerance: relative degradation (>= 0) that triggers a rollback: |after - before| / |before|.
        greater_is_better: whether a larger metric is better; None infers it from the name (names ending in "loss"
            are lower-is-better, like `Trainer`).
        log_hsv: store the per-layer HSVs (lists of floats) in each history event and log their sums.

    Attributes:
        history: list of event dicts (the same events as `model.reduction_history`).
    """

    def __init__(
        self,
        policy: str = "tolerance",
        tau: float = 0.01,
        fraction: float = 0.25,
        start_step: int = 0,
        end_step: int | float = 0.1,
        interval: int = 100,
        gate: float = 0.95,
        min_dim: int = 1,
        total_budget: int | None = None,
        rollback_metric: str = "eval_loss",
        rollback_tolerance: float = 0.01,
        greater_is_better: bool | None = None,
        log_hsv: bool = True,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) < 1.0:
            raise ValueError(f"tau must be a number in [0, 1), got {tau!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"fraction must be a number strictly between 0 and 1, got {fraction!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if isinstance(end_step, bool) or not isinstance(end_step, (int, float)):
            raise ValueError(f"end_step must be an int (absolute step) or a float in (0, 1], got {end_step!r}")
        if isinstance(end_step, float) and not 0.0 < end_step <= 1.0:
            raise ValueError(
                f"a float end_step is a fraction of max_steps and must lie in (0, 1], got {end_step!r} "
                "(pass an int for an absolute step)"
            )
        if isinstance(end_step, int) and end_step < start_step:
            raise ValueError(f"end_step ({end_step}) must be >= start_step ({start_step})")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0.0 < float(gate) <= 1.0:
            raise ValueError(f"gate must be a number in (0, 1], got {gate!r}")
        if isinstance(min_dim, bool) or not isinstance(min_dim, int) or min_dim < 1:
            raise ValueError(f"min_dim must be an int >= 1, got {min_dim!r}")
        if total_budget is not None and (
            isinstance(total_budget, bool) or not isinstance(total_budget, int) or total_budget < 1
        ):
            raise ValueError(f"total_budget must be None or a positive int, got {total_budget!r}")
        if not isinstance(rollback_metric, str) or not rollback_metric:
            raise ValueError(f"rollback_metric must be a non-empty string, got {rollback_metric!r}")
        if (
            isinstance(rollback_tolerance, bool)
            or not isinstance(rollback_tolerance, (int, float))
            or not rollback_tolerance >= 0
            or not math.isfinite(rollback_tolerance)
        ):
            raise ValueError(f"rollback_tolerance must be a finite number >= 0, got {rollback_tolerance!r}")
        if greater_is_better is not None and not isinstance(greater_is_better, bool):
            raise ValueError(f"greater_is_better must be None or a bool, got {greater_is_better!r}")
        if not isinstance(log_hsv, bool):
            raise ValueError(f"log_hsv must be a bool, got {log_hsv!r}")

        self.policy = policy
        self.tau = float(tau)
        self.fraction = float(fraction)
        self.start_step = start_step
        self.end_step = end_step
        self.interval = interval
        self.gate = float(gate)
        self.min_dim = min_dim
        self.total_budget = total_budget
        self.rollback_metric = rollback_metric
        self.rollback_tolerance = float(rollback_tolerance)
        self.greater_is_better = greater_is_better
        self.log_hsv = log_hsv

        self.history: list[dict] = []
        self.stopped = False  # True after a rollback: no further reductions
        self._trainer = None
        self._end_step_resolved: int | None = None
        self._snapshot: dict | None = None  # rollback policy: state before the pending (unverified) event
        self._baseline: float | None = None  # rollback policy: metric before the pending event
        self._last_metric: float | None = None

    # ------------------------------------------------------------------------------------------ configuration
    def bind(self, trainer) -> "CompreSSMCallback":
        """Attach the Trainer whose `log` receives the metrics and whose wrapped (DDP) model is rebuilt after a
        reduction. Done automatically at `on_train_begin` when the callback runs inside a Trainer; returns self."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind expects a transformers.Trainer, got {type(trainer).__name__}")
        self._trainer = trainer
        return self

    @property
    def metric_name(self) -> str:
        return self.rollback_metric if self.rollback_metric.startswith("eval_") else f"eval_{self.rollback_metric}"

    @property
    def lower_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return not self.greater_is_better
        return self.metric_name.endswith("loss")

    def resolved_end_step(self, max_steps: int) -> int:
        """end_step as an absolute step for a run of `max_steps` optimizer steps."""
        if isinstance(self.end_step, float):
            return int(math.floor(self.end_step * max_steps + 1e-9))
        return int(self.end_step)

    def is_reduction_step(self, global_step: int, max_steps: int) -> bool:
        """Whether the schedule asks for a reduction event after optimizer step `global_step`."""
        end = self.resolved_end_step(max_steps)
        return (
            global_step > 0
            and self.start_step <= global_step <= end
            and (global_step - self.start_step) % self.interval == 0
        )

    def state(self) -> dict:
        """ExportableState: constructor arguments and progress, saved in trainer_state.json of every checkpoint."""
        return {
            "args": {
                "policy": self.policy, "tau": self.tau, "fraction": self.fraction, "start_step": self.start_step,
                "end_step": self.end_step, "interval": self.interval, "gate": self.gate, "min_dim": self.min_dim,
                "total_budget": self.total_budget, "rollback_metric": self.rollback_metric,
                "rollback_tolerance": self.rollback_tolerance, "greater_is_better": self.greater_is_better,
                "log_hsv": self.log_hsv,
            },
            "attributes": {"history": self.history, "stopped": self.stopped},
        }

    def _find_trainer(self):
        """The Trainer running this callback: bound explicitly, else the `self` of a calling Trainer method."""
        if self._trainer is not None:
            return self._trainer
        frame = sys._getframe(1)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and any(
                callback is self for callback in getattr(candidate.callback_handler, "callbacks", [])
            ):
                self._trainer = candidate
                return candidate
            frame = frame.f_back
        return None

    def _sync_history(self, model) -> None:
        model.reduction_history = self.history
        self.history = model.reduction_history  # one list object shared with the model

    # ---------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _unwrap_model(model)
        trainer = self._find_trainer()
        if _distributed() and trainer is None:
            raise RuntimeError(
                "CompreSSMCallback under torch.distributed needs its Trainer (to rebuild the DDP reducer after a "
                "reduction): call callback.bind(trainer) or use CompreSSMTrainer"
            )
        if trainer is None and args.report_to and args.report_to not in ("none", ["none"]):
            logger.warning(
                "CompreSSMCallback is not bound to a Trainer: its metrics go to state.log_history only, not to "
                "report_to integrations. Call callback.bind(trainer) or use CompreSSMTrainer."
            )
        self._end_step_resolved = self.resolved_end_step(state.max_steps)
        if self._end_step_resolved < max(self.start_step, 1):
            logger.warning(
                "CompreSSMCallback: end_step resolves to step %d, before start_step %d / step 1: no reduction will "
                "happen in this run", self._end_step_resolved, self.start_step,
            )
        if self.policy == "rollback" and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            raise ValueError(
                "policy='rollback' compares an evaluation metric after each reduction with the one before it: set "
                "eval_strategy='steps' (or 'epoch') and pass an eval_dataset"
            )
        # Resume: the model (re-sized by CompreSSMTrainer / prepare_model_for_resume) carries the checkpoint's
        # history; a callback restored through restore_callback_states_from_checkpoint carries its own. A fresh run
        # continues the history of the model it starts from (empty for a new model).
        if not (state.global_step > 0 and self.history and not model.reduction_history):
            self.history = list(model.reduction_history)
        self.stopped = state.global_step > 0 and any(event.get("type") == "rollback" for event in self.history)
        self._sync_history(model)
        self._snapshot = None
        self._baseline = None
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.stopped or self._snapshot is not None:
            return control  # rollback policy: the previous event is not verified yet
        if not self.is_reduction_step(state.global_step, state.max_steps):
            return control
        self.reduce_now(args, state, model=model, optimizer=optimizer)
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, **kwargs):
        if self.policy != "rollback" or metrics is None:
            return control
        name = self.metric_name
        if name not in metrics:
            raise KeyError(
                f"rollback_metric {name!r} is not among the evaluation metrics {sorted(metrics)}; set "
                "rollback_metric to one of them"
            )
        value = float(metrics[name])
        if self._snapshot is None:
            self._last_metric = value
            return control
        baseline = self._baseline
        degradation = (value - baseline) if self.lower_is_better else (baseline - value)
        relative = degradation / max(abs(baseline), 1e-12)
        rollback = _broadcast_object(bool(relative > self.rollback_tolerance))
        event = self.history[-1] if self.history else {}
        event.update(metric_name=name, metric_before=baseline, metric_after=value, relative_degradation=relative)
        if rollback:
            self._rollback(args, state, _unwrap_model(model), optimizer, metric_value=value)
        else:
            event["verified"] = True
            self._last_metric = value
        self._snapshot = None
        self._baseline = None
        self._sync_history(_unwrap_model(model))
        return control

    # ------------------------------------------------------------------------------------------- reduction
    def reduce_now(self, args, state, model, optimizer=None) -> dict | None:
        """Run one reduction event now (what `on_step_end` does on schedule).

        Args:
            model: the CompreSSM model (or a wrapper).   optimizer: the Trainer's optimizer (state of reduced
                parameters is deleted), or None.
        Returns:
            the history event (dict), or None when no layer was changed (nothing to record).
        """
        model = _unwrap_model(model)
        trainer = self._find_trainer()
        step = int(state.global_step)
        if self.policy == "rollback":
            self._baseline = self._evaluate_baseline(trainer)
            if self._baseline is None:
                logger.warning(
                    "CompreSSMCallback: no %s before the reduction at step %d and no Trainer to evaluate with; "
                    "this reduction cannot be rolled back", self.metric_name, step,
                )
            else:
                self._snapshot = self._take_snapshot(model, optimizer)

        dims_before = [layer.state_dim for layer in model.lru_layers()]
        payload = None
        if _rank() == 0:
            payload = self._decide_and_reduce(model, step)
        payload = _broadcast_object(payload)
        if payload is None:  # HSVs could not be computed: nothing changed anywhere
            self._snapshot = None
            self._baseline = None
            return None
        if _distributed():
            # Other ranks re-allocate the new sizes (set_state_dims re-initialises the whole layer, D included) and
            # receive every parameter of the reduced layers from rank 0.
            if _rank() != 0:
                model.set_state_dims(payload["dims_after"])
            for index, layer in enumerate(model.lru_layers()):
                if payload["status"][index] == "reduced":
                    for parameter in layer.parameters():
                        parameter.grad = None
                        torch.distributed.broadcast(parameter.data, src=0)
        reduced_layers = [index for index, status in enumerate(payload["status"]) if status == "reduced"]
        if reduced_layers:
            self._reset_optimizer_state(model, optimizer, reduced_layers)
            if trainer is not None:
                rebuild_ddp_reducer(trainer.model_wrapped)
        changed = any(status != "unchanged" for status in payload["status"])
        if not reduced_layers:
            self._snapshot = None  # nothing to verify
            self._baseline = None

        event = None
        if changed:
            event = {
                "step": step,
                "policy": self.policy,
                "dims_before": dims_before,
                "dims_after": payload["dims_after"],
                "kept_energy": payload["kept_energy"],
                "ranks_requested": payload["ranks"],
                "status": payload["status"],
                "errors": payload["errors"],
                "tau": self.tau if self.policy != "fixed" else None,
                "fraction": self.fraction if self.policy == "fixed" else None,
                "rolled_back": False,
            }
            if self.log_hsv:
                event["hsv"] = payload["hsv"]
            if self._baseline is not None:
                event["metric_name"] = self.metric_name
                event["metric_before"] = self._baseline
            self.history.append(event)
            self._sync_history(model)
        self._log(state, self._metrics(model, payload))
        return event

    def _decide_and_reduce(self, model, step: int) -> dict | None:
        """Rank 0: HSVs -> ranks -> model.reduce. Returns a picklable summary (broadcast to other ranks)."""
        try:
            hsv = model.hankel_singular_values()
        except (ReductionError, ValueError, RuntimeError) as error:  # NaN/unstable parameters: skip this event
            logger.warning("CompreSSMCallback: step %d: Hankel singular values failed (%s); no reduction", step, error)
            return None
        current = [layer.state_dim for layer in model.lru_layers()]
        ranks = select_ranks(
            hsv, current, policy=self.policy, tau=self.tau, fraction=self.fraction, gate=self.gate,
            min_dim=self.min_dim, total_budget=self.total_budget,
        )
        report = model.reduce([rank if rank < dim else None for rank, dim in zip(ranks, current)], record=False)
        kept = []
        for entry, values in zip(report, hsv):
            if entry["status"] == "reduced":
                kept.append(float(entry["kept_energy"]))
            else:
                kept.append(1.0)
        for entry in report:
            if entry["status"] == "failed":
                logger.warning(
                    "CompreSSMCallback: step %d: layer %d kept at %d states (reduction to %d failed: %s)",
                    step, entry["layer"], entry["old_dim"], ranks[entry["layer"]], entry["error"],
                )
        return {
            "ranks": ranks,
            "dims_after": [layer.state_dim for layer in model.lru_layers()],
            "status": [entry["status"] for entry in report],
            "errors": [entry["error"] for entry in report],
            "kept_energy": kept,
            "hsv": [values.tolist() for values in hsv],
        }

    @staticmethod
    def _reset_optimizer_state(model, optimizer, layers: list[int]) -> None:
        """Delete the optimizer state (Adam moments, step) of the SSM parameters of the reduced layers."""
        if optimizer is None:
            return
        inner = _unwrap_optimizer(optimizer)
        lru = model.lru_layers()
        for index in layers:
            for parameter in lru[index].ssm_parameters():
                inner.state.pop(parameter, None)

    def _metrics(self, model, payload: dict) -> dict:
        dims = [layer.state_dim for layer in model.lru_layers()]
        metrics = {f"compressm/state_dim_layer{index}": dim for index, dim in enumerate(dims)}
        metrics["compressm/total_state_dim"] = sum(dims)
        for index, value in enumerate(payload["kept_energy"]):
            metrics[f"compressm/kept_energy_layer{index}"] = value
        if self.log_hsv:
            for index, values in enumerate(payload["hsv"]):
                metrics[f"compressm/hsv_sum_layer{index}"] = float(sum(values))
        metrics["compressm/failed_layers"] = sum(status == "failed" for status in payload["status"])
        metrics["compressm/reductions"] = sum(1 for event in self.history if event.get("type") != "rollback")
        return metrics

    def _log(self, state, metrics: dict) -> None:
        trainer = self._find_trainer()
        if trainer is not None:
            with _preserve_control_flags(trainer):
                trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": state.global_step})
            logger.info("CompreSSM step %d: %s", state.global_step, metrics)

    # -------------------------------------------------------------------------------------------- rollback
    def _evaluate_baseline(self, trainer) -> float | None:
        if trainer is not None and trainer.eval_dataset is not None:
            with _preserve_control_flags(trainer):
                metrics = trainer.evaluate()  # on_evaluate records it as _last_metric (no pending event yet)
            if self.metric_name not in metrics:
                raise KeyError(
                    f"rollback_metric {self.metric_name!r} is not among the evaluation metrics {sorted(metrics)}"
                )
            return float(metrics[self.metric_name])
        return self._last_metric

    @staticmethod
    def _take_snapshot(model, optimizer) -> dict:
        """CPU copies of the model weights, the dims and the optimizer state of every parameter."""
        snapshot = {
            "state_dims": list(model.config.state_dims),
            "model": {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
            "optimizer": None,
        }
        if optimizer is not None:
            inner = _unwrap_optimizer(optimizer)
            saved = []
            for group in inner.param_groups:
                for parameter in group["params"]:
                    entry = {}
                    for key, value in inner.state.get(parameter, {}).items():
                        if isinstance(value, torch.Tensor):
                            entry[key] = (value.detach().to("cpu", copy=True), value.device)
                        else:
                            entry[key] = (value, None)
                    saved.append((parameter, entry))
            snapshot["optimizer"] = saved
        return snapshot

    def _rollback(self, args, state, model, optimizer, metric_value: float) -> None:
        snapshot = self._snapshot
        dims_before = [layer.state_dim for layer in model.lru_layers()]
        model.set_state_dims(snapshot["state_dims"])
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(snapshot["model"][name].to(tensor.device))
        for parameter in model.parameters():
            parameter.grad = None
        if optimizer is not None and snapshot["optimizer"] is not None:
            inner = _unwrap_optimizer(optimizer)
            for parameter, entry in snapshot["optimizer"]:
                inner.state.pop(parameter, None)
                if entry:
                    inner.state[parameter] = {
                        key: (value.to(device, copy=True) if device is not None else value)
                        for key, (value, device) in entry.items()
                    }
        trainer = self._find_trainer()
        if trainer is not None:
            rebuild_ddp_reducer(trainer.model_wrapped)
        self.stopped = True
        if self.history:
            self.history[-1]["rolled_back"] = True
        self.history.append({
            "step": int(state.global_step),
            "type": "rollback",
            "policy": "rollback",
            "dims_before": dims_before,
            "dims_after": list(model.config.state_dims),
            "kept_energy": None,
            "metric_name": self.metric_name,
            "metric_before": self._baseline,
            "metric_after": metric_value,
        })
        logger.warning(
            "CompreSSMCallback: %s went from %.6g to %.6g after the reduction at step %s (tolerance %.3g): rolled "
            "back to state sizes %s and stopped reducing", self.metric_name, self._baseline, metric_value,
            self.history[-2].get("step") if len(self.history) > 1 else "?", self.rollback_tolerance,
            model.config.state_dims,
        )
        dims = list(model.config.state_dims)
        metrics = {f"compressm/state_dim_layer{index}": dim for index, dim in enumerate(dims)}
        metrics["compressm/total_state_dim"] = sum(dims)
        metrics["compressm/rolled_back"] = 1
        self._log(state, metrics)
