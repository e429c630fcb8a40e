"""What the `compressm` commands do to an output folder that already exists: the files an earlier run wrote are
replaced, the user's own files (notes, evaluation results, subfolders) survive `train` and `reduce`, a user's file
the new output would overwrite stops the command before anything is written, and new folders get the mode
`save_pretrained` gives them. Runs are the shortest digits runs (a few steps, no timing)."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from without_package import BLOCK_PACKAGE
from modeling_compressm.app.cli import main
from modeling_compressm.app.output_folder import MANIFEST_FILE, compressm_files, write_output_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["--max-steps", "2", "--no-progress", "--start-step", "1", "--end-step", "1"]


def _train(folder, *extra) -> int:
    return main(["train", *SHORT_RUN, "--output-dir", str(folder), *extra])


def _add_user_files(folder) -> dict:
    """A note, an evaluation result in a subfolder and a link, as a user adds them after a run."""
    (folder / "notes.txt").write_text("lr 3e-3 looked best")
    (folder / "evals").mkdir()
    (folder / "evals" / "results.json").write_text('{"accuracy": 0.93}')
    os.symlink("notes.txt", folder / "notes-link")
    return {"notes.txt": "lr 3e-3 looked best", "evals/results.json": '{"accuracy": 0.93}'}


def _assert_user_files(folder, files: dict) -> None:
    for name, content in files.items():
        assert (folder / name).read_text() == content, name
    assert os.readlink(folder / "notes-link") == "notes.txt"


def test_train_again_into_an_earlier_output_keeps_the_users_files(tmp_path, capsys):
    folder = tmp_path / "run"
    assert _train(folder) == 0
    first_weights = (folder / "model.safetensors").read_bytes()
    user_files = _add_user_files(folder)
    assert _train(folder, "--seed", "1") == 0, capsys.readouterr().err
    _assert_user_files(folder, user_files)
    assert (folder / "model.safetensors").read_bytes() != first_weights  # the model itself is the new run's
    assert json.loads((folder / "train_summary.json").read_text())["seed"] == 1
    manifest = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert "notes.txt" not in manifest and "config.json" in manifest
    assert compressm_files(str(folder)) == set(manifest)
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging folder left


def test_a_users_file_that_the_output_would_replace_stops_train_before_training(tmp_path, capsys, monkeypatch):
    import modeling_compressm.app.recipe as recipe

    folder = tmp_path / "run"
    assert _train(folder) == 0
    (folder / "README.md").write_text("# my own card\n")  # edited by hand after the run
    (folder / "notes.txt").write_text("keep")
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def no_training(*args, **kwargs):
        raise AssertionError("training started although the output folder was refused")

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "run_training", no_training)
        assert _train(folder) == 2
    err = capsys.readouterr().err
    assert "holds README.md, which compressm did not write or which changed since it wrote them" in err
    assert "--overwrite-output-dir" in err
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert _train(folder, "--overwrite-output-dir") == 0
    assert "# my own card" not in (folder / "README.md").read_text()
    assert (folder / "notes.txt").read_text() == "keep"  # --overwrite-output-dir replaces only what clashes


def test_reduce_into_an_earlier_output_and_in_place_keeps_the_users_files(tmp_path, capsys):
    source, target = tmp_path / "run", tmp_path / "smaller"
    assert _train(source) == 0
    assert main(["reduce", str(source), "--tau", "0.3", "--output-dir", str(target)]) == 0
    user_files = _add_user_files(target)
    source_notes = source / "source-notes.txt"
    source_notes.write_text("about the source")
    assert main(["reduce", str(source), "--tau", "0.5", "--output-dir", str(target)]) == 0
    _assert_user_files(target, user_files)
    assert not (target / "source-notes.txt").exists()  # the source's own notes stay with the source
    assert main(["reduce", str(target), "--tau", "0.5"]) == 0  # in place
    _assert_user_files(target, user_files)
    assert main(["reduce", str(source), "--tau", "0.5"]) == 0
    assert source_notes.read_text() == "about the source"
    capsys.readouterr()
    (target / "config.json").write_text("{}")  # the user's own file under an output name
    assert main(["reduce", str(source), "--tau", "0.5", "--output-dir", str(target)]) == 2
    assert "holds config.json, which compressm did not write" in capsys.readouterr().err
    assert (target / "config.json").read_text() == "{}"


def test_write_output_folder_refuses_a_clash_found_while_writing_and_changes_nothing(tmp_path):
    target = tmp_path / "out"
    write_output_folder(str(target), lambda folder: (open(os.path.join(folder, "a.txt"), "w").close()))
    (target / "b.txt").write_text("mine")

    def write_b(folder):
        with open(os.path.join(folder, "b.txt"), "w") as handle:
            handle.write("ours")

    with pytest.raises(ValueError, match="holds b.txt, which compressm did not write"):
        write_output_folder(str(target), write_b)
    assert (target / "b.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["out"]
    write_output_folder(str(target), write_b, overwrite=True)
    assert (target / "b.txt").read_text() == "ours" and not (target / "a.txt").exists()


@pytest.mark.parametrize("model_type", ["compressm", "compressm_mamba2", "compressm_mamba"])
def test_a_model_folder_without_manifest_counts_its_remote_code_copies_as_compressms(model_type, tmp_path):
    """A folder `save_pretrained` wrote (no manifest): the copied remote-code modules of the bundle are compressm's,
    so writing it again replaces them; a user's file named like a module of the application is not."""
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in ("modeling_compressm.py", "modeling_compressm_mamba2.py", "cli.py", "notes.txt"):
        (folder / name).write_text("# " + name)
    assert compressm_files(str(folder)) == {"config.json", "modeling_compressm.py", "modeling_compressm_mamba2.py"}


def test_a_damaged_manifest_is_named(tmp_path, capsys):
    folder = tmp_path / "run"
    assert _train(folder) == 0
    (folder / MANIFEST_FILE).write_text("{not json")
    assert _train(folder) == 2
    assert f"the manifest '{folder / MANIFEST_FILE}' (which files compressm wrote there) is damaged" in (
        capsys.readouterr().err)


def test_new_output_folders_get_the_mode_save_pretrained_gives(tmp_path):
    from modeling_compressm import CompreSSMConfig, CompreSSMForSequenceClassification

    previous = os.umask(0o022)
    try:
        assert _train(tmp_path / "run") == 0
        model = CompreSSMForSequenceClassification(CompreSSMConfig(input_dim=1, num_labels=2, hidden_size=8,
                                                                   num_hidden_layers=1, state_dims=4))
        model.save_pretrained(tmp_path / "plain")
        os.umask(0o027)
        assert _train(tmp_path / "group") == 0
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "run").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "group").st_mode) == 0o750  # the umask is respected
    os.chmod(tmp_path / "run", 0o700)
    assert _train(tmp_path / "run") == 0
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700  # written again: keeps the user's mode


def test_without_matplotlib_a_one_line_hint_says_how_to_get_the_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib.figure")  # imported first, so that the modules are restored as they were
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
        patch.setitem(sys.modules, "matplotlib.figure", None)
        assert _train(tmp_path / "run") == 0
        hints = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
        assert hints == ["compressm: the model card has no Hankel-singular-value plot (hsv_spectrum.png): matplotlib "
                         "is not installed; `pip install matplotlib` and run the command again to get it"]
        assert not (tmp_path / "run" / "hsv_spectrum.png").exists()
        assert main(["reduce", str(tmp_path / "run"), "--tau", "0.5"]) == 0
        assert "`pip install matplotlib`" in capsys.readouterr().err
    assert _train(tmp_path / "run") == 0
    assert "matplotlib" not in capsys.readouterr().err and (tmp_path / "run" / "hsv_spectrum.png").is_file()


TOKENIZER_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    r"""
    import json

    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in ("modeling_compressm", "transformers_modules"))
    print(json.dumps({"ids": tokenizer("é")["input_ids"], "size": len(tokenizer), "loaded": loaded}))
    """
)


def test_the_cli_tokenizer_loads_as_the_docs_say_without_custom_code(tmp_path):
    """The tokenizer of a CLI output loads with no question and no custom code where this package is not importable,
    the way the docs tell (transformers 5's AutoTokenizer asks about the folder's config.json, which the docs say)."""
    folder = tmp_path / "lm"
    assert main(["train", "--preset", "tiny", "--max-steps", "1", "--batch-size", "4", "--block-size", "16",
                 "--no-progress", "--output-dir", str(folder)]) == 0
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())
    script = tmp_path / "load.py"
    script.write_text(TOKENIZER_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(REPO_ROOT), str(folder)], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trust_remote_code" not in result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"ids": [195, 169], "size": 258, "loaded": []}
    documented = "`PreTrainedTokenizerFast.from_pretrained(\"my-lm\")` loads it without"
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "train-your-data.md"):
        assert documented in " ".join(doc.read_text().split()), doc
