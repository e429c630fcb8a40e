"""The default reduction recipe (settings.DEFAULTS, chosen by the LM study of issue 14): its schedule scales with
max_steps, so `CompreSSMCallback()` with no arguments reduces in a short plain-Trainer run, and the "global" policy
halves the total state over the scheduled events."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_compressm import CompreSSMCallback, CompreSSMConfig, CompreSSMForCausalLM, CompreSSMReducer
from modeling_compressm.training.rank_selection import global_ranks, select_ranks
from modeling_compressm.training.settings import DEFAULTS
from tasks import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(state_dims=16):
    torch.manual_seed(0)
    return CompreSSMForCausalLM(CompreSSMConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2,
                                                state_dims=state_dims))


@pytest.mark.parametrize("max_steps, expected", [(800, [20, 40, 60, 80]), (1000, [25, 50, 75, 100]),
                                                 (60, [1, 2, 3, 4, 5, 6]), (20, [1, 2])])
def test_default_schedule_scales_with_max_steps(max_steps, expected):
    assert DEFAULTS.schedule.steps(max_steps) == expected


def test_callback_with_no_arguments_reduces_in_a_short_plain_trainer_run(tmp_path):
    model = tiny_lm(state_dims=16)
    tokens = torch.randint(0, 32, (64, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    callback = CompreSSMCallback()
    args = TrainingArguments(str(tmp_path / "run"), max_steps=60, learning_rate=3e-3, report_to="none")
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()

    reductions = [event for event in callback.history if event.kind == "reduction"]
    assert reductions and all(event.step <= 6 for event in reductions)  # within the first 10% of the run
    assert model.config.state_dims == [layer.state_dim for layer in model.lru_layers()]
    assert sum(model.config.state_dims) < 32
    # "global" policy: half of the total state is left after the last scheduled event
    assert abs(sum(model.config.state_dims) - 16) <= 2


def test_global_policy_shrinks_the_total_geometrically_and_ranks_states_over_all_layers():
    generator = torch.Generator().manual_seed(0)
    concentrated = torch.cat([torch.ones(4), 1e-4 * torch.rand(60, generator=generator)])  # 4 states carry it all
    spread = torch.linspace(1.0, 0.5, 64, dtype=torch.float64)
    for gate, expected in ((1.0, [108, 91, 77, 65]), (0.95, [108, 91, 77, 68])):
        dims, totals = [64, 64], []
        for _ in range(4):
            hsv = [concentrated[: dims[0]], spread[: dims[1]]]
            dims = select_ranks(hsv, dims, policy="global", final_fraction=0.5, events=4, gate=gate)
            totals.append(sum(dims))
        # each event keeps 0.5 ** (1/4) = 0.84 of the total, about half after four; with the 5% gate the last
        # event leaves the spread layer alone (64 -> 61 is a cut under 5%)
        assert totals == expected
        assert dims[0] == 4  # the budget goes where the energy is: the concentrated layer keeps its 4 states
    assert global_ranks([spread, spread], 0.5, events=1) == [32, 32]
    with pytest.raises(ValueError, match="final_fraction"):
        global_ranks([spread], 1.0)
    with pytest.raises(ValueError, match="events"):
        global_ranks([spread], 0.5, events=0)
    with pytest.raises(ValueError, match="final_fraction"):
        CompreSSMCallback(final_fraction=0.0)


def test_reducer_spreads_the_global_shrink_over_the_events_of_its_run():
    model = tiny_lm(state_dims=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert DEFAULTS.policy == "global"
    assert CompreSSMReducer(model, optimizer, max_steps=800).scheduled_events() == 4
    reducer = CompreSSMReducer(model, optimizer, max_steps=40)  # events at steps 1, 2, 3, 4
    assert reducer.scheduled_events() == 4
    for step in range(1, 41):
        reducer.step(step)
    assert [event.step for event in reducer.history] == [1, 2, 3, 4]
    assert sum(model.config.state_dims) == 16


def test_policy_is_inferred_from_the_arguments_given():
    model = tiny_lm(state_dims=8)
    assert CompreSSMCallback().policy == "global"
    assert CompreSSMCallback(tau=0.05).policy == "tolerance"  # tau alone keeps meaning a tolerance
    assert CompreSSMReducer(model, None, fraction=0.3).policy == "fixed"
    assert CompreSSMCallback(policy="rollback", tau=0.05).policy == "rollback"
    with pytest.raises(ValueError, match="pass policy="):
        CompreSSMCallback(tau=0.05, fraction=0.3)
