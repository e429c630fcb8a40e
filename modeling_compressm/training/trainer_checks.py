"""Checks of a Trainer run's arguments that CompreSSMCallback makes before step 1 (no training-loop glue here).

* `check_no_trainer_fsdp`: the Trainer's own FSDP cannot resume a model that shrank (TRAINER_FSDP_MESSAGE);
* `check_label_smoothing_is_shifted`: the Trainer would not shift labels for our causal LM;
* `check_every_event_is_checked`: the rollback policy needs an evaluation between consecutive events.
"""

from __future__ import annotations

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..modeling_compressm import CompreSSMForCausalLM
from .distributed import compressm_model_of
from .fsdp import is_fsdp2
from .schedule import evaluation_steps, unchecked_rollback_events

__all__ = [
    "TRAINER_FSDP_MESSAGE",
    "check_every_event_is_checked",
    "check_label_smoothing_is_shifted",
    "check_no_trainer_fsdp",
]


TRAINER_FSDP_MESSAGE = (
    "CompreSSMCallback does not support the Trainer's FSDP (TrainingArguments(fsdp=...)): on resume the Trainer shards "
    "the model at its initial sizes before loading a checkpoint saved at reduced sizes, which CompreSSMTrainer cannot "
    "re-size. Train FSDP2 models in a plain PyTorch or accelerate loop with CompreSSMReducer(model, optimizer, ...), "
    "which supports fully_shard and accelerate's FSDP2 plugin (docs/fsdp.md), or use the Trainer with DDP"
)


def check_no_trainer_fsdp(args, model=None) -> None:
    """Raise the TRAINER_FSDP_MESSAGE error for Trainer arguments that ask for FSDP or a model sharded by FSDP."""
    asked = bool(getattr(args, "fsdp", None)) if args is not None else False
    sharded = model is not None and is_fsdp2(model)
    if asked or sharded:
        raise NotImplementedError(TRAINER_FSDP_MESSAGE)


def check_label_smoothing_is_shifted(args, model) -> None:
    """The Trainer shifts labels for label smoothing only for causal LMs in transformers' own tables: refuse it for
    ours before step 1 (each position would learn to predict its own input token)."""
    lm = compressm_model_of(model) if model is not None else None
    if getattr(args, "label_smoothing_factor", 0) and isinstance(lm, CompreSSMForCausalLM):
        if type(lm).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} with {type(lm).__name__}: transformers' Trainer "
                "shifts labels for label smoothing only for causal LMs built into transformers, so each position would "
                "learn its own input token. Set label_smoothing_factor=0 or pass a compute_loss_func that shifts labels"
            )


def check_every_event_is_checked(args, state, reducer) -> None:
    """Rollback policy with `eval_strategy="steps"`: refuse a schedule in which an event has no evaluation before the
    next one (that next event would be skipped while the first awaits its check)."""
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "steps" or not state.eval_steps:
        return
    events = [step for step in reducer.schedule.steps(state.max_steps) if step > state.global_step]
    checks = evaluation_steps(int(state.eval_steps), state.max_steps, args.eval_delay or 0)
    unchecked = unchecked_rollback_events(events, checks)
    if unchecked:
        skipped = ", ".join(str(following) for _, following in unchecked)
        raise ValueError(
            f"policy='rollback' checks each reduction at the next evaluation and makes no reduction while a check is "
            f"pending, but with eval_steps={state.eval_steps} the reductions scheduled at steps {events} would "
            f"have no evaluation between " + ", ".join(f"steps {step} and {following}" for step, following in unchecked)
            + f", so the events at steps {skipped} would be skipped. Set eval_steps to at most the reduction "
            f"interval ({reducer.schedule.resolve(state.max_steps)[2]} steps), or schedule fewer events"
        )
