"""The training recipe behind `compressm train`: data -> model -> Trainer with CompreSSMCallback -> evaluation ->
an output folder with model, tokenizer, model card and metrics (written whole or not at all) -> optional Hub upload.

    from modeling_compressm.recipe import train_preset, train_on_dataset

    summary = train_preset("digits", tau=0.05, max_steps=600)                 # offline digits classifier
    summary = train_on_dataset("corpus.txt", preset="tiny", tokenizer="bytes", block_size=128,
                               training=TrainingOptions(max_steps=200), output_dir="my-model")

Both return a summary dict (the trained model under "model"; metrics; state sizes before/after; reduction events).
The pieces are public too: `ReductionPlan` (what the callback is asked to do, steps as ints or fractions of the run),
`TrainingOptions`, `build_optimizer` (the one place the optimizer is made), `run_training`, `write_output_folder`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

__all__ = [
    "ReductionPlan",
    "TrainingOptions",
    "build_optimizer",
    "run_training",
    "digits_datasets",
    "train_preset",
    "train_on_dataset",
    "check_output_dir",
    "write_output_folder",
    "default_num_threads",
    "configure_threads",
    "SUMMARY_FILE",
]

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "digits"  # `compressm train` without --dataset
DEFAULT_TEXT_PRESET = "lm-small"  # `compressm train --dataset ...`
DEFAULT_TAU = 0.05
DEFAULT_EPOCHS = 50.0  # digits
DEFAULT_TEXT_EPOCHS = 1.0
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_BLOCK_SIZE = 128
DEFAULT_START_STEP = 0.02
DEFAULT_END_STEP = 0.3
DEFAULT_NUM_INTERVALS = 6
SUMMARY_FILE = "train_summary.json"
SYNTHETIC_CORPUS = "synthetic"  # name of the generated toy corpus the causal-LM presets train on without --dataset


# ------------------------------------------------------------------------------------------------ settings
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve_step(value, max_steps: int, name: str) -> int:
    """An absolute step (int >= 0) or a fraction of the run (float in [0, 1]) as an int step."""
    if _is_int(value):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return int(value * max_steps)
    raise ValueError(f"{name} must be an int step or a float fraction of the run in [0, 1], got {value!r}")


@dataclass
class ReductionPlan:
    """What CompreSSMCallback is asked to do in a run. Steps are ints (optimizer steps) or floats (fractions of the
    run's steps), resolved to ints by `resolve` once the run length is known.

    Reductions are scheduled at steps start, start + interval, ... up to end inclusive (never at step 0). Without
    an `interval`, it is (end - start) // num_intervals, which schedules num_intervals + 1 events when start > 0
    (7 for the defaults: 2% to 30% of the run). `fraction`, `gate`, `min_dim`, `total_budget` left at None take the
    callback's own defaults.
    """

    compress: bool = True
    policy: str = "tolerance"
    tau: float = DEFAULT_TAU
    fraction: float | None = None
    start_step: int | float = DEFAULT_START_STEP
    end_step: int | float = DEFAULT_END_STEP
    interval: int | float | None = None
    num_intervals: int = DEFAULT_NUM_INTERVALS
    gate: float | None = None
    min_dim: int | None = None
    total_budget: int | None = None

    def resolve(self, max_steps: int) -> dict[str, int]:
        """{"start_step", "end_step", "interval"} as ints for a run of `max_steps` steps."""
        start = _resolve_step(self.start_step, max_steps, "start step")
        end = _resolve_step(self.end_step, max_steps, "end step")
        if isinstance(self.end_step, float):
            end = max(start + 1, end)
        if end < start:
            raise ValueError(f"the end step ({end}) comes before the start step ({start})")
        if self.interval is None:
            if not _is_int(self.num_intervals) or self.num_intervals < 1:
                raise ValueError(f"num_intervals must be a positive int, got {self.num_intervals!r}")
            interval = max(1, (end - start) // self.num_intervals)
        elif _is_int(self.interval) and self.interval >= 1:
            interval = self.interval
        elif isinstance(self.interval, float) and 0.0 < self.interval <= 1.0:
            interval = max(1, int(round(self.interval * max_steps)))
        else:
            raise ValueError(
                f"interval must be an int >= 1 or a float fraction of the run in (0, 1], got {self.interval!r}"
            )
        return {"start_step": start, "end_step": end, "interval": interval}

    def make_callback(self, max_steps: int):
        """A CompreSSMCallback for a run of `max_steps` steps, or None without compression. Its constructor checks
        the values (ValueError)."""
        if not self.compress:
            return None
        from .callback import CompreSSMCallback

        optional = {name: getattr(self, name) for name in ("fraction", "gate", "min_dim", "total_budget")}
        return CompreSSMCallback(
            policy=self.policy, tau=self.tau, **self.resolve(max_steps),
            **{name: value for name, value in optional.items() if value is not None},
        )

    def describe(self, max_steps: int) -> dict:
        if not self.compress:
            return {"compression": "none (baseline)"}
        steps = self.resolve(max_steps)
        out = {"policy": self.policy}
        if self.policy in ("tolerance", "rollback"):
            out["tau"] = self.tau
        if self.policy == "fixed" and self.fraction is not None:
            out["fraction"] = self.fraction
        out["reduction steps"] = f"every {steps['interval']} from {steps['start_step']} to {steps['end_step']}"
        for name in ("gate", "min_dim", "total_budget"):
            if getattr(self, name) is not None:
                out[name.replace("_", " ")] = getattr(self, name)
        return out


@dataclass
class TrainingOptions:
    """Trainer settings of a run. `epochs` and `max_steps` are alternatives (max_steps wins); without either the
    recipe's default number of epochs is used."""

    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    eval_batch_size: int | None = None
    learning_rate: float = DEFAULT_LEARNING_RATE
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    seed: int = 0
    bf16: bool = False
    report_to: str | list[str] = "none"
    save_steps: int | None = None
    checkpoint_dir: str | None = None
    resume_from_checkpoint: str | None = None
    show_progress: bool = True
    callbacks: list = field(default_factory=list)

    def validate(self) -> None:
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")
        if self.epochs is not None and (not isinstance(self.epochs, (int, float)) or self.epochs <= 0):
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        for name in ("batch_size",) + (("eval_batch_size",) if self.eval_batch_size is not None else ()):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.save_steps is not None and (not _is_int(self.save_steps) or self.save_steps < 1):
            raise ValueError(f"save_steps must be a positive int, got {self.save_steps!r}")
        self._check_report_to()

    def _check_report_to(self) -> None:
        """ValueError for a --report-to integration that is unknown or not installed (the Trainer would fail only
        when it is built)."""
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        requested = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        installed = set(get_available_reporting_integrations())
        for name in requested:
            if name in ("none", "all"):
                continue
            if name not in INTEGRATION_TO_CALLBACK:
                raise ValueError(f"unknown --report-to {name!r}; choose from none, all, "
                                 f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
            if name not in installed:
                raise ValueError(f"--report-to {name}: the {name} package is not installed (pip install {name})")

    def total_steps(self, num_examples: int, default_epochs: float) -> int:
        if self.max_steps is not None:
            return self.max_steps
        epochs = self.epochs if self.epochs is not None else default_epochs
        return max(1, int(round(epochs * math.ceil(num_examples / self.batch_size))))

    def checkpoint_folder(self, output_dir: str | None) -> str | None:
        """Where Trainer checkpoints go: `checkpoint_dir`, else `<output_dir>-checkpoints` when checkpoints are saved
        or resumed from, else None (a temporary folder)."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if (self.save_steps is not None or self.resume_from_checkpoint is not None) and output_dir is not None:
            return os.path.normpath(output_dir) + "-checkpoints"
        return None

    def resolve_resume(self, output_dir: str | None) -> str | None:
        """The checkpoint folder to resume from ("last": the newest one in the checkpoint folder); ValueError when
        it does not exist."""
        if self.resume_from_checkpoint is None:
            return None
        if self.resume_from_checkpoint == "last":
            from transformers.trainer_utils import get_last_checkpoint

            folder = self.checkpoint_folder(output_dir)
            last = get_last_checkpoint(folder) if folder and os.path.isdir(folder) else None
            if last is None:
                raise ValueError(f"--resume-from-checkpoint last: no checkpoint-* folder in {folder!r}")
            return last
        if not os.path.isfile(os.path.join(self.resume_from_checkpoint, "trainer_state.json")):
            raise ValueError(
                f"--resume-from-checkpoint {self.resume_from_checkpoint!r} is not a Trainer checkpoint folder "
                "(no trainer_state.json); give a checkpoint-N folder or 'last'"
            )
        return self.resume_from_checkpoint


def default_num_threads() -> int:
    """torch threads `compressm` uses when neither --threads nor OMP_NUM_THREADS is set: half the CPUs this process
    may run on, at most 4, at least 1. torch's own default (one per core) made a 20 s run take 616 s on a loaded
    2-core machine (47 s with one thread); small LRU models gain little from more threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


def configure_threads(threads: int | None) -> tuple[int, str]:
    """Set torch's intra-op threads: `threads` when given, else keep OMP_NUM_THREADS when set, else
    `default_num_threads()`. Returns (threads in use, where the number came from)."""
    import torch

    if threads is not None:
        if not _is_int(threads) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
        return threads, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    torch.set_num_threads(default_num_threads())
    return torch.get_num_threads(), "default"


# ------------------------------------------------------------------------------------------------ training
def build_optimizer(model, *, learning_rate: float, weight_decay: float):
    """The optimizer of every recipe run (the one place it is made): AdamW, weight decay on every parameter except
    biases and norm weights (the Trainer's default grouping), fused where torch supports it.

    Returns:
        torch.optim.AdamW over all trainable parameters.
    """
    import torch
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], forbidden))
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in named)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


@dataclass
class TrainingRun:
    trainer: object
    train_seconds: float
    max_steps: int
    tokens_seen: int | None


def run_training(model, train_dataset, eval_dataset, *, options: TrainingOptions, plan: ReductionPlan,
                 max_steps: int, output_dir: str | None = None, data_collator=None, processing_class=None,
                 compute_metrics=None, count_tokens: str = "no", callback=None) -> TrainingRun:
    """Train `model` with `CompreSSMTrainer` (and the plan's CompreSSMCallback, or `callback` when given).

    `eval_dataset` is what rollback decisions evaluate on (a validation split, never a test set); final metrics are
    the caller's business. `count_tokens` ("no", "all", "non_padding") sets the Trainer's token counter.
    """
    import torch
    from transformers import TrainingArguments

    from .callback import CompreSSMTrainer

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
                                        weight_decay=options.weight_decay), None),
        )
        if not options.show_progress:  # quiet: no progress bar and no per-log printing
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen) if count_tokens != "no" else None
    return TrainingRun(trainer=trainer, train_seconds=train_seconds, max_steps=max_steps, tokens_seen=tokens)


# ------------------------------------------------------------------------------------------------ output folder
def _looks_like_compressm_output(path: str) -> bool:
    if os.path.isfile(os.path.join(path, SUMMARY_FILE)):
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            return json.load(handle).get("model_type") == "compressm"
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """ValueError when `path` is a file, or a non-empty folder that is not an earlier CompreSSM output (and
    `overwrite` is False): `write_output_folder` would replace it as a whole."""
    if os.path.isfile(path):
        raise ValueError(f"output dir {path!r} is a file; choose another --output-dir")
    if os.path.isdir(path) and os.listdir(path) and not overwrite and not _looks_like_compressm_output(path):
        raise ValueError(
            f"output dir {path!r} already holds files that are not a CompreSSM model; choose another --output-dir "
            "or pass --overwrite-output-dir"
        )


def write_output_folder(path: str, write) -> str:
    """Call `write(folder)` on a fresh hidden folder next to `path`, then put it in place of `path` (an earlier
    folder there is removed only after the new one is complete). On any error nothing changes at `path`.

    Returns:
        the absolute path.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        write(staging)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _write_summary(folder: str, summary: dict) -> None:
    serialisable = {key: value for key, value in summary.items() if key not in ("model", "tokenizer", "log_history")}
    with open(os.path.join(folder, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        json.dump(serialisable, handle, indent=1)
        handle.write("\n")


def _save(summary: dict, output_dir: str, overwrite: bool) -> None:
    """Write model (+ card with the run's training info), tokenizer and summary into `output_dir` as a whole."""
    from .tokenization import save_tokenizer

    model, tokenizer = summary["model"], summary.get("tokenizer")
    model.compressm_training_info = training_info(summary)
    summary["output_dir"] = os.path.abspath(output_dir)
    check_output_dir(output_dir, overwrite)

    def write(folder):
        model.save_pretrained(folder)
        if tokenizer is not None:
            save_tokenizer(tokenizer, folder)
        _write_summary(folder, summary)

    write_output_folder(output_dir, write)


def training_info(summary: dict) -> dict:
    """The model card's "Training" section for a run summary (data, settings, metrics)."""
    data = {label: summary[key]
            for key, label in (("dataset", "dataset"), ("dataset_config", "dataset config"), ("split", "split"),
                               ("validation", "evaluated on"), ("task", "task"), ("text_column", "text column"),
                               ("label_column", "label column"), ("tokenizer_name", "tokenizer"),
                               ("block_size", "block size"), ("train_examples", "training examples"),
                               ("eval_examples", "evaluation examples"))
            if summary.get(key) is not None}
    settings = dict(summary.get("reduction") or {})
    settings.update({key.replace("_", " "): summary[key] for key in ("max_steps", "batch_size", "learning_rate", "seed")
                     if summary.get(key) is not None})
    metrics = {}
    for key, label in (("test_accuracy", "test accuracy"), ("test_loss", "test loss"),
                       ("test_perplexity", "test perplexity"), ("eval_accuracy", "eval accuracy"),
                       ("eval_loss", "eval loss"), ("eval_perplexity", "eval perplexity"),
                       ("bits_per_byte", "eval bits per byte"), ("train_seconds", "training wall-clock (s)"),
                       ("tokens_per_second", "training tokens / s"), ("threads", "torch threads"),
                       ("device", "device")):
        if summary.get(key) is not None:
            value = summary[key]
            metrics[label] = round(value, 4) if isinstance(value, float) else value
    metrics["state dims"] = f"{summary['dims_before']} -> {summary['dims_after']}"
    return {"Data": data, "Settings": settings, "Metrics": metrics}


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
        "threads": torch.get_num_threads(),
        "device": str(run.trainer.args.device),
        "events": [
            {key: event.get(key) for key in ("step", "dims_before", "dims_after", "kept_energy", "policy")}
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
        if policy not in ("tolerance", "fixed", "rollback"):
            raise ValueError(f"policy must be 'tolerance', 'fixed' or 'rollback', got {policy!r}")
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
    summary["tokens_per_second"] = _digits_steps_seen(len(train_dataset), options.batch_size, steps) / max(
        run.train_seconds, 1e-9)
    _finish(summary, started, output_dir, overwrite_output_dir, push_to_hub, hub_model_id, hub_private)
    return summary


def _prepare_output(output_dir, overwrite: bool, options: TrainingOptions, push_to_hub: bool,
                    hub_model_id: str | None) -> str | None:
    """Checks before training: the output folder, the checkpoint to resume from, Hub access. Returns the repo id."""
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


def _finish(summary: dict, started: float, output_dir, overwrite: bool, push_to_hub: bool, hub_model_id, private):
    """Save the output folder and push it (when asked); set the summary's total wall-clock."""
    if output_dir is not None:
        summary["total_seconds"] = time.perf_counter() - started
        _save(summary, output_dir, overwrite)
        if push_to_hub:
            from .publish import push_folder_to_hub

            summary["hub_commit"] = str(push_folder_to_hub(output_dir, hub_model_id, private=private))
            summary["hub_model_id"] = hub_model_id
    summary["total_seconds"] = time.perf_counter() - started


def _digits_steps_seen(num_examples: int, batch_size: int, steps: int) -> int:
    """Time steps (pixels, the sequence "tokens") the Trainer fed in `steps` steps: 64 per example seen."""
    from .data import DIGITS_SEQUENCE_LENGTH

    per_epoch = math.ceil(num_examples / batch_size)
    full_epochs, rest = divmod(steps, per_epoch)
    return DIGITS_SEQUENCE_LENGTH * (full_epochs * num_examples + min(rest * batch_size, num_examples))


# ------------------------------------------------------------------------------------------------ own data
def _synthetic_splits():
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
        dataset: what `load_text_dataset` takes (file, folder, Hub id), "synthetic" (the generated toy corpus), or
            a `datasets.DatasetDict` with "train" and "validation".
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
    if not _is_int(block_size) or block_size < 2:
        raise ValueError(f"block size must be an int >= 2, got {block_size!r}")
    hub_model_id = _prepare_output(output_dir, overwrite_output_dir, options, push_to_hub, hub_model_id)

    tokenizer_name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None) or "given"
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, pad_token=pad_token)
    elif pad_token is not None:
        set_pad_token(tokenizer, pad_token)
    if tokenizer_name == "bytes":
        tokenizer_name = "bytes (byte-level, shipped with compressm)"

    if isinstance(dataset, hf_datasets.DatasetDict):
        splits, dataset_name = dataset, "a DatasetDict"
    elif dataset == SYNTHETIC_CORPUS:
        splits, dataset_name = _synthetic_splits(), "synthetic toy corpus (modeling_compressm.data)"
    else:
        splits, dataset_name = load_text_dataset(
            dataset, config_name=dataset_config, split=split, eval_split=eval_split,
            validation_fraction=validation_fraction,
            columns=(text_column,) if task == "causal-lm" else (text_column, label_column),
            shuffle_split=task == "classification", seed=options.seed, cache_dir=cache_dir,
        ), str(dataset)
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
        "dataset_config": dataset_config, "split": split if isinstance(dataset, str) else None,
        "validation": _validation_description(splits, split, validation_fraction),
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
    summary["tokens_per_second"] = (run.tokens_seen or 0) / max(run.train_seconds, 1e-9)
    _finish(summary, started, output_dir, overwrite_output_dir, push_to_hub, hub_model_id, hub_private)
    return summary


def _validation_description(splits, train_split: str, validation_fraction: float | None) -> str:
    train, validation = splits["train"], splits["validation"]
    if validation.split is not None and str(validation.split) != str(train.split):
        return f"split {str(validation.split)!r}"
    fraction = len(validation) / (len(validation) + len(train))
    return f"{len(validation)} rows ({fraction:.0%}) held out of split {train_split!r}"
