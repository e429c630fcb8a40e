"""Own-data pieces without training: the byte-level tokenizer, loading every kind of `--dataset`, packing with the
datasets cache, classification tokenization, building a model for a tokenizer, and the one-line errors."""

import json
import logging
import os

import datasets
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modeling_compressm import (
    CompreSSMForCausalLM,
    CompreSSMForSequenceClassification,
    build_model_for_tokenizer,
    byte_level_tokenizer,
    load_text_dataset,
    load_tokenizer,
    pack_dataset,
    tokenize_for_classification,
)
from modeling_compressm.app import text_data
from modeling_compressm.app.tokenization import save_tokenizer

LINES = [f"line {index}: the state space model keeps a small state, ünïcode {index % 7}" for index in range(60)]
DOCUMENTS = [{"text": f"document {index} " + "words " * (index % 5 + 3), "label": ["neg", "pos"][index % 2]}
             for index in range(40)]


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _write(tmp_path, kind: str) -> str:
    """The same documents as a file (or folder) of type `kind`; returns the --dataset spec."""
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in DOCUMENTS), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(DOCUMENTS), encoding="utf-8")
    elif kind == "csv":
        datasets.Dataset.from_list(DOCUMENTS).to_csv(str(path), index=False)
    elif kind == "parquet":
        datasets.Dataset.from_list(DOCUMENTS).to_parquet(str(path))
    elif kind == "folder":
        path = tmp_path / "folder"
        path.mkdir()
        for part in range(2):
            (path / f"part{part}.jsonl").write_text(
                "".join(json.dumps(row) + "\n" for row in DOCUMENTS[part * 20:(part + 1) * 20]), encoding="utf-8")
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(DOCUMENTS).save_to_disk(str(path))  # load_dataset refuses it: load_from_disk
    return str(path)


def _file(folder, name: str, content: str) -> str:
    (folder / name).write_text(content, encoding="utf-8")
    return str(folder / name)


def test_byte_level_tokenizer_ids_are_bytes_and_it_reloads_with_auto_tokenizer(tmp_path):
    tokenizer = byte_level_tokenizer()
    text = "héllo\n\twörld ✓"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert len(tokenizer) == 258
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) == (256, 256, 257)
    assert tokenizer.decode(ids + [256], skip_special_tokens=True) == text
    assert isinstance(tokenizer, PreTrainedTokenizerFast)

    written = save_tokenizer(tokenizer, str(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(written)
    # a class name transformers 4 and 5 both know, so plain AutoTokenizer needs no custom code
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded(text)["input_ids"] == ids and len(reloaded) == 258
    assert reloaded.pad_token == "<pad>" and reloaded.eos_token == "<|endoftext|>"
    assert load_tokenizer("bytes")(text)["input_ids"] == ids


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "csv", "parquet", "folder", "save_to_disk"])
def test_every_dataset_kind_loads_and_packs(kind, tmp_path):
    spec = _write(tmp_path, kind)
    splits = load_text_dataset(spec, cache_dir=str(tmp_path / "cache"))
    rows = LINES if kind == "txt" else [row["text"] for row in DOCUMENTS]
    assert len(splits["train"]) + len(splits["validation"]) == len(rows)
    assert len(splits["validation"]) == round(0.1 * len(rows))
    tokenizer = byte_level_tokenizer()
    blocks = pack_dataset(splits, tokenizer, block_size=16)
    stream = [token for block in blocks["train"]["input_ids"] for token in block]
    if kind == "txt":  # lines keep their line breaks, no separator between them; the last rows are held out
        expected = "".join(line + "\n" for line in LINES[: len(splits["train"])]).encode("utf-8")
        assert bytes(stream) == expected[: len(stream)] and len(expected) - len(stream) < 16
    else:  # documents are separated by eos (256)
        documents = tokenizer.decode(stream).split("<|endoftext|>")
        assert documents[:-1] == list(splits["train"]["text"])[: len(documents) - 1]
        assert stream.count(256) >= len(splits["train"]) - 1
    assert all(len(block) == 16 for block in blocks["validation"]["input_ids"])
    assert blocks["train"]["labels"] == blocks["train"]["input_ids"]


def test_hub_dataset_id_loads_from_the_local_cache_while_offline(tmp_path, monkeypatch):
    """A Hub dataset loaded once before (here: its cache entry made with the json builder) loads offline by id."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    source = _write(tmp_path, "jsonl")
    cache = tmp_path / "cache"
    files = DataFilesDict.from_patterns({"train": [source], "validation": [source]}, base_path=str(tmp_path))
    builder = Json(cache_dir=str(cache), dataset_name="toy", data_files=files, hash="0", config_id="default")
    builder.download_and_prepare()
    os.rename(cache / "toy", cache / "someone___toy")  # how datasets stores the Hub dataset "someone/toy"
    splits = load_text_dataset("someone/toy", cache_dir=str(cache))
    assert len(splits["train"]) == len(splits["validation"]) == len(DOCUMENTS)  # its own validation split is used


def test_validation_choices(tmp_path):
    spec = _write(tmp_path, "jsonl")
    cache = str(tmp_path / "cache")
    fraction = load_text_dataset(spec, validation_fraction=0.25, cache_dir=cache)
    assert len(fraction["validation"]) == 10
    assert list(fraction["validation"]["text"]) == [row["text"] for row in DOCUMENTS[30:]]  # the last rows
    shuffled = load_text_dataset(spec, validation_fraction=0.25, shuffle_split=True, seed=1, cache_dir=cache)
    assert len(shuffled["validation"]) == 10
    assert list(shuffled["validation"]["text"]) != [row["text"] for row in DOCUMENTS[30:]]
    same_split = load_text_dataset(spec, eval_split="train", cache_dir=cache)
    assert len(same_split["validation"]) == len(same_split["train"]) == 40
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: train\); choose one with --eval-split"):
        load_text_dataset(spec, eval_split="test", cache_dir=cache)
    with pytest.raises(ValueError, match="no split 'dev'.*--split"):
        load_text_dataset(spec, split="dev", cache_dir=cache)


class _CallCounter:
    calls = 0


def test_packing_is_cached_so_a_second_run_does_not_tokenize(tmp_path, monkeypatch):
    spec = _write(tmp_path, "txt")
    cache = str(tmp_path / "cache")
    real_call = text_data._Tokenize.__call__

    def counting_call(self, batch):
        _CallCounter.calls += 1
        return real_call(self, batch)

    monkeypatch.setattr(text_data._Tokenize, "__call__", counting_call)
    _CallCounter.calls = 0
    first = pack_dataset(load_text_dataset(spec, cache_dir=cache), byte_level_tokenizer(), block_size=16)
    assert _CallCounter.calls == 2  # train and validation tokenized once each
    files = {name: [entry["filename"] for entry in split.cache_files] for name, split in first.items()}
    assert all(path.startswith(cache) for paths in files.values() for path in paths)
    modified = {path: os.path.getmtime(path) for paths in files.values() for path in paths}

    again = pack_dataset(load_text_dataset(spec, cache_dir=cache), byte_level_tokenizer(), block_size=16)  # new run
    assert _CallCounter.calls == 2  # read from the datasets cache
    assert {name: [entry["filename"] for entry in split.cache_files] for name, split in again.items()} == files
    assert {path: os.path.getmtime(path) for path in modified} == modified
    assert again["train"]["input_ids"] == first["train"]["input_ids"]

    other_blocks = pack_dataset(load_text_dataset(spec, cache_dir=cache), byte_level_tokenizer(), block_size=32)
    assert _CallCounter.calls == 2  # a new block size re-packs the cached tokens without tokenizing again
    assert len(other_blocks["train"][0]["input_ids"]) == 32

    other_tokenizer = byte_level_tokenizer()
    other_tokenizer.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    pack_dataset(load_text_dataset(spec, cache_dir=cache), other_tokenizer, block_size=16)
    assert _CallCounter.calls == 4  # another tokenizer is another cache entry

    in_two_processes = pack_dataset(load_text_dataset(spec, cache_dir=cache), byte_level_tokenizer(), block_size=16,
                                    num_proc=2, map_batch_size=20)
    in_one = pack_dataset(load_text_dataset(spec, cache_dir=cache), byte_level_tokenizer(), block_size=16,
                          map_batch_size=20)
    assert in_two_processes["train"]["input_ids"] == in_one["train"]["input_ids"]


def test_tokenizer_trained_with_the_tokenizers_library_packs(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = _write(tmp_path, "txt")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train([spec], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer.pad_token is None and 258 < len(tokenizer) <= 300
    blocks = pack_dataset(load_text_dataset(spec, cache_dir=str(tmp_path / "cache")), tokenizer, block_size=8)
    decoded = tokenizer.decode([token for block in blocks["train"]["input_ids"] for token in block])
    assert decoded.startswith(LINES[0] + "\n" + LINES[1])
    # fewer tokens than bytes: merges were learned
    assert 8 * len(blocks["train"]) < 0.7 * sum(len(line.encode()) + 1 for line in LINES)


def test_build_model_for_tokenizer_follows_the_vocabulary(caplog):
    tokenizer = byte_level_tokenizer()
    with caplog.at_level(logging.WARNING, logger="modeling_compressm"):
        model = build_model_for_tokenizer("tiny", tokenizer, seed=0)
    assert "vocab_size 64 of preset 'tiny' -> 258" in caplog.text
    assert isinstance(model, CompreSSMForCausalLM)
    assert model.get_input_embeddings().weight.shape == (258, 16) and model.lm_head.weight.shape == (258, 16)
    assert (model.config.eos_token_id, model.config.bos_token_id, model.config.pad_token_id) == (256, 256, 257)
    assert model.config.state_dims == [8, 8]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[0, 255, 256, 257]])).logits.shape == (1, 4, 258)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_compressm"):
        model = build_model_for_tokenizer("lm-small", tokenizer, state_dims=4, hidden_size=8, num_hidden_layers=1)
    assert model.config.vocab_size == 258 and model.config.state_dims == [4]

    tokenizer.pad_token = tokenizer.eos_token  # pad = eos: no padding_idx, or eos' embedding would never learn
    classifier = build_model_for_tokenizer(model.config, tokenizer, task="classification", labels=["neg", "pos"])
    assert isinstance(classifier, CompreSSMForSequenceClassification)
    assert classifier.config.pad_token_id is None and classifier.config.id2label == {0: "neg", 1: "pos"}
    assert classifier.config.state_dims == [4]
    with pytest.raises(ValueError, match="preset 'digits' takes continuous inputs.*tiny, lm-small or lm-base"):
        build_model_for_tokenizer("digits", tokenizer)
    with pytest.raises(ValueError, match="at least two labels"):
        build_model_for_tokenizer("tiny", tokenizer, task="classification", labels=["only"])


def test_tokenize_for_classification(tmp_path):
    splits = load_text_dataset(_write(tmp_path, "csv"), columns=("text", "label"), shuffle_split=True,
                               cache_dir=str(tmp_path / "cache"))
    tokenizer = byte_level_tokenizer()
    encoded, labels = tokenize_for_classification(splits, tokenizer, max_length=12)
    assert labels == ["neg", "pos"]
    first = encoded["train"][0]
    source = splits["train"][0]
    assert first["input_ids"] == list(source["text"].encode())[:12]
    assert first["labels"] == labels.index(source["label"]) and first["attention_mask"] == [1] * 12

    unseen = datasets.DatasetDict({"train": splits["train"].filter(lambda row: row["label"] == "neg"),
                                   "validation": splits["validation"]})
    unseen = datasets.DatasetDict({"train": datasets.concatenate_datasets([unseen["train"], unseen["train"].map(
        lambda row: {"label": "meh"})]), "validation": unseen["validation"]})
    with pytest.raises(ValueError, match=r"the validation split has labels the training split lacks: \['pos'\]"):
        tokenize_for_classification(unseen, tokenizer)
    no_pad = byte_level_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="tokenizer has no pad token.*--pad-token"):
        tokenize_for_classification(splits, no_pad)
    with pytest.raises(ValueError, match="no column 'stars'.*--label-column"):
        tokenize_for_classification(splits, tokenizer, label_column="stars")


@pytest.mark.parametrize(
    "make, call, message",
    [
        (lambda tmp: _write(tmp, "jsonl"),
         lambda spec, cache: load_text_dataset(spec, columns=("body",), cache_dir=cache),
         r"has no column 'body' in its training split \(columns: text, label\); name the right one with --text-column"),
        (lambda tmp: str(tmp / "missing.txt"), lambda spec, cache: load_text_dataset(spec, cache_dir=cache),
         r"dataset file or folder '.*missing.txt' does not exist"),
        (lambda tmp: _file(tmp, "data.xml", "<a/>"),
         lambda spec, cache: load_text_dataset(spec, cache_dir=cache), r"unsupported extension '.xml'; use one of"),
        (lambda tmp: _file(tmp, "empty.jsonl", ""),
         lambda spec, cache: load_text_dataset(spec, cache_dir=cache),
         r"dataset file '.*empty.jsonl' is empty; give a file with rows of text"),
        (lambda tmp: _file(tmp, "header.csv", "text,label\n"),
         lambda spec, cache: load_text_dataset(spec, cache_dir=cache),
         r"dataset file '.*header.csv' has no rows; give a file with rows of text"),
        (lambda tmp: _write(tmp, "txt"), lambda spec, cache: pack_dataset(
            load_text_dataset(spec, cache_dir=cache), byte_level_tokenizer(), block_size=100_000),
         r"the train split holds \d+ tokens, fewer than one block of 100000: lower --block-size"),
        (lambda tmp: _file(tmp, "stars.jsonl", '{"text": "ok", "stars": 3}\n' * 4),
         lambda spec, cache: pack_dataset(load_text_dataset(spec, cache_dir=cache), byte_level_tokenizer(), 2,
                                          text_column="stars"),
         r"column 'stars' holds .*not text; name the text column with --text-column"),
    ],
)
def test_bad_data_gives_one_line_errors(make, call, message, tmp_path):
    spec = make(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        call(spec, str(tmp_path / "cache"))
    assert "\n" not in str(error.value)


def test_hub_ids_while_offline_name_what_is_missing(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"dataset 'someone/not-cached' is not a local file or folder and is not in "
                                         r"the datasets cache, and the Hugging Face Hub cannot be reached"):
        load_text_dataset("someone/not-cached", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"tokenizer 'someone/not-cached' is not a local folder and could not be "
                                         r"loaded from the Hugging Face Hub or its local cache \(offline mode is on"):
        load_tokenizer("someone/not-cached")
    with pytest.raises(ValueError, match="tokenizer folder './nope' does not exist"):
        load_tokenizer("./nope")
