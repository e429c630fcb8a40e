"""The reducibility regulariser: a differentiable Hankel nuclear norm (math) and its training-side glue."""

import pytest
import torch
from conftest import random_stable_system
from tasks import SignTask, one_thread, tiny_classifier, training_arguments  # noqa: F401 (fixture)

from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM
from modeling_compressm.training.callback import CompreSSMCallback
from modeling_compressm.hankel_penalty import hankel_nuclear_norm, reducibility_penalty
from modeling_compressm.training.reducer import CompreSSMReducer
from modeling_compressm.training.reducibility import ReducibilityRegularizer
from modeling_compressm.reduction import balance


@pytest.mark.parametrize("system", ["real", "complex"])
def test_hankel_nuclear_norm_is_the_hsv_sum_and_passes_gradcheck(system):
    lam, B, C = random_stable_system(3, 2, max_modulus=0.9, seed=0)
    torch.testing.assert_close(hankel_nuclear_norm(lam, B, C, system), balance(lam, B, C, system).hsv.sum(),
                               rtol=1e-8, atol=0)

    def from_real(lam_ri, B_ri, C_ri):
        return hankel_nuclear_norm(torch.view_as_complex(lam_ri), torch.view_as_complex(B_ri),
                                   torch.view_as_complex(C_ri), system)

    inputs = tuple(torch.view_as_real(t).clone().requires_grad_() for t in (lam, B, C))
    assert torch.autograd.gradcheck(from_real, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_penalty_is_the_sum_over_layers_of_the_mean_hsv_per_state():
    layers = [random_stable_system(4, 3, seed=1), random_stable_system(6, 3, seed=2)]
    expected = sum(balance(*layer).hsv.sum() / layer[0].shape[0] for layer in layers)
    torch.testing.assert_close(reducibility_penalty(layers), expected, rtol=1e-8, atol=0)


def _lm(state_dims=8, layers=2):
    torch.manual_seed(0)
    config = CompreSSMConfig(vocab_size=16, hidden_size=8, num_hidden_layers=layers, state_dims=state_dims)
    return CompreSSMForCausalLM(config)


def _hsv_sum(model):
    return float(sum(values.sum() for values in model.hankel_singular_values()))


def test_a_few_steps_on_the_penalty_lower_the_hsv_sum():
    model = _lm()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    reducer = CompreSSMReducer(model, optimizer, start_step=100, end_step=100, interval=100,
                               regularizer=ReducibilityRegularizer(weight=1.0, every=1))
    before = _hsv_sum(model)
    for step in range(1, 21):
        assert reducer.apply_regularizer(step) is not None  # every=1: evaluated at each step
        optimizer.step()
        optimizer.zero_grad()
    assert _hsv_sum(model) < 0.8 * before


def test_the_window_and_the_evaluation_interval_are_respected():
    model = _lm()
    layer = model.lru_layers()[0]
    regularizer = ReducibilityRegularizer(weight=0.1, every=3, start_step=2)
    reducer = CompreSSMReducer(model, None, policy="fixed", fraction=0.25, start_step=0, end_step=6, interval=3,
                               regularizer=regularizer)
    assert regularizer.window(6) == (2, 6)  # default end: the last scheduled reduction event
    evaluated, touched = [], []
    for step in range(1, 10):
        layer.nu_log.grad = None
        evaluated.append(reducer.apply_regularizer(step) is not None)
        touched.append(layer.nu_log.grad is not None)
    assert touched == [False, True, True, True, True, True, False, False, False]
    assert evaluated == [False, True, False, False, True, False, False, False, False]
    # the cached gradient is the penalty's, scaled by the weight
    layer.nu_log.grad = None
    fresh = ReducibilityRegularizer(weight=0.1, every=1, end_step=1)
    fresh.apply(model, 1, "real", None)
    penalty = reducibility_penalty([each.to_lti()[:3] for each in model.lru_layers()])
    expected = 0.1 * torch.autograd.grad(penalty, layer.nu_log)[0]
    torch.testing.assert_close(layer.nu_log.grad, expected.to(layer.nu_log.dtype))


def test_bad_settings_and_a_sharded_model_are_refused_clearly(monkeypatch):
    for settings, message in (({"weight": 0}, "weight must be a positive number"),
                              ({"every": 0}, "every must be an int >= 1"),
                              ({"start_step": 5, "end_step": 3}, "end_step must be None")):
        with pytest.raises(ValueError, match=message):
            ReducibilityRegularizer(**settings)
    with pytest.raises(TypeError, match="regularizer must be a ReducibilityRegularizer"):
        CompreSSMCallback(regularizer=0.02)

    class ShardedStrategy:
        shards_parameters = True

    monkeypatch.setattr("modeling_compressm.training.reducer.strategy_for", lambda *args: ShardedStrategy())
    with pytest.raises(ValueError, match="sharded"):
        CompreSSMReducer(_lm(), None, regularizer=ReducibilityRegularizer())


def test_a_plain_trainer_with_the_callback_applies_and_logs_the_penalty(tmp_path, one_thread):
    from transformers import Trainer

    def train(regularizer):
        model = tiny_classifier(state_dims=8)
        callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=20, end_step=20, interval=20,
                                     regularizer=regularizer)
        args = training_arguments(tmp_path, max_steps=12, logging_steps=4)
        trainer = Trainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback])
        trainer.train()
        return model, trainer.state.log_history, callback

    regularized, history, callback = train(ReducibilityRegularizer(weight=1.0, every=2))
    plain, _, _ = train(None)
    assert any("compressm/reducibility_penalty" in entry for entry in history)
    assert _hsv_sum(regularized) < 0.9 * _hsv_sum(plain)
    assert callback.state()["args"]["regularizer"] == {"weight": 1.0, "every": 2, "start_step": 1, "end_step": None}


def test_a_regularizer_without_a_window_says_so(caplog):
    with caplog.at_level("WARNING"):
        CompreSSMReducer(_lm(), None, max_steps=5, regularizer=ReducibilityRegularizer())
    assert "will not act" in caplog.text
