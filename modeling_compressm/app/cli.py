"""`compressm` command line: train with in-training balanced truncation, reduce or sample from a saved model.

    compressm train                                   # digits classifier on sklearn's bundled digits (offline)
    compressm train --tau 0.1 --max-steps 300 --output-dir ./small
    compressm train --dataset corpus.txt --tokenizer bytes --preset tiny --block-size 128 --output-dir my-lm
    compressm train --dataset reviews.csv --task classification --label-column label --tokenizer ./my-tokenizer
    compressm reduce my-lm --tau 0.1                  # post-hoc reduction of a saved model, HSV report printed
    compressm reduce my-mamba2 --dataset corpus.txt --ranks 16 --output-dir small   # Mamba-2 / Mamba, from text
    compressm generate my-lm "The state"              # continuation by a saved causal LM
    compressm presets                                 # list the presets

The training recipe lives in `modeling_compressm.app.recipe` (`train_preset`, `train_on_dataset`), the data pieces in
`modeling_compressm.app.text_data` and `modeling_compressm.app.tokenization`, post-hoc reduction and generation in
`modeling_compressm.app.posthoc` (of Mamba-2 / Mamba checkpoints, from calibration text: `.selective_posthoc`); this
module only parses arguments and prints. Bad input exits with status 2 and a one-line message, before anything is
written; a failed Hub upload after training exits with status 1 after the report, with one line saying where the model
was saved.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from ..training.rank_selection import POLICIES
from .recipe import train_on_dataset, train_preset
from .run_settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_END_STEP,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_PRESET,
    DEFAULT_START_STEP,
    DEFAULT_TAU,
    DEFAULT_TEXT_EPOCHS,
    DEFAULT_TEXT_PRESET,
    ReductionPlan,
    TrainingOptions,
    configure_threads,
)
from .selective_posthoc import (
    DEFAULT_CALIBRATION_BATCH_SIZE,
    DEFAULT_CALIBRATION_BATCHES,
    DEFAULT_CALIBRATION_BLOCK_SIZE,
)

__all__ = ["main", "build_parser", "train_preset", "format_summary"]

DEFAULT_OUTPUT_DIR = "./compressm-digits"


def format_summary(summary: dict) -> str:
    """Plain-text report of a `train_preset` / `train_on_dataset` summary: before/after table and metrics."""
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
    weight = summary.get("reduction", {}).get("reducibility regulariser weight")
    mode = (
        f"CompreSSM ({summary['policy']}" + (f", tau={summary['tau']:g}" if summary["tau"] is not None else "")
        + (f", reducibility regulariser weight {weight:g}" if weight is not None else "") + ")"
        if summary["compressed"] else "no compression"
    )
    out = [f"preset {summary['preset']} | {mode} | {summary['max_steps']} steps | seed {summary['seed']}"]
    if summary.get("tokenizer_name"):
        out.append(f"data {summary['dataset']} | validation: {summary['validation']} | tokenizer "
                   f"{summary['tokenizer_name']} (vocab {summary['vocab_size']}) | block size {summary['block_size']}")
    out += [""] + lines + [""]
    for key, label, form in (
        ("test_accuracy", "test accuracy ", "{:.4f}"), ("test_loss", "test loss     ", "{:.4f}"),
        ("eval_accuracy", "eval accuracy ", "{:.4f}"), ("eval_loss", "eval loss     ", "{:.4f}"),
        ("eval_perplexity", "eval perplexity", "{:.3f}"), ("bits_per_byte", "bits per byte ", "{:.4f}"),
    ):
        if summary.get(key) is not None:
            out.append(f"{label}: {form.format(summary[key])}")
    out.append(f"train time    : {summary['train_seconds']:.1f} s (total {summary['total_seconds']:.1f} s, "
               f"{summary['threads']} torch thread{'s' if summary['threads'] != 1 else ''}, {summary['device']})")
    if summary.get("tokens_per_second"):
        out.append(f"tokens / s    : {summary['tokens_per_second']:.0f}")
    reductions = [event for event in summary["events"] if event.get("dims_after") != event.get("dims_before")]
    out.append(f"reductions    : {len(reductions)}" + "".join(
        f"\n  step {event['step']}: {event['dims_before']} -> {event['dims_after']}" for event in reductions
    ))
    if summary.get("output_dir"):
        out.append(f"saved to      : {summary['output_dir']}")
    if summary.get("hub_model_id"):
        out.append(f"pushed to     : {summary['hub_model_id']} ({summary['hub_commit']})")
    return "\n".join(out)


def _step_value(text: str) -> int | float:
    """An int step ("200") or a float fraction of the run ("0.1")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int step or a float fraction, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compressm", description="CompreSSM: LRU state-space models that shrink themselves while they train."
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,reduce,generate,presets}")
    train = commands.add_parser(
        "train", help="train with in-training balanced truncation (offline digits by default, or your own data)",
        description="Train a CompreSSM model while it shrinks. Without --dataset: the digits classifier on sklearn's "
        "bundled digits, or a causal-LM preset on a generated toy corpus. With --dataset: your own text.",
    )
    model = train.add_argument_group("model")
    model.add_argument("--preset", default=None, help=f"preset name or JSON path (default: {DEFAULT_PRESET}; "
                       f"{DEFAULT_TEXT_PRESET} with --dataset)")
    model.add_argument("--state-dims", type=int, nargs="+", default=None, help="override the preset's state sizes")

    data = train.add_argument_group("your own data (text)")
    data.add_argument("--dataset", default=None, help="a local .txt/.json/.jsonl/.csv/.tsv/.parquet file, a folder, or "
                      "a Hub dataset id (online or from the datasets cache); a format name (text, json, csv, ...) "
                      "only with --data-files")
    data.add_argument("--data-files", nargs="+", action="extend", default=None, metavar="FILE_OR_PATTERN",
                      help="data files: files or glob patterns (quote them), each optionally SPLIT=... (default "
                      "split: --split), e.g. --data-files 'books/*.txt' validation=held-out.txt; the format "
                      "follows the extension, or --dataset text|json|csv|parquet names it (with a dataset folder or "
                      "Hub id: files inside it)")
    data.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset (refused for "
                      "local files)")
    data.add_argument("--split", default="train", help="training split (default: train)")
    holdout = data.add_mutually_exclusive_group()
    holdout.add_argument("--eval-split", default=None, help="split to evaluate on (default: 'validation' if the "
                         "dataset has one, otherwise 10%% of the training rows held out)")
    holdout.add_argument("--validation-fraction", type=float, default=None,
                         help="share of the training rows held out for evaluation")
    data.add_argument("--text-column", default="text", help="column with the text (default: text)")
    data.add_argument("--task", choices=("causal-lm", "classification"), default="causal-lm")
    data.add_argument("--label-column", default="label", help="classification: column with the labels")
    data.add_argument("--tokenizer", default=None, help="'bytes' (byte-level, shipped with compressm), a "
                      "tokenizer folder or a Hub id (default: bytes)")
    data.add_argument("--pad-token", default=None, help="set the tokenizer's pad token (added when new)")
    data.add_argument("--block-size", type=int, default=None, help=f"tokens per packed block (causal LM) or "
                      f"truncation length (classification) (default {DEFAULT_BLOCK_SIZE})")
    data.add_argument("--num-proc", type=int, default=None, help="processes for tokenization (datasets.map)")
    data.add_argument("--cache-dir", default=None, help="datasets cache folder (default: HF_DATASETS_CACHE)")

    reduction = train.add_argument_group("reduction (CompreSSMCallback)")
    reduction.add_argument("--policy", choices=POLICIES, default="tolerance",
                           help="tolerance: per-layer tau (default); fixed: --fraction per event; rollback: tolerance "
                           "undone when eval loss degrades; global: keep --final-fraction of the total state after "
                           "the last event, one HSV ranking over all layers (the library's default recipe)")
    reduction.add_argument("--tau", type=float, default=DEFAULT_TAU,
                           help=f"tolerance: share of HSV energy dropped, in [0, 1) (default {DEFAULT_TAU})")
    reduction.add_argument("--fraction", type=float, default=None,
                           help="fixed policy: share of states removed per event (default: the callback's, 0.25)")
    reduction.add_argument("--final-fraction", type=float, default=None,
                           help="global policy: share of the total state left after the last event (default 0.5)")
    reduction.add_argument("--start-step", type=_step_value, default=DEFAULT_START_STEP,
                           help=f"first reduction step, or a fraction of the run (default {DEFAULT_START_STEP})")
    reduction.add_argument("--end-step", type=_step_value, default=DEFAULT_END_STEP,
                           help=f"last reduction step, or a fraction of the run (default {DEFAULT_END_STEP})")
    reduction.add_argument("--interval", type=_step_value, default=None,
                           help="steps between reductions, or a fraction of the run (default: (end - start) / 6)")
    reduction.add_argument("--gate", type=float, default=None,
                           help="reduce a layer only below gate x its size (default: the callback's, 0.95)")
    reduction.add_argument("--min-dim", type=int, default=None, help="least state size per layer (default 1)")
    reduction.add_argument("--total-budget", type=int, default=None, help="total state size over all layers")
    reduction.add_argument("--system", choices=("real", "complex"), default=None,
                           help="balanced system: complex (the paper's map; the in-training default, which did as "
                           "well or better in the LM study) or real (the map each layer computes)")
    reduction.add_argument("--reducibility-weight", type=float, default=None, metavar="W",
                           help="train to be reducible: add W x the per-layer normalised Hankel nuclear norm while the "
                           "reductions run (0.02 helped language models by 0.014-0.023 bits/byte in the study; it cost "
                           "accuracy on permuted digits; default: off)")
    reduction.add_argument("--no-compress", action="store_true", help="train without reductions (baseline)")

    training = train.add_argument_group("training")
    length = training.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None,
                        help=f"training epochs (default {DEFAULT_EPOCHS:g} for digits, {DEFAULT_TEXT_EPOCHS:g} with "
                        "--dataset); exclusive with --max-steps")
    length.add_argument("--max-steps", type=int, default=None, help="training steps; exclusive with --epochs")
    training.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    training.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE)
    training.add_argument("--weight-decay", type=float, default=0.01)
    training.add_argument("--ssm-lr-factor", type=float, default=None,
                          help="learning-rate factor of the LRU parameters nu, theta, gamma, B (no weight decay on "
                          "them either; default 1.0, from the language-modelling study)")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    training.add_argument("--tf32", action="store_true",
                          help="allow TF32 matmuls (NVIDIA GPUs of compute capability 8.0+): the LRU layers' fp32 "
                          "state projections then run on tensor cores")
    training.add_argument("--report-to", nargs="+", default=["none"],
                          help="logging integrations for TrainingArguments.report_to (default: none)")
    training.add_argument("--save-steps", type=int, default=None,
                          help="save a Trainer checkpoint every N steps into --checkpoint-dir")
    training.add_argument("--checkpoint-dir", default=None,
                          help="folder for Trainer checkpoints (default: <output-dir>-checkpoints)")
    training.add_argument("--resume-from-checkpoint", default=None,
                          help="a checkpoint-N folder, or 'last' for the newest in --checkpoint-dir")
    training.add_argument("--threads", type=int, default=None,
                          help="torch CPU threads (default: OMP_NUM_THREADS when set, else half the CPUs, at most 4)")
    training.add_argument("--no-progress", action="store_true", help="hide progress bars")

    output = train.add_argument_group("output")
    output.add_argument("--output-dir", default=None, help=f"where to save the model (default {DEFAULT_OUTPUT_DIR} "
                        "for digits, ./compressm-<preset> otherwise); written whole at the end: the files an earlier "
                        "compressm run wrote there are replaced, your other files are kept")
    output.add_argument("--overwrite-output-dir", action="store_true",
                        help="write into a folder that holds no CompreSSM model, and replace files of yours that have "
                        "the names of output files (other files are kept)")
    output.add_argument("--push-to-hub", action="store_true", help="upload the output folder to the Hugging Face Hub")
    output.add_argument("--hub-model-id", default=None, help="Hub repo id (default: the output folder's name)")
    output.add_argument("--hub-private", action="store_true", help="create the Hub repo private")

    reduce = commands.add_parser(
        "reduce", help="reduce a saved model post hoc: an LRU model by balanced truncation, a Mamba-2 / Mamba model "
        "from calibration text (no training)",
        description="Reduce a saved model. A CompreSSM LRU model: balanced truncation of each layer at tolerance "
        "--tau. A Mamba-2 or Mamba (Mamba-1) causal LM (CompreSSM's, or transformers' own, converted): data-driven "
        "Gramians from calibration text (--dataset / --data-files), then --ranks or --tau per layer.",
    )
    reduce.add_argument("checkpoint", help="a folder written by `compressm train` or save_pretrained")
    sizes = reduce.add_mutually_exclusive_group()
    sizes.add_argument("--tau", type=float, default=None, help="tolerance in [0, 1): LRU: share of HSV energy "
                       "dropped; Mamba: share of predicted scan-output energy (Σ dropped σ² / Σ σ²) dropped per layer")
    sizes.add_argument("--ranks", type=int, nargs="+", default=None, help="Mamba: the new state size, one for every "
                       "layer or one per layer (a layer's own size leaves it alone)")
    reduce.add_argument("--min-dim", type=int, default=1, help="least state size per layer (with --tau)")
    reduce.add_argument("--output-dir", default=None, help="where to save (default: overwrite CHECKPOINT's model "
                        "files); your other files in the folder are kept")
    reduce.add_argument("--overwrite-output-dir", action="store_true",
                        help="as for train: replace files of yours in --output-dir that have the names of output files")
    reduce.add_argument("--system", choices=("real", "complex"), default=None,
                        help="LRU: balanced system: real (the map each layer computes, default) or complex (the "
                        "paper's)")
    mamba = reduce.add_argument_group("Mamba-2 / Mamba checkpoints: calibration text and method")
    mamba.add_argument("--method", choices=("balanced", "select"), default=None,
                       help="balanced: project B and C by square-root balancing (Mamba-2 default); select: keep the "
                       "states picked by pivoted QR (a stock layer of the smaller size; the only exact reduction of "
                       "Mamba-1, its default)")
    mamba.add_argument("--dataset", default=None, help="calibration text as for train --dataset (a local file or "
                       "folder, a Hub id from the datasets cache), or 'synthetic' for the generated toy corpus")
    mamba.add_argument("--data-files", nargs="+", action="extend", default=None, metavar="FILE_OR_PATTERN",
                       help="calibration data files or glob patterns, as for train")
    mamba.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset")
    mamba.add_argument("--split", default=None, help="split with the calibration text (default: train); all its "
                       "rows are used")
    mamba.add_argument("--text-column", default=None, help="column with the text (default: text)")
    mamba.add_argument("--tokenizer", default=None, help="tokenizer when the folder has none ('bytes', folder, id)")
    mamba.add_argument("--block-size", type=int, default=None,
                       help=f"tokens per calibration block (default {DEFAULT_CALIBRATION_BLOCK_SIZE})")
    mamba.add_argument("--calibration-batch-size", type=int, default=None,
                       help=f"blocks per calibration batch (default {DEFAULT_CALIBRATION_BATCH_SIZE})")
    mamba.add_argument("--calibration-batches", type=int, default=None,
                       help=f"calibration batches, at most (default {DEFAULT_CALIBRATION_BATCHES})")
    mamba.add_argument("--cache-dir", default=None, help="datasets cache folder (default: HF_DATASETS_CACHE)")

    generate = commands.add_parser("generate", help="print a continuation of a prompt by a saved causal LM")
    generate.add_argument("checkpoint", help="a folder written by `compressm train` or save_pretrained")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--tokenizer", default=None, help="tokenizer when the folder has none ('bytes', folder, id)")

    commands.add_parser("presets", help="list the model presets")
    return parser


def _train(args) -> int:
    from .publish import HubUploadError

    try:
        summary = _run_training(args)
    except HubUploadError as error:  # trained and saved, but not uploaded: the report, where it is, one error line
        print(format_summary(error.summary))
        _hint_missing_plot(error.summary.get("output_dir"))
        _print_error(error)
        return 1
    print(format_summary(summary))
    _hint_missing_plot(summary.get("output_dir"))
    return 0


def _hint_missing_plot(folder: str | None) -> None:
    """One line on stderr when the model card in `folder` has no HSV plot because matplotlib is not installed."""
    from ..model_card import HSV_PLOT_FILE

    if folder is None or os.path.isfile(os.path.join(folder, HSV_PLOT_FILE)):
        return
    try:
        import matplotlib.figure  # noqa: F401  (what the model card draws with)
    except ImportError:
        print(f"compressm: the model card has no Hankel-singular-value plot ({HSV_PLOT_FILE}): matplotlib is not "
              "installed; `pip install matplotlib` and run the command again to get it", file=sys.stderr)


def _run_training(args) -> dict:
    from .presets import load_preset, model_class_for_config

    configure_threads(args.threads)
    if args.no_progress:
        _hide_progress_bars()
    own_data = args.dataset is not None or args.data_files is not None
    preset = args.preset or (DEFAULT_TEXT_PRESET if own_data else DEFAULT_PRESET)
    output_dir = args.output_dir
    if output_dir is None:
        name = os.path.splitext(os.path.basename(preset))[0]
        output_dir = DEFAULT_OUTPUT_DIR if name == DEFAULT_PRESET else f"./compressm-{name}"
    state_dims = None
    if args.state_dims is not None:
        state_dims = args.state_dims[0] if len(args.state_dims) == 1 else list(args.state_dims)
    plan = ReductionPlan(
        compress=not args.no_compress, policy=args.policy, tau=args.tau, fraction=args.fraction,
        start_step=args.start_step, end_step=args.end_step, interval=args.interval, gate=args.gate,
        min_dim=args.min_dim, total_budget=args.total_budget, final_fraction=args.final_fraction,
        system=args.system, reducibility_weight=args.reducibility_weight,
    )
    options = TrainingOptions(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, ssm_lr_factor=args.ssm_lr_factor, seed=args.seed, bf16=args.bf16,
        tf32=args.tf32, report_to=list(args.report_to),
        save_steps=args.save_steps, checkpoint_dir=args.checkpoint_dir,
        resume_from_checkpoint=args.resume_from_checkpoint, show_progress=not args.no_progress,
    )
    text_model = model_class_for_config(load_preset(preset)).__name__ == "CompreSSMForCausalLM"
    if not own_data and not text_model:
        given = [flag for flag, value, default in (
            ("--tokenizer", args.tokenizer, None), ("--task", args.task, "causal-lm"),
            ("--block-size", args.block_size, None), ("--pad-token", args.pad_token, None),
            ("--dataset-config", args.dataset_config, None),
        ) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} apply to text: add --dataset, or use a causal-LM preset")
        summary = train_preset(preset, plan=plan, options=options, state_dims=state_dims, output_dir=output_dir,
                               overwrite_output_dir=args.overwrite_output_dir, push_to_hub=args.push_to_hub,
                               hub_model_id=args.hub_model_id, hub_private=args.hub_private or None)
    else:
        if not own_data and args.task == "classification":
            raise ValueError("--task classification needs --dataset with a label column")
        summary = train_on_dataset(
            args.dataset if own_data else "synthetic", data_files=args.data_files, preset=preset,
            tokenizer=args.tokenizer or "bytes",
            task=args.task, dataset_config=args.dataset_config, split=args.split, eval_split=args.eval_split,
            validation_fraction=args.validation_fraction, text_column=args.text_column,
            label_column=args.label_column, block_size=args.block_size or DEFAULT_BLOCK_SIZE,
            pad_token=args.pad_token, num_proc=args.num_proc, cache_dir=args.cache_dir, state_dims=state_dims,
            plan=plan, options=options, output_dir=output_dir, overwrite_output_dir=args.overwrite_output_dir,
            push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id, hub_private=args.hub_private or None,
        )
    return summary


def _print_error(error: BaseException) -> None:
    """`compressm: error: ...` on stderr; COMPRESSM_DEBUG=1 adds the traceback, for telling an internal error apart
    from bad input."""
    if os.environ.get("COMPRESSM_DEBUG", "0") not in ("", "0"):
        traceback.print_exception(error)
    print(f"compressm: error: {error}", file=sys.stderr)


def _hide_progress_bars() -> None:
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


# `compressm reduce` options that only Mamba checkpoints take (their argparse default is None)
_MAMBA_REDUCE_OPTIONS = ("ranks", "method", "dataset", "data_files", "dataset_config", "split", "text_column",
                         "tokenizer", "block_size", "calibration_batch_size", "calibration_batches", "cache_dir")


def _given_options(args, names) -> list[str]:
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) is not None]


def _reduce(args) -> int:
    from .posthoc import LRU_MODEL_TYPE, checkpoint_model_type

    _hide_progress_bars()
    if checkpoint_model_type(args.checkpoint) == LRU_MODEL_TYPE:
        return _reduce_lru(args)
    return _reduce_selective(args)


def _reduce_lru(args) -> int:
    from .posthoc import reduce_checkpoint

    given = _given_options(args, _MAMBA_REDUCE_OPTIONS)
    if given:
        raise ValueError(f"{', '.join(given)} apply to Mamba-2 / Mamba checkpoints; {args.checkpoint!r} holds a "
                         "CompreSSM LRU model, which reduces by --tau alone")
    if args.tau is None:
        raise ValueError("give --tau (the share of HSV energy dropped) to reduce a CompreSSM LRU model")
    result = reduce_checkpoint(args.checkpoint, args.tau, output_dir=args.output_dir, min_dim=args.min_dim,
                               overwrite=args.overwrite_output_dir, system=args.system or "real")
    _print_reduction(f"Hankel singular values of {args.checkpoint} (tau={args.tau:g})", result,
                     f" at tau={args.tau:g}")
    _hint_missing_plot(result["output_dir"])
    return 0


def _print_reduction(title: str, result: dict, unchanged_note: str, note: str | None = None) -> None:
    """The report of a post-hoc reduction: title, per-layer table, sizes before and after, where it was saved."""
    print(f"{title}:\n")
    print(result["report"])
    print()
    if result["changed"]:
        print(f"state dims: {result['dims_before']} -> {result['dims_after']}")
    else:
        print(f"state dims: {result['dims_before']} (no layer gets smaller{unchanged_note})")
    if note is not None:
        print(note)
    print(f"saved to  : {result['output_dir']}")


def _reduce_selective(args) -> int:
    from .selective_posthoc import CalibrationText, reduce_selective_checkpoint

    if args.system is not None:
        raise ValueError(f"--system applies to CompreSSM LRU models; {args.checkpoint!r} holds a Mamba model (choose "
                         "--method balanced or select)")
    if args.tau is None and args.ranks is None:
        raise ValueError("give --ranks (new state sizes) or --tau (share of predicted scan-output energy dropped)")
    calibration = CalibrationText(dataset=args.dataset, data_files=args.data_files, dataset_config=args.dataset_config,
                                  tokenizer=args.tokenizer, cache_dir=args.cache_dir)
    for field, value in (("split", args.split), ("text_column", args.text_column), ("block_size", args.block_size),
                         ("batch_size", args.calibration_batch_size), ("batches", args.calibration_batches)):
        if value is not None:
            setattr(calibration, field, value)
    result = reduce_selective_checkpoint(args.checkpoint, calibration, ranks=args.ranks, tau=args.tau,
                                         method=args.method, min_dim=args.min_dim, output_dir=args.output_dir,
                                         overwrite=args.overwrite_output_dir)
    _print_reduction(
        f"Data-driven Hankel singular values of {args.checkpoint} ({result['method']}; calibration: "
        f"{result['calibration']})", result, "",
        "predicted relative error: Σ dropped σ² / Σ σ² of each layer's scan output on the calibration text",
    )
    return 0


def _generate(args) -> int:
    from .posthoc import generate_text

    configure_threads(None)
    _hide_progress_bars()
    print(generate_text(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        tokenizer=args.tokenizer))
    return 0


def _presets() -> int:
    from .presets import list_presets, load_preset

    for name in list_presets():
        config = load_preset(name)
        kind = "classifier" if config.input_dim is not None else "causal LM"
        print(f"{name:10s} {kind:10s} layers={config.num_hidden_layers} H={config.hidden_size} "
              f"state_dims={config.state_dims}")
    return 0


def _show_library_warnings() -> logging.Handler:
    """Print this package's warnings (e.g. the vocabulary resize) as `compressm: ...` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("compressm: %(message)s"))
    package_logger = logging.getLogger("modeling_compressm")
    package_logger.addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`compressm`). Returns the exit status (0 on success, 2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = _show_library_warnings()
    try:
        if args.command == "presets":
            return _presets()
        return {"train": _train, "reduce": _reduce, "generate": _generate}[args.command](args)
    except ValueError as error:  # bad input: a message meant for the user
        _print_error(error)
        return 2
    finally:
        logging.getLogger("modeling_compressm").removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
