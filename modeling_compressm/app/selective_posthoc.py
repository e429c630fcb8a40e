"""`compressm reduce` for Mamba-2 and Mamba-1 checkpoints: state reduction from the Gramians of calibration text.

    from modeling_compressm.app.selective_posthoc import CalibrationText, reduce_selective_checkpoint

    result = reduce_selective_checkpoint("my-mamba2", CalibrationText(dataset="corpus.txt"), ranks=[16, 8],
                                         output_dir="my-mamba2-small")
    print(result["report"])   # per layer: N, r, method, largest HSV, predicted relative scan-output error

A folder holding a `CompreSSMMamba2ForCausalLM` / `CompreSSMMambaForCausalLM`, or transformers' own
`Mamba2ForCausalLM` / `MambaForCausalLM` (converted, identical logits), is reduced in place or into another folder:
the calibration text (the data options of `compressm train`: a local file or folder, `--data-files`, or "synthetic",
the generated toy corpus) is tokenized with the folder's tokenizer and packed into blocks, the model accumulates its
float64 Gramians over `batches` batches of them (`model.gramian_statistics`), and `model.reduce` shrinks each layer
to the given ranks or to the smallest rank whose predicted scan-output error Σ_{i>r} σ_i² is at most tau · Σσ²
(`rank_for_output_energy`). Mamba-2 reduces by balanced projection (default) or selection, Mamba-1 by selection only.
The folder is written as `compressm reduce` writes an LRU model's (`posthoc.write_reduced_folder`: manifest, the
tokenizer and other files carried over, files of the user's kept) with a model card of the reduction.

Every bad input raises ValueError with one line before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "CalibrationText",
    "calibration_batches",
    "ranks_from_options",
    "reduce_selective_checkpoint",
    "render_reduction_card",
]

DEFAULT_CALIBRATION_BATCHES = 8
DEFAULT_CALIBRATION_BATCH_SIZE = 4
DEFAULT_CALIBRATION_BLOCK_SIZE = 128


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class CalibrationText:
    """Where the calibration text comes from and how it is batched.

    dataset: what `load_text_dataset` takes (a local file, folder or Hub id; with `data_files` a builder name or
        None), or "synthetic" (the generated toy corpus of `compressm train`).
    data_files, dataset_config, split, text_column, cache_dir: as for `load_text_dataset` (all rows of `split` are
        used; nothing is held out).
    tokenizer: "bytes", a folder or Hub id; None: the checkpoint folder's own tokenizer.
    block_size: tokens per packed block (>= 2).
    batch_size: blocks per calibration batch.
    batches: the most calibration batches (fewer when the text holds fewer blocks).
    """

    dataset: str | None = None
    data_files: list[str] | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    tokenizer: str | None = None
    block_size: int = DEFAULT_CALIBRATION_BLOCK_SIZE
    batch_size: int = DEFAULT_CALIBRATION_BATCH_SIZE
    batches: int = DEFAULT_CALIBRATION_BATCHES
    cache_dir: str | None = None

    def validate(self) -> None:
        """ValueError naming the option when a setting is out of range or no text is given."""
        if self.dataset is None and self.data_files is None:
            raise ValueError("reducing a Mamba model needs calibration text: give --dataset FILE (or --data-files, "
                             "or --dataset synthetic for the generated toy corpus)")
        for option, value, least in (("--block-size", self.block_size, 2), ("--calibration-batch-size",
                                     self.batch_size, 1), ("--calibration-batches", self.batches, 1)):
            if not _is_positive_int(value) or value < least:
                raise ValueError(f"{option} must be an int >= {least}, got {value!r}")


def calibration_batches(calibration: CalibrationText, tokenizer) -> tuple[list, str]:
    """Token-id batches from the calibration text: the first `batches * batch_size` packed blocks of its `split`.

    Returns:
        (list of LongTensor (batch_size, block_size), the last one possibly with fewer rows; a description such as
         "5 batches of 4 x 128 tokens from 'corpus.txt'")
    """
    import torch

    from .recipe import SYNTHETIC_CORPUS, synthetic_splits
    from .text_data import load_text_dataset, pack_dataset

    calibration.validate()
    if calibration.dataset == SYNTHETIC_CORPUS and calibration.data_files is None:
        if calibration.dataset_config is not None:
            raise ValueError("--dataset-config names a configuration of a Hub dataset: give that dataset with "
                             "--dataset")
        text, name = synthetic_splits()["train"], "the synthetic toy corpus"
    else:
        splits = load_text_dataset(
            calibration.dataset, data_files=calibration.data_files, config_name=calibration.dataset_config,
            split=calibration.split, eval_split=calibration.split, columns=(calibration.text_column,),
            cache_dir=calibration.cache_dir,
        )
        text = splits["train"]
        name = repr(calibration.dataset) if calibration.data_files is None else f"--data-files {calibration.data_files}"
    blocks = pack_dataset(text, tokenizer, calibration.block_size, text_column=calibration.text_column)
    count = min(len(blocks), calibration.batches * calibration.batch_size)
    ids = torch.tensor(blocks.select(range(count))["input_ids"], dtype=torch.long)
    batches = list(ids.split(calibration.batch_size))
    return batches, (f"{len(batches)} batch{'es' if len(batches) != 1 else ''} of {calibration.batch_size} x "
                     f"{calibration.block_size} tokens from {name}")


def ranks_from_options(sizes: list[int], ranks: list[int] | None, tau: float | None, hsv=None,
                       min_dim: int = 1) -> list[int | None]:
    """Per layer the new state size, or None where the layer keeps its size.

    Args:
        sizes: current state size per layer.
        ranks: one int (every layer) or one per layer; a rank equal to the size leaves the layer alone.
        tau: instead of ranks, the share of predicted scan-output energy dropped, in [0, 1): per layer the smallest r
            with Σ_{i>r} σ_i² <= tau · Σσ², at least `min_dim`.
        hsv: with tau, per layer the float64 HSVs (groups, size).
    """
    from ..mamba2_reduction import rank_for_output_energy

    if (ranks is None) == (tau is None):
        raise ValueError("give either --ranks or --tau")
    if tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) < 1.0:
            raise ValueError(f"tau must lie in [0, 1), got {tau!r}")
        if not _is_positive_int(min_dim):
            raise ValueError(f"min dim must be a positive int, got {min_dim!r}")
        if hsv is None:
            return [None] * len(sizes)
        chosen = [min(size, max(min_dim, rank_for_output_energy(values, float(tau))))
                  for size, values in zip(sizes, hsv)]
        return [rank if rank < size else None for rank, size in zip(chosen, sizes)]
    ranks = list(ranks)
    if len(ranks) == 1:
        ranks = ranks * len(sizes)
    if len(ranks) != len(sizes):
        raise ValueError(f"--ranks gives {len(ranks)} values for a model of {len(sizes)} layers: give one (every "
                         "layer) or one per layer")
    for layer, (rank, size) in enumerate(zip(ranks, sizes)):
        if not _is_positive_int(rank) or rank > size:
            raise ValueError(f"--ranks: layer {layer} has {size} states; its rank must lie in [1, {size}], got {rank!r}")
    return [rank if rank < size else None for rank, size in zip(ranks, sizes)]


def _format_report(results: list) -> str:
    rows = [("layer", "N", "r", "method", "σ max", "predicted relative error")]
    for entry in results:
        hsv, error = entry.hsv, entry.relative_error
        rows.append((str(entry.layer), str(entry.old_dim), str(entry.new_dim), entry.method or "-",
                     f"{float(hsv.max()):.3g}" if hsv is not None and hsv.numel() else "-",
                     f"{error:.4g}" if error is not None else "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def render_reduction_card(model, entry: dict) -> str:
    """Markdown model card of a Mamba model reduced post hoc: how to load it, per-layer sizes before and after,
    method, calibration text and the predicted relative scan-output error per layer (`entry`: the summary entry of
    `reduce_selective_checkpoint`)."""
    from ..model_card import CARD_MARKER, escape_markdown

    class_name = type(model).__name__
    family = "Mamba-2" if "Mamba2" in class_name else "Mamba (Mamba-1)"
    errors = entry["predicted_relative_error"]
    lines = [
        "---", "library_name: transformers", "tags:", CARD_MARKER, "- state-space-model", "- mamba",
        "- state-reduction", "---", "",
        f"# {escape_markdown(class_name)} (CompreSSM)", "",
        f"A {family} language model whose per-layer state sizes were reduced after training (post hoc) from the "
        "data-driven Gramians of calibration text (CompreSSM): "
        + ("balanced projection of B and C (square-root balancing)." if entry["method"] == "balanced" else
           "selection of the states picked by pivoted QR of Q^1/2 P^1/2 (a stock layer of the smaller size)."),
        "", "Load it with the modeling code stored next to the weights (no package needed):", "", "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this repo or folder>", trust_remote_code=True)', "```", "",
        "## Post-hoc reduction", "",
        f"- method: {escape_markdown(entry['method'])}; "
        + (f"tau={entry['tau']:g} (share of predicted scan-output energy dropped)" if entry.get("tau") is not None
           else f"ranks: {escape_markdown(entry['ranks'])}"),
        f"- calibration: {escape_markdown(entry['calibration'])}",
        f"- parameters: {sum(parameter.numel() for parameter in model.parameters()):,}", "",
        "| layer | state dim before | state dim after | predicted relative scan-output error |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {layer} | {before} | {after} | {f'{error:.4g}' if error is not None else '-'} |"
              for layer, (before, after, error) in enumerate(zip(entry["dims_before"], entry["dims_after"], errors))]
    lines += ["", "The predicted error is Σ_{i>r} σ_i² / Σ σ² of the layer's data-driven Hankel singular values σ "
              "(E‖Δy‖² / E‖y‖² of the scan output on the calibration text, under a factorisation assumption; not a "
              "worst-case bound)."]
    return "\n".join(lines) + "\n"


def reduce_selective_checkpoint(path: str, calibration: CalibrationText, *, ranks: list[int] | None = None,
                                tau: float | None = None, method: str | None = None, min_dim: int = 1,
                                output_dir: str | None = None, overwrite: bool = False) -> dict:
    """Reduce the Mamba-2 / Mamba-1 causal LM saved in `path` from calibration text and save it (see the module
    docstring). Give `ranks` or `tau`.

    Args:
        calibration: the `CalibrationText`.
        ranks: one int (every layer) or one per layer.
        tau: instead of ranks: share of predicted scan-output energy dropped per layer, in [0, 1).
        method: "balanced" or "select"; None: "balanced" for Mamba-2, "select" for Mamba-1 (which refuses
            "balanced").
        min_dim: with tau, the least state size per layer.
        output_dir / overwrite: as for `posthoc.reduce_checkpoint`.
    Returns:
        {"report" (text), "results" (model.reduce's `LayerReduction`s), "dims_before", "dims_after", "changed",
         "method", "calibration" (description), "output_dir"}
    """
    from ..model_card import is_replaceable_card
    from ..modeling_compressm_mamba2 import CompreSSMMamba2ForCausalLM
    from ..mamba2_reduction import hankel_singular_values
    from .posthoc import (
        SELECTIVE_SSM_MODEL_TYPES,
        checkpoint_model_type,
        find_tokenizer,
        load_checkpoint,
        output_target,
        summary_with_posthoc_entry,
        write_reduced_folder,
    )

    model_type = checkpoint_model_type(path)
    if model_type not in SELECTIVE_SSM_MODEL_TYPES:
        raise ValueError(f"{path!r} holds a CompreSSM LRU model: reduce it with --tau alone (balanced truncation of "
                         "its own system, no calibration text)")
    calibration.validate()
    target, in_place = output_target(path, output_dir, overwrite)
    model = load_checkpoint(path)
    if method is None:
        method = "balanced" if isinstance(model, CompreSSMMamba2ForCausalLM) else "select"
    dims_before = list(model.config.state_dims)
    model.reduce([None] * len(dims_before), method=method)  # the model's own refusal of a method, changes nothing
    ranks_from_options(dims_before, ranks, tau, min_dim=min_dim)  # checks ranks / tau before the calibration pass
    tokenizer = find_tokenizer(path, calibration.tokenizer, model.config.vocab_size)
    batches, description = calibration_batches(calibration, tokenizer)
    statistics = model.gramian_statistics(batches)
    hsv = [hankel_singular_values(*layer.gramians()) for layer in statistics]
    chosen = ranks_from_options(dims_before, ranks, tau, hsv=hsv, min_dim=min_dim)
    results = model.reduce(chosen, statistics=statistics, method=method)
    dims_after = list(model.config.state_dims)
    entry = {
        "model": SELECTIVE_SSM_MODEL_TYPES[model_type], "method": method,
        "ranks": list(ranks) if ranks is not None else None, "tau": float(tau) if tau is not None else None,
        "min_dim": min_dim, "calibration": description, "dims_before": dims_before, "dims_after": dims_after,
        "predicted_relative_error": [result.relative_error for result in results],
    }
    summary = summary_with_posthoc_entry(path, entry)

    def write_card(folder):
        card_path = os.path.join(folder, "README.md")
        if is_replaceable_card(card_path):  # a card of the user's is kept, as save_pretrained keeps it
            with open(card_path, "w", encoding="utf-8") as handle:
                handle.write(render_reduction_card(model, entry))

    target = write_reduced_folder(path, target, in_place, model, summary, overwrite, after_save=write_card)
    return {"report": _format_report(results), "results": results, "dims_before": dims_before,
            "dims_after": dims_after, "changed": dims_after != dims_before, "method": method,
            "calibration": description, "output_dir": target}
