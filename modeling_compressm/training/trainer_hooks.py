"""Trainer plumbing of CompreSSMCallback that reaches into a plain `Trainer`: methods wrapped so the model is re-sized
before the best checkpoint loads and an incomplete checkpoint is refused with a message before the Trainer reads it,
and the Trainer's control flags kept across nested `log` / `evaluate` calls.
"""

from __future__ import annotations

import contextlib
import os

from .checkpoints import check_checkpoint_complete, restore_checkpoint_sizes
from .reducer import CompreSSMReducer

__all__ = [
    "check_checkpoint_before_resume",
    "preserve_control_flags",
    "resize_before_loading_best_model",
    "restore_best_checkpoint_sizes",
]


def restore_best_checkpoint_sizes(trainer) -> bool:
    """Give the Trainer's model the sizes and history of its best checkpoint (before `load_best_model_at_end` loads
    the weights), through the reducer of its CompreSSMCallback when it has one; False when there is nothing to do."""
    checkpoint = trainer.state.best_model_checkpoint
    if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, "config.json")):
        return False
    reducer = next((callback.reducer for callback in trainer.callback_handler.callbacks
                    if isinstance(getattr(callback, "reducer", None), CompreSSMReducer)), None)
    return restore_checkpoint_sizes(trainer.model, checkpoint, trainer.state.global_step, trainer.optimizer,
                                    trainer.model_wrapped, reducer)


def _run_before(trainer, method_name: str, before) -> None:
    """Wrap a plain Trainer's method `method_name` (once per Trainer) so `before(*args, **kwargs)` runs first."""
    marker = f"_compressm_before{method_name}"
    if trainer.__dict__.get(marker):
        return
    method = getattr(trainer, method_name)

    def wrapped(*args, **kwargs):
        before(*args, **kwargs)
        return method(*args, **kwargs)

    setattr(trainer, method_name, wrapped)
    trainer.__dict__[marker] = True


def resize_before_loading_best_model(trainer) -> None:
    """Wrap a plain Trainer's `_load_best_model` so the model gets the best checkpoint's sizes first."""
    _run_before(trainer, "_load_best_model", lambda *args, **kwargs: restore_best_checkpoint_sizes(trainer))


def check_checkpoint_before_resume(trainer) -> None:
    """Wrap a plain Trainer's `_load_from_checkpoint` so an incomplete checkpoint fails with a message naming the
    folder to delete and the newest complete one, instead of transformers' FileNotFoundError for trainer_state.json."""
    _run_before(trainer, "_load_from_checkpoint",
                lambda checkpoint, *args, **kwargs: check_checkpoint_complete(checkpoint))


@contextlib.contextmanager
def preserve_control_flags(trainer):
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
