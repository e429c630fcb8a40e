"""Trainer checkpoints of models that shrink: read what a checkpoint says about the reduction, re-size a model to it,
reconcile its two copies of the history, and write checkpoints atomically.

A Trainer checkpoint of a reduced model holds the sizes (`config.json`), the history (`compressm_history.json`), the
callback's state inside `trainer_state.json` (history, stop flag, pending rollback check) and, while a rollback check
is pending, the state before that event (`compressm_pending.pt`). `read_checkpoint` validates all of it with errors
that name the file and the field, and reconciles the two histories: a copy that disagrees with the weights is not
used (an error when neither agrees); of two that agree, the richer one wins; a warning says which was used.

`atomic_checkpoint_save(trainer, save)` is what `CompreSSMTrainer._save_checkpoint` runs: the Trainer writes the
checkpoint into a staging folder that the resume logic does not recognise, and the folder is renamed to
`checkpoint-<step>` only when weights, config, history, optimizer and trainer state are all on disk, so a kill at
any moment leaves either a complete `checkpoint-<step>` or none. A plain Trainer's checkpoints are written in place
(trainer_state.json last): `check_checkpoint_complete` turns resuming from one whose save did not finish into an
error naming the folder to delete and the newest complete one, and `last_complete_checkpoint(output_dir)` skips such
folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import weakref
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

from ..events import HISTORY_FILE, HistoryError, ReductionEvent, coerce_events, history_problems, read_history
from ..events import histories_matching_weights
from .distributed import find_wrapper, rebuild_ddp_reducer
from .optimizer_state import repair_optimizer_state
from .reducer import compressm_model_of, restore_sizes_and_history
from .selective_ssm_training import check_selective_resume, is_selective_ssm_model

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.json"
PENDING_FILE = "compressm_pending.pt"
CALLBACK_NAME = "CompreSSMCallback"
STAGING_FOLDER = ".compressm-staging"


@dataclass
class CheckpointReductionState:
    """What a checkpoint folder says about the reduction.

    path: the folder.   state_dims: sizes of its weights.   events: the reconciled history.
    stopped: reductions had stopped (after a rollback).   pending: the pending rollback check (dict with
    "event_index", "metric_name", "metric_before", "snapshot") or None.   warnings: what reconciliation found.
    """

    path: str
    state_dims: list[int]
    events: list[ReductionEvent]
    stopped: bool = False
    pending: dict | None = None
    warnings: list[str] = field(default_factory=list)
    has_reduction_state: bool = True  # False: no callback state and no event (saved by a run without compression)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise HistoryError(path, "", f"not valid JSON ({error})") from None
    except RecursionError:
        raise HistoryError(path, "", "JSON nested too deeply to be read (the file is damaged)") from None


def _read_state_dims(checkpoint_dir: str) -> list[int]:
    path = os.path.join(checkpoint_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in checkpoint {checkpoint_dir!r}: cannot read its state_dims")
    config = _read_json(path)
    dims = config.get("state_dims") if isinstance(config, dict) else None
    if not isinstance(dims, list) or not dims or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1 for dim in dims
    ):
        raise HistoryError(path, "state_dims", f"expected a non-empty list of positive ints, got {dims!r}")
    return dims


def _callback_state(checkpoint_dir: str) -> tuple[dict | None, str]:
    """The CompreSSMCallback entry of trainer_state.json's stateful_callbacks (the first one), or None."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        return None, path
    state = _read_json(path)
    entry = (state.get("stateful_callbacks") or {}).get(CALLBACK_NAME) if isinstance(state, dict) else None
    if isinstance(entry, list):
        entry = entry[0] if entry else None
    if entry is None:
        return None, path
    if not isinstance(entry, dict) or not isinstance(entry.get("attributes", {}), dict):
        raise HistoryError(path, f"stateful_callbacks.{CALLBACK_NAME}", f"expected an object, got {entry!r}")
    return entry.get("attributes", {}), path


def _state_events(attributes: dict, path: str) -> tuple[list[ReductionEvent] | None, bool, dict | None]:
    where = f"{path} (stateful_callbacks.{CALLBACK_NAME})"
    reducer_state = attributes.get("reducer_state")
    if isinstance(reducer_state, dict):  # this release
        events = coerce_events(reducer_state.get("history", []), source=where)
        return events, bool(reducer_state.get("stopped", False)), reducer_state.get("pending")
    if "history" in attributes:  # callback state of earlier releases
        return coerce_events(attributes["history"], source=where), bool(attributes.get("stopped", False)), None
    return None, False, None


def _same(first: list[ReductionEvent], second: list[ReductionEvent]) -> bool:
    return [event.to_dict() for event in first] == [event.to_dict() for event in second]


def reconcile_histories(file_events, state_events, file_label: str, state_label: str):
    """The richer of the two histories (more events; the file on a tie) and a warning text when they differ."""
    if file_events is None and state_events is None:
        return [], None
    if file_events is None:
        return state_events, (f"{file_label} is missing; restored {len(state_events)} event(s) from {state_label}")
    if state_events is None or _same(file_events, state_events):
        return file_events, None
    prefix = _same(file_events[: len(state_events)], state_events) or _same(state_events[: len(file_events)], file_events)
    relation = "one extends the other" if prefix else "they disagree"
    if len(state_events) > len(file_events):
        return state_events, (
            f"{file_label} has {len(file_events)} event(s) but {state_label} has {len(state_events)} ({relation}); "
            f"using the richer {state_label}"
        )
    return file_events, (
        f"{state_label} has {len(state_events)} event(s) but {file_label} has {len(file_events)} ({relation}); using "
        f"the richer {file_label}"
    )


def read_checkpoint(checkpoint_dir) -> CheckpointReductionState:
    """Validate and reconcile what a checkpoint folder says about the reduction (see the module docstring).

    Raises FileNotFoundError without config.json, HistoryError (naming file and field) for invalid files."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    dims = _read_state_dims(checkpoint_dir)
    history_path = os.path.join(checkpoint_dir, HISTORY_FILE)
    file_history = read_history(history_path) if os.path.lexists(history_path) else None  # a folder there: an error
    file_events = file_history.events if file_history is not None else None
    attributes, state_path = _callback_state(checkpoint_dir)
    state_events, stopped, pending = _state_events(attributes, state_path) if attributes is not None else (None, False, None)
    # A copy that disagrees with the weights is left out (an error when no copy agrees); the agreeing ones reconcile.
    copies = [copy for copy in ((history_path, file_events, file_history and file_history.state_dims),
                                (state_path, state_events, None)) if copy[1] is not None]
    matching, warnings = histories_matching_weights(copies, dims, os.path.join(checkpoint_dir, CONFIG_FILE))
    if len(matching) < len(copies):
        events, message = matching[0][1], None
    else:
        events, message = reconcile_histories(file_events, state_events, history_path, state_path)
    warnings += [message] if message else []
    warnings += [f"{checkpoint_dir}: {problem}" for problem in history_problems(events, dims)]
    if attributes is None and events and events[-1].kind == "rollback":
        stopped = True  # only the history is known: a well-formed rollback at its end means reductions had stopped
    if pending is not None:
        pending_path = os.path.join(checkpoint_dir, PENDING_FILE)
        if os.path.isfile(pending_path):
            pending = dict(pending, snapshot=torch.load(pending_path, map_location="cpu", weights_only=True))
        else:
            warnings.append(
                f"{state_path} records a pending rollback check but {pending_path} is missing: that event can no longer "
                "be undone"
            )
            pending = dict(pending, snapshot=None)
    return CheckpointReductionState(checkpoint_dir, dims, events, stopped, pending, warnings,
                                    has_reduction_state=bool(file_events) or attributes is not None)


# ------------------------------------------------------------------------------------ incomplete checkpoints
class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint folder whose save did not finish (a plain Trainer writes `checkpoint-<step>` in place and
    trainer_state.json last, so a kill during a save leaves a folder without it)."""


def checkpoint_incomplete_reason(checkpoint_dir) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (its save did not finish), or None when it can."""
    path = os.path.join(os.fspath(checkpoint_dir), TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        return f"it has no {TRAINER_STATE_FILE}, which the Trainer writes last: its save did not finish"
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE_FILE} cannot be read ({error}): its save did not finish"
    return None


def _checkpoints_newest_first(run_dir: str) -> list[str]:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = {}
    for name in os.listdir(run_dir):
        prefix, _, step = name.rpartition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(run_dir, name)):
            steps[os.path.join(run_dir, name)] = int(step)
    return sorted(steps, key=steps.get, reverse=True)


def last_complete_checkpoint(run_dir) -> str | None:
    """The newest `checkpoint-<step>` folder of `run_dir` whose save finished, or None. Newer incomplete folders are
    skipped with a warning naming them (what `Trainer.train(resume_from_checkpoint=True)` would stop on)."""
    run_dir = os.fspath(run_dir)
    skipped = []
    for folder in _checkpoints_newest_first(run_dir) if os.path.isdir(run_dir) else []:
        reason = checkpoint_incomplete_reason(folder)
        if reason is not None:
            skipped.append(f"{folder} ({reason})")
            continue
        if skipped:
            logger.warning(
                "CompreSSM resume: skipped the incomplete checkpoint(s) %s; resuming from %s, the newest complete one. "
                "Delete the skipped folder(s)", "; ".join(skipped), folder,
            )
        return folder
    return None


def check_checkpoint_complete(checkpoint_dir) -> None:
    """Raise IncompleteCheckpointError naming the folder to delete and the newest complete checkpoint beside it."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    reason = checkpoint_incomplete_reason(checkpoint_dir)
    if reason is None:
        return
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    others = [folder for folder in _checkpoints_newest_first(parent)
              if os.path.abspath(folder) != os.path.abspath(checkpoint_dir)
              and checkpoint_incomplete_reason(folder) is None]
    alternative = (f"resume from {others[0]}, the newest complete checkpoint there" if others
                   else "no complete checkpoint is left beside it: start the run again")
    raise IncompleteCheckpointError(
        f"cannot resume from {checkpoint_dir}: {reason} (the process was probably stopped while saving). Delete "
        f"that folder and {alternative}; resume_from_checkpoint=last_complete_checkpoint(output_dir) "
        "(modeling_compressm.training.checkpoints) skips such folders by itself"
    )


def prepare_model_for_resume(model, checkpoint_dir) -> list[int]:
    """Re-size `model` to the state sizes of a checkpoint so `Trainer.train(resume_from_checkpoint=...)` can load it.

    Reads and validates the checkpoint (`read_checkpoint`), calls `model.set_state_dims` (layers whose size changes
    are re-allocated; the checkpoint weights then overwrite them), restores `model.reduction_history` and leaves the
    rest (stop flag, pending rollback check) for CompreSSMCallback to pick up when training starts. Call it before
    the Trainer creates its optimizer, i.e. before `trainer.train`; CompreSSMTrainer does it by itself.

    Args:
        model: a CompreSSM model (possibly wrapped in DDP).   checkpoint_dir: a Trainer checkpoint folder.
    Returns:
        the state sizes the model now has (list of ints).
    A CompreSSM Mamba-2 / Mamba model is not re-sized: it must already have the checkpoint's sizes (ValueError
    otherwise, `selective_ssm_training.check_selective_resume`).
    Raises:
        IncompleteCheckpointError: the checkpoint's save did not finish (the message names the folder to delete and
            the newest complete checkpoint beside it).
    """
    check_checkpoint_complete(checkpoint_dir)
    if is_selective_ssm_model(model):  # Mamba-2 / Mamba: sizes must already match (no in-place re-sizing)
        return check_selective_resume(model, checkpoint_dir)
    info = read_checkpoint(checkpoint_dir)
    for message in info.warnings:
        logger.warning("CompreSSM resume: %s", message)
    model = compressm_model_of(model)
    restore_sizes_and_history(model, info.state_dims, info.events)  # no optimizer state yet: nothing to repair
    _PREPARED_RESUMES[model] = info
    return list(model.config.state_dims)


# What prepare_model_for_resume read beyond sizes and history (stop flag, pending rollback check), kept for the
# CompreSSMCallback that starts training this model (`take_prepared_resume`). Held weakly, and outside the model
# object, so nothing of it is saved, copied or pickled with the model.
_PREPARED_RESUMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def take_prepared_resume(model) -> CheckpointReductionState | None:
    """The checkpoint state `prepare_model_for_resume` prepared this (unwrapped) model with, once; None if none."""
    return _PREPARED_RESUMES.pop(model, None)


def restore_checkpoint_sizes(model, checkpoint_dir, step, optimizer=None, wrapped=None, reducer=None) -> bool:
    """Before the weights of `checkpoint_dir` are loaded into a trained model (`load_best_model_at_end`): give the
    model that checkpoint's sizes and history, plus a "restored" event, so weights, sizes and history agree.

    The optimizer state of re-sized parameters is deleted; a DDP wrapper is rebuilt: by `reducer` (the run's
    CompreSSMReducer, `CompreSSMReducer.restore`) when it reduces this model, else here for `optimizer` and
    `wrapped`. Does nothing (returns False) when the model already is in that state."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    info = read_checkpoint(checkpoint_dir)
    model = compressm_model_of(model)
    history = model.reduction_history
    if history and history[-1].kind == "restored" and history[-1].restored_from == checkpoint_dir:
        return False
    for message in info.warnings:
        logger.warning("CompreSSM: %s", message)
    dims_now = list(model.config.state_dims)
    events = list(info.events) + [
        ReductionEvent(step=step, kind="restored", policy=None, dims_before=dims_now,
                       dims_after=list(info.state_dims), restored_from=checkpoint_dir)
    ]
    if reducer is not None and reducer.model is model:
        reducer.restore(info.state_dims, events)
        return True
    changes = restore_sizes_and_history(model, info.state_dims, events)
    if changes:
        if wrapped is not None:
            rebuild_ddp_reducer(find_wrapper(wrapped, DistributedDataParallel))
        repair_optimizer_state(optimizer, changes, "reset")
    return True


def save_pending_check(reducer, checkpoint_dir) -> bool:
    """Write the state before a pending rollback event into the checkpoint (PENDING_FILE); False if none pends."""
    state = reducer.state_dict(include_snapshot=True) if reducer is not None else None
    if not state or state["pending"] is None or state["pending"]["snapshot"] is None:
        return False
    path = os.path.join(os.fspath(checkpoint_dir), PENDING_FILE)
    temporary = f"{path}.tmp-{os.getpid()}"
    torch.save(state["pending"]["snapshot"], temporary)
    os.replace(temporary, path)
    return True


# ---------------------------------------------------------------------------------------------- atomic saving
def atomic_checkpoint_save(trainer, save, trial=None, extra_writers=()) -> str | None:
    """Run `save()` (the Trainer's own `_save_checkpoint`) so that `checkpoint-<step>` appears complete or not at all.

    The Trainer is pointed at a staging parent folder (`<output>/.compressm-staging`, which `get_last_checkpoint` and
    checkpoint rotation do not list), `extra_writers(staged_folder)` add their files, trainer_state.json is rewritten
    with the final best-checkpoint path, and the folder is renamed into place (a folder of the same name is replaced:
    renamed aside first, removed after). Then old checkpoints are rotated as the Trainer would.
    Returns the final checkpoint folder (None on ranks that do not save).
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    run_dir = trainer._get_output_dir(trial=trial)
    staging_root = os.path.join(run_dir, STAGING_FOLDER)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
    distributed = trainer.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if trainer.args.should_save and os.path.isdir(staging_root):
        shutil.rmtree(staging_root, ignore_errors=True)  # leftovers of a killed save
    if distributed:
        torch.distributed.barrier()
    trainer._compressm_output_dir = staging_root
    try:
        save()
    finally:
        trainer._compressm_output_dir = None
    best = trainer.state.best_model_checkpoint
    if best is not None and os.path.dirname(os.path.abspath(best)) == os.path.abspath(staging_root):
        trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
    if distributed:
        torch.distributed.barrier()  # every rank wrote its RNG state into the staged folder
    if trainer.args.should_save:
        for writer in extra_writers:
            writer(staged)
        trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_FILE))
        aside = None
        if os.path.exists(final):
            aside = os.path.join(staging_root, f"{name}.replaced")
            os.replace(final, aside)
        os.replace(staged, final)
        shutil.rmtree(staging_root, ignore_errors=True)
        _rotate(trainer, run_dir)
    if distributed:
        torch.distributed.barrier()
    return final if trainer.args.should_save else None


def _rotate(trainer, run_dir: str) -> None:
    """Delete old checkpoints beyond save_total_limit, as the Trainer does after a save."""
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # transformers < 5: a Trainer method
        trainer._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        return
    rotate_checkpoints(
        output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
        best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True,
    )
