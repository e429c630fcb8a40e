"""In-training reduction of CompreSSM Mamba-2 models: statistics from training batches, optimizer repair, Trainer."""

import pytest
import torch

from modeling_compressm import modeling_compressm_mamba2 as modeling2

if modeling2.MISSING_FROM_TRANSFORMERS:
    pytest.skip(f"this transformers release lacks the Mamba-2 5.x pieces ({modeling2.MISSING_FROM_TRANSFORMERS})", allow_module_level=True)

from transformers import Trainer, TrainingArguments  # noqa: E402

from modeling_compressm import CompreSSMMamba2ForCausalLM  # noqa: E402
from modeling_compressm.training.selective_ssm_training import SelectiveSSMReductionCallback, repair_optimizer  # noqa: E402
from test_mamba2 import GROUPS, STATE, VOCAB, _calibration, _stock_model  # noqa: E402 - tests/ helpers


def _trained_steps(model, optimizer, steps=2):
    model.train()
    for tokens in _calibration(batches=steps, seed=3):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_selection_slices_adam_moments_exactly_and_training_continues():
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _trained_steps(model, optimizer)
    name = "backbone.layers.0.mixer.in_proj.weight"
    old_parameters = dict(model.named_parameters())
    old_state = {key: value.clone() for key, value in optimizer.state[old_parameters[name]].items()}
    old_conv_state = optimizer.state[old_parameters["backbone.layers.0.mixer.conv1d.weight"]]["exp_avg"].clone()
    keep = [[0, 3, 4, 6], [1, 2, 5, 7]]
    results = model.reduce([4, None], keep=[keep, None])
    repair_optimizer(optimizer, old_parameters, model, results)

    inner = model.backbone.layers[0].mixer.intermediate_size
    b = [inner + g * STATE + i for g in range(GROUPS) for i in keep[g]]
    c = [inner + GROUPS * STATE + g * STATE + i for g in range(GROUPS) for i in keep[g]]
    conv = list(range(inner)) + b + c
    heads = list(range(inner + inner + 2 * GROUPS * STATE, inner + inner + 2 * GROUPS * STATE + 4))
    rows = list(range(inner)) + [inner + channel for channel in conv] + heads
    new = dict(model.named_parameters())
    state = optimizer.state[new[name]]
    assert torch.equal(state["exp_avg"], old_state["exp_avg"][rows])
    assert torch.equal(state["exp_avg_sq"], old_state["exp_avg_sq"][rows])
    assert float(state["step"]) == float(old_state["step"]) == 2
    assert torch.equal(optimizer.state[new["backbone.layers.0.mixer.conv1d.weight"]]["exp_avg"], old_conv_state[conv])
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()} and len(optimizer.state) == len(optimized)

    before = new[name].detach().clone()
    _trained_steps(model, optimizer, steps=1)
    assert not torch.equal(new[name], before)


def test_balanced_projection_joins_the_optimizer():
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "lr": 1e-2}])
    _trained_steps(model, optimizer)
    old_parameters = dict(model.named_parameters())
    results = model.reduce([5, None], calibration=_calibration())
    repair_optimizer(optimizer, old_parameters, model, results)
    projection = model.backbone.layers[0].mixer.state_projection_in
    assert any(p is projection for p in optimizer.param_groups[0]["params"])
    before = projection.detach().clone()
    _trained_steps(model, optimizer, steps=1)
    assert not torch.equal(projection, before)


def test_trainer_reduces_from_training_batch_statistics(tmp_path):
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, VOCAB, (16,), generator=generator) for _ in range(24)]
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    callback = SelectiveSSMReductionCallback(ranks=[4, 3], start_step=2, window_steps=2, method="balanced")
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    assert model.config.state_dims == [4, 3]
    assert [result.status for result in callback.results] == ["reduced", "reduced"]
    # statistics came from exactly the window's training batches: 2 steps x 4 sequences x 16 positions per layer
    assert [statistics.count for statistics in callback.collector.statistics] == [2 * 4 * 16] * 2
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
