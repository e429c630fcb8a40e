"""`CompreSSMCallback` shrinks CompreSSM Mamba-2 and Mamba (Mamba-1) models under a plain `transformers.Trainer`:
the settings' schedule and rank policy on data-driven HSVs from the training batches of the window before each event,
the optimizer repaired, the events recorded and logged, the checkpoint reloadable; settings that do not apply are
refused before the first step."""

import pytest
import torch

from modeling_compressm import modeling_compressm_mamba as modeling1
from modeling_compressm import modeling_compressm_mamba2 as modeling2

if modeling1.MISSING_FROM_TRANSFORMERS or modeling2.MISSING_FROM_TRANSFORMERS:
    pytest.skip("this transformers release lacks the Mamba / Mamba-2 5.x pieces", allow_module_level=True)

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from modeling_compressm import CompreSSMMamba2ForCausalLM, CompreSSMMambaForCausalLM  # noqa: E402
from modeling_compressm.training import CompreSSMCallback, ReductionSettings  # noqa: E402
from test_mamba import _stock_model as _stock_mamba1  # noqa: E402 - tests/ helpers
from test_mamba2 import VOCAB, _stock_model as _stock_mamba2  # noqa: E402

STEPS, BATCH, LENGTH = 12, 4, 16


class _SizesAfterEachStep(TrainerCallback):
    """Records config.state_dims after every optimizer step (runs after CompreSSMCallback: added later)."""

    def __init__(self):
        self.sizes = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.sizes[state.global_step] = list(model.config.state_dims)


def _dataset(rows=STEPS * BATCH, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": row, "labels": row} for row in torch.randint(3, VOCAB, (rows, LENGTH), generator=generator)]


def _trainer(model, callback, output_dir, steps=STEPS):
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
    )
    probe = _SizesAfterEachStep()
    trainer = Trainer(model=model, args=arguments, train_dataset=_dataset(), callbacks=[callback, probe])
    return trainer, probe


def _check_training_continued(trainer, model):
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    optimizer = trainer.optimizer
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    position = {id(p): index for index, p in enumerate(model.parameters())}
    for group in optimizer.param_groups:  # the order of an optimizer built for the reduced model (resume loads by it)
        assert [position[id(p)] for p in group["params"]] == sorted(position[id(p)] for p in group["params"])
    for parameter in model.parameters():
        for value in optimizer.state.get(parameter, {}).values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == parameter.shape


def test_mamba2_shrinks_at_the_scheduled_steps_under_a_plain_trainer_and_reloads(tmp_path):
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2())
    settings = ReductionSettings(policy="fixed", fraction=0.5, start_step=4, end_step=8, interval=4,
                                 statistics_steps=2)
    callback = CompreSSMCallback(settings=settings)
    trainer, probe = _trainer(model, callback, tmp_path)
    callback.bind(trainer)
    trainer.train()

    assert probe.sizes[3] == [8, 8] and probe.sizes[4] == [4, 4] and probe.sizes[7] == [4, 4]
    assert probe.sizes[8] == [2, 2] and probe.sizes[STEPS] == [2, 2]
    assert [mixer.ssm_state_size for mixer in model._mixers()] == [2, 2]
    assert [event.step for event in callback.history] == [4, 8]
    assert [event.dims_after for event in callback.history] == [[4, 4], [2, 2]]
    assert callback.history is callback.reducer.history
    assert [result.method for result in callback.reducer.results] == ["balanced", "balanced"]
    logged = [entry for entry in trainer.state.log_history if "compressm/total_state_dim" in entry]
    assert [(entry["step"], entry["compressm/total_state_dim"]) for entry in logged] == [(4, 8), (8, 4)]
    # statistics came from the window's 2 steps x 4 sequences x 16 positions of training batches
    assert [event.extra["statistics_positions"] for event in callback.history] == [[2 * BATCH * LENGTH] * 2] * 2
    assert callback.reducer.collector.statistics == []  # handed to the reduction, hooks removed
    assert not callback.reducer.collector.active
    _check_training_continued(trainer, model)

    model.save_pretrained(tmp_path / "saved")
    reloaded = CompreSSMMamba2ForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.state_dims == [2, 2]
    tokens = _dataset(rows=2)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits)


def test_mamba1_shrinks_by_selection_with_the_global_policy(tmp_path):
    model = CompreSSMMambaForCausalLM.from_mamba(_stock_mamba1())
    settings = ReductionSettings(policy="global", final_fraction=0.5, start_step=5, end_step=10, interval=5)
    callback = CompreSSMCallback(settings=settings)
    trainer, probe = _trainer(model, callback, tmp_path)
    trainer.train()

    assert probe.sizes[4] == [8, 8]
    assert sum(probe.sizes[5]) < 16 and sum(probe.sizes[10]) == 8 and probe.sizes[STEPS] == probe.sizes[10]
    assert [event.step for event in callback.history] == [5, 10]
    assert {result.method for result in callback.reducer.results if result.reduced} == {"select"}
    assert [mixer.ssm_state_size for mixer in model._mixers()] == probe.sizes[10]
    _check_training_continued(trainer, model)

    model.save_pretrained(tmp_path / "saved")
    reloaded = CompreSSMMambaForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.state_dims == probe.sizes[10]


@pytest.mark.parametrize(
    ("model_of", "fields", "named"),
    [
        (lambda: CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()), {"policy": "rollback"}, "policy"),
        (lambda: CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()), {"system": "real"}, "system"),
        (lambda: CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()),
         {"regularizer": {"weight": 0.1}}, "regularizer"),
        (lambda: CompreSSMMambaForCausalLM.from_mamba(_stock_mamba1()), {"selective_method": "balanced"}, "select"),
    ],
)
def test_settings_that_do_not_apply_are_refused_before_the_first_step(tmp_path, model_of, fields, named):
    model = model_of()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    callback = CompreSSMCallback(settings=ReductionSettings(start_step=2, end_step=4, interval=2).replace(**fields))
    trainer, probe = _trainer(model, callback, tmp_path)
    with pytest.raises(ValueError, match=named):
        trainer.train()
    assert probe.sizes == {} and trainer.state.global_step == 0
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_mamba2_tolerance_policy_keeps_the_smallest_size_with_enough_predicted_output_energy(tmp_path):
    tau = 0.3
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2())
    callback = CompreSSMCallback(settings=ReductionSettings(policy="tolerance", tau=tau, start_step=6, end_step=6,
                                                            interval=6, statistics_steps=3, gate=1.0))
    trainer, probe = _trainer(model, callback, tmp_path)
    trainer.train()

    (event,) = callback.history
    assert event.step == 6 and event.extra["statistics_positions"] == [3 * BATCH * LENGTH] * 2
    for layer, energies in enumerate(event.hsv):  # per layer Σ_g σ², descending
        energies = torch.tensor(energies, dtype=torch.float64)
        kept = event.dims_after[layer]
        share = torch.cumsum(energies, 0) / energies.sum()
        assert share[kept - 1] >= 1 - tau - 1e-12 and (kept == 1 or share[kept - 2] < 1 - tau)
    assert probe.sizes[5] == [8, 8] and probe.sizes[6] == event.dims_after and sum(event.dims_after) < 16
    _check_training_continued(trainer, model)


def test_an_event_whose_window_no_statistics_reach_stops_with_a_clear_error(tmp_path, monkeypatch):
    """Where the training forward skips the hooked modules (transformers' fused Mamba-1 CUDA path), the callback does
    not reduce from no data: it names the cause and leaves the sizes alone."""
    from modeling_compressm.training.selective_ssm_training import SelectiveSSMGramianCollector

    def start_without_hooks(self, model):  # active, but its hook sits on a module the model never runs
        self.statistics = [modeling1.MambaGramianStatistics() for _ in range(2)]
        self._handles = [torch.nn.Identity().register_forward_hook(lambda *args: None)]

    monkeypatch.setattr(SelectiveSSMGramianCollector, "start", start_without_hooks)
    model = CompreSSMMambaForCausalLM.from_mamba(_stock_mamba1())
    callback = CompreSSMCallback(settings=ReductionSettings(policy="fixed", start_step=3, end_step=3, interval=3))
    trainer, probe = _trainer(model, callback, tmp_path)
    with pytest.raises(RuntimeError, match=r"no Gramian statistics reached layers \[0, 1\] in the 1 step.*inner_fn"):
        trainer.train()
    assert model.config.state_dims == [8, 8] and callback.history == []


def test_a_run_resumes_from_a_checkpoint_written_after_a_balanced_reduction(tmp_path):
    """The checkpoint's model (loaded at its saved sizes) and optimizer state load into a resumed run, which goes on
    reducing at the remaining scheduled steps."""
    settings = ReductionSettings(policy="fixed", fraction=0.5, start_step=4, end_step=8, interval=4)
    arguments = dict(max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-3, report_to=[],
                     save_strategy="steps", save_steps=6, logging_steps=1, use_cpu=True, dataloader_num_workers=0)
    first = Trainer(model=CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()), train_dataset=_dataset(),
                    args=TrainingArguments(output_dir=str(tmp_path / "first"), **arguments),
                    callbacks=[CompreSSMCallback(settings=settings)])
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-6"

    model = CompreSSMMamba2ForCausalLM.from_pretrained(checkpoint)
    assert model.config.state_dims == [4, 4]
    callback = CompreSSMCallback(settings=settings)
    resumed = Trainer(model=model, train_dataset=_dataset(), callbacks=[callback],
                      args=TrainingArguments(output_dir=str(tmp_path / "resumed"), **arguments,
                                             restore_callback_states_from_checkpoint=True))
    # the saved state matches, position by position, the optimizer the resumed Trainer builds (checked here: a
    # mismatch would reach Adam's kernels with wrong shapes)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    built = [p for group in resumed.create_optimizer().param_groups for p in group["params"]]
    positions = [index for group in saved["param_groups"] for index in group["params"]]
    assert [tuple(saved["state"][index]["exp_avg"].shape) for index in positions] == [tuple(p.shape) for p in built]
    resumed.optimizer = None  # the Trainer builds it again in train()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert model.config.state_dims == [2, 2]
    callback = next(item for item in resumed.callback_handler.callbacks if isinstance(item, CompreSSMCallback))
    assert [event.step for event in callback.history] == [4, 8]  # the checkpoint's event, then the resumed run's
    assert [event.dims_after for event in callback.history] == [[4, 4], [2, 2]]


def test_compressm_trainer_resumes_a_mamba2_model_loaded_at_the_checkpoints_sizes_and_refuses_another(tmp_path):
    from modeling_compressm.training import CompreSSMTrainer

    settings = ReductionSettings(policy="fixed", fraction=0.5, start_step=4, end_step=8, interval=4)
    arguments = dict(max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-3, report_to=[],
                     save_strategy="steps", save_steps=6, logging_steps=1, use_cpu=True, dataloader_num_workers=0)

    def trainer_for(model, folder):
        return CompreSSMTrainer(model=model, train_dataset=_dataset(), callbacks=[CompreSSMCallback(settings=settings)],
                                args=TrainingArguments(output_dir=str(tmp_path / folder), **arguments))

    trainer_for(CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()), "first").train()
    checkpoint = str(tmp_path / "first" / "checkpoint-6")

    full_size = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2())
    with pytest.raises(ValueError, match=r"config.json: the checkpoint has state_dims \[4, 4\].*from_pretrained"):
        trainer_for(full_size, "refused").train(resume_from_checkpoint=checkpoint)
    assert full_size.config.state_dims == [8, 8]

    model = CompreSSMMamba2ForCausalLM.from_pretrained(checkpoint)
    trainer_for(model, "resumed").train(resume_from_checkpoint=checkpoint)
    assert model.config.state_dims == [2, 2]


def test_load_best_model_at_end_is_refused_for_mamba_models_before_the_first_step(tmp_path):
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2())
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=BATCH,
                                  report_to=[], eval_strategy="steps", eval_steps=2, save_strategy="steps",
                                  save_steps=2, load_best_model_at_end=True, use_cpu=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=_dataset(), eval_dataset=_dataset(rows=4),
                      callbacks=[CompreSSMCallback()])
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        trainer.train()
    assert trainer.state.global_step == 0
