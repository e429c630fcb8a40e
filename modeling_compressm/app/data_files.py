"""Explicit data files (`compressm train --data-files`): files and glob patterns, each for a split, resolved to files
before anything is loaded, and the `datasets` builder that reads them.

    resolve_data_files(["books/*.txt", "validation=held-out.txt"])
    # {"train": ["/abs/books/a.txt", "/abs/books/b.txt"], "validation": ["/abs/held-out.txt"]}

Nothing is guessed: `datasets.load_dataset("text")` without data files would read every file of the current folder
whose name contains "train"; here a builder name such as `text` needs its files named, a pattern that matches no file
and an empty file are errors, and the format follows the files' extension (or the builder named by `--dataset`).
"""

from __future__ import annotations

import glob
import os
import re

__all__ = ["DATA_FILE_BUILDERS", "resolve_data_files", "builder_for_files", "is_builder_name", "split_and_pattern"]

# file extension -> datasets packaged builder (and its extra arguments)
DATA_FILE_BUILDERS = {
    ".txt": ("text", {"keep_linebreaks": True}),
    ".text": ("text", {"keep_linebreaks": True}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
_SPLIT_PREFIX = re.compile(r"^([A-Za-z][\w.-]*)=(.*)$")
_GLOB_CHARACTERS = ("*", "?", "[")


def is_builder_name(name) -> bool:
    """Whether `name` is one of the file-format builders packaged with `datasets` ("text", "json", "csv", ...)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return isinstance(name, str) and name in _PACKAGED_DATASETS_MODULES


def split_and_pattern(value: str, default_split: str) -> tuple[str, str]:
    """"validation=held/*.txt" -> ("validation", "held/*.txt"); a value without "SPLIT=" (or an existing file whose
    name has "=") is for `default_split`."""
    match = _SPLIT_PREFIX.match(value)
    if match and not os.path.exists(value):
        return match.group(1), match.group(2)
    return default_split, value


def resolve_data_files(values, default_split: str = "train") -> dict[str, list[str]]:
    """The files named by `--data-files` values, per split.

    Args:
        values: a string or a list of strings, each a file, a glob pattern (`*`, `?`, `[...]`, `**` for any depth,
            relative to the current folder), or SPLIT=either of those (e.g. "validation=held-out/*.txt").
        default_split: the split of values without "SPLIT=".
    Returns:
        {split: absolute file paths} in the order given (each pattern's matches sorted), without repeats.
    Raises:
        ValueError (one line, naming the value) for a pattern that matches no file, a missing file, a folder, an
        empty file, or no values at all.
    """
    if isinstance(values, str):
        values = [values]
    if not values:
        raise ValueError("--data-files names no file; give files or glob patterns, e.g. --data-files 'corpus/*.txt'")
    resolved: dict[str, list[str]] = {}
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"--data-files takes file names and glob patterns, got {value!r}")
        split, pattern = split_and_pattern(value, default_split)
        path = os.path.expanduser(pattern)
        if any(character in pattern for character in _GLOB_CHARACTERS):
            matches = sorted(match for match in glob.glob(path, recursive=True) if os.path.isfile(match))
            if not matches:
                raise ValueError(
                    f"--data-files pattern {pattern!r} matches no file (looked in {os.getcwd()}); check the pattern "
                    "and quote it, so that the shell passes it on"
                )
        elif os.path.isdir(path):
            raise ValueError(f"--data-files {pattern!r} is a folder; name its files, e.g. "
                             f"'{os.path.join(pattern, '*.txt')}', or pass the folder as --dataset")
        elif not os.path.isfile(path):
            raise ValueError(f"data file {pattern!r} (from --data-files) does not exist")
        else:
            matches = [path]
        for match in matches:
            if os.path.getsize(match) == 0:
                raise ValueError(f"data file {match!r} is empty; give files with rows of text")
        files = resolved.setdefault(split, [])
        files.extend(absolute for absolute in map(os.path.abspath, matches) if absolute not in files)
    return resolved


def builder_for_files(files: dict[str, list[str]], builder: str | None = None) -> tuple[str, dict]:
    """The `datasets` builder (and its extra arguments) that reads `files`: `builder` when given (a name from
    `is_builder_name`), else the one their extension names, which must be the same for every file.

    Raises:
        ValueError naming the file with an extension no builder reads, or the formats that are mixed.
    """
    paths = [path for split_files in files.values() for path in split_files]
    extensions = sorted({os.path.splitext(path)[1].lower() for path in paths})
    if builder is not None:
        for extension in extensions:
            name, extra = DATA_FILE_BUILDERS.get(extension, (None, {}))
            if name == builder:
                return builder, dict(extra)
        return builder, {"keep_linebreaks": True} if builder == "text" else {}
    for path in paths:
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"data file {path!r} has an unsupported extension {extension or '(none)'!r}; use one of "
                f"{', '.join(sorted(DATA_FILE_BUILDERS))}, or name the format with --dataset (text, json, csv, parquet)"
            )
    formats = {DATA_FILE_BUILDERS[extension][0] for extension in extensions}
    if len({repr(DATA_FILE_BUILDERS[extension]) for extension in extensions}) > 1:
        raise ValueError(
            f"--data-files mixes formats ({', '.join(extensions)}{' read differently' if len(formats) == 1 else ''}); "
            "give files of one format"
        )
    name, extra = DATA_FILE_BUILDERS[extensions[0]]
    return name, dict(extra)
