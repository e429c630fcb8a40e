"""`compressm` command line: train a preset with in-training balanced truncation and save the reduced model.

    compressm train                         # digits preset on sklearn's bundled 8x8 digits, tolerance policy
    compressm train --tau 0.1 --max-steps 300 --output-dir ./small
    compressm train --no-compress           # the same run without reductions (baseline)
    compressm presets                       # list the presets

Everything runs offline: classification presets with `input_dim=1, num_labels=10` (digits, smnist) train on the
digits pixel sequences (`modeling_compressm.data`), causal-LM presets (tiny, lm-small, lm-base) on a synthetic
byte-level corpus. The Python entry point is `train_preset(...)`, which returns the trained model and a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

__all__ = ["main", "build_parser", "train_preset", "format_summary"]

DEFAULT_PRESET = "digits"
DEFAULT_OUTPUT_DIR = "./compressm-digits"
DEFAULT_TAU = 0.05
DEFAULT_EPOCHS = 50.0
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 3e-3


def _load_datasets(config, seed: int, permutation_seed: int | None = None):
    """(train_dataset, eval_dataset, task) for a config: "classification" on digits (pixel order permuted by
    `permutation_seed` when given) or "causal-lm" on toy text."""
    from .data import DIGITS_NUM_CLASSES, DigitsSequenceDataset, TokenBlockDataset, synthetic_text_corpus
    from .presets import model_class_for_config

    model_class = model_class_for_config(config)
    if model_class.__name__ == "CompreSSMForSequenceClassification":
        if config.input_dim != 1 or config.num_labels != DIGITS_NUM_CLASSES:
            raise ValueError(
                f"the offline dataset is sklearn's digits (64-step pixel sequences, input_dim=1, 10 classes); this "
                f"preset has input_dim={config.input_dim}, num_labels={config.num_labels} (e.g. scifar needs CIFAR "
                "images, which are not shipped offline). Train it with your own data through the Python API "
                "(CompreSSMCallback + transformers.Trainer)"
            )
        # the split is fixed; --seed changes init and order
        train, test = DigitsSequenceDataset.splits(seed=0, permutation_seed=permutation_seed)
        return train, test, "classification"
    if config.input_dim is not None:
        raise ValueError("causal-LM presets must use token inputs (input_dim unset)")
    texts = synthetic_text_corpus(num_documents=600, seed=0)
    if config.vocab_size < 256:
        raise ValueError(f"the offline text corpus is byte-level (256 token ids); preset vocab_size={config.vocab_size}")
    return TokenBlockDataset(texts[:540], block_size=64), TokenBlockDataset(texts[540:], block_size=64), "causal-lm"


def _accuracy_metrics(eval_prediction) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    labels = eval_prediction.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


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
    reduction_start: float = 0.02,
    reduction_end: float = 0.3,
    num_reductions: int = 6,
    output_dir: str | None = None,
    state_dims: int | list[int] | None = None,
    show_progress: bool = True,
    callbacks: list | None = None,
    permutation_seed: int | None = None,
) -> dict:
    """Train preset `preset` offline with the HF Trainer and CompreSSMCallback; optionally save the reduced model.

    Reductions happen every `interval = (reduction_end - reduction_start) * max_steps / num_reductions` steps between
    `reduction_start` and `reduction_end` (fractions of the training steps).

    Args:
        preset: preset name (see `compressm presets`) or path to a preset JSON file.
        tau: tolerance of the "tolerance" policy (fraction of the summed Hankel singular values that may be dropped).
        policy: "tolerance", "fixed" (drop `fraction` of each layer per reduction) or "rollback".
        compress: False trains without the callback (baseline).
        epochs / max_steps: training length (max_steps wins when both are given; default 30 epochs).
        state_dims: override the preset's per-layer state sizes (e.g. to train a small model from scratch).
        output_dir: save the trained model there (save_pretrained) with `train_summary.json`; None saves nothing.
        callbacks: extra `TrainerCallback`s.
        permutation_seed: digits presets only: train and test on the pixel sequences in one fixed random order
            (a psMNIST-style task); None keeps the natural order.
    Returns:
        {"model", "preset", "task", "policy", "tau", "compressed", "dims_before" (list[int]), "dims_after",
         "params_before", "params_after", "test_loss", "test_accuracy" (classification) or "test_perplexity",
         "train_seconds", "total_seconds", "max_steps", "events" (reduction events), "output_dir"}
    """
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from .presets import load_preset, model_class_for_config

    if policy not in ("tolerance", "fixed", "rollback"):
        raise ValueError(f"policy must be 'tolerance', 'fixed' or 'rollback', got {policy!r}")
    if not isinstance(tau, (int, float)) or not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must lie strictly between 0 and 1, got {tau!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if epochs is not None and (not isinstance(epochs, (int, float)) or epochs <= 0):
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not 0.0 <= reduction_start < reduction_end <= 1.0:
        raise ValueError(
            f"need 0 <= reduction_start < reduction_end <= 1 (fractions of training), got {reduction_start}, {reduction_end}"
        )
    if isinstance(num_reductions, bool) or not isinstance(num_reductions, int) or num_reductions < 1:
        raise ValueError(f"num_reductions must be a positive int, got {num_reductions!r}")

    started = time.perf_counter()
    overrides = {} if state_dims is None else {"state_dims": state_dims}
    config = load_preset(preset, **overrides)
    train_dataset, eval_dataset, task = _load_datasets(config, seed, permutation_seed)
    rollback = compress and policy == "rollback"
    validation_dataset = None
    if rollback:  # rollback decisions use a validation split held out of the training data, never the test set
        order = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        held_out = max(1, len(order) // 10)
        validation_dataset = torch.utils.data.Subset(train_dataset, order[:held_out])
        train_dataset = torch.utils.data.Subset(train_dataset, order[held_out:])
    if max_steps is None:
        steps_per_epoch = math.ceil(len(train_dataset) / batch_size)
        max_steps = max(1, int(round((epochs if epochs is not None else DEFAULT_EPOCHS) * steps_per_epoch)))

    set_seed(seed)
    model = model_class_for_config(config)(config)
    dims_before = list(model.config.state_dims)
    params_before = sum(parameter.numel() for parameter in model.parameters())

    start_step = int(reduction_start * max_steps)
    end_step = max(start_step + 1, int(reduction_end * max_steps))
    interval = max(1, (end_step - start_step) // num_reductions)
    all_callbacks = list(callbacks or [])
    if compress:
        from .callback import CompreSSMCallback

        all_callbacks.insert(
            0,
            CompreSSMCallback(
                policy=policy, tau=float(tau), fraction=fraction, start_step=start_step, end_step=end_step,
                interval=interval,
            ),
        )

    with tempfile.TemporaryDirectory(prefix="compressm-trainer-") as trainer_dir:
        arguments = TrainingArguments(
            output_dir=trainer_dir,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=256,
            learning_rate=learning_rate,
            weight_decay=0.01,
            warmup_steps=max(1, int(0.05 * max_steps)),
            lr_scheduler_type="cosine",
            logging_steps=max(1, interval if compress else max_steps // 20),
            eval_strategy="steps" if rollback else "no",
            eval_steps=interval if rollback else None,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            disable_tqdm=not show_progress,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=train_dataset,
            eval_dataset=validation_dataset if rollback else eval_dataset,
            compute_metrics=_accuracy_metrics if task == "classification" else None,
            callbacks=all_callbacks,
        )
        if not show_progress:  # quiet: no progress bar and no per-log printing
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        train_started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_started
        metrics = trainer.evaluate(eval_dataset)
        log_history = list(trainer.state.log_history)

    model = trainer.model
    model.eval()
    summary = {
        "model": model,
        "preset": str(preset),
        "task": task,
        "policy": policy if compress else None,
        "tau": float(tau) if compress and policy == "tolerance" else None,
        "compressed": bool(compress),
        "seed": seed,
        "max_steps": max_steps,
        "dims_before": dims_before,
        "dims_after": list(model.config.state_dims),
        "params_before": params_before,
        "params_after": sum(parameter.numel() for parameter in model.parameters()),
        "test_loss": float(metrics["eval_loss"]),
        "train_seconds": train_seconds,
        "events": [
            {key: event.get(key) for key in ("step", "dims_before", "dims_after", "kept_energy", "policy")}
            for event in model.reduction_history
        ],
        "log_history": log_history,
        "output_dir": None,
    }
    if task == "classification":
        summary["test_accuracy"] = float(metrics["eval_accuracy"])
    else:
        summary["test_perplexity"] = float(math.exp(min(metrics["eval_loss"], 50.0)))
    if output_dir is not None:
        model.save_pretrained(output_dir)
        summary["output_dir"] = os.path.abspath(output_dir)
    summary["total_seconds"] = time.perf_counter() - started
    if output_dir is not None:
        serialisable = {key: value for key, value in summary.items() if key not in ("model", "log_history")}
        with open(os.path.join(output_dir, "train_summary.json"), "w", encoding="utf-8") as handle:
            json.dump(serialisable, handle, indent=1)
    return summary


def format_summary(summary: dict) -> str:
    """Plain-text before/after table of a `train_preset` summary."""
    before, after = summary["dims_before"], summary["dims_after"]
    rows = [("layer", "state dim before", "state dim after")]
    rows += [(str(index), str(b), str(a)) for index, (b, a) in enumerate(zip(before, after))]
    rows.append(("total", str(sum(before)), str(sum(after))))
    rows.append(("parameters", str(summary["params_before"]), str(summary["params_after"])))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    rule = "+".join("-" * (width + 2) for width in widths)
    lines = ["|".join(f" {cell.ljust(width)} " for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, rule)
    lines.insert(len(lines) - 2, rule)
    mode = (
        f"CompreSSM ({summary['policy']}" + (f", tau={summary['tau']:g}" if summary["tau"] is not None else "") + ")"
        if summary["compressed"] else "no compression"
    )
    out = [f"preset {summary['preset']} | {mode} | {summary['max_steps']} steps | seed {summary['seed']}", ""]
    out += lines
    out.append("")
    if "test_accuracy" in summary:
        out.append(f"test accuracy : {summary['test_accuracy']:.4f}")
    else:
        out.append(f"test perplexity: {summary['test_perplexity']:.3f}")
    out.append(f"test loss     : {summary['test_loss']:.4f}")
    out.append(f"train time    : {summary['train_seconds']:.1f} s (total {summary['total_seconds']:.1f} s)")
    reductions = [event for event in summary["events"] if event.get("dims_after") != event.get("dims_before")]
    out.append(f"reductions    : {len(reductions)}" + "".join(
        f"\n  step {event['step']}: {event['dims_before']} -> {event['dims_after']}" for event in reductions
    ))
    if summary["output_dir"]:
        out.append(f"saved to      : {summary['output_dir']}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compressm", description="CompreSSM: LRU state-space models that shrink themselves while they train."
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,presets}")
    train = commands.add_parser("train", help="train a preset offline with in-training balanced truncation")
    train.add_argument("--preset", default=DEFAULT_PRESET, help="preset name or JSON path (default: digits)")
    train.add_argument("--tau", type=float, default=DEFAULT_TAU, help="tolerance: HSV energy fraction dropped (default 0.05)")
    train.add_argument("--policy", choices=("tolerance", "fixed", "rollback"), default="tolerance")
    train.add_argument("--fraction", type=float, default=0.25, help="state fraction removed per reduction (fixed policy)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help=f"training epochs (default {DEFAULT_EPOCHS:g})")
    length.add_argument("--max-steps", type=int, default=None, help="training steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    train.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE)
    train.add_argument("--state-dims", type=int, nargs="+", default=None, help="override the preset's state sizes")
    train.add_argument("--output-dir", default=None, help=f"where to save the model (default {DEFAULT_OUTPUT_DIR} for digits, "
                       "./compressm-<preset> otherwise)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-compress", action="store_true", help="train without reductions (baseline)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    commands.add_parser("presets", help="list the model presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`compressm`). Returns the exit status (0 on success, 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "presets":
        from .presets import list_presets, load_preset

        for name in list_presets():
            config = load_preset(name)
            kind = "classifier" if config.input_dim is not None else "causal LM"
            print(f"{name:10s} {kind:10s} layers={config.num_hidden_layers} H={config.hidden_size} "
                  f"state_dims={config.state_dims}")
        return 0

    output_dir = args.output_dir
    if output_dir is None:
        name = os.path.splitext(os.path.basename(args.preset))[0]
        output_dir = DEFAULT_OUTPUT_DIR if name == DEFAULT_PRESET else f"./compressm-{name}"
    state_dims = None
    if args.state_dims is not None:
        state_dims = args.state_dims[0] if len(args.state_dims) == 1 else list(args.state_dims)
    try:
        summary = train_preset(
            args.preset,
            tau=args.tau,
            policy=args.policy,
            fraction=args.fraction,
            compress=not args.no_compress,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            output_dir=output_dir,
            state_dims=state_dims,
            show_progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"compressm: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
