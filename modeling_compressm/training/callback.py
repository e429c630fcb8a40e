"""Hugging Face `Trainer` adapter: `CompreSSMCallback` and `CompreSSMTrainer`, thin layers over `CompreSSMReducer`.

The callback builds a `CompreSSMReducer` when training starts (model, optimizer and run length come from the
Trainer) and forwards the Trainer's events to it: `on_step_end` -> `reducer.step`, `on_evaluate` -> the rollback
check. Around that it does only Trainer plumbing:

* logging through `Trainer.log` (so `report_to` integrations, `log_history` and printers see the metrics), which
  needs the Trainer: `CompreSSMTrainer` binds its callbacks, `callback.bind(trainer)` binds one to a plain
  `Trainer`. Unbound, metrics go to `state.log_history` only (nothing on the console; a warning at the start of
  training says so); under torch.distributed an unbound callback stops
  before step 1 (the reducer needs the DDP-wrapped model, which only the Trainer holds). A callback bound to a
  Trainer that is not the one now training raises at `train()` instead of logging to the wrong run.
* FSDP: the Trainer's FSDP (`TrainingArguments(fsdp=...)`) is refused with a message naming the supported path
  (`CompreSSMReducer` in a plain or accelerate loop, docs/fsdp.md).
* checkpoints: `CompreSSMTrainer` re-sizes the model before a checkpoint's weights are loaded (resume and
  `load_best_model_at_end`), writes checkpoints atomically, and stores a pending rollback check in them; with a plain
  `Trainer`, `prepare_model_for_resume(model, checkpoint)` re-sizes for resume, and for `load_best_model_at_end` the
  callback re-sizes the model just before the best checkpoint is loaded: a bound callback wraps that Trainer's
  `_load_best_model`; an unbound one re-sizes when the Trainer logs its final metrics, which transformers >= 5.3
  does before loading the best checkpoint (earlier releases load it first, so there the callback must be bound).

Reduction math lives in `reduction.py`, the loop-independent core in `reducer.py`, its settings in `settings.py`,
schedule and policies in `schedule.py`, checkpoint reading and atomic saves in `checkpoints.py`, the checks of the
Trainer's arguments before step 1 in `trainer_checks.py`, the wrapped methods of a plain Trainer in
`trainer_hooks.py`, and moving a checkpoint's optimizer state into other parameter groups in `optimizer_regroup.py`.
Over 500 lines because what stays here is the two classes, which need the Trainer itself: its logging, optimizer
groups, resume, checkpoint and best-model hooks (on both sides of transformers 5.3).
"""

from __future__ import annotations

import inspect
import logging
import os

import transformers
from packaging import version
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..events import coerce_events, event_metrics
from ..model_card import defer_card_plot, refresh_card_spectrum, write_model_card
from .checkpoints import (
    atomic_checkpoint_save,
    last_complete_checkpoint,
    prepare_model_for_resume,
    reconcile_histories,
    restore_checkpoint_sizes,
    save_pending_check,
    take_prepared_resume,
)
from .distributed import distributed_world_size, rebuild_ddp_reducer
from .optim import DEFAULT_SSM_LR_FACTOR, compressm_parameter_groups
from .optimizer_regroup import known_layouts, load_regrouped_optimizer_state
from .reducer import CompreSSMReducer, compressm_model_of
from .selective_ssm_training import SelectiveSSMReducer, is_selective_ssm_model
from .settings import ReductionSettings, SettingsView, settings_from
from .trainer_checks import (  # noqa: F401 (TRAINER_FSDP_MESSAGE: importable from here, as before)
    TRAINER_FSDP_MESSAGE,
    check_every_event_is_checked,
    check_label_smoothing_is_shifted,
    check_no_trainer_fsdp,
)
from .trainer_hooks import (
    check_checkpoint_before_resume,
    preserve_control_flags,
    resize_before_loading_best_model,
    restore_best_checkpoint_sizes,
)

logger = logging.getLogger(__name__)

__all__ = ["CompreSSMCallback", "CompreSSMTrainer", "prepare_model_for_resume", "rebuild_ddp_reducer"]


# transformers >= 5.3 logs the final training metrics (on_log) before `load_best_model_at_end` loads the best
# checkpoint; earlier releases load it first, so an unbound callback cannot re-size the model in time there.
FINAL_LOG_PRECEDES_BEST_MODEL_LOAD = version.parse(transformers.__version__).release >= (5, 3)


class CompreSSMCallback(SettingsView, TrainerCallback, ExportableState):
    """Shrink a CompreSSM model during `Trainer` training by balanced truncation (arXiv 2510.02823).

    Every `interval` optimizer steps from `start_step` to `end_step` (inclusive, global_step > 0), each layer's
    Hankel singular values are computed, new state sizes picked and the model reduced in place (`CompreSSMReducer`).

    Args:
        settings: a `settings.ReductionSettings` (or its `to_dict()`): schedule, rank policy ("global" by default;
            "tolerance", "fixed", or "rollback": tolerance sizes, but each event is checked at the next evaluation
            and undone, ending all further reductions, if `rollback_metric` degraded by more than
            `rollback_tolerance`), optimizer-state mode, system, regularizer (a `reducibility.ReducibilityRegularizer`
            whose gradient is added before each optimizer step of its window; works in a plain Trainer) and
            collective timeout. The reducer of each run gets these settings, with `collective_timeout` lowered to the
            Trainer's `ddp_timeout` where that is shorter.
        **shortcuts: instead of `settings`, its fields as keywords (`CompreSSMCallback(tau=0.05, interval=10)`;
            `ReductionSettings.from_arguments`: policy None is "tolerance" if tau is given, "fixed" if fraction is
            given, else the default).
    Invalid values raise ValueError here; checks that need the model (`total_budget` against `min_dim` x layers) or
    the TrainingArguments run when training starts, before step 1.

    Attributes:
        settings: the ReductionSettings; its fields read as attributes (`callback.policy`, `callback.schedule`, ...).
        history: the reduction events (`events.ReductionEvent`; the same list as `model.reduction_history`).
        reducer: the CompreSSMReducer of the current run (None before training starts).
    """

    def __init__(self, settings: ReductionSettings | dict | None = None, **shortcuts):
        self.settings = settings_from(settings, shortcuts, "CompreSSMCallback")
        self._penalty: float | None = None
        self.reducer: CompreSSMReducer | None = None
        self.reducer_state: dict | None = None  # restored from trainer_state.json (restore_callback_states_...)
        self._legacy_history: list | None = None
        self._legacy_stopped: bool | None = None
        self._trainer = None
        self._last_metric: float | None = None

    # ------------------------------------------------------------------------------------------ configuration
    @property
    def metric_name(self) -> str:
        return self.rollback_rule.metric_name

    @property
    def lower_is_better(self) -> bool:
        return self.rollback_rule.lower_is_better

    def effective_collective_timeout(self, args) -> float:
        """Seconds a collective of a distributed reduction waits: `settings.collective_timeout` (300 s by default),
        or the Trainer's `ddp_timeout` where that is shorter (the process group gives up then anyway)."""
        ddp_timeout = getattr(args, "ddp_timeout", None)
        return float(min(self.collective_timeout, ddp_timeout or self.collective_timeout))

    def resolved_end_step(self, max_steps: int) -> int:
        """end_step as an absolute step for a run of `max_steps` optimizer steps."""
        return self.schedule.resolve(max_steps)[1]

    def is_reduction_step(self, global_step: int, max_steps: int) -> bool:
        """Whether the schedule asks for a reduction event after optimizer step `global_step`."""
        return self.schedule.is_due(global_step, max_steps)

    @property
    def history(self) -> list:
        if self.reducer is not None:
            return self.reducer.history
        return list(self._legacy_history or [])

    @history.setter
    def history(self, events) -> None:  # restore_callback_states_from_checkpoint of earlier releases
        self._legacy_history = coerce_events(list(events), source="CompreSSMCallback state")

    @property
    def stopped(self) -> bool:
        if self.reducer is not None:
            return self.reducer.stopped
        return bool(self._legacy_stopped)

    @stopped.setter
    def stopped(self, value) -> None:
        if self.reducer is not None:
            self.reducer.stopped = bool(value)
        else:
            self._legacy_stopped = bool(value)

    def bind(self, trainer) -> "CompreSSMCallback":
        """Attach the Trainer whose `log` receives the metrics, whose evaluation gives rollback baselines and whose
        wrapped (DDP) model the reducer works on. `CompreSSMTrainer` does this itself; returns self."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind expects a transformers.Trainer, got {type(trainer).__name__}")
        check_no_trainer_fsdp(trainer.args)
        if not isinstance(trainer, CompreSSMTrainer):  # CompreSSMTrainer checks in its own _load_from_checkpoint
            check_checkpoint_before_resume(trainer)
        self._trainer = trainer
        return self

    def state(self) -> dict:
        """ExportableState: the settings (as constructor keywords) and progress, saved in trainer_state.json of
        every checkpoint."""
        if self.reducer is not None:
            progress = self.reducer.state_dict(include_snapshot=False)
        else:
            progress = self.reducer_state
        return {"args": self.settings.to_dict(), "attributes": {"reducer_state": progress}}

    # ----------------------------------------------------------------------------------------- Trainer binding
    def _running_trainer(self, optimizer):
        """The bound Trainer if it is the one now training; raise if the callback is bound to another one."""
        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.optimizer is optimizer and any(callback is self for callback in trainer.callback_handler.callbacks):
            return trainer
        raise RuntimeError(
            "this CompreSSMCallback is bound to another Trainer (one that already trained), not to the one now "
            "training: use one callback per Trainer, pass it to CompreSSMTrainer (which binds its callbacks), or call "
            "callback.bind(new_trainer) before train()"
        )

    # --------------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if is_selective_ssm_model(model):  # Mamba-2 / Mamba: the selective-SSM strategy (no LRU checkpoint plumbing)
            check_no_trainer_fsdp(args, model)
            if args.load_best_model_at_end:
                raise ValueError("load_best_model_at_end is not supported with in-training reduction of Mamba models "
                                 "yet (the best checkpoint may have other state sizes): set it to False and load the "
                                 "checkpoint with from_pretrained")
            self._running_trainer(optimizer)
            self.reducer = SelectiveSSMReducer(model, optimizer, settings=self.settings, max_steps=state.max_steps)
            if state.global_step > 0 and self.reducer_state is not None:  # resumed: the restored callback state's
                self.reducer.history.extend(  # events (TrainingArguments(restore_callback_states_from_checkpoint))
                    coerce_events(self.reducer_state.get("history", []), source="CompreSSMCallback state")
                )
            self.reducer_state = None
            return control
        check_no_trainer_fsdp(args, model)
        check_label_smoothing_is_shifted(args, model)
        trainer = self._running_trainer(optimizer)
        if distributed_world_size() > 1 and trainer is None:
            raise RuntimeError(
                "CompreSSMCallback under torch.distributed needs its Trainer (the reducer works on the DDP-wrapped "
                "model only the Trainer holds): use CompreSSMTrainer, or call callback.bind(trainer)"
            )
        if trainer is None:
            logger.warning(
                "CompreSSMCallback is not bound to a Trainer: its metrics go to trainer.state.log_history only, not "
                "to the console or report_to integrations. Use CompreSSMTrainer or call callback.bind(trainer) "
                "before train()."
            )
        if args.load_best_model_at_end and not isinstance(trainer, CompreSSMTrainer):
            if trainer is not None:
                resize_before_loading_best_model(trainer)
            elif not FINAL_LOG_PRECEDES_BEST_MODEL_LOAD:
                raise ValueError(
                    f"load_best_model_at_end with a plain transformers.Trainer: transformers "
                    f"{transformers.__version__} loads the best checkpoint before any callback can give the model that "
                    "checkpoint's state sizes, so training would end in a size mismatch. Use CompreSSMTrainer, or call "
                    "callback.bind(trainer) before train()"
                )
        if self.policy == "rollback" and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            raise ValueError(
                "policy='rollback' compares an evaluation metric after each reduction with the one before it: set "
                "eval_strategy='steps' (or 'epoch') and pass an eval_dataset"
            )
        if isinstance(state.stateful_callbacks, dict):
            # A run resumed from a checkpoint written without this callback: transformers saves the state of the
            # callbacks the checkpoint listed only (KeyError at the next save) unless this one has an entry.
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        wrapped = trainer.model_wrapped if trainer is not None else model
        compressm_model = compressm_model_of(model)
        resume = take_prepared_resume(compressm_model)
        self.reducer = CompreSSMReducer(
            wrapped, optimizer, max_steps=state.max_steps,
            settings=self.settings.replace(collective_timeout=self.effective_collective_timeout(args)),
        )
        self._restore_progress(state, compressm_model, resume)
        if self.policy == "rollback":
            check_every_event_is_checked(args, state, self.reducer)
        defer_card_plot(compressm_model)  # drawn into each checkpoint once it is complete (on_save)
        self._last_metric = None
        return control

    def _restore_progress(self, state, model, resume) -> None:
        """On resume: stop flag and pending check from the checkpoint (prepared by CompreSSMTrainer /
        prepare_model_for_resume) or from restored callback state; reconcile histories (richer wins)."""
        reducer = self.reducer
        restored = self.reducer_state
        legacy_history, legacy_stopped = self._legacy_history, self._legacy_stopped
        self.reducer_state, self._legacy_history, self._legacy_stopped = None, None, None
        if state.global_step == 0:
            return  # a fresh run continues the history of the model it starts from
        if resume is not None:
            if not resume.has_reduction_state:
                logger.warning(
                    "CompreSSMCallback: %s was written without compression (no CompreSSMCallback state, no event in "
                    "its history): reductions start with this run, from step %d, on the model as saved", resume.path,
                    state.global_step,
                )
            reducer.stopped = resume.stopped
            reducer.restore_pending(resume.pending, f"checkpoint {resume.path}")
            return
        # No prepared checkpoint: callback state restored by the Trainer (restore_callback_states_from_checkpoint).
        state_events, stopped = None, False
        if restored is not None:
            state_events = coerce_events(restored.get("history", []), source="CompreSSMCallback state")
            stopped = bool(restored.get("stopped", False))
        elif legacy_history is not None:
            state_events, stopped = legacy_history, bool(legacy_stopped)
        if state_events is None:
            logger.warning(
                "CompreSSMCallback: training resumed at step %d without CompreSSMTrainer or prepare_model_for_resume: "
                "the checkpoint's history, stop flag and pending rollback check were not restored", state.global_step,
            )
            return
        events, message = reconcile_histories(
            list(model.reduction_history) or None, state_events, "the model's history", "the restored callback state"
        )
        if message:
            logger.warning("CompreSSMCallback: %s", message)
        reducer.restore(reducer.state_dims, events)  # the history only: the sizes are the checkpoint's already
        reducer.stopped = stopped
        if restored is not None and restored.get("pending") is not None:
            reducer.restore_pending(dict(restored["pending"], snapshot=None), "the restored callback state")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.reducer is not None and not self.reducer.stopped:
            self.reducer.before_step(state.global_step + 1)  # Mamba models: statistics hooks for the coming step
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        reducer = self.reducer
        if reducer is None or reducer.stopped or not reducer.is_due(state.global_step):
            return control
        if reducer.skip_while_pending(state.global_step):
            return control
        baseline = self._evaluate_baseline() if self.policy == "rollback" else None
        event = reducer.reduce_now(state.global_step, metric_before=baseline, metric_name=self.metric_name)
        if event is None:
            return control
        if reducer.pending is not None and baseline is None:
            logger.warning(
                "CompreSSMCallback: no %s before the reduction at step %d and no Trainer to evaluate with; this "
                "reduction cannot be checked and is accepted", self.metric_name, state.global_step,
            )
            reducer.resolve_pending(True, state.global_step)
        self._log(state, event_metrics(event, self._reductions()))
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.policy != "rollback" or metrics is None or self.reducer is None:
            return control
        name = self.metric_name
        if name not in metrics:
            raise KeyError(
                f"rollback_metric {name!r} is not among the evaluation metrics {sorted(metrics)}; set "
                "rollback_metric to one of them"
            )
        value = float(metrics[name])
        pending = self.reducer.pending
        if pending is None:
            self._last_metric = value
            return control
        before = pending.metric_before
        relative = self.rollback_rule.relative_degradation(before, value)
        rollback = self.reducer.resolve_pending(
            not self.rollback_rule.degraded(before, value), state.global_step, metric_after=value,
            relative_degradation=relative,
        )
        if rollback is None:
            self._last_metric = value
            return control
        logger.warning(
            "CompreSSMCallback: %s went from %.6g to %.6g after the reduction at step %s (tolerance %.3g): rolled back "
            "to state sizes %s and stopped reducing", name, before, value, pending.event.step,
            self.rollback_rule.tolerance, rollback.dims_after,
        )
        self._log(state, event_metrics(rollback, self._reductions()))
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.reducer is None or not args.should_save:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return control
        # Plain Trainer: store a pending rollback check next to the checkpoint it belongs to (CompreSSMTrainer
        # writes it inside its atomic save instead).
        if not isinstance(self._trainer, CompreSSMTrainer):
            save_pending_check(self.reducer, folder)
        # The checkpoint is complete (trainer_state.json written): only now draw the card's HSV plot into it, which
        # takes far longer than the save (deferred in on_train_begin).
        if getattr(self.reducer, "writes_model_card", True):  # False: SelectiveSSMReducer (no LRU spectrum to draw)
            write_model_card(self.reducer.model, folder, draw_plot=True)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # After backward and clipping, before optimizer.step(): the reducibility regularizer adds its gradient.
        if self.reducer is not None:
            value = self.reducer.apply_regularizer(state.global_step + 1)
            self._penalty = value if value is not None else self._penalty
        return control

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if logs is not None and "loss" in logs and self._penalty is not None:  # with the training-loss entries
            logs["compressm/reducibility_penalty"] = self._penalty  # integrations called after this callback
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["compressm/reducibility_penalty"] = self._penalty  # appended before on_log
            self._penalty = None
        # Unbound callback in a plain Trainer: transformers >= 5.3 logs its final metrics ("train_runtime", ...) right
        # before `load_best_model_at_end` loads the best checkpoint: give the model that checkpoint's sizes first, so
        # the weights fit. (A bound callback wraps the Trainer's `_load_best_model` instead; CompreSSMTrainer does it.)
        if (
            logs and "train_runtime" in logs and args.load_best_model_at_end and state.best_model_checkpoint
            and self._trainer is None and model is not None
            and os.path.isfile(os.path.join(state.best_model_checkpoint, "config.json"))
        ):
            restore_checkpoint_sizes(model, state.best_model_checkpoint, state.global_step, optimizer,
                                     reducer=self.reducer)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            card_model = self.reducer.model if self.reducer is not None else compressm_model_of(model)
            refresh_card_spectrum(card_model)  # the final save draws the final spectrum
            defer_card_plot(card_model, False)
        return control

    # ---------------------------------------------------------------------------------------------- helpers
    def _reductions(self) -> int:
        return sum(event.kind == "reduction" for event in self.history)

    def _evaluate_baseline(self) -> float | None:
        trainer = self._trainer
        if trainer is not None and trainer.eval_dataset is not None:
            with preserve_control_flags(trainer):
                metrics = trainer.evaluate()  # on_evaluate records it as _last_metric (no pending event yet)
            if self.metric_name not in metrics:
                raise KeyError(
                    f"rollback_metric {self.metric_name!r} is not among the evaluation metrics {sorted(metrics)}"
                )
            return float(metrics[self.metric_name])
        return self._last_metric

    def _log(self, state, metrics: dict) -> None:
        trainer = self._trainer
        if trainer is not None:
            with preserve_control_flags(trainer):
                trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": state.global_step})
            logger.info("CompreSSM step %d: %s", state.global_step, metrics)


class CompreSSMTrainer(Trainer):
    """`Trainer` for models that shrink while they train.

    * binds every `CompreSSMCallback` it runs (logging through `Trainer.log`, evaluation for rollback baselines, the
      DDP-wrapped model for distributed reductions);
    * re-sizes the model to a checkpoint's `state_dims` and restores its reduction history before loading its
      weights (resume and `load_best_model_at_end`; the latter adds a "restored" event);
    * writes checkpoints atomically (staging folder, then rename; `checkpoints.atomic_checkpoint_save`), including a
      pending rollback check;
    * builds its default optimizer (when no `optimizers=` / `optimizer_cls_and_kwargs=` optimizer instance was
      passed) over `optim.compressm_parameter_groups`: the LRU recurrence parameters (nu_log, theta_log, gamma_log,
      B_re, B_im) get no weight decay and `learning_rate * ssm_lr_factor`, as in the reference implementation;
      every other parameter is grouped as `Trainer` groups it. The optimizer class and its settings still come
      from `TrainingArguments.optim` / `optim_args`. `ssm_lr_factor=None` keeps the Trainer's own grouping.
    Otherwise identical to `Trainer`.

    Args (besides Trainer's):
        ssm_lr_factor: learning-rate multiplier of the SSM group (> 0), or None (keyword only).
    """

    _compressm_output_dir = None

    def __init__(self, *args, ssm_lr_factor: float | None = DEFAULT_SSM_LR_FACTOR, **kwargs):
        if ssm_lr_factor is not None and (
            isinstance(ssm_lr_factor, bool) or not isinstance(ssm_lr_factor, (int, float)) or not ssm_lr_factor > 0
        ):
            raise ValueError(f"ssm_lr_factor must be a positive number or None, got {ssm_lr_factor!r}")
        self.ssm_lr_factor = None if ssm_lr_factor is None else float(ssm_lr_factor)
        super().__init__(*args, **kwargs)
        self._bind_compressm_callbacks()

    def create_optimizer(self, model=None):
        """The Trainer's optimizer over CompreSSM parameter groups (see the class docstring). Optimizers that build
        their own parameter lists (GaLore, LOMO, layer-wise, factories such as Muon) and bitsandbytes keep the
        Trainer's path. Returns the optimizer (also stored as `self.optimizer`)."""
        if self.optimizer is not None or self.ssm_lr_factor is None:
            # transformers < 5 has create_optimizer(self), later releases create_optimizer(self, model=None)
            if "model" in inspect.signature(Trainer.create_optimizer).parameters:
                return super().create_optimizer(model)
            return super().create_optimizer()
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        import transformers.trainer as trainer_module

        is_factory = getattr(trainer_module, "is_optimizer_factory", lambda cls: False)(optimizer_cls)
        owns_parameters = any(key in optimizer_kwargs for key in ("params", "model", "optimizer_dict"))
        if is_factory or owns_parameters or "bitsandbytes" in str(optimizer_cls):
            logger.warning(
                "CompreSSMTrainer: optimizer %s builds its own parameter groups; the SSM parameters keep the Trainer's "
                "weight decay and learning rate", getattr(optimizer_cls, "__name__", optimizer_cls),
            )
            return super().create_optimizer(model)
        optimizer_kwargs = dict(optimizer_kwargs)
        learning_rate = optimizer_kwargs.get("lr", self.args.learning_rate)
        groups = compressm_parameter_groups(
            opt_model, self.args.weight_decay, self.ssm_lr_factor, learning_rate=learning_rate
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _compressm_callbacks(self) -> list[CompreSSMCallback]:
        return [callback for callback in self.callback_handler.callbacks if isinstance(callback, CompreSSMCallback)]

    def _bind_compressm_callbacks(self) -> None:
        for callback in self._compressm_callbacks():
            callback.bind(self)

    def add_callback(self, callback):
        super().add_callback(callback)
        self._bind_compressm_callbacks()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint of
        `output_dir` (`checkpoints.last_complete_checkpoint`: a folder left incomplete by a plain Trainer's
        interrupted save is skipped with a warning naming it)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        prepare_model_for_resume(model if model is not None else self.model, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A checkpoint written by an optimizer with other parameter groups (a plain Trainer's, before compression
        was added) has its state moved into this run's groups (`optimizer_regroup`), with a warning."""
        if checkpoint is not None and not self.is_deepspeed_enabled and not self.is_fsdp_enabled:
            from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

            files = [os.path.join(checkpoint, name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
            layouts = known_layouts(self.model, self.get_decay_parameter_names(self.model), self.args.weight_decay)
            if all(os.path.isfile(path) for path in files) and load_regrouped_optimizer_state(
                self.optimizer, self.lr_scheduler, *files, layouts
            ):
                return None
        return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_best_model(self):
        restore_best_checkpoint_sizes(self)
        return super()._load_best_model()

    def _load_callback_state(self):
        super()._load_callback_state()  # may replace callbacks by fresh instances
        self._bind_compressm_callbacks()

    def _get_output_dir(self, trial):
        if self._compressm_output_dir is not None:
            return self._compressm_output_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        if self.args.push_to_hub:  # the Hub upload reads the folder it was given: keep the Trainer's own layout
            return super()._save_checkpoint(model, trial)

        def write_pending(folder):
            for callback in self._compressm_callbacks():
                save_pending_check(callback.reducer, folder)

        atomic_checkpoint_save(self, lambda: super(CompreSSMTrainer, self)._save_checkpoint(model, trial), trial,
                               (write_pending,))
