"""`ReductionSettings`: one value configures the reducer, the callback and the command line; one set of defaults; one
rounding rule for fractions of a run."""

import json

import pytest
import torch

from modeling_compressm import CompreSSMCallback, CompreSSMConfig, CompreSSMForCausalLM, CompreSSMReducer
from modeling_compressm.app.run_settings import ReductionPlan
from modeling_compressm.training.reducibility import ReducibilityRegularizer
from modeling_compressm.training.settings import DEFAULTS, ReductionSettings


def _lm():
    torch.manual_seed(0)
    return CompreSSMForCausalLM(CompreSSMConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, state_dims=12))


def test_the_reducer_and_the_callback_take_one_settings_value_and_the_shortcuts_build_the_same():
    settings = ReductionSettings(policy="fixed", fraction=0.5, start_step=2, end_step=8, interval=2, gate=1.0,
                                 regularizer=ReducibilityRegularizer(weight=0.5, every=2))
    model = _lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reducer = CompreSSMReducer(model, optimizer, settings=settings, max_steps=10)
    shortcut = CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.5, start_step=2, end_step=8, interval=2,
                                gate=1.0, regularizer=ReducibilityRegularizer(weight=0.5, every=2), max_steps=10)
    assert reducer.settings is settings and shortcut.settings == settings
    assert (reducer.policy, reducer.schedule.steps(10), reducer.regularizer.weight) == ("fixed", [2, 4, 6, 8], 0.5)
    callback = CompreSSMCallback(settings=settings)
    assert callback.settings is settings and callback.interval == 2 and callback.rank_policy == settings.rank_policy
    assert CompreSSMCallback(settings=settings.to_dict()).settings == settings
    with pytest.raises(TypeError, match="not both"):
        CompreSSMReducer(model, optimizer, settings=settings, tau=0.1)
    with pytest.raises(TypeError, match=r"unknown reduction setting\(s\) \['intervall'\]"):
        CompreSSMCallback(intervall=3)


def test_settings_are_checked_once_when_made_and_survive_a_checkpoint():
    with pytest.raises(ValueError, match=r"tau must be a number in \[0, 1\)"):
        ReductionSettings(tau=1.5)
    with pytest.raises(ValueError, match="collective_timeout"):
        ReductionSettings(collective_timeout=0)
    with pytest.raises(ValueError, match="interval"):
        DEFAULTS.replace(interval=0)
    settings = ReductionSettings.from_arguments(tau=0.05, interval=10, regularizer={"weight": 1.0, "every": 2})
    assert settings.policy == "tolerance"  # inferred from tau, as the keyword shortcuts always did
    saved = json.loads(json.dumps(settings.to_dict()))  # what a checkpoint's trainer_state.json holds
    assert ReductionSettings.from_dict(saved) == settings
    assert CompreSSMCallback(**saved).state()["args"] == saved
    with pytest.raises(AttributeError):
        settings.tau = 0.2  # frozen


def test_one_set_of_defaults_and_one_rounding_rule_for_fractions_of_a_run():
    assert CompreSSMCallback().settings == DEFAULTS == CompreSSMReducer(_lm()).settings
    assert DEFAULTS.schedule.resolve(1150) == (0, 115, 28)  # 0.025 * 1150 = 28.75 steps, rounded down
    # The command line resolves a fractional interval as the library does (it used round(): 29 here).
    assert ReductionPlan(start_step=0, end_step=0.1, interval=0.025).resolve(1150)["interval"] == 28
    settings = ReductionPlan(policy="global", final_fraction=0.5, start_step=0.0, end_step=0.1,
                             interval=0.025).settings(1150)
    assert (settings.policy, settings.final_fraction, settings.interval) == ("global", 0.5, 28)


def test_train_preset_accepts_every_policy_the_command_line_does():
    from modeling_compressm.app.recipe import train_preset

    summary = train_preset(policy="global", max_steps=4, show_progress=False)
    assert summary["policy"] == "global"
