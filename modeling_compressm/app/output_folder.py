"""The output folder of `compressm train` and `compressm reduce`: checked before training, written whole at the end
(staged next to it, then put in place), with `train_summary.json`, the model card's "Training" section, and a
manifest of what compressm wrote.

Whose files are whose: `.compressm_files.json` lists each file compressm wrote into the folder with its SHA-256. When
a command writes the folder again, those files (unless changed since) are replaced or dropped, and everything else
(your notes, evaluation results, subfolders) is carried into the new folder (hard links where the file system allows,
else copies), so it survives. A file of yours that the new output would overwrite (a README.md edited by hand, the
config.json of another model) stops the command before anything is written, unless `overwrite` is given
(`--overwrite-output-dir`); then only that file is replaced. A folder written before manifests existed counts its
files with the names compressm writes as compressm's. A non-empty folder that holds no CompreSSM output is refused
unless `overwrite`.

New folders get the mode `os.makedirs` would give (0755 under the usual umask 022), as `save_pretrained`'s do; a
folder written again keeps its mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

__all__ = [
    "SUMMARY_FILE",
    "MANIFEST_FILE",
    "check_output_dir",
    "compressm_files",
    "is_output_name",
    "write_output_folder",
    "save_run",
    "training_info",
]

SUMMARY_FILE = "train_summary.json"
MANIFEST_FILE = ".compressm_files.json"
# Names compressm writes into an output folder: model (save_pretrained), model card, history, summary, tokenizer
# (the files `save_pretrained` of common tokenizers writes) and the remote-code copies of this package's modules.
_OUTPUT_NAMES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", "README.md",
    "hsv_spectrum.png", "compressm_history.json", SUMMARY_FILE, "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})
_COMPRESSM_MODEL_TYPES = ("compressm", "compressm_mamba2", "compressm_mamba")
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# the remote-code bundle, whose modules save_pretrained copies next to the weights (this file's folder is app/)
_BUNDLE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE_MODULES = frozenset(name for name in os.listdir(_BUNDLE_FOLDER) if name.endswith(".py"))


def is_output_name(name: str) -> bool:
    """Whether compressm may write a file called `name` into an output folder."""
    return name in _OUTPUT_NAMES or name in _PACKAGE_MODULES or name == MANIFEST_FILE or bool(_SHARD_NAME.match(name))


def _looks_like_compressm_output(path: str) -> bool:
    if os.path.isfile(os.path.join(path, SUMMARY_FILE)) or os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            return json.load(handle).get("model_type") in _COMPRESSM_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def _digest(path: str) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: str) -> dict[str, str] | None:
    """{file name: SHA-256} from the folder's manifest; None without one; ValueError naming it when damaged."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            files = json.load(handle)["files"]
        if not isinstance(files, dict) or not all(
            isinstance(name, str) and isinstance(value, str) and name == os.path.basename(name) and name
            for name, value in files.items()
        ):
            raise ValueError("'files' must map file names to SHA-256 digests")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"the manifest {path!r} (which files compressm wrote there) is damaged ({str(error).splitlines()[0]}): "
            "delete it (files with the names compressm writes then count as compressm's) or choose another output dir"
        ) from None
    return files


def _is_plain_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def compressm_files(folder: str) -> set[str]:
    """Names of the files in `folder` that compressm wrote and nobody changed since (by the manifest; in a folder
    without one that holds a CompreSSM output, its files with the names compressm writes). Writing the folder again
    replaces or drops these; every other entry belongs to the user and is kept."""
    if not os.path.isdir(folder):
        return set()
    manifest = read_manifest(folder)
    if manifest is None:
        if not _looks_like_compressm_output(folder):
            return set()
        return {name for name in os.listdir(folder)
                if is_output_name(name) and _is_plain_file(os.path.join(folder, name))}
    return {name for name, digest in manifest.items()
            if _is_plain_file(os.path.join(folder, name)) and _digest(os.path.join(folder, name)) == digest}


def _user_entries(folder: str) -> list[str]:
    """Entries of `folder` (files, links, subfolders) that are not compressm's, sorted."""
    ours = compressm_files(folder) | {MANIFEST_FILE}
    return sorted(name for name in os.listdir(folder) if name not in ours)


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """ValueError (one line, before anything is written) when writing the output folder `path` would lose something:
    `path` is a file; or, unless `overwrite`, it is a non-empty folder that holds no CompreSSM output, or it holds a
    file of the user's with a name the new output uses (see the module docstring)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"output dir {path!r} is a file; choose another --output-dir")
    if not os.path.isdir(path) or not os.listdir(path) or overwrite:
        if os.path.isdir(path):
            read_manifest(path)  # a damaged manifest is reported, also with overwrite
        return
    if not _looks_like_compressm_output(path):
        raise ValueError(
            f"output dir {path!r} already holds files that are not a CompreSSM model; choose another --output-dir, "
            "or pass --overwrite-output-dir to write the model into it (files of the same names are replaced, the "
            "others kept)"
        )
    clashes = [name for name in _user_entries(path) if is_output_name(name)]
    if clashes:
        raise ValueError(_clash_message(path, clashes))


def _clash_message(path: str, names: list[str]) -> str:
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"output dir {path!r} holds {listed}, which compressm did not write or which changed since it wrote them, "
        "and the new output would replace them: move them away, choose another --output-dir, or pass "
        "--overwrite-output-dir to replace them (your other files are kept)"
    )


def _link_or_copy_file(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target, follow_symlinks=False)


def _carry_over(source: str, target: str) -> None:
    """Put the user's entry `source` (file, link or folder) at `target`, sharing the data where possible."""
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
    elif os.path.isdir(source):
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(source, target)


def _same_content(first: str, second: str) -> bool:
    return _is_plain_file(first) and _is_plain_file(second) and (
        os.path.getsize(first) == os.path.getsize(second) and _digest(first) == _digest(second)
    )


def _carry_user_entries(path: str, staging: str, overwrite: bool) -> set[str]:
    """Carry the user's entries of the existing folder `path` into `staging`. A user's file that `staging` also holds
    stays the user's when the content is the same, is replaced with `overwrite`, and otherwise raises ValueError.

    Returns:
        names in `staging` that are the user's (carried over, or the same content): left out of the manifest.
    """
    if not os.path.isdir(path):
        return set()
    users, clashes = set(), []
    for name in _user_entries(path):
        source, target = os.path.join(path, name), os.path.join(staging, name)
        if not os.path.lexists(target):
            _carry_over(source, target)
            users.add(name)
        elif _same_content(source, target):
            users.add(name)
        elif not overwrite:
            clashes.append(name)
    if clashes:
        raise ValueError(_clash_message(path, clashes))
    return users


def _write_manifest(staging: str, users: set[str]) -> None:
    files = {
        name: _digest(os.path.join(staging, name)) for name in sorted(os.listdir(staging))
        if name not in users and name != MANIFEST_FILE and _is_plain_file(os.path.join(staging, name))
    }
    manifest = {
        "written_by": "compressm",
        "about": "the files compressm wrote in this folder (SHA-256); when it writes the folder again it replaces "
                 "these, and keeps every other file",
        "files": files,
    }
    with open(os.path.join(staging, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.write("\n")


def _folder_mode(path: str) -> int:
    """The mode of the existing folder `path`, else what `os.makedirs` gives under the current umask."""
    if os.path.isdir(path):
        return os.stat(path).st_mode & 0o7777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def write_output_folder(path: str, write, overwrite: bool = False) -> str:
    """Call `write(folder)` on a fresh hidden folder next to `path`, carry the user's entries of an existing `path`
    into it, record compressm's files in its manifest, then put it in place of `path` (the earlier folder is removed
    only after the new one is complete). On any error nothing changes at `path`.

    Args:
        write: callable taking the staging folder's path; writes compressm's files there.
        overwrite: a user's file with a name `write` also wrote is replaced (else ValueError, nothing changes).
    Returns:
        the absolute path.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        write(staging)
        _write_manifest(staging, _carry_user_entries(path, staging, overwrite))
        os.chmod(staging, _folder_mode(path))
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

    write_output_folder(output_dir, write, overwrite)


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
