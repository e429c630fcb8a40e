"""Work on a saved CompreSSM checkpoint without training: reduce it by balanced truncation (`compressm reduce`) and
generate text with it (`compressm generate`).

    from modeling_compressm.app.posthoc import reduce_checkpoint, generate_text

    result = reduce_checkpoint("my-model", tau=0.1, output_dir="my-model-small")
    print(result["report"])                       # per-layer HSV report: size, rank, kept energy, error bound
    print(generate_text("my-model-small", "The state", max_new_tokens=40))
"""

from __future__ import annotations

import json
import os
import shutil

__all__ = [
    "checkpoint_model_type",
    "load_checkpoint",
    "hsv_report",
    "reduce_checkpoint",
    "output_target",
    "summary_with_posthoc_entry",
    "write_reduced_folder",
    "find_tokenizer",
    "generate_text",
]


LRU_MODEL_TYPE = "compressm"  # the `model_type` in config.json of a CompreSSM LRU model
# the `model_type`s of the Mamba models `compressm reduce` takes -> what they are (in summaries and messages)
SELECTIVE_SSM_MODEL_TYPES = {
    "compressm_mamba2": "CompreSSM Mamba-2", "compressm_mamba": "CompreSSM Mamba-1",
    "mamba2": "transformers Mamba-2", "mamba": "transformers Mamba-1",
}


def checkpoint_model_type(path: str) -> str:
    """The `model_type` of the model saved in folder `path`: "compressm" (LRU) or one of `SELECTIVE_SSM_MODEL_TYPES`.

    Raises:
        ValueError when `path` is not a folder with a `config.json` of one of these models.
    """
    config_path = os.path.join(str(path), "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is not a saved model folder (no config.json); give the folder `compressm train` or "
                         "save_pretrained wrote")
    with open(config_path, encoding="utf-8") as handle:
        try:
            model_type = json.load(handle).get("model_type")
        except (ValueError, AttributeError):
            raise ValueError(f"{config_path!r} is not a valid JSON config") from None
    if model_type != LRU_MODEL_TYPE and model_type not in SELECTIVE_SSM_MODEL_TYPES:
        raise ValueError(f"{path!r} holds a {model_type!r} model, not a CompreSSM ('compressm'), Mamba-2 or Mamba "
                         "model")
    return model_type


def load_checkpoint(path: str):
    """The model saved in folder `path`, in eval mode: a CompreSSM LRU model (class from its config's
    `architectures`), a CompreSSM Mamba-2 / Mamba-1 causal LM, or a transformers `Mamba2ForCausalLM` /
    `MambaForCausalLM`, converted to the CompreSSM class (identical logits).

    Raises:
        ValueError when `path` is not a folder with the config of one of these models.
    """
    model_type = checkpoint_model_type(path)
    if model_type in SELECTIVE_SSM_MODEL_TYPES:
        return _load_selective_ssm(path, model_type).eval()
    from ..configuration_compressm import CompreSSMConfig
    from .presets import model_class_for_config

    config = CompreSSMConfig.from_pretrained(path)
    return model_class_for_config(config).from_pretrained(path).eval()


def _load_selective_ssm(path: str, model_type: str):
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    from ..modeling_compressm_mamba import CompreSSMMambaForCausalLM
    from ..modeling_compressm_mamba2 import CompreSSMMamba2ForCausalLM

    if model_type == "compressm_mamba2":
        return CompreSSMMamba2ForCausalLM.from_pretrained(path)
    if model_type == "compressm_mamba":
        return CompreSSMMambaForCausalLM.from_pretrained(path)
    if model_type == "mamba2":
        return CompreSSMMamba2ForCausalLM.from_mamba2(Mamba2ForCausalLM.from_pretrained(path))
    return CompreSSMMambaForCausalLM.from_mamba(MambaForCausalLM.from_pretrained(path))


def hsv_report(model, tau: float, min_dim: int = 1, system: str = "real") -> tuple[list[int | None], str]:
    """Ranks for tolerance `tau` per layer and a plain-text table of the Hankel singular values (per LRU state, of
    the balanced `system`: "real" (default) or "complex", see `model.hankel_singular_values`).

    Returns:
        (ranks: one entry per layer, the new size or None where the layer keeps its size; report text with, per
         layer, the state size, the rank, the kept HSV energy, the largest and the largest dropped HSV, and the
         dropped energy Σ dropped σ / Σ σ, which is also the H∞ error bound 2·Σ dropped σ relative to 2·Σ σ)
    """
    from ..reduction import check_tau, rank_for_energy

    tau = check_tau(tau)
    if isinstance(min_dim, bool) or not isinstance(min_dim, int) or min_dim < 1:
        raise ValueError(f"min dim must be a positive int, got {min_dim!r}")
    ranks, rows = [], [("layer", "N", "rank", "kept energy", "σ max", "largest dropped σ", "dropped energy")]
    for index, hsv in enumerate(model.hankel_singular_values(system=system)):
        values = hsv.detach().double().sort(descending=True).values
        size = int(values.numel())
        rank = min(size, max(min_dim, rank_for_energy(values, tau)))
        total = float(values.sum())
        kept = float(values[:rank].sum()) / total if total > 0 else 1.0
        dropped = float(values[rank]) if rank < size else 0.0
        ranks.append(rank if rank < size else None)
        rows.append((str(index), str(size), str(rank), f"{kept:.4f}", f"{float(values[0]):.3g}",
                     f"{dropped:.3g}" if rank < size else "-", f"{1.0 - kept:.4f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return ranks, "\n".join(lines)


def reduce_checkpoint(path: str, tau: float, *, output_dir: str | None = None, min_dim: int = 1,
                      overwrite: bool = False, system: str = "real") -> dict:
    """Shrink a saved model by balanced truncation at tolerance `tau` and save it with an updated model card.

    The other files of the folder (tokenizer, `train_summary.json`, ...) are carried over; the summary gains a
    "posthoc_reductions" entry. The folder is written whole (a temporary folder put in place at the end), so a
    failure leaves `output_dir` as it was; files of the user's there are kept (see `output_folder`). From a folder
    with a compressm manifest only compressm's files are carried to another `output_dir`.

    Args:
        path: a folder written by `compressm train` or `save_pretrained`.
        tau: tolerance in [0, 1): each layer keeps the fewest states holding (1 - tau) of its HSV sum.
        output_dir: where to save; None overwrites `path`.
        min_dim: least state size per layer.
        overwrite: replace a file of the user's in `output_dir` that the new output also writes (else ValueError
            before anything is written); in place, the model's own files are always replaced.
        system: "real" (default): balance each layer's real output map; "complex": the paper's complex map.
    Returns:
        {"report" (text), "ranks", "dims_before", "dims_after", "changed" (bool), "output_dir"}
    """
    from .output_folder import training_info

    if checkpoint_model_type(path) != LRU_MODEL_TYPE:
        raise ValueError(f"{path!r} holds a Mamba model, which reduces from calibration text: use "
                         "`compressm reduce PATH --dataset ...` (reduce_selective_checkpoint)")
    target, in_place = output_target(path, output_dir, overwrite)
    model = load_checkpoint(path)
    ranks, report = hsv_report(model, tau, min_dim, system)
    dims_before = list(model.config.state_dims)
    model.reduce(ranks, system=system)  # records a "manual" event in model.reduction_history
    dims_after = list(model.config.state_dims)
    summary = summary_with_posthoc_entry(
        path, {"tau": float(tau), "min_dim": min_dim, "dims_before": dims_before, "dims_after": dims_after}
    )
    if summary is not None:
        info = training_info(summary)
        info["Metrics"]["state dims"] = f"{summary['dims_before']} -> {summary['dims_after']} (end of training)"
        info["Post-hoc reduction"] = {
            f"tau={entry['tau']:g}": f"{entry['dims_before']} -> {entry['dims_after']}"
            for entry in summary["posthoc_reductions"]
        }
        model.compressm_training_info = info
    target = write_reduced_folder(path, target, in_place, model, summary, overwrite)
    return {"report": report, "ranks": ranks, "dims_before": dims_before, "dims_after": dims_after,
            "changed": dims_after != dims_before, "output_dir": target}


def output_target(path: str, output_dir: str | None, overwrite: bool) -> tuple[str, bool]:
    """(the folder a post-hoc command writes, whether that is `path` itself); another folder is checked
    (`check_output_dir`) before anything is loaded or computed."""
    from .output_folder import check_output_dir

    target = output_dir if output_dir is not None else path
    in_place = os.path.realpath(target) == os.path.realpath(path)
    if not in_place:
        check_output_dir(target, overwrite)
    return target, in_place


def summary_with_posthoc_entry(path: str, entry: dict) -> dict | None:
    """The `train_summary.json` of folder `path` with `entry` appended to its "posthoc_reductions", or None when the
    folder has no summary."""
    from .output_folder import SUMMARY_FILE

    summary_path = os.path.join(path, SUMMARY_FILE)
    if not os.path.isfile(summary_path):
        return None
    with open(summary_path, encoding="utf-8") as handle:
        summary = json.load(handle)
    summary.setdefault("posthoc_reductions", []).append(entry)
    return summary


def write_reduced_folder(path: str, target: str, in_place: bool, model, summary: dict | None, overwrite: bool,
                         after_save=None) -> str:
    """Write the reduced `model` (save_pretrained), the other files of `path` and `summary` (when not None) into
    `target` as a whole (`write_output_folder`): files of the user's there are kept; one the output would replace
    stops it unless `overwrite` (in place, the model's own files are always replaced). `after_save(folder)`, if
    given, runs after the model is saved (e.g. to write a model card). Returns the absolute path."""
    from .output_folder import MANIFEST_FILE, SUMMARY_FILE, compressm_files, write_output_folder

    # Every file is copied (those of the user's stay theirs: write_output_folder sees the same content), except that
    # only compressm's files of a folder with a manifest go to another folder.
    with_manifest = os.path.isfile(os.path.join(path, MANIFEST_FILE))
    carried = compressm_files(path) if with_manifest and not in_place else os.listdir(path)

    def write(folder):
        for name in sorted(carried):
            source = os.path.join(path, name)
            if os.path.isfile(source) and not os.path.islink(source) and name != MANIFEST_FILE:
                shutil.copy2(source, os.path.join(folder, name))
        model.save_pretrained(folder)
        if after_save is not None:
            after_save(folder)
        if summary is not None:
            with open(os.path.join(folder, SUMMARY_FILE), "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=1)
                handle.write("\n")

    return write_output_folder(target, write, overwrite=overwrite or in_place)


def find_tokenizer(path: str, tokenizer: str | None, vocab_size: int):
    """The tokenizer saved in folder `path`, or `tokenizer` ("bytes", a folder or a Hub id) when given.

    Raises:
        ValueError when neither gives one, or when it has more tokens than the model's `vocab_size`.
    """
    from .tokenization import load_tokenizer

    if tokenizer is None:
        if not any(os.path.isfile(os.path.join(path, name))
                   for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
            raise ValueError(f"{path!r} holds no tokenizer; pass --tokenizer (a folder, a Hub id or 'bytes')")
        tokenizer = path
    tokenizer = load_tokenizer(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model only {vocab_size}")
    return tokenizer


def generate_text(path: str, prompt: str, *, max_new_tokens: int = 64, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  tokenizer: str | None = None) -> str:
    """The prompt and its continuation by the causal LM saved in `path` (greedy unless `do_sample`).

    Args:
        tokenizer: a tokenizer folder, Hub id or "bytes" when `path` holds none.
    Raises:
        ValueError when the folder holds no causal LM or no tokenizer, or for bad sampling settings.
    """
    import torch

    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt must be a non-empty string")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max new tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    model = load_checkpoint(path)
    if not type(model).__name__.endswith("ForCausalLM"):
        raise ValueError(f"{path!r} holds a {type(model).__name__}; generate needs a causal LM")
    tokenizer = find_tokenizer(path, tokenizer, model.config.vocab_size)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("the prompt tokenizes to no tokens")
    torch.manual_seed(seed)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    with torch.no_grad():
        output = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), max_new_tokens=max_new_tokens,
            do_sample=do_sample, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id, **sampling,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)
