"""CompreSSMCallback inside real (tiny, CPU) Trainer runs: shrinking, optimizer state, logging, checkpoints and
resume, rollback, failing layers, gradient accumulation with clipping and bf16."""

import json
import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState

import modeling_compressm.modeling_compressm as modeling
from tasks import SignTask, one_thread, tiny_classifier, training_arguments  # noqa: F401 (fixture)
from modeling_compressm import (
    CompreSSMCallback,
    CompreSSMTrainer,
    ReductionError,
    prepare_model_for_resume,
)


pytestmark = pytest.mark.usefixtures("one_thread")
make_model = tiny_classifier


def make_args(tmp_path, name="run", **overrides):
    return training_arguments(tmp_path / name, **{"max_steps": 40, "logging_steps": 5, "lr_scheduler_type": "linear",
                                                  **overrides})


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: those run before user callbacks, so it is registered first."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def losses(trainer):
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy": "greedy"}, "policy"),
        ({"tau": 1.0}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"fraction": 0.0}, "fraction"),
        ({"start_step": -1}, "start_step"),
        ({"end_step": 1.5}, "fraction of max_steps"),
        ({"end_step": "10"}, "end_step"),
        ({"start_step": 20, "end_step": 10}, "end_step"),
        ({"interval": 0}, "interval"),
        ({"gate": 1.2}, "gate"),
        ({"min_dim": 0}, "min_dim"),
        ({"total_budget": 0}, "total_budget"),
        ({"rollback_tolerance": -0.1}, "rollback_tolerance"),
        ({"greater_is_better": "yes"}, "greater_is_better"),
        ({"rollback_metric": ""}, "rollback_metric"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompreSSMCallback(**kwargs)


def test_schedule_and_metric_direction():
    callback = CompreSSMCallback(start_step=10, end_step=0.25, interval=5)
    assert callback.resolved_end_step(100) == 25
    steps = [step for step in range(0, 101) if callback.is_reduction_step(step, 100)]
    assert steps == [10, 15, 20, 25]
    assert [s for s in range(0, 30) if CompreSSMCallback(end_step=12, interval=4).is_reduction_step(s, 1000)] == [4, 8, 12]
    assert CompreSSMCallback(rollback_metric="loss").metric_name == "eval_loss"
    assert CompreSSMCallback(rollback_metric="eval_loss").lower_is_better
    assert not CompreSSMCallback(rollback_metric="accuracy").lower_is_better
    assert CompreSSMCallback(rollback_metric="accuracy", greater_is_better=False).lower_is_better


# ----------------------------------------------------------------------------------------------- main run
def test_training_shrinks_logs_and_keeps_learning(tmp_path):
    model = make_model()
    recorder = Recorder()
    callback = CompreSSMCallback(tau=0.05, start_step=10, end_step=30, interval=10)
    trainer = CompreSSMTrainer(
        model=model, args=make_args(tmp_path, max_steps=80), train_dataset=SignTask(512),
        callbacks=[recorder, callback],
    )
    trainer.train()

    events = callback.history
    assert [event["step"] for event in events] == [10, 20, 30]
    assert events[0]["dims_before"] == [16, 16]
    for before, after in zip(events, events[1:]):
        assert after["dims_before"] == before["dims_after"]
    for event in events:
        assert all(new < old for new, old in zip(event["dims_after"], event["dims_before"]))
        assert all(0.9 < value <= 1.0 for value in event["kept_energy"])
        assert [len(values) for values in event["hsv"]] == event["dims_before"]
    assert model.config.state_dims == events[-1]["dims_after"]
    assert [layer.state_dim for layer in model.lru_layers()] == model.config.state_dims
    assert model.reduction_history == events
    json.dumps([event.to_dict() for event in events])  # JSON-serialisable

    # Metrics went through Trainer.log: into log_history and to callbacks that run before ours (integrations).
    logged = {step: logs for step, logs in recorder.logs if "compressm/total_state_dim" in logs}
    assert sorted(logged) == [10, 20, 30]
    assert logged[30]["compressm/total_state_dim"] == sum(model.config.state_dims)
    assert logged[30]["compressm/state_dim_layer1"] == model.config.state_dims[1]
    assert logged[30]["compressm/reductions"] == 3
    assert logged[10]["compressm/kept_energy_layer0"] == pytest.approx(events[0]["kept_energy"][0])
    assert logged[10]["compressm/hinf_bound_rel_layer1"] == pytest.approx(events[0].hinf_bound_relative[1])
    assert all(0 < value for value in events[0].hinf_bound_relative)
    assert any("compressm/total_state_dim" in entry for entry in trainer.state.log_history)
    # ...without swallowing the Trainer's own loss logs at the reduction steps
    steps_with_loss = [step for step, _ in losses(trainer)]
    assert steps_with_loss == list(range(5, 81, 5))

    # Training keeps improving after the last reduction (step 30).
    values = dict(losses(trainer))
    early = (values[5] + values[10]) / 2
    after_last = [values[step] for step in range(35, 81, 5)]
    late = sum(after_last[-4:]) / 4
    assert late < early - 0.1, (early, late, values)
    model.eval()
    dataset = SignTask(256, seed=1)
    with torch.no_grad():
        predictions = model(inputs_embeds=dataset.inputs).logits.argmax(-1)
    assert (predictions == dataset.labels).float().mean() > 0.7


def test_optimizer_state_reset_only_for_reduced_parameters(tmp_path):
    model = make_model()
    seen = {}

    class Probe(TrainerCallback):  # runs right after CompreSSMCallback in the same on_step_end
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the torch AdamW
            if state.global_step in (10, 11):
                ssm = {id(p) for layer in model.lru_layers() for p in layer.ssm_parameters()}

                def copy(p):
                    return {key: value.clone() for key, value in inner.state.get(p, {}).items()}

                seen[state.global_step] = {
                    "ssm": [copy(p) for layer in model.lru_layers() for p in layer.ssm_parameters()],
                    "shapes": [tuple(p.shape) for layer in model.lru_layers() for p in layer.ssm_parameters()],
                    "other": [copy(p) for p in model.parameters() if id(p) not in ssm],
                }

    callback = CompreSSMCallback(tau=0.05, start_step=10, end_step=10, interval=10, gate=1.0)
    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=12), train_dataset=SignTask(256),
                      callbacks=[callback, Probe()])
    trainer.train()
    assert callback.history and all(status == "reduced" for status in callback.history[0]["status"])
    # right after the reduction: no state for the reduced SSM parameters, other parameters keep theirs
    assert all(state == {} for state in seen[10]["ssm"])
    assert seen[10]["other"] and all(float(state["step"]) == 10 for state in seen[10]["other"])
    # one step later: fresh Adam state of the new shapes
    for state, shape in zip(seen[11]["ssm"], seen[11]["shapes"]):
        assert float(state["step"]) == 1
        assert tuple(state["exp_avg"].shape) == shape
    assert all(float(state["step"]) == 11 for state in seen[11]["other"])
    # the learning-rate schedule continued (linear decay from 3e-3 to 0 over 12 steps)
    lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert lrs[-1] == pytest.approx(3e-3 * (12 - 9) / 12)


# --------------------------------------------------------------------------------------- checkpoint/resume
def _final_parameters(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(
    "trainer_cls", ["CompreSSMTrainer", "CompreSSMTrainer+restored_callback_state", "Trainer+prepare_model_for_resume"]
)
def test_checkpoint_after_reduction_and_exact_resume(tmp_path, trainer_cls):
    def run(output, resume=None):
        model = make_model()
        callback = CompreSSMCallback(tau=0.05, start_step=10, end_step=20, interval=10)
        restore = trainer_cls.endswith("restored_callback_state")
        args = make_args(tmp_path, output, max_steps=30, save_strategy="steps", save_steps=15,
                         restore_callback_states_from_checkpoint=restore)
        if trainer_cls.startswith("CompreSSMTrainer"):
            trainer = CompreSSMTrainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback])
        else:
            if resume is not None:
                prepare_model_for_resume(model, resume)
            trainer = Trainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        # with restore_callback_states_from_checkpoint the Trainer runs a new callback built from the saved state
        (running,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CompreSSMCallback)]
        assert (running is callback) == (not restore or resume is None)
        return model, running, trainer

    full_model, full_callback, _ = run("full")
    assert [event["step"] for event in full_callback.history] == [10, 20]
    checkpoint = tmp_path / "full" / "checkpoint-15"
    with open(checkpoint / "config.json") as handle:
        saved_dims = json.load(handle)["state_dims"]
    assert saved_dims == full_callback.history[0]["dims_after"] and sum(saved_dims) < 32
    with open(checkpoint / "compressm_history.json") as handle:
        saved_history = json.load(handle)
    assert saved_history["state_dims"] == saved_dims and len(saved_history["events"]) == 1
    with open(checkpoint / "trainer_state.json") as handle:
        assert "CompreSSMCallback" in json.load(handle)["stateful_callbacks"]

    # A fresh full-size model resumes from the reduced checkpoint: weights and optimizer state load, the pending
    # reduction at step 20 still happens, and the result matches the uninterrupted run.
    resumed_model, resumed_callback, trainer = run("resumed", resume=str(checkpoint))
    assert [event["step"] for event in resumed_callback.history] == [10, 20]
    assert resumed_model.reduction_history == resumed_callback.history
    assert resumed_model.config.state_dims == full_model.config.state_dims
    inner = trainer.optimizer.optimizer
    assert all(float(inner.state[p]["step"]) == 30 for p in resumed_model.model.layers[0].glu_proj.parameters())
    expected = _final_parameters(full_model)
    for name, tensor in _final_parameters(resumed_model).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_plain_trainer_resume_without_preparation_fails_clearly(tmp_path):
    model = make_model()
    callback = CompreSSMCallback(tau=0.05, start_step=5, end_step=5, interval=5)
    args = make_args(tmp_path, "a", max_steps=6, save_strategy="steps", save_steps=6)
    Trainer(model=model, args=args, train_dataset=SignTask(128), callbacks=[callback]).train()
    fresh = make_model()
    trainer = Trainer(model=fresh, args=make_args(tmp_path, "b", max_steps=8), train_dataset=SignTask(128),
                      callbacks=[CompreSSMCallback(tau=0.05, start_step=5, end_step=5, interval=5)])
    with pytest.raises(RuntimeError, match="size mismatch"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert prepare_model_for_resume(fresh, str(tmp_path / "a" / "checkpoint-6")) == model.config.state_dims
    assert fresh.reduction_history == model.reduction_history


# ------------------------------------------------------------------------------------------------- rollback
class StateSizeMetric:
    """compute_metrics returning the model's total state size: a metric a reduction is sure to change."""

    def __init__(self, model):
        self.model = model

    def __call__(self, prediction):
        return {"state_total": float(sum(self.model.config.state_dims))}


def _rollback_run(tmp_path, greater_is_better):
    model = make_model()
    snapshots = {}

    class Before(TrainerCallback):  # runs before CompreSSMCallback: sees the state the reduction starts from
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 10:
                inner = optimizer.optimizer
                snapshots["model"] = {k: v.clone() for k, v in model.state_dict().items()}
                snapshots["optimizer"] = [
                    {k: v.clone() for k, v in inner.state[p].items()} for p in model.parameters()
                ]

    class After(TrainerCallback):  # runs after CompreSSMCallback.on_evaluate
        def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 10:  # baseline evaluation before the reduction, then the one after it
                snapshots["evaluations_at_10"] = snapshots.get("evaluations_at_10", 0) + 1
                inner = optimizer.optimizer
                snapshots["after"] = {k: v.clone() for k, v in model.state_dict().items()}
                snapshots["after_optimizer"] = [
                    {k: v.clone() for k, v in inner.state.get(p, {}).items()} for p in model.parameters()
                ]

    callback = CompreSSMCallback(
        policy="rollback", tau=0.05, start_step=10, end_step=30, interval=10, rollback_metric="state_total",
        rollback_tolerance=0.0, greater_is_better=greater_is_better,
    )
    args = make_args(tmp_path, max_steps=30, eval_strategy="steps", eval_steps=10, per_device_eval_batch_size=64)
    trainer = CompreSSMTrainer(
        model=model, args=args, train_dataset=SignTask(256), eval_dataset=SignTask(64, seed=2),
        compute_metrics=StateSizeMetric(model), callbacks=[Before(), callback, After()],
    )
    trainer.train()
    return model, callback, snapshots


def test_rollback_restores_exactly_and_stops(tmp_path):
    # greater_is_better=True: the smaller state after the reduction is a "degradation" -> rolled back at step 10
    model, callback, snapshots = _rollback_run(tmp_path, greater_is_better=True)
    assert callback.stopped
    assert [event.kind for event in callback.history] == ["reduction", "rollback"]
    event, rollback = callback.history
    assert event["rolled_back"] and event["metric_before"] == 32.0 and event["metric_after"] < 32.0
    assert rollback["dims_after"] == [16, 16] and rollback["dims_before"] == event["dims_after"]
    assert model.config.state_dims == [16, 16]  # no reduction after the rollback
    assert model.reduction_history == callback.history
    assert snapshots["evaluations_at_10"] == 2
    for name, tensor in snapshots["model"].items():
        assert torch.equal(snapshots["after"][name], tensor), name
    for before, after in zip(snapshots["optimizer"], snapshots["after_optimizer"]):
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key])


def test_rollback_policy_keeps_an_improving_reduction(tmp_path):
    model, callback, _ = _rollback_run(tmp_path, greater_is_better=False)
    assert not callback.stopped
    reductions = [event for event in callback.history if event.kind != "rollback"]
    assert len(reductions) >= 2 and all(event.get("verified") for event in reductions[:-1])
    assert not any(event["rolled_back"] for event in reductions)
    assert sum(model.config.state_dims) < 32


def test_rollback_requires_evaluation(tmp_path):
    callback = CompreSSMCallback(policy="rollback", start_step=5, end_step=5, interval=5)
    trainer = Trainer(model=make_model(), args=make_args(tmp_path, max_steps=5), train_dataset=SignTask(64),
                      callbacks=[callback])
    with pytest.raises(ValueError, match="eval_strategy"):
        trainer.train()


def test_rollback_refuses_evaluations_too_sparse_to_check_every_event(tmp_path):
    """Issue 20.6: events at 10/20/30 with eval_steps=35: the event at 10 would wait for its check until step 35 and
    the ones at 20 and 30 would be skipped without a word. Refused before step 1, naming the events and the fix."""
    model = make_model()
    callback = CompreSSMCallback(policy="rollback", tau=0.05, start_step=10, end_step=30, interval=10,
                                 rollback_metric="state_total")
    args = make_args(tmp_path, max_steps=40, eval_strategy="steps", eval_steps=35, per_device_eval_batch_size=64)
    trainer = CompreSSMTrainer(model=model, args=args, train_dataset=SignTask(256), eval_dataset=SignTask(64, seed=2),
                               compute_metrics=StateSizeMetric(model), callbacks=[callback])
    with pytest.raises(ValueError, match=r"events at steps 20, 30 would be skipped.*eval_steps to at most .*10 steps"):
        trainer.train()
    assert trainer.state.global_step == 0 and model.reduction_history == []


# ------------------------------------------------------------------------------------------- failure paths
def test_failing_layer_is_skipped_with_warning(tmp_path, monkeypatch, caplog):
    original = modeling.truncate

    def flaky(balancing, rank):
        if balancing.lam.shape[0] == 12:  # layer 1
            raise ReductionError("injected failure")
        return original(balancing, rank)

    monkeypatch.setattr(modeling, "truncate", flaky)
    model = make_model(state_dims=[16, 12])
    recorder = Recorder()
    callback = CompreSSMCallback(tau=0.05, start_step=5, end_step=5, interval=5, gate=1.0)
    trainer = CompreSSMTrainer(model=model, args=make_args(tmp_path, max_steps=10), train_dataset=SignTask(128),
                      callbacks=[recorder, callback])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    (event,) = callback.history
    assert event["status"] == ["reduced", "failed"]
    assert "injected failure" in event["errors"][1]
    assert model.config.state_dims[0] < 16 and model.config.state_dims[1] == 12
    assert any("injected failure" in record.getMessage() for record in caplog.records)
    (logs,) = [logs for _, logs in recorder.logs if "compressm/failed_layers" in logs]
    assert logs["compressm/failed_layers"] == 1
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses(trainer))


def test_gradient_accumulation_clipping_and_bf16(tmp_path):
    model = make_model()
    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=4, end_step=8, interval=4)
    micro_batches = []

    class Counter(TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            micro_batches.append(state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            micro_batches.append(("step", state.global_step, list(model.config.state_dims)))

    args = make_args(tmp_path, max_steps=12, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True,
                     per_device_train_batch_size=8, logging_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback, Counter()])
    trainer.train()
    assert [event["step"] for event in callback.history] == [4, 8]
    assert [event["dims_after"] for event in callback.history] == [[12, 12], [9, 9]]
    # reductions happen on optimizer-step boundaries: each on_step_end follows exactly one accumulation substep
    steps = [entry for entry in micro_batches if isinstance(entry, tuple)]
    assert len(steps) == 12 and len(micro_batches) == 24
    assert steps[3][2] == [12, 12] and steps[2][2] == [16, 16]
    grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert grad_norms and all(torch.isfinite(torch.tensor(value)) for value in grad_norms)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses(trainer))


def test_plain_trainer_says_when_the_callback_prints_nothing(tmp_path, caplog):
    """Issue 20.13: unbound in a plain Trainer (report_to="none"), the callback printed nothing and said nothing;
    bound, its metrics go through Trainer.log (the console printer and integrations) and there is no warning."""
    for bind in (False, True):
        caplog.clear()
        recorder = Recorder()
        callback = CompreSSMCallback(tau=0.05, start_step=2, end_step=2, interval=2)
        trainer = Trainer(model=make_model(), args=make_args(tmp_path, max_steps=3), train_dataset=SignTask(64),
                          callbacks=[recorder, callback])
        if bind:
            callback.bind(trainer)
        with caplog.at_level(logging.WARNING, logger="modeling_compressm"):
            trainer.train()
        warned = [r.getMessage() for r in caplog.records if "not bound to a Trainer" in r.getMessage()]
        printed = [logs for _, logs in recorder.logs if "compressm/total_state_dim" in logs]
        assert len(callback.history) == 1
        if bind:
            assert not warned and len(printed) == 1
        else:
            assert len(warned) == 1 and "not to the console" in warned[0] and "callback.bind(trainer)" in warned[0]
            assert not printed and any("compressm/total_state_dim" in entry for entry in trainer.state.log_history)


def test_unbound_callback_logs_to_state(tmp_path):
    """Outside a Trainer (no Trainer to find), metrics still land in state.log_history."""
    model = make_model()
    callback = CompreSSMCallback(tau=0.05, start_step=2, end_step=2, interval=2)
    args = make_args(tmp_path, max_steps=10)
    state = TrainerState(max_steps=10)
    control = TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    state.global_step = 1
    callback.on_step_end(args, state, control, model=model, optimizer=None)
    assert callback.history == [] and state.log_history == []
    state.global_step = 2
    callback.on_step_end(args, state, control, model=model, optimizer=None)
    assert len(callback.history) == 1 and model.reduction_history == callback.history
    assert state.log_history[-1]["step"] == 2
    assert state.log_history[-1]["compressm/total_state_dim"] == sum(model.config.state_dims) < 32
    saved = json.loads(json.dumps(callback.state()))  # goes into trainer_state.json: must survive JSON
    assert [event["step"] for event in saved["attributes"]["reducer_state"]["history"]] == [2]
    assert saved["attributes"]["reducer_state"]["state_dims"] == model.config.state_dims
    restored = CompreSSMCallback(**saved["args"])
    assert restored.state()["args"] == saved["args"]
    assert restored.rank_policy == callback.rank_policy and restored.schedule == callback.schedule


# --------------------------------------------------------------------------------------------- model card
class ScoreBestAt:
    """compute_metrics that makes the evaluation at `best_step` the best one."""

    def __init__(self, best_step):
        self.best_step, self.trainer = best_step, None

    def __call__(self, prediction):
        return {"score": -float(abs(self.trainer.state.global_step - self.best_step))}


def test_model_card_after_restoring_a_best_checkpoint_from_before_the_reductions(tmp_path):
    """Issue 20.10: the best checkpoint (step 2) predates the reductions at 4 and 8; the card of the saved model
    said "total state size: 32 (initially 18)" with its table going 9 -> 16 states."""
    model = make_model()
    score = ScoreBestAt(2)
    args = make_args(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = CompreSSMTrainer(
        model=model, args=args, train_dataset=SignTask(128), eval_dataset=SignTask(32, seed=1), compute_metrics=score,
        callbacks=[CompreSSMCallback(policy="fixed", fraction=0.25, start_step=4, end_step=8, interval=4)],
    )
    score.trainer = trainer
    trainer.train()
    assert model.config.state_dims == [16, 16] and [event.kind for event in model.reduction_history] == ["restored"]
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "total state size: 32 (initially 32)" in card
    assert "| 0 | 16 | 16 |" in card and "| 1 | 16 | 16 |" in card
    assert "reduced during training" not in card and "checkpoint from before any reduction" in card
    assert "restored from checkpoint-2 (the sizes the run had reached, dims before, were discarded)" in card


# --------------------------------------------------------------------------------- docs against the schedule
def _normalised(path):
    from pathlib import Path

    return " ".join((Path(__file__).resolve().parents[1] / path).read_text().split())


def test_documented_event_counts_match_the_schedules():
    """Issue 20.13: docs/train-your-data.md said the CLI's default schedule has 7 events; a 124-step run has 8."""
    import re

    from modeling_compressm.app.run_settings import ReductionPlan
    from modeling_compressm.training.schedule import ReductionSchedule
    from modeling_compressm.training.settings import DEFAULTS

    def cli_steps(max_steps):
        resolved = ReductionPlan().resolve(max_steps)
        return ReductionSchedule(resolved["start_step"], resolved["end_step"], resolved["interval"]).steps(max_steps)

    text = _normalised("docs/train-your-data.md")
    claim = re.search(r"schedules (\d+) events in runs of (\d+) steps or more; shorter runs get between (\d+) and "
                      r"(\d+) events \(a (\d+)-step run reduces (\d+) times, at steps (\d+), (\d+), \.\.\., (\d+)\)", text)
    assert claim, "the CLI schedule sentence of docs/train-your-data.md changed: update this test"
    usual, long_from, fewest, most, example, example_count, first, second, last = map(int, claim.groups())
    counts = {max_steps: len(cli_steps(max_steps)) for max_steps in range(1, 5001)}
    assert all(count == usual for max_steps, count in counts.items() if max_steps >= long_from)
    assert counts[long_from - 1] != usual
    shorter = [count for max_steps, count in counts.items() if max_steps < long_from]
    assert (min(shorter), max(shorter)) == (fewest, most)
    steps = cli_steps(example)
    assert (len(steps), steps[0], steps[1], steps[-1]) == (example_count, first, second, last)

    # docs/callback.md on the library's default schedule (fractions 0 / 0.1 / 0.025 of max_steps)
    text = _normalised("docs/callback.md")
    assert "4 events, at 2.5%, 5%, 7.5% and 10% of `max_steps`, when `max_steps` is a multiple of 40" in text
    library = {max_steps: DEFAULTS.schedule.steps(max_steps) for max_steps in range(1, 5001)}
    assert all(len(library[max_steps]) == 4 for max_steps in range(40, 5001, 40))
    claim = re.search(r"gives up to (\d+) events in short runs \(a (\d+)-step run reduces at steps 1 to (\d+)\)", text)
    assert claim and max(map(len, library.values())) == int(claim.group(1))
    assert library[int(claim.group(2))] == list(range(1, int(claim.group(3)) + 1))
    assert "Runs shorter than 10 steps have no event" in text and min(s for s in library if library[s]) == 10
