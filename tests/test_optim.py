"""Optimizer parameter groups (modeling_compressm.training.optim): coverage, weight decay and learning rates per group, and an
optimizer that stays usable across reductions (alone and inside transformers.Trainer with CompreSSMCallback)."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from tasks import one_thread  # noqa: F401 (fixture)
from modeling_compressm import (
    CompreSSMCallback,
    CompreSSMConfig,
    CompreSSMForCausalLM,
    CompreSSMTrainer,
    reduce_with_optimizer,
)
from modeling_compressm.training.optim import (
    DEFAULT_SSM_LR_FACTOR,
    DEFAULT_SSM_PARAMETER_NAMES,
    compressm_adamw,
    compressm_parameter_groups,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_lm(state_dims=12, norm_type="rmsnorm", seed=0):
    torch.manual_seed(seed)
    config = CompreSSMConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, state_dims=state_dims,
                             norm_type=norm_type)
    return CompreSSMForCausalLM(config)


def names_by_group(model, groups):
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    return {group["name"]: [name_of[id(parameter)] for parameter in group["params"]] for group in groups}


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_groups_cover_every_trainable_parameter_exactly_once(norm_type):
    model = make_lm(norm_type=norm_type)
    groups = compressm_parameter_groups(model, weight_decay=0.1, ssm_lr_factor=0.5, learning_rate=1e-3)
    grouped = [id(parameter) for group in groups for parameter in group["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter twice (the tied embedding / LM head included)
    assert set(grouped) == {id(parameter) for parameter in model.parameters()}
    assert len(grouped) == len(list(model.parameters()))


def test_ssm_parameters_get_no_decay_and_the_factor_norms_and_biases_no_decay():
    model = make_lm()
    groups = {group["name"]: group for group in
              compressm_parameter_groups(model, weight_decay=0.1, ssm_lr_factor=0.25, learning_rate=2e-3)}
    names = names_by_group(model, groups.values())
    expected_ssm = {f"model.layers.{i}.lru.{name}" for i in range(2) for name in DEFAULT_SSM_PARAMETER_NAMES}
    assert set(names["ssm"]) == expected_ssm
    assert groups["ssm"]["weight_decay"] == 0.0
    assert groups["ssm"]["lr"] == pytest.approx(5e-4)
    # Norm weights (including the final norm, which transformers' name patterns miss) and biases: no decay.
    assert set(names["no_decay"]) == {
        "model.layers.0.norm.weight", "model.layers.1.norm.weight", "model.norm_f.weight",
        "model.layers.0.glu_proj.bias", "model.layers.1.glu_proj.bias",
    }
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr"] == pytest.approx(2e-3)
    # C and D are ordinary weights by default.
    assert {"model.layers.0.lru.C_re", "model.layers.0.lru.C_im", "model.layers.0.lru.D",
            "model.embeddings.weight", "model.layers.0.glu_proj.weight"} <= set(names["decay"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["lr"] == pytest.approx(2e-3)


def test_ssm_parameter_names_choose_the_group_and_frozen_parameters_are_left_out():
    model = make_lm()
    model.model.layers[1].glu_proj.weight.requires_grad_(False)
    groups = compressm_parameter_groups(model, 0.1, 0.5, learning_rate=1e-3,
                                        ssm_parameter_names=DEFAULT_SSM_PARAMETER_NAMES + ("C_re", "C_im"))
    names = names_by_group(model, groups)
    assert "model.layers.0.lru.C_re" in names["ssm"] and "model.layers.1.lru.C_im" in names["ssm"]
    assert not any("C_" in name for name in names["decay"])
    assert all("layers.1.glu_proj.weight" not in name for group in names.values() for name in group)


def test_bad_arguments_are_refused_with_the_reason():
    model = make_lm()
    with pytest.raises(ValueError, match="needs the base learning_rate"):
        compressm_parameter_groups(model, weight_decay=0.1, ssm_lr_factor=0.5)
    with pytest.raises(ValueError, match="unknown LRU parameter names"):
        compressm_parameter_groups(model, ssm_parameter_names=("nu_log", "A"))
    with pytest.raises(ValueError, match="ssm_lr_factor"):
        compressm_parameter_groups(model, ssm_lr_factor=0.0, learning_rate=1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        compressm_parameter_groups(model, weight_decay=-1.0)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        compressm_parameter_groups(model)


def test_weight_decay_does_not_move_the_ssm_parameters():
    model = make_lm()
    optimizer = compressm_adamw(model, learning_rate=0.1, weight_decay=0.5, ssm_lr_factor=0.5)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)  # no gradient signal: only decay can move a parameter
    optimizer.step()
    after = dict(model.named_parameters())
    for name in ("model.layers.0.lru.nu_log", "model.layers.0.lru.theta_log", "model.layers.1.lru.B_re",
                 "model.norm_f.weight", "model.layers.0.glu_proj.bias"):
        assert torch.equal(after[name], before[name]), name
    for name in ("model.layers.0.lru.C_re", "model.embeddings.weight"):
        torch.testing.assert_close(after[name], before[name] * (1 - 0.1 * 0.5))


def test_scheduler_keeps_the_ssm_factor():
    model = make_lm()
    optimizer = compressm_adamw(model, learning_rate=1e-2, weight_decay=0.1, ssm_lr_factor=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates["ssm"] == pytest.approx(0.2 * rates["decay"]) and rates["decay"] == pytest.approx(1e-2 / 4)


def test_optimizer_stays_valid_across_a_reduction():
    model = make_lm(state_dims=12)
    optimizer = compressm_adamw(model, learning_rate=1e-2, weight_decay=0.1, ssm_lr_factor=0.5)
    batch = torch.randint(0, 32, (4, 10))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    layer = model.lru_layers()[0]
    report = model.reduce([6, None])
    assert report[0].status == "reduced" and layer.B_re.shape == (6, 8)
    for parameter in layer.ssm_parameters():  # what CompreSSMCallback does for reduced layers
        optimizer.state.pop(parameter, None)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert any(parameter is layer.B_re for parameter in groups["ssm"]["params"])  # same object, new shape
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    assert optimizer.state[layer.B_re]["exp_avg"].shape == (6, 8)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_trainer_with_compressm_optimizer_and_callback_reduces_and_keeps_groups(tmp_path):
    model = make_lm(state_dims=16)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (64, 12), generator=generator)
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    optimizer = compressm_adamw(model, learning_rate=3e-3, weight_decay=0.1, ssm_lr_factor=0.5)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8, report_to="none",
                             disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0, logging_steps=4)
    callback = CompreSSMCallback(policy="fixed", fraction=0.5, start_step=4, end_step=4, interval=1)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None),
                      callbacks=[callback])
    trainer.train()
    assert model.config.state_dims == [8, 8]
    inner = trainer.optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        inner = inner.optimizer
    assert inner is optimizer
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates["ssm"] == pytest.approx(0.5 * rates["decay"])
    assert optimizer.state[model.lru_layers()[0].B_re]["exp_avg"].shape == (8, 8)


def _lm_dataset(rows=32, length=12):
    tokens = torch.randint(0, 32, (rows, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in tokens]


def _trainer_args(tmp_path, **overrides):
    values = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=4e-3, weight_decay=0.1,
                  lr_scheduler_type="constant", report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True)
    return TrainingArguments(str(tmp_path / "run"), **{**values, **overrides})


def _settings_by_parameter(model, optimizer):
    """{parameter name: (weight_decay, lr)} over the optimizer's groups (each parameter in exactly one)."""
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    settings = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert name_of[id(parameter)] not in settings
            settings[name_of[id(parameter)]] = (group["weight_decay"], group["lr"])
    assert set(settings) == set(name_of.values())
    return settings


@pytest.mark.parametrize("factor", [0.25, None])
def test_compressm_trainer_default_optimizer_trains_ssm_parameters_without_decay_at_the_factor(tmp_path, factor):
    model = make_lm(state_dims=8)
    kwargs = {} if factor is None else {"ssm_lr_factor": factor}
    expected_factor = DEFAULT_SSM_LR_FACTOR if factor is None else factor
    trainer = CompreSSMTrainer(model=model, args=_trainer_args(tmp_path), train_dataset=_lm_dataset(), **kwargs)
    trainer.train()  # the scheduler must keep each group's own rate
    settings = _settings_by_parameter(model, trainer.optimizer)
    for name, (decay, rate) in settings.items():
        attribute = name.rsplit(".", 1)[-1]
        if attribute in DEFAULT_SSM_PARAMETER_NAMES:
            assert (decay, rate) == (0.0, pytest.approx(4e-3 * expected_factor)), name
        elif "norm" in name or name.endswith("bias"):
            assert (decay, rate) == (0.0, pytest.approx(4e-3)), name
        else:
            assert (decay, rate) == (0.1, pytest.approx(4e-3)), name
    assert settings["model.layers.1.lru.C_re"][0] == 0.1 and settings["model.layers.1.lru.nu_log"][0] == 0.0


def test_compressm_trainer_leaves_a_user_optimizer_and_opt_out_alone(tmp_path):
    model = make_lm(state_dims=8)
    mine = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.3)
    trainer = CompreSSMTrainer(model=model, args=_trainer_args(tmp_path), train_dataset=_lm_dataset(),
                               optimizers=(mine, None), ssm_lr_factor=0.5)
    assert trainer.create_optimizer() is mine
    assert len(mine.param_groups) == 1 and mine.param_groups[0]["weight_decay"] == 0.3
    assert mine.param_groups[0]["lr"] == 1e-3

    plain = CompreSSMTrainer(model=make_lm(state_dims=8), args=_trainer_args(tmp_path), ssm_lr_factor=None)
    settings = _settings_by_parameter(plain.model, plain.create_optimizer())
    assert settings["model.layers.0.lru.B_re"] == (0.1, 4e-3)  # the Trainer's own grouping decays B
    with pytest.raises(ValueError, match="ssm_lr_factor"):
        CompreSSMTrainer(model=make_lm(), args=_trainer_args(tmp_path), ssm_lr_factor=0)


def _adam_after_one_step(model):
    optimizer = compressm_adamw(model, learning_rate=1e-2, weight_decay=0.1)
    batch = torch.randint(0, 32, (4, 10), generator=torch.Generator().manual_seed(1))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer, batch


def test_project_carries_b_and_c_moments_through_the_change_of_basis():
    model = make_lm(state_dims=12)
    optimizer, _ = _adam_after_one_step(model)
    layer = model.lru_layers()[0]
    # Plant first moments equal to the parameters themselves: mapped like the parameters, they must come out equal
    # to the reduced parameters (B through project with the gains, C through lift).
    for name in ("B_re", "B_im", "C_re", "C_im"):
        optimizer.state[getattr(layer, name)]["exp_avg"] = getattr(layer, name).detach().clone()
    optimizer.state[layer.nu_log]["exp_avg"] = torch.full((12,), 0.25)
    optimizer.state[layer.B_re]["exp_avg_sq"] = torch.ones(12, 8)
    optimizer.state[layer.B_im]["exp_avg_sq"] = torch.ones(12, 8)
    step_before = optimizer.state[layer.B_re]["step"].clone()
    report = reduce_with_optimizer(model, [5, None], optimizer=optimizer, optimizer_state="project", system="complex")
    assert report[0].status == "reduced"
    state = optimizer.state
    for name in ("B_re", "B_im", "C_re", "C_im"):
        torch.testing.assert_close(state[getattr(layer, name)]["exp_avg"], getattr(layer, name).detach(),
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state[layer.nu_log]["exp_avg"], torch.full((5,), 0.25))  # participation average
    project = report[0].change.project
    gain_old = torch.exp(report[0].change.previous["gamma_log"].double())
    gain_new = torch.exp(layer.gamma_log.detach().double())
    b_map = project * (gain_old[None, :] / gain_new[:, None])
    expected_var = (b_map.real.square() + b_map.imag.square()).sum(dim=1, keepdim=True).expand(5, 8)
    torch.testing.assert_close(state[layer.B_re]["exp_avg_sq"].double(), expected_var, rtol=1e-5, atol=0)
    assert torch.equal(state[layer.B_re]["step"], step_before)
    # layer 1 was not reduced: its state is untouched (same shape, still there)
    assert state[model.lru_layers()[1].B_re]["exp_avg"].shape == (12, 8)


def test_project_state_trains_on_and_resets_layers_without_state():
    model = make_lm(state_dims=12)
    optimizer, batch = _adam_after_one_step(model)
    second = model.lru_layers()[1]
    for parameter in second.ssm_parameters():
        optimizer.state.pop(parameter)  # nothing to carry for this layer
    reduce_with_optimizer(model, [6, 6], optimizer=optimizer, optimizer_state="project")
    first = model.lru_layers()[0]
    assert optimizer.state[first.C_im]["exp_avg_sq"].shape == (8, 6)
    assert (optimizer.state[first.C_im]["exp_avg_sq"] >= 0).all()
    assert all(parameter not in optimizer.state for parameter in second.ssm_parameters())
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()  # no shape error, no stale-state error
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert optimizer.state[second.B_re]["exp_avg"].shape == (6, 8)
