"""`compressm train` reads exactly the data it is given: `--data-files` (files and glob patterns, per split), never
files guessed from the current folder; a pattern that matches nothing, an empty file or a `--dataset-config` that
would be ignored stop the command with exit 2 and one line, before anything is written."""

import json
import os
import re

import datasets
import pytest

from modeling_compressm.app.cli import main
from modeling_compressm.app.data_files import builder_for_files, resolve_data_files

LINE = "the state space model keeps a small hidden state and the balanced truncation removes states.\n"
TINY_LM = ["--preset", "tiny", "--tokenizer", "bytes", "--block-size", "16", "--batch-size", "4", "--max-steps", "2",
           "--start-step", "1", "--end-step", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder holding what an earlier run leaves there: files with "train" in their name."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "train_summary.json").write_text('{"eval_loss": 1.0}\n')
    (folder / "train_tok.py").write_text("print('not training data')\n")
    (folder / "books").mkdir()
    for index in range(3):
        (folder / "books" / f"part{index}.txt").write_text("".join(f"{index}.{row}: {LINE}" for row in range(20)))
    (folder / "held-out.txt").write_text("".join(f"held {row}: {LINE}" for row in range(10)))
    monkeypatch.chdir(folder)
    return folder


def _run(workdir, *arguments) -> int:
    return main(["train", *arguments, *TINY_LM, "--cache-dir", str(workdir.parent / "cache"),
                 "--output-dir", str(workdir.parent / "out")])


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("compressm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_format_name_without_data_files_is_refused_instead_of_guessing(workdir, capsys):
    assert _run(workdir, "--dataset", "text") == 2
    error = _one_error(capsys.readouterr().err)
    assert "--dataset text names a file format, not the data: give the files with --data-files" in error
    assert not (workdir.parent / "out").exists()


def test_data_files_and_patterns_per_split_are_what_trains(workdir, capsys):
    assert _run(workdir, "--data-files", "books/*.txt", "validation=held-out.txt") == 0, capsys.readouterr().err
    summary = json.loads((workdir.parent / "out" / "train_summary.json").read_text())
    assert summary["data_files"] == ["books/*.txt", "validation=held-out.txt"]
    assert summary["dataset"] == "files: books/*.txt, validation=held-out.txt"
    assert summary["validation"] == "split 'validation'" and summary["dataset_config"] is None
    train_bytes = sum(len(path.read_bytes()) for path in (workdir / "books").iterdir())
    assert summary["train_examples"] == train_bytes // 16  # the three books, one byte per token, blocks of 16
    card = (workdir.parent / "out" / "README.md").read_text()
    assert "books/\\*.txt" in card or "books/*.txt" in card
    # the format named by --dataset: any extension
    os.rename(workdir / "held-out.txt", workdir / "held-out.log")
    assert _run(workdir, "--dataset", "text", "--data-files", "books/part0.txt", "validation=held-out.log") == 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--data-files", "novels/*.txt"], r"--data-files pattern 'novels/\*.txt' matches no file \(looked in .*work\)"),
        (["--data-files", "missing.txt"], r"data file 'missing.txt' \(from --data-files\) does not exist"),
        (["--data-files", "books"], r"--data-files 'books' is a folder; name its files, e.g. 'books/\*.txt'"),
        (["--data-files", "books/*.txt", "train_tok.py"], r"data file '.*train_tok.py' has an unsupported extension"),
        (["--data-files", "books/*.txt", "train_summary.json"], r"--data-files mixes formats \(.json, .txt\)"),
        (["--dataset", "books/part0.txt", "--data-files", "held-out.txt"],
         r"--dataset 'books/part0.txt' is a file and --data-files names files too"),
        (["--dataset", "books/part0.txt", "--dataset-config", "wikitext-2-raw-v1"],
         r"--dataset-config 'wikitext-2-raw-v1' names a configuration of a Hub dataset .* the local file "
         r"'books/part0.txt', which has none: drop --dataset-config"),
        (["--data-files", "books/*.txt", "--dataset-config", "x"], r"the data is local data files, which has none"),
        (["--dataset-config", "x"], r"--dataset-config names a configuration of a Hub dataset: give that dataset"),
    ],
)
def test_bad_data_files_exit_2_with_one_line_and_write_nothing(arguments, message, workdir, capsys):
    (workdir / "empty.txt").write_text("")
    assert _run(workdir, *arguments) == 2
    assert re.search(message, _one_error(capsys.readouterr().err))
    assert not (workdir.parent / "out").exists()


def test_resolve_data_files(workdir):
    (workdir / "empty.txt").write_text("")
    resolved = resolve_data_files(["books/part2.txt", "books/*.txt", "dev=held-out.txt"])
    assert resolved == {"train": [str(workdir / "books" / f"part{index}.txt") for index in (2, 0, 1)],
                        "dev": [str(workdir / "held-out.txt")]}
    assert resolve_data_files("books/part1.txt", default_split="main") == {"main": [str(workdir / "books/part1.txt")]}
    (workdir / "a=b.txt").write_text(LINE)  # an existing file whose name has "=" is a file, not SPLIT=PATTERN
    assert resolve_data_files(["a=b.txt"]) == {"train": [str(workdir / "a=b.txt")]}
    with pytest.raises(ValueError, match=r"data file '.*empty.txt' is empty"):
        resolve_data_files(["*.txt"])
    with pytest.raises(ValueError, match="--data-files names no file"):
        resolve_data_files([])
    assert builder_for_files({"train": ["a.tsv"]}) == ("csv", {"sep": "\t"})
    assert builder_for_files({"train": ["a.log"]}, "text") == ("text", {"keep_linebreaks": True})
