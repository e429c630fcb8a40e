"""Your own text data for CompreSSM models, through Hugging Face `datasets`.

    from modeling_compressm import byte_level_tokenizer, load_text_dataset, pack_dataset

    splits = load_text_dataset("corpus.txt", validation_fraction=0.1)   # DatasetDict: "train", "validation"
    blocks = pack_dataset(splits, byte_level_tokenizer(), block_size=128)
    blocks["train"][0]   # {"input_ids": [128 ids], "labels": [the same 128 ids]}: Trainer-ready causal-LM blocks

`load_text_dataset` takes what `datasets.load_dataset` takes: a local file (`.txt`, `.json`/`.jsonl`, `.csv`, `.tsv`,
`.parquet`, `.arrow`, chosen by extension), a folder (data files, or a `save_to_disk` dataset), or a Hub dataset id
(online, or from the local `datasets` cache when offline). `pack_dataset` tokenizes with `Dataset.map` (batched,
`num_proc` processes) and concatenates the documents into blocks of `block_size` tokens; both maps are cached by
`datasets` next to a file-backed dataset, so running the same packing again reads the cache instead of tokenizing.
`tokenize_for_classification` prepares (text, label) rows for `CompreSSMForSequenceClassification`.

Every bad input (missing file or column, empty split, a block size longer than the data, a Hub id while offline)
raises `ValueError` with one line that says what to change.
"""

from __future__ import annotations

import os

from .data_files import DATA_FILE_BUILDERS, builder_for_files, is_builder_name, resolve_data_files, split_and_pattern
from .tokenization import first_line

__all__ = [
    "load_text_dataset",
    "pack_dataset",
    "tokenize_for_classification",
    "tokens_per_byte",
    "DATA_FILE_BUILDERS",
]

# `load_text_dataset` marks the splits of a .txt file with this description: their rows are lines (kept with their
# line breaks), which `pack_dataset` concatenates as they are instead of separating them with eos.
LINES_DESCRIPTION = "compressm: rows are the lines of a text file, line breaks included"


def _load_files(builder: str, extra: dict, files: dict[str, list[str]], cache_dir: str | None, shown: str):
    """DatasetDict of local `files` ({split: paths}) read by the `datasets` builder; ValueError naming them."""
    import datasets

    try:
        loaded = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, **extra)
    except Exception as error:  # parse errors of csv/json/parquet readers come in many types
        if isinstance(error, StopIteration) or "corresponds to no data" in str(error):
            raise ValueError(f"{shown} has no rows; give a file with rows of text") from None
        raise ValueError(f"could not read {shown} as {builder}: {first_line(error)}") from None
    if builder == "text":
        for split in loaded.values():
            split.info.description = LINES_DESCRIPTION
    return loaded


def _refuse_config(config_name: str | None, what: str) -> None:
    if config_name is not None:
        raise ValueError(f"--dataset-config {config_name!r} names a configuration of a Hub dataset (or of a dataset "
                         f"folder), but the data is {what}, which has none: drop --dataset-config")


def _load_data_files(spec: str | None, data_files, config_name: str | None, cache_dir: str | None, split: str):
    """DatasetDict of explicit data files: local files/patterns read by a builder (named by `spec`, else by their
    extension), or files of a local dataset folder / Hub dataset `spec` (resolved there by `datasets`)."""
    import datasets

    if spec is not None and os.path.isfile(spec):
        raise ValueError(f"--dataset {spec!r} is a file and --data-files names files too: give the data one way")
    if spec is not None and not is_builder_name(spec) and (os.path.isdir(spec) or not os.path.exists(spec)):
        values = [data_files] if isinstance(data_files, str) else list(data_files)
        patterns: dict[str, list[str]] = {}
        for value in values:
            name, pattern = split_and_pattern(value, split)
            patterns.setdefault(name, []).append(pattern)
        try:
            return datasets.load_dataset(spec, config_name, data_files=patterns, cache_dir=cache_dir)
        except Exception as error:
            raise ValueError(f"could not load --data-files {values} of dataset {spec!r}: {first_line(error)}") from None
    _refuse_config(config_name, "local data files")
    files = resolve_data_files(data_files, default_split=split)
    builder, extra = builder_for_files(files, spec)
    count = sum(len(paths) for paths in files.values())
    return _load_files(builder, extra, files, cache_dir, f"the {count} file(s) of --data-files")


def _load_raw(spec: str, config_name: str | None, cache_dir: str | None):
    """DatasetDict (or Dataset for a `save_to_disk` folder) for `spec`; ValueError naming the dataset on failure."""
    import datasets

    extension = os.path.splitext(spec)[1].lower()
    if os.path.isfile(spec):
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"dataset file {spec!r} has an unsupported extension {extension or '(none)'!r}; use one of "
                f"{', '.join(sorted(DATA_FILE_BUILDERS))}"
            )
        if os.path.getsize(spec) == 0:
            raise ValueError(f"dataset file {spec!r} is empty; give a file with rows of text")
        _refuse_config(config_name, f"the local file {spec!r}")
        builder, extra = DATA_FILE_BUILDERS[extension]
        return _load_files(builder, extra, {"train": [os.path.abspath(spec)]}, cache_dir, f"dataset file {spec!r}")
    if os.path.isdir(spec):
        if any(os.path.isfile(os.path.join(spec, name)) for name in ("dataset_dict.json", "state.json")):
            _refuse_config(config_name, f"the saved dataset {spec!r}")
            return datasets.load_from_disk(spec)
        try:
            return datasets.load_dataset(spec, config_name, cache_dir=cache_dir)
        except Exception as error:
            raise ValueError(f"could not load a dataset from folder {spec!r}: {first_line(error)}") from None
    if extension in DATA_FILE_BUILDERS or os.path.isabs(spec) or spec.startswith(".") or spec.count("/") > 1:
        raise ValueError(f"dataset file or folder {spec!r} does not exist")
    if is_builder_name(spec):  # datasets would read whatever files of the current folder have "train" in their name
        raise ValueError(
            f"--dataset {spec} names a file format, not the data: give the files with --data-files (files or glob "
            f"patterns, e.g. --data-files 'corpus/*.txt' validation=held-out.txt), or pass one file as --dataset"
        )
    try:
        return datasets.load_dataset(spec, config_name, cache_dir=cache_dir)
    except ConnectionError as error:
        raise ValueError(
            f"dataset {spec!r} is not a local file or folder and is not in the datasets cache, and the Hugging Face "
            f"Hub cannot be reached ({first_line(error)}): give a local file or folder, or load it once while online"
        ) from None
    except Exception as error:
        raise ValueError(f"could not load dataset {spec!r}: {first_line(error)}") from None


def load_text_dataset(
    spec: str | None,
    *,
    data_files=None,
    config_name: str | None = None,
    split: str = "train",
    eval_split: str | None = None,
    validation_fraction: float | None = None,
    columns: tuple[str, ...] = ("text",),
    shuffle_split: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
):
    """Load a dataset and return its training and validation splits.

    Args:
        spec: a local data file (by extension: .txt (one row per line), .json/.jsonl, .csv, .tsv, .parquet, .arrow),
            a folder, or a Hub dataset id; with `data_files`: a builder name ("text", "json", "csv", ...; None: by
            the files' extension), a dataset folder or a Hub dataset id. A builder name alone is refused (`datasets`
            would guess the files from the current folder).
        data_files: files and glob patterns, each optionally "SPLIT=..." (see `data_files.resolve_data_files`;
            values without a split are for `split`).
        config_name: the dataset's configuration (Hub datasets with several, or a dataset folder), else None;
            refused for local data files, which have none.
        split: the training split.
        eval_split: the split to evaluate on. When None: the dataset's "validation" split if it has one, otherwise
            `validation_fraction` of the training split (default 0.1) is held out.
        validation_fraction: share of the training rows held out for validation, in (0, 1); only when the dataset
            has no validation split or when given explicitly (then it wins over an existing "validation" split).
        columns: columns every split must have (e.g. ("text",) or ("text", "label")).
        shuffle_split: hold out a random sample (classification) instead of the last rows (text: neighbouring lines
            stay on one side of the split).
        seed: seed of the random hold-out.
        cache_dir: the `datasets` cache folder (default: `HF_DATASETS_CACHE`).
    Returns:
        `datasets.DatasetDict` with "train" and "validation".
    """
    import datasets

    if eval_split is not None and validation_fraction is not None:
        raise ValueError("give either an eval split or a validation fraction, not both")
    if validation_fraction is not None and not (
        isinstance(validation_fraction, (int, float)) and 0.0 < float(validation_fraction) < 1.0
    ):
        raise ValueError(f"validation fraction must lie strictly between 0 and 1, got {validation_fraction!r}")
    if data_files is not None:
        loaded = _load_data_files(spec, data_files, config_name, cache_dir, split)
        shown = "from --data-files" if spec is None else f"{spec!r} (--data-files)"
    elif spec is None:
        raise ValueError("no data: give --dataset (a file, folder or Hub dataset id) or --data-files")
    else:
        loaded, shown = _load_raw(spec, config_name, cache_dir), repr(spec)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"dataset {shown} loaded as {type(loaded).__name__}, expected a DatasetDict of splits")
    names = ", ".join(loaded)
    if split not in loaded:
        raise ValueError(f"dataset {shown} has no split {split!r} (splits: {names}); choose one with --split")
    train = loaded[split]
    if eval_split is not None:
        if eval_split not in loaded:
            raise ValueError(
                f"dataset {shown} has no split {eval_split!r} (splits: {names}); choose one with --eval-split"
            )
        validation = loaded[eval_split]
    elif validation_fraction is None and "validation" in loaded and split != "validation":
        validation = loaded["validation"]
    else:
        fraction = 0.1 if validation_fraction is None else float(validation_fraction)
        if len(train) < 2:
            raise ValueError(
                f"dataset {shown} split {split!r} has {len(train)} row(s): too few to hold out a validation part; "
                "add data or give an --eval-split"
            )
        held_out = min(len(train) - 1, max(1, int(round(fraction * len(train)))))
        if shuffle_split:
            parts = train.train_test_split(test_size=held_out, seed=seed, shuffle=True)
            train, validation = parts["train"], parts["test"]
        else:
            train, validation = train.select(range(len(train) - held_out)), train.select(
                range(len(train) - held_out, len(train))
            )
        validation.info.description = train.info.description = loaded[split].info.description
    for name, part in (("training", train), ("validation", validation)):
        if len(part) == 0:
            raise ValueError(f"dataset {shown}: the {name} split is empty; give a dataset with rows")
        missing = [column for column in columns if column not in part.column_names]
        if missing:
            flag = "--text-column" if missing[0] == columns[0] else "--label-column"
            raise ValueError(
                f"dataset {shown} has no column {missing[0]!r} in its {name} split (columns: "
                f"{', '.join(part.column_names)}); name the right one with {flag}"
            )
    return datasets.DatasetDict({"train": train, "validation": validation})


def _check_text_column(dataset, text_column: str) -> None:
    feature = dataset.features.get(text_column)
    if feature is None:
        raise ValueError(
            f"the dataset has no column {text_column!r} (columns: {', '.join(dataset.column_names)}); name the text "
            "column with --text-column"
        )
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"column {text_column!r} holds {feature}, not text; name the text column with --text-column")


class _Tokenize:
    """Batched map function: token ids of each row (+ a separator); a class so `datasets` can fingerprint it."""

    def __init__(self, tokenizer, text_column: str, lines: bool):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.lines = lines

    def __call__(self, batch):
        texts = [text if text is not None else "" for text in batch[self.text_column]]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if not self.lines and eos is not None:  # rows are documents: separate them with eos
            encoded = [ids + [eos] for ids in encoded]
        return {"input_ids": encoded}


class _GroupIntoBlocks:
    """Batched map function: concatenate token ids and cut them into blocks of `block_size` (the rest is dropped)."""

    def __init__(self, block_size: int):
        self.block_size = block_size

    def __call__(self, batch):
        flat = [token for ids in batch["input_ids"] for token in ids]
        usable = len(flat) - len(flat) % self.block_size
        blocks = [flat[start:start + self.block_size] for start in range(0, usable, self.block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def pack_dataset(dataset, tokenizer, block_size: int, *, text_column: str = "text", num_proc: int | None = None,
                 map_batch_size: int = 1000, rows_are_lines: bool | None = None):
    """Tokenize the `text_column` of every split and pack the token stream into blocks of `block_size` tokens.

    Rows are documents, separated by the tokenizer's eos token (when it has one); the rows of a `.txt` file loaded by
    `load_text_dataset` are lines with their line breaks and are concatenated as they are. Tokens are concatenated
    within each map batch of `map_batch_size` rows and the remainder of a batch that does not fill a block is dropped
    (the usual `run_clm` grouping).

    Args:
        dataset: `datasets.Dataset` or `DatasetDict` with a text column.
        tokenizer: any transformers tokenizer (a fast one is much quicker).
        block_size: tokens per block (>= 2).
        text_column: the column holding the text.
        num_proc: processes for `Dataset.map` (None: in this process).
        map_batch_size: rows per map batch.
        rows_are_lines: True: rows are lines that carry their own line breaks (no eos between them); None: True
            for splits `load_text_dataset` read from a .txt file.
    Returns:
        the same type as `dataset`, each split with columns "input_ids" and "labels" (int lists of `block_size`;
        labels equal input_ids, the model shifts them).
    Raises:
        ValueError when a split yields no full block (its token count is reported).
    """
    import datasets

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block size must be an int >= 2, got {block_size!r}")
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc must be None or a positive int, got {num_proc!r}")
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({
            name: _pack_split(split, tokenizer, block_size, text_column, num_proc, map_batch_size, rows_are_lines, name)
            for name, split in dataset.items()
        })
    return _pack_split(dataset, tokenizer, block_size, text_column, num_proc, map_batch_size, rows_are_lines, "dataset")


def _pack_split(dataset, tokenizer, block_size, text_column, num_proc, map_batch_size, rows_are_lines, name):
    import pyarrow.compute

    if len(dataset) == 0:
        raise ValueError(f"the {name} split is empty; give a dataset with rows")
    _check_text_column(dataset, text_column)
    lines = dataset.info.description == LINES_DESCRIPTION if rows_are_lines is None else bool(rows_are_lines)
    num_proc = None if num_proc is None or num_proc < 2 or len(dataset) < 2 * num_proc else num_proc
    tokenized = dataset.map(
        _Tokenize(tokenizer, text_column, lines), batched=True, batch_size=map_batch_size, num_proc=num_proc,
        remove_columns=dataset.column_names, desc=f"Tokenizing the {name} split",
    )
    total = int(pyarrow.compute.sum(pyarrow.compute.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0)
    if total < block_size:
        raise ValueError(
            f"the {name} split holds {total} tokens, fewer than one block of {block_size}: lower --block-size "
            "or give more text"
        )
    blocks = tokenized.map(
        _GroupIntoBlocks(block_size), batched=True, batch_size=map_batch_size, num_proc=num_proc,
        desc=f"Packing the {name} split into blocks of {block_size}",
    )
    if len(blocks) == 0:
        raise ValueError(
            f"the {name} split holds {total} tokens, but no map batch of {map_batch_size} rows fills a block of "
            f"{block_size}: lower --block-size"
        )
    return blocks


def tokens_per_byte(blocks, tokenizer, max_blocks: int = 4096) -> float:
    """Tokens per UTF-8 byte of the text in packed `blocks` (decoded without special tokens), from at most
    `max_blocks` blocks: multiply a per-token loss in nats by this / ln 2 to get bits per byte."""
    count = min(len(blocks), max_blocks)
    if count == 0:
        raise ValueError("no blocks to measure")
    rows = [list(row) for row in blocks.select(range(count))["input_ids"]]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return sum(len(row) for row in rows) / max(1, total_bytes)


class _TokenizeForClassification:
    def __init__(self, tokenizer, text_column: str, label_column: str, max_length: int, label_ids: dict | None):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.label_column = label_column
        self.max_length = max_length
        self.label_ids = label_ids

    def __call__(self, batch):
        texts = [text if text is not None else "" for text in batch[self.text_column]]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        labels = batch[self.label_column]
        if self.label_ids is not None:
            labels = [self.label_ids[label] for label in labels]
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def tokenize_for_classification(dataset, tokenizer, *, text_column: str = "text", label_column: str = "label",
                                max_length: int = 512, num_proc: int | None = None):
    """Tokenize (text, label) rows for sequence classification.

    Labels may be a `ClassLabel` feature, ints >= 0, or strings (mapped to ids in sorted order).

    Args:
        dataset: `DatasetDict` with "train" (defines the label set) and "validation".
        tokenizer: a tokenizer with a pad token (batches are padded by `DataCollatorWithPadding`).
        max_length: texts are truncated to this many tokens.
    Returns:
        (DatasetDict with "input_ids", "attention_mask", "labels"; list of label names, index = label id)
    """
    import datasets

    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token, which classification batches need: pass --pad-token TOKEN (a token of "
            "the vocabulary such as its eos token, or a new one that is added)"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    train = dataset["train"]
    for name, split in dataset.items():
        _check_text_column(split, text_column)
        if label_column not in split.column_names:
            raise ValueError(
                f"the {name} split has no column {label_column!r} (columns: {', '.join(split.column_names)}); name "
                "the label column with --label-column"
            )
    feature = train.features[label_column]
    label_ids = None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        names = sorted({label for label in train[label_column] if label is not None})
        label_ids = {label: index for index, label in enumerate(names)}
    elif str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
        values = train[label_column]
        if min(values) < 0:
            raise ValueError(f"label column {label_column!r} holds negative ints; labels must be 0..num_labels-1")
        names = [str(index) for index in range(max(values) + 1)]
    else:
        raise ValueError(f"label column {label_column!r} holds {feature}; labels must be ints, strings or ClassLabel")
    if len(names) < 2:
        raise ValueError(f"label column {label_column!r} has {len(names)} distinct label(s); classification needs >= 2")
    for name, split in dataset.items():
        if label_ids is not None:
            unknown = sorted({label for label in split[label_column]} - set(label_ids), key=str)
        else:
            unknown = sorted({label for label in split[label_column] if not 0 <= label < len(names)})
        if unknown:
            raise ValueError(
                f"the {name} split has labels the training split lacks: {unknown[:5]}; every label must occur in "
                "training"
            )
    num_proc = None if num_proc is None or num_proc < 2 else num_proc
    return datasets.DatasetDict({
        name: split.map(
            _TokenizeForClassification(tokenizer, text_column, label_column, max_length, label_ids), batched=True,
            num_proc=num_proc if len(split) >= 2 * (num_proc or 1) else None, remove_columns=split.column_names,
            desc=f"Tokenizing the {name} split",
        )
        for name, split in dataset.items()
    }), names
