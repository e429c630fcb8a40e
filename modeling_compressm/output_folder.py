"""The output folder of a `compressm train` run: checked before training, written whole at the end (staged next to
it, then put in place), with `train_summary.json` and the model card's "Training" section.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

__all__ = ["SUMMARY_FILE", "check_output_dir", "write_output_folder", "save_run", "training_info"]

SUMMARY_FILE = "train_summary.json"


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


def save_run(summary: dict, output_dir: str, overwrite: bool) -> None:
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
