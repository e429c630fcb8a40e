"""The training recipe behind `compressm train`: data -> model -> Trainer with CompreSSMCallback -> evaluation ->
an output folder with model, tokenizer, model card and metrics (written whole or not at all) -> optional Hub upload.

    from modeling_compressm.app.recipe import train_preset, train_on_dataset

    summary = train_preset("digits", tau=0.05, max_steps=600)                 # offline digits classifier
    summary = train_on_dataset("corpus.txt", preset="tiny", tokenizer="bytes", block_size=128,
                               options=TrainingOptions(max_steps=200), output_dir="my-model")

Both return a summary dict (the trained model under "model"; metrics; state sizes before/after; reduction events).
The pieces are public too: `ReductionPlan` and `TrainingOptions` (`run_settings.py`: what the callback is asked to do,
steps as ints or fractions of the run; Trainer settings), `build_optimizer` (the one place the optimizer is made),
`run_training`, and the all-or-nothing output folder (`output_folder.py`).

Over 500 lines because both recipes (presets and own data) live here beside the steps they share (`run_training`,
the summary, the output folder and Hub upload); settings and the output folder are already modules of their own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

from transformers import TrainerCallback

from ..training.rank_selection import POLICIES
from ..training.schedule import is_int
from .output_folder import check_output_dir, save_run
from .run_settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_END_STEP,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_NUM_INTERVALS,
    DEFAULT_PRESET,
    DEFAULT_START_STEP,
    DEFAULT_TAU,
    DEFAULT_TEXT_EPOCHS,
    DEFAULT_TEXT_PRESET,
    ReductionPlan,
    TrainingOptions,
)

__all__ = [
    "ReductionPlan",
    "TrainingOptions",
    "build_optimizer",
    "run_training",
    "digits_datasets",
    "synthetic_splits",
    "train_preset",
    "train_on_dataset",
]

logger = logging.getLogger(__name__)

SYNTHETIC_CORPUS = "synthetic"  # name of the generated toy corpus the causal-LM presets train on without --dataset


# ------------------------------------------------------------------------------------------------ training
def build_optimizer(model, *, learning_rate: float, weight_decay: float, ssm_lr_factor: float | None = None):
    """The optimizer of every recipe run (the one place it is made): AdamW over `optim.compressm_parameter_groups`
    (weight decay on every parameter except biases, norm weights and the LRU recurrence parameters nu_log,
    theta_log, gamma_log, B, which train at learning_rate * ssm_lr_factor, as `CompreSSMTrainer` does), fused where
    torch supports it. ssm_lr_factor None takes `optim.DEFAULT_SSM_LR_FACTOR`.

    Returns:
        torch.optim.AdamW over all trainable parameters.
    """
    import torch

    from ..training.optim import DEFAULT_SSM_LR_FACTOR, compressm_parameter_groups

    factor = DEFAULT_SSM_LR_FACTOR if ssm_lr_factor is None else ssm_lr_factor
    groups = compressm_parameter_groups(model, weight_decay, factor, learning_rate=learning_rate)
    parameters = [parameter for group in groups for parameter in group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in parameters)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


@dataclass
class TrainingRun:
    trainer: object
    train_seconds: float
    max_steps: int
    tokens_seen: int | None
    steps_run: int = 0  # optimizer steps taken in this process (fewer than max_steps after a resume)
    tokens_run: int | None = None  # input tokens fed in this process
    resumed_from: str | None = None  # the checkpoint the run continued from
    resumed_at_step: int | None = None  # its global step: this process trained max_steps - resumed_at_step steps


def run_training(model, train_dataset, eval_dataset, *, options: TrainingOptions, plan: ReductionPlan,
                 max_steps: int, output_dir: str | None = None, data_collator=None, processing_class=None,
                 compute_metrics=None, count_tokens: str = "no", callback=None) -> TrainingRun:
    """Train `model` with `CompreSSMTrainer` (and the plan's CompreSSMCallback, or `callback` when given).

    `eval_dataset` is what rollback decisions evaluate on (a validation split, never a test set); final metrics are
    the caller's business. `count_tokens` ("no", "all", "non_padding") sets the Trainer's token counter.
    """
    import torch
    from transformers import TrainingArguments

    from ..training.callback import CompreSSMTrainer

    callback = callback if callback is not None else plan.make_callback(max_steps)
    steps = plan.resolve(max_steps) if plan.compress else None
    rollback = plan.compress and plan.policy == "rollback"
    checkpoint_folder = options.checkpoint_folder(output_dir)
    resume = options.resolve_resume(output_dir)
    with tempfile.TemporaryDirectory(prefix="compressm-trainer-") as scratch:
        arguments = TrainingArguments(
            output_dir=checkpoint_folder or scratch,
            max_steps=max_steps,
            per_device_train_batch_size=options.batch_size,
            per_device_eval_batch_size=options.eval_batch_size or options.batch_size,
            learning_rate=options.learning_rate,
            weight_decay=options.weight_decay,
            warmup_steps=max(1, int(options.warmup_ratio * max_steps)),
            lr_scheduler_type="cosine",
            logging_steps=max(1, steps["interval"] if steps else max_steps // 20),
            eval_strategy="steps" if rollback else "no",
            eval_steps=steps["interval"] if rollback else None,
            save_strategy="steps" if options.save_steps else "no",
            save_steps=options.save_steps or 500,
            report_to=options.report_to,
            seed=options.seed,
            data_seed=options.seed,
            bf16=options.bf16,
            tf32=True if options.tf32 else None,  # None: leave torch's setting alone
            use_cpu=options.bf16 and not torch.cuda.is_available(),  # transformers wants it explicit for CPU bf16
            disable_tqdm=not options.show_progress,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            include_num_input_tokens_seen=count_tokens,
        )
        trainer = CompreSSMTrainer(
            model=model,
            args=arguments,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=([callback] if callback is not None else []) + list(options.callbacks),
            optimizers=(build_optimizer(model, learning_rate=options.learning_rate,
                                        weight_decay=options.weight_decay, ssm_lr_factor=options.ssm_lr_factor), None),
        )
        if not options.show_progress:  # quiet: no progress bar and no per-log printing
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        counter = _StepCounter()
        trainer.add_callback(counter)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen) if count_tokens != "no" else None
    resumed_at, tokens_before = None, 0
    if resume is not None:
        with open(os.path.join(resume, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        resumed_at, tokens_before = int(state["global_step"]), int(state.get("num_input_tokens_seen") or 0)
    return TrainingRun(trainer=trainer, train_seconds=train_seconds, max_steps=max_steps, tokens_seen=tokens,
                       steps_run=counter.steps, tokens_run=None if tokens is None else tokens - tokens_before,
                       resumed_from=os.path.abspath(resume) if resume else None, resumed_at_step=resumed_at)


class _StepCounter(TrainerCallback):
    """Counts the optimizer steps taken in this process (after a resume: fewer than max_steps)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


# ------------------------------------------------------------------------------------------------ digits presets
def digits_datasets(config, permutation_seed: int | None = None):
    """(train, test) digits datasets for a classifier preset with `input_dim=1, num_labels=10` (pixel order permuted
    by `permutation_seed` when given); ValueError for presets the offline digits cannot train."""
    from .data import DIGITS_NUM_CLASSES, DigitsSequenceDataset

    if config.input_dim != 1 or config.num_labels != DIGITS_NUM_CLASSES:
        raise ValueError(
            f"the offline dataset is sklearn's digits (64-step pixel sequences, input_dim=1, 10 classes); this "
            f"preset has input_dim={config.input_dim}, num_labels={config.num_labels} (e.g. scifar needs CIFAR "
            "images, which are not shipped offline). Train it with your own data through the Python API "
            "(CompreSSMCallback + transformers.Trainer)"
        )
    # the split is fixed; the seed changes init and order
    return DigitsSequenceDataset.splits(seed=0, permutation_seed=permutation_seed)


def _accuracy_metrics(eval_prediction) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(eval_prediction.label_ids)).mean())}


def _common_summary(model, run: TrainingRun, plan: ReductionPlan, dims_before, params_before, options) -> dict:
    import torch

    model = run.trainer.model
    model.eval()
    return {
        "model": model,
        "policy": plan.policy if plan.compress else None,
        "tau": float(plan.tau) if plan.compress and plan.policy in ("tolerance", "rollback") else None,
        "compressed": bool(plan.compress),
        "reduction": plan.describe(run.max_steps),
        "seed": options.seed,
        "max_steps": run.max_steps,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "dims_before": list(dims_before),
        "dims_after": list(model.config.state_dims),
        "params_before": params_before,
        "params_after": sum(parameter.numel() for parameter in model.parameters()),
        "train_seconds": run.train_seconds,
        "steps_run": run.steps_run,
        "resumed_from": run.resumed_from,
        "resumed_at_step": run.resumed_at_step,
        "threads": torch.get_num_threads(),
        "device": str(run.trainer.args.device),
        "events": [
            {key: getattr(event, key) for key in ("step", "dims_before", "dims_after", "kept_energy", "policy")}
            for event in model.reduction_history
        ],
        "log_history": list(run.trainer.state.log_history),
        "output_dir": None,
    }


def train_preset(
    preset: str = DEFAULT_PRESET,
    *,
    tau: float = DEFAULT_TAU,
    policy: str = "tolerance",
    fraction: float = 0.25,
    compress: bool = True,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    seed: int = 0,
    reduction_start: int | float = DEFAULT_START_STEP,
    reduction_end: int | float = DEFAULT_END_STEP,
    num_reductions: int = DEFAULT_NUM_INTERVALS,
    output_dir: str | None = None,
    state_dims: int | list[int] | None = None,
    show_progress: bool = True,
    callbacks: list | None = None,
    permutation_seed: int | None = None,
    plan: ReductionPlan | None = None,
    options: TrainingOptions | None = None,
    overwrite_output_dir: bool = False,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool | None = None,
) -> dict:
    """Train preset `preset` offline with the HF Trainer and CompreSSMCallback; optionally save the reduced model.

    Classifier presets with `input_dim=1, num_labels=10` (digits, smnist) train on sklearn's digits; causal-LM presets
    train on a generated toy corpus with the byte-level tokenizer (see `train_on_dataset`).

    Args:
        preset: preset name (see `compressm presets`) or path to a preset JSON file.
        tau, policy, fraction, compress: the reduction (see `ReductionPlan`); compress=False trains a baseline.
        epochs / max_steps: training length (max_steps wins; default 50 epochs).
        reduction_start / reduction_end: first and last reduction step (int) or fraction of the steps (float).
        num_reductions: the window is cut into this many intervals: events at start, start + interval, ..., end.
        state_dims: override the preset's per-layer state sizes (e.g. to train a small model from scratch).
        output_dir: save the trained model there with `train_summary.json`; None saves nothing.
        callbacks: extra `TrainerCallback`s.
        permutation_seed: digits only: one fixed random pixel order for train and test (psMNIST-style).
        plan / options: a full `ReductionPlan` / `TrainingOptions`, used instead of the keyword arguments above.
        overwrite_output_dir, push_to_hub, hub_model_id, hub_private: see `train_on_dataset`.
    Returns:
        {"model", "preset", "task", "policy", "tau", "compressed", "dims_before" (list[int]), "dims_after",
         "params_before", "params_after", "test_loss", "test_accuracy", "train_seconds", "total_seconds",
         "tokens_per_second", "max_steps", "events" (reduction events), "output_dir", ...}
    """
    from transformers import set_seed

    from .presets import load_preset, model_class_for_config

    started = time.perf_counter()
    if plan is None:
        if policy not in POLICIES:  # the CLI's --policy choices, the global policy included
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        plan = ReductionPlan(compress=compress, policy=policy, tau=tau, fraction=fraction,
                             start_step=reduction_start, end_step=reduction_end, num_intervals=num_reductions)
    if options is None:
        options = TrainingOptions(epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                                  learning_rate=learning_rate, seed=seed, show_progress=show_progress,
                                  callbacks=list(callbacks or []))
    options.validate()
    overrides = {} if state_dims is None else {"state_dims": state_dims}
    config = load_preset(preset, **overrides)
    if model_class_for_config(config).__name__ == "CompreSSMForCausalLM":
        return train_on_dataset(SYNTHETIC_CORPUS, preset=preset, tokenizer="bytes", state_dims=state_dims,
                                plan=plan, options=options, output_dir=output_dir,
                                overwrite_output_dir=overwrite_output_dir, push_to_hub=push_to_hub,
                                hub_model_id=hub_model_id, hub_private=hub_private)
    train_dataset, test_dataset = digits_datasets(config, permutation_seed)
    rollback = plan.compress and plan.policy == "rollback"
    validation_dataset = None
    if rollback:  # rollback decisions use a validation split held out of the training data, never the test set
        import torch

        order = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(options.seed)).tolist()
        held_out = max(1, len(order) // 10)
        validation_dataset = torch.utils.data.Subset(train_dataset, order[:held_out])
        train_dataset = torch.utils.data.Subset(train_dataset, order[held_out:])
    steps = options.total_steps(len(train_dataset), DEFAULT_EPOCHS)
    callback = plan.make_callback(steps)  # checks the plan before anything runs
    hub_model_id = _prepare_output(output_dir, overwrite_output_dir, options, push_to_hub, hub_model_id)
    if options.eval_batch_size is None:
        options.eval_batch_size = 256
    _create_hub_repo(push_to_hub, hub_model_id, hub_private)

    set_seed(options.seed)
    model = model_class_for_config(config)(config)
    dims_before = list(model.config.state_dims)
    params_before = sum(parameter.numel() for parameter in model.parameters())
    run = run_training(model, train_dataset, validation_dataset, options=options, plan=plan, max_steps=steps,
                       output_dir=output_dir, compute_metrics=_accuracy_metrics, callback=callback)
    metrics = run.trainer.evaluate(test_dataset)
    summary = {"preset": str(preset), "task": "classification", "dataset": "sklearn digits (64-step pixel sequences)",
               **_common_summary(model, run, plan, dims_before, params_before, options)}
    summary["test_loss"] = float(metrics["eval_loss"])
    summary["test_accuracy"] = float(metrics["eval_accuracy"])
    pixels = _digits_steps_seen(len(train_dataset), options.batch_size, steps) - _digits_steps_seen(
        len(train_dataset), options.batch_size, run.resumed_at_step or 0)
    summary["tokens_per_second"] = pixels / max(run.train_seconds, 1e-9)
    _finish(summary, started, output_dir, overwrite_output_dir, push_to_hub, hub_model_id, hub_private)
    return summary


def _prepare_output(output_dir, overwrite: bool, options: TrainingOptions, push_to_hub: bool,
                    hub_model_id: str | None) -> str | None:
    """Checks before training: the output folder, the checkpoint to resume from, Hub access (offline mode, token;
    `_create_hub_repo` checks the Hub itself last). Returns the repo id."""
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    options.resolve_resume(output_dir)
    if not push_to_hub:
        return None
    from .publish import check_hub_access

    if output_dir is None:
        raise ValueError("--push-to-hub uploads the output folder: give an output dir")
    check_hub_access()
    return hub_model_id or os.path.basename(os.path.normpath(output_dir))


def _create_hub_repo(push_to_hub: bool, hub_model_id: str | None, private: bool | None) -> None:
    """The last check before training: the Hub is reachable and the repo exists or can be created (ValueError)."""
    if push_to_hub:
        from .publish import check_hub_access

        check_hub_access(hub_model_id, private)


def _finish(summary: dict, started: float, output_dir, overwrite: bool, push_to_hub: bool, hub_model_id, private):
    """Save the output folder and push it (when asked); set the summary's total wall-clock.

    Raises:
        publish.HubUploadError (with the summary) when the upload fails: the folder is saved by then.
    """
    if output_dir is not None:
        summary["total_seconds"] = time.perf_counter() - started
        save_run(summary, output_dir, overwrite)
        if push_to_hub:
            from .publish import HubUploadError, push_folder_to_hub

            try:
                summary["hub_commit"] = str(push_folder_to_hub(output_dir, hub_model_id, private=private))
            except Exception as error:  # network and Hub errors come in many types; the model is saved locally
                summary["total_seconds"] = time.perf_counter() - started
                raise HubUploadError(hub_model_id, summary["output_dir"], error, summary) from error
            summary["hub_model_id"] = hub_model_id
    summary["total_seconds"] = time.perf_counter() - started


def _digits_steps_seen(num_examples: int, batch_size: int, steps: int) -> int:
    """Time steps (pixels, the sequence "tokens") the Trainer fed in `steps` steps: 64 per example seen."""
    from .data import DIGITS_SEQUENCE_LENGTH

    per_epoch = math.ceil(num_examples / batch_size)
    full_epochs, rest = divmod(steps, per_epoch)
    return DIGITS_SEQUENCE_LENGTH * (full_epochs * num_examples + min(rest * batch_size, num_examples))


# ------------------------------------------------------------------------------------------------ own data
def synthetic_splits():
    """The generated toy corpus (`data.synthetic_text_corpus`, 600 documents, seed 0) as a DatasetDict: "train"
    (540 rows of text) and "validation" (60)."""
    import datasets

    from .data import synthetic_text_corpus

    texts = synthetic_text_corpus(num_documents=600, seed=0)
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts[:540]}),
        "validation": datasets.Dataset.from_dict({"text": texts[540:]}),
    })


def train_on_dataset(
    dataset,
    *,
    data_files=None,
    preset: str = DEFAULT_TEXT_PRESET,
    tokenizer="bytes",
    task: str = "causal-lm",
    dataset_config: str | None = None,
    split: str = "train",
    eval_split: str | None = None,
    validation_fraction: float | None = None,
    text_column: str = "text",
    label_column: str = "label",
    block_size: int = DEFAULT_BLOCK_SIZE,
    pad_token: str | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    state_dims: int | list[int] | None = None,
    plan: ReductionPlan | None = None,
    options: TrainingOptions | None = None,
    output_dir: str | None = None,
    overwrite_output_dir: bool = False,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool | None = None,
) -> dict:
    """Train a CompreSSM token model on your own text with in-training reduction.

    Everything that can be checked before training is (data, columns, tokenizer, pad token, block size, output
    folder, Hub access): bad input raises ValueError with a one-line message and writes nothing.

    Args:
        dataset: what `load_text_dataset` takes (file, folder, Hub id; with `data_files` also a builder name such
            as "text", or None), "synthetic" (the generated toy corpus), or a `datasets.DatasetDict` with "train" and
            "validation".
        data_files: files and glob patterns, each optionally "SPLIT=..." (see `load_text_dataset`).
        preset: a token preset (tiny, lm-small, lm-base) or a preset JSON path; its vocabulary follows the tokenizer.
        tokenizer: "bytes", a tokenizer folder or Hub id, or a tokenizer object.
        task: "causal-lm" (packed blocks of `block_size`) or "classification" (texts truncated to `block_size`,
            labels from `label_column`).
        dataset_config, split, eval_split, validation_fraction, text_column, cache_dir: see `load_text_dataset`.
        pad_token: set/add the tokenizer's pad token (classification needs one).
        num_proc: processes for tokenization.
        plan / options: `ReductionPlan` / `TrainingOptions` (defaults: tolerance tau=0.05, 1 epoch).
        output_dir: the folder for model, tokenizer, card and `train_summary.json` (None: nothing saved).
        push_to_hub / hub_model_id / hub_private: upload the output folder (repo id default: its folder name).
    Returns:
        summary dict: "model", "tokenizer", "eval_loss", "eval_perplexity" and "bits_per_byte" (causal LM) or
        "eval_accuracy" (classification), "dims_before", "dims_after", "train_seconds", "tokens_per_second", ...
    """
    import datasets as hf_datasets
    from transformers import DataCollatorWithPadding, default_data_collator, set_seed

    from .presets import TASKS, build_model_for_tokenizer
    from .text_data import load_text_dataset, pack_dataset, tokenize_for_classification, tokens_per_byte
    from .tokenization import load_tokenizer, set_pad_token

    started = time.perf_counter()
    plan = plan if plan is not None else ReductionPlan()
    options = options if options is not None else TrainingOptions()
    options.validate()
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not is_int(block_size) or block_size < 2:
        raise ValueError(f"block size must be an int >= 2, got {block_size!r}")
    hub_model_id = _prepare_output(output_dir, overwrite_output_dir, options, push_to_hub, hub_model_id)

    tokenizer_name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None) or "given"
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, pad_token=pad_token)
    elif pad_token is not None:
        set_pad_token(tokenizer, pad_token)
    if tokenizer_name == "bytes":
        tokenizer_name = "bytes (byte-level, shipped with compressm)"

    given = isinstance(dataset, hf_datasets.DatasetDict) or (dataset == SYNTHETIC_CORPUS and data_files is None)
    if given and dataset_config is not None:  # it would name nothing, yet go into the summary and model card
        raise ValueError("--dataset-config names a configuration of a Hub dataset: give that dataset with --dataset")
    if isinstance(dataset, hf_datasets.DatasetDict):
        splits, dataset_name = dataset, "a DatasetDict"
    elif given:
        splits, dataset_name = synthetic_splits(), "synthetic toy corpus (modeling_compressm.app.data)"
    else:
        splits = load_text_dataset(
            dataset, data_files=data_files, config_name=dataset_config, split=split, eval_split=eval_split,
            validation_fraction=validation_fraction,
            columns=(text_column,) if task == "causal-lm" else (text_column, label_column),
            shuffle_split=task == "classification", seed=options.seed, cache_dir=cache_dir,
        )
        dataset_name = str(dataset) if data_files is None else _data_files_name(dataset, data_files)
    if "train" not in splits or "validation" not in splits:
        raise ValueError(f"the dataset needs 'train' and 'validation' splits, got {', '.join(splits)}")

    labels = None
    if task == "causal-lm":
        prepared = pack_dataset(splits, tokenizer, block_size, text_column=text_column, num_proc=num_proc)
        # blocks are full: no padding (the Trainer would pick a padding collator for a tokenizer)
        collator, count_tokens = default_data_collator, "all"
    else:
        prepared, labels = tokenize_for_classification(splits, tokenizer, text_column=text_column,
                                                       label_column=label_column, max_length=block_size,
                                                       num_proc=num_proc)
        collator, count_tokens = DataCollatorWithPadding(tokenizer), "non_padding"
    train_data, eval_data = prepared["train"], prepared["validation"]
    steps = options.total_steps(len(train_data), DEFAULT_TEXT_EPOCHS)
    callback = plan.make_callback(steps)  # checks the plan before training
    _create_hub_repo(push_to_hub, hub_model_id, hub_private)

    set_seed(options.seed)
    overrides = {} if state_dims is None else {"state_dims": state_dims}
    model = build_model_for_tokenizer(preset, tokenizer, task=task, labels=labels, **overrides)
    dims_before = list(model.config.state_dims)
    params_before = sum(parameter.numel() for parameter in model.parameters())
    run = run_training(model, train_data, eval_data, options=options, plan=plan, max_steps=steps,
                       output_dir=output_dir, data_collator=collator, processing_class=tokenizer,
                       compute_metrics=_accuracy_metrics if task == "classification" else None,
                       count_tokens=count_tokens, callback=callback)
    metrics = run.trainer.evaluate(eval_data)
    summary = {
        "preset": str(preset), "task": task, "dataset": dataset_name,
        "dataset_config": dataset_config, "split": split if isinstance(dataset, str) or data_files else None,
        "data_files": _data_files_list(data_files),
        "validation": _validation_description(splits, split, eval_split),
        "text_column": text_column, "label_column": label_column if task == "classification" else None,
        "tokenizer_name": tokenizer_name, "vocab_size": len(tokenizer), "block_size": block_size,
        "train_examples": len(train_data), "eval_examples": len(eval_data),
        **_common_summary(model, run, plan, dims_before, params_before, options),
        "tokenizer": tokenizer,
    }
    summary["eval_loss"] = float(metrics["eval_loss"])
    if task == "causal-lm":
        summary["eval_perplexity"] = float(math.exp(min(summary["eval_loss"], 50.0)))
        summary["bits_per_byte"] = summary["eval_loss"] / math.log(2) * tokens_per_byte(eval_data, tokenizer)
    else:
        summary["eval_accuracy"] = float(metrics["eval_accuracy"])
        summary["labels"] = list(labels)
    summary["tokens_seen"] = run.tokens_seen
    summary["tokens_per_second"] = (run.tokens_run or 0) / max(run.train_seconds, 1e-9)  # this process only
    _finish(summary, started, output_dir, overwrite_output_dir, push_to_hub, hub_model_id, hub_private)
    return summary


def _data_files_list(data_files) -> list[str] | None:
    """--data-files values as given (the summary and the model card name them)."""
    if data_files is None:
        return None
    return [data_files] if isinstance(data_files, str) else [str(value) for value in data_files]


def _data_files_name(dataset, data_files) -> str:
    """The summary's "dataset" for explicit data files: where they are read from, and the values given."""
    source = "files" if dataset is None else f"{dataset} files" if isinstance(dataset, str) else str(dataset)
    return f"{source}: {', '.join(_data_files_list(data_files))}"


def _validation_description(splits, train_split: str, eval_split: str | None) -> str:
    """Where the evaluation rows came from, for the summary and the model card."""
    train, validation = splits["train"], splits["validation"]
    if eval_split is not None:
        return f"split {eval_split!r}"
    if validation.split is None:
        return "the given 'validation' split"
    if str(validation.split) != str(train.split):
        return f"split {str(validation.split)!r}"
    fraction = len(validation) / (len(validation) + len(train))
    return f"{len(validation)} rows ({fraction:.0%}) held out of split {train_split!r}"
