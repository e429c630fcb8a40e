"""CompreSSMCallback and CompreSSMTrainer resuming from checkpoints they did not write themselves (issue 20): a run
that adds compression to checkpoints saved without it (other optimizer parameter groups, no callback state), and a
plain Trainer's checkpoint left incomplete by an interrupted save (the HSV plot is drawn only into complete
checkpoints; resuming names the folder to delete or falls back to the newest complete one)."""

import json
import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback

from tasks import SignTask, one_thread, tiny_classifier, training_arguments  # noqa: F401 (fixture)
from modeling_compressm import CompreSSMCallback, CompreSSMTrainer, prepare_model_for_resume

pytestmark = pytest.mark.usefixtures("one_thread")
make_model = tiny_classifier


def make_args(tmp_path, name="run", **overrides):
    return training_arguments(tmp_path / name, **{"max_steps": 40, "logging_steps": 5, "lr_scheduler_type": "linear",
                                                  **overrides})


# ------------------------------------------------------------------- compression added to an existing run
def _checkpoint_without_compression(tmp_path):
    args = make_args(tmp_path, "plain", max_steps=6, save_strategy="steps", save_steps=3)
    Trainer(model=make_model(), args=args, train_dataset=SignTask(128)).train()
    return tmp_path / "plain" / "checkpoint-3"


def test_compressm_trainer_resumes_a_checkpoint_written_without_compression(tmp_path, caplog):
    """Issue 20.7: CompreSSMTrainer groups the SSM parameters apart, so the plain Trainer's optimizer state (two
    groups) raised "loaded state dict has a different number of parameter groups". The saved state is moved into
    the new groups (with a warning) and the schedule continues."""
    checkpoint = _checkpoint_without_compression(tmp_path)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    model = make_model()
    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            inner = optimizer.optimizer
            seen["state"] = {id(p): {k: v.clone() for k, v in inner.state[p].items()} for p in model.parameters()}
            seen["lrs"] = [group["lr"] for group in inner.param_groups]
            seen["base_lrs"] = list(lr_scheduler.base_lrs)

    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=4, end_step=4, interval=4)
    args = make_args(tmp_path, "compressed", max_steps=8, save_strategy="steps", save_steps=2)
    trainer = CompreSSMTrainer(model=model, args=args, train_dataset=SignTask(128), callbacks=[callback, Probe()])
    with caplog.at_level(logging.WARNING, logger="modeling_compressm"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert [event.step for event in callback.history] == [4] and model.config.state_dims == [12, 12]
    assert any("moved into the new groups" in record.getMessage() for record in caplog.records)
    # every parameter got its own saved state: the plain Trainer's order is decay parameters, then the others
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())  # resizing keeps the Parameter objects
    order = [p for n, p in named if n in decay] + [p for n, p in named if n not in decay]
    assert len(order) == len(saved["state"])
    for index, parameter in enumerate(order):
        assert float(seen["state"][id(parameter)]["step"]) == 3
        assert torch.equal(seen["state"][id(parameter)]["exp_avg"], saved["state"][index]["exp_avg"])
    # one base learning rate per new group, each at the linear schedule's value for step 3 of 8
    assert len(seen["base_lrs"]) == len(seen["lrs"]) == 3
    assert seen["lrs"] == pytest.approx([3e-3 * 5 / 8] * 3)


def test_plain_trainer_resumes_with_the_callback_added_and_saves_after_a_reduction(tmp_path, caplog):
    """Issue 20.7: a plain Trainer resumed from a checkpoint without the callback raised KeyError:
    'CompreSSMCallback' at the first save after a reduction (transformers saves only the callbacks the checkpoint
    listed)."""
    checkpoint = _checkpoint_without_compression(tmp_path)
    model = make_model()
    prepare_model_for_resume(model, str(checkpoint))
    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=4, end_step=4, interval=4)
    args = make_args(tmp_path, "compressed", max_steps=8, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=SignTask(128), callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="modeling_compressm"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert any("was written without compression" in record.getMessage() for record in caplog.records)
    assert [event.step for event in callback.history] == [4]
    state = json.loads((tmp_path / "compressed" / "checkpoint-8" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["CompreSSMCallback"]["attributes"]["reducer_state"]
    assert saved["state_dims"] == [12, 12] and [event["step"] for event in saved["history"]] == [4]


# ----------------------------------------------------------------- checkpoints a plain Trainer left incomplete
def test_hsv_plot_is_drawn_only_into_complete_checkpoints(tmp_path, monkeypatch):
    """Issue 20.9: the plot took 10-20x longer than the rest of a small checkpoint and was drawn inside the plain
    Trainer's save, before trainer_state.json: most kills left the newest checkpoint incomplete."""
    import modeling_compressm.model_card as model_card

    output = tmp_path / "run"
    incomplete_while_drawing = []
    render = model_card.render_hsv_plot

    def watched_render(hsv_per_layer):
        folders = list(output.glob("checkpoint-*"))
        incomplete_while_drawing.extend(f.name for f in folders if not (f / "trainer_state.json").exists())
        return render(hsv_per_layer)

    monkeypatch.setattr(model_card, "render_hsv_plot", watched_render)
    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=2, end_step=4, interval=2)
    args = make_args(tmp_path, "run", max_steps=6, save_strategy="steps", save_steps=2)
    Trainer(model=make_model(), args=args, train_dataset=SignTask(64), callbacks=[callback]).train()
    assert incomplete_while_drawing == []
    for step in (2, 4, 6):  # the plot still lands in every checkpoint, and its card shows it
        folder = output / f"checkpoint-{step}"
        assert (folder / "hsv_spectrum.png").stat().st_size > 0
        assert "![Hankel singular values per layer](hsv_spectrum.png)" in (folder / "README.md").read_text()


def _run_with_incomplete_newest_checkpoint(tmp_path):
    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=2, end_step=4, interval=2)
    args = make_args(tmp_path, "run", max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(model=make_model(), args=args, train_dataset=SignTask(64), callbacks=[callback]).train()
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").unlink()  # as a kill during the save leaves it
    return tmp_path / "run"


def test_resume_from_an_incomplete_checkpoint_names_the_folder_to_delete(tmp_path):
    """Issue 20.9: transformers' bare FileNotFoundError for trainer_state.json gave no hint."""
    from modeling_compressm.training.checkpoints import IncompleteCheckpointError, last_complete_checkpoint

    output = _run_with_incomplete_newest_checkpoint(tmp_path)
    expected = (r"cannot resume from .*checkpoint-4: it has no trainer_state\.json.*Delete that folder and resume "
                r"from .*checkpoint-2, the newest complete checkpoint")
    with pytest.raises(IncompleteCheckpointError, match=expected):
        prepare_model_for_resume(make_model(), output / "checkpoint-4")
    # a bound plain Trainer resuming with resume_from_checkpoint=True says the same
    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=2, end_step=4, interval=2)
    trainer = Trainer(model=make_model(), args=make_args(tmp_path, "run", max_steps=6), train_dataset=SignTask(64),
                      callbacks=[callback])
    callback.bind(trainer)
    with pytest.raises(IncompleteCheckpointError, match=expected):
        trainer.train(resume_from_checkpoint=True)
    assert last_complete_checkpoint(output) == str(output / "checkpoint-2")


def test_compressm_trainer_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    _run_with_incomplete_newest_checkpoint(tmp_path)
    model = make_model()
    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=2, end_step=4, interval=2)
    trainer = CompreSSMTrainer(model=model, args=make_args(tmp_path, "run", max_steps=6), train_dataset=SignTask(64),
                               callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="modeling_compressm"):
        trainer.train(resume_from_checkpoint=True)
    assert [event.step for event in callback.history] == [2, 4] and model.config.state_dims == [9, 9]
    assert any("skipped the incomplete checkpoint(s)" in r.getMessage() and "checkpoint-4" in r.getMessage()
               and "resuming from" in r.getMessage() for r in caplog.records)


def test_what_prepare_model_for_resume_keeps_for_the_callback_stays_outside_the_model(tmp_path):
    """The stop flag and pending check that prepare_model_for_resume reads are handed to the callback that trains
    this model, once; nothing of them is stored on the model, so a copy (or a pickle) does not carry them."""
    import copy

    from modeling_compressm.training.checkpoints import take_prepared_resume

    checkpoint = _checkpoint_without_compression(tmp_path)
    model = make_model()
    prepare_model_for_resume(model, str(checkpoint))
    assert not [key for key in vars(model) if "resume" in key]
    assert take_prepared_resume(copy.deepcopy(model)) is None
    assert take_prepared_resume(model).path == str(checkpoint)
    assert take_prepared_resume(model) is None  # taken once
