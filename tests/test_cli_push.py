"""`compressm train --push-to-hub` against an intercepted Hub (tests/fake_hub.py): a Hub that cannot be reached stops
the command before training (exit 2, one line), a failed upload at the end still prints the report and where the
model was saved (exit 1, one line, no traceback), and an upload sends compressm's files, not the user's."""

import os

from fake_hub import install_fake_hub
from modeling_compressm.app.cli import main
from modeling_compressm.app.publish import push_folder_to_hub

SHORT_RUN = ["train", "--max-steps", "2", "--no-progress", "--start-step", "1", "--end-step", "1", "--push-to-hub",
             "--hub-model-id", "someone/digits"]


def _unreachable(*args, **kwargs):
    raise ConnectionError("[Errno -3] Temporary failure in name resolution")


def test_an_unreachable_hub_stops_the_run_before_training(tmp_path, capsys, monkeypatch):
    import modeling_compressm.app.recipe as recipe

    hub = install_fake_hub(monkeypatch)
    monkeypatch.setattr(hub, "create_repo", _unreachable)

    def no_training(*args, **kwargs):
        raise AssertionError("training started although the Hub cannot be reached")

    monkeypatch.setattr(recipe, "run_training", no_training)
    assert main([*SHORT_RUN, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("compressm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "could not create the Hub repo 'someone/digits' before training (ConnectionError: [Errno -3]" in errors[0]
    assert os.listdir(tmp_path) == [] and hub.commits == []


def test_a_failed_upload_prints_the_report_and_where_the_model_is(tmp_path, capsys, monkeypatch):
    hub = install_fake_hub(monkeypatch)
    monkeypatch.setattr(hub, "create_commit", _unreachable)
    folder = tmp_path / "run"
    assert main([*SHORT_RUN, "--output-dir", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "test accuracy :" in captured.out and f"saved to      : {folder}" in captured.out
    assert "pushed to" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("compressm: error:")]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    assert f"the upload to the Hub repo 'someone/digits' failed (ConnectionError: [Errno -3]" in errors[0]
    assert f"the model is saved in {folder}: upload it later with" in errors[0]
    assert (folder / "config.json").is_file() and (folder / "train_summary.json").is_file()
    assert hub.repos == [("someone/digits", None)] * 2  # created before training, then again by the upload


def test_the_upload_sends_compressms_files_not_the_users(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    assert main(["train", "--max-steps", "2", "--no-progress", "--output-dir", str(folder)]) == 0
    (folder / "notes.txt").write_text("private")
    hub = install_fake_hub(monkeypatch)
    push_folder_to_hub(str(folder), "someone/digits")
    (commit,) = hub.commits
    assert "config.json" in commit["files"] and "train_summary.json" in commit["files"]
    assert "notes.txt" not in commit["files"] and ".compressm_files.json" not in commit["files"]
