"""FSDP2 (`fully_shard` on blocks and model) driven by the package's `CompreSSMReducer`, 2 processes on gloo/CPU:
tests/fsdp_worker.py reduces three times while training, repairs the optimizer state ("reset", and a registered mode
that runs on gathered full tensors), checkpoints, resumes a fresh model through `reducer.load_state_dict`, saves
with `save_pretrained`, rolls back, compares everything with a single-process reference and injects faults; these
tests check its report. One torchrun launch for all of it (process start-up dominates the cost). The in-process
tests below need no process group."""

from pathlib import Path

import pytest
import torch
import torch.distributed

from modeling_compressm import (
    CompreSSMCallback,
    CompreSSMConfig,
    CompreSSMForSequenceClassification,
    CompreSSMReducer,
)
from modeling_compressm.training import distributed as distributed_module
from modeling_compressm.training import optimizer_state as optimizer_state_module
from modeling_compressm.training.callback import TRAINER_FSDP_MESSAGE
from modeling_compressm.training.fsdp import DistributedReductionError, full_lru_parameters, is_fsdp2
from modeling_compressm.training.optimizer_state import StaleOptimizerStateError, replace_parameters_in_optimizer

from tasks import SignTask, one_thread, training_arguments  # noqa: F401 - one_thread is a fixture
from two_ranks import requires_gloo, run_two_ranks_for_report

WORKER = Path(__file__).with_name("fsdp_worker.py")

pytestmark = requires_gloo


def small_model(state_dims=4, seed=0):
    torch.manual_seed(seed)
    return CompreSSMForSequenceClassification(
        CompreSSMConfig(input_dim=1, hidden_size=8, num_hidden_layers=2, state_dims=state_dims, num_labels=2)
    )


class _Wrapper:
    """Stands for accelerate's AcceleratedOptimizer: the torch optimizer is `.optimizer`."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_replace_parameters_in_optimizer_in_place():
    kept, same_shape, reshaped = (torch.nn.Parameter(torch.randn(shape)) for shape in ((3,), (4, 2), (5, 2)))
    optimizer = torch.optim.AdamW(
        [{"params": [kept, same_shape], "lr": 0.1}, {"params": [reshaped], "weight_decay": 0.5}]
    )
    for parameter in (kept, same_shape, reshaped):
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    groups, kept_state, moved_state = optimizer.param_groups, optimizer.state[kept], optimizer.state[same_shape]
    new_same, new_reshaped = torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(3, 2))
    assert replace_parameters_in_optimizer(_Wrapper(optimizer), {same_shape: new_same, reshaped: new_reshaped}) == 2
    assert optimizer.param_groups is groups
    assert [group["params"] for group in optimizer.param_groups] == [[kept, new_same], [new_reshaped]]
    assert [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups] == [(0.1, 0.01), (1e-3, 0.5)]
    assert optimizer.state[kept] is kept_state and optimizer.state[new_same] is moved_state
    assert new_reshaped not in optimizer.state and same_shape not in optimizer.state and reshaped not in optimizer.state
    new_reshaped.grad = torch.ones_like(new_reshaped)
    optimizer.step()  # the reshaped parameter starts afresh
    assert optimizer.state[new_reshaped]["exp_avg"].shape == (3, 2)


class ReplacingStrategy(distributed_module.ReductionStrategy):
    """Stands for FSDP2 in one process: after a change every SSM parameter is a new Parameter object."""

    def __init__(self, model, optimizer, timeout):
        pass

    def after_change(self, model):
        replaced = {}
        for layer in model.lru_layers():
            for name in layer.SSM_PARAMETER_NAMES:
                old = getattr(layer, name)
                replaced[old] = layer._parameters[name] = torch.nn.Parameter(old.detach().clone())
        return replaced


def test_reducer_follows_parameters_that_a_strategy_replaces(monkeypatch, one_thread):
    monkeypatch.setattr(distributed_module, "_STRATEGIES", [])
    distributed_module.register_strategy(lambda model: True, ReplacingStrategy)
    seen = []

    def record(optimizer, changes):  # a repair mode sees the model's current parameters with their old state
        for change in changes:
            layer = model.lru_layers()[change.layer]
            for name, parameter in change.parameters.items():
                seen.append((parameter is getattr(layer, name), tuple(optimizer.state[parameter]["exp_avg"].shape),
                             tuple(parameter.shape)))
                optimizer.state.pop(parameter)

    monkeypatch.setitem(optimizer_state_module.OPTIMIZER_STATE_REPAIRS, "record", record)
    model = small_model(state_dims=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, labels = torch.randn(4, 6, 1), torch.tensor([0, 1, 0, 1])
    model(inputs_embeds=inputs, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    old = [p for layer in model.lru_layers() for p in layer.ssm_parameters()]
    CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.5, optimizer_state="record").reduce_now(1)
    current = {id(p) for p in model.parameters()}
    assert not current & {id(p) for p in old}
    assert sorted(id(p) for group in optimizer.param_groups for p in group["params"]) == sorted(current)
    assert seen[0] == (True, (8,), (4,)) and seen[3] == (True, (8, 8), (4, 8)) and len(seen) == 14
    assert all(is_current for is_current, _, _ in seen)
    model(inputs_embeds=inputs, labels=labels).loss.backward()
    optimizer.step()  # trains the new parameters
    assert optimizer.state[model.lru_layers()[0].B_re]["exp_avg"].shape == (4, 8)

    # reduced without its optimizer: the left-out optimizer would train objects the model no longer uses
    other = small_model(state_dims=8)
    left_out = torch.optim.SGD(other.parameters(), lr=0.1)
    CompreSSMReducer(other, None, policy="fixed", fraction=0.5).reduce_now(1)
    with pytest.raises(StaleOptimizerStateError, match="replaced by a new Parameter object"):
        left_out.step()


def test_full_lru_parameters_needs_a_process_group():
    model = small_model()
    assert not is_fsdp2(model)
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(DistributedReductionError, match="initialised torch.distributed process group"):
        with full_lru_parameters(model):
            pass


def test_trainer_fsdp_is_refused_with_the_supported_path(tmp_path, one_thread):
    # The Trainer's FSDP cannot run in one process (transformers refuses it), so the arguments are set afterwards.
    from transformers import Trainer, TrainerControl, TrainerState

    model = small_model()
    callback = CompreSSMCallback()
    args = training_arguments(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=SignTask(8))
    args.fsdp = True
    with pytest.raises(NotImplementedError, match="CompreSSMReducer") as refused:
        callback.bind(trainer)
    assert str(refused.value) == TRAINER_FSDP_MESSAGE and "docs/fsdp.md" in TRAINER_FSDP_MESSAGE
    with pytest.raises(NotImplementedError, match="accelerate loop"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=None)


def test_card_spectrum_comes_from_the_state_dict_being_saved(tmp_path, one_thread):
    """save_pretrained(state_dict=...) draws the card from those tensors (under FSDP2 the parameters are shards)."""
    model = small_model(state_dims=6)
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state_dict["model.layers.0.lru.B_re"] *= 3.0
    state_dict["model.layers.0.lru.B_im"] *= 3.0
    saved = small_model(state_dims=6, seed=1)
    saved.load_state_dict(state_dict)
    expected = ", ".join(f"layer {i}: {values[0]:.3g} / {values[-1]:.3g}"
                         for i, values in enumerate(v.tolist() for v in saved.hankel_singular_values()))
    own = ", ".join(f"layer {i}: {values[0]:.3g} / {values[-1]:.3g}"
                    for i, values in enumerate(v.tolist() for v in model.hankel_singular_values()))
    assert expected != own
    model.save_pretrained(tmp_path, state_dict=state_dict)
    card = (tmp_path / "README.md").read_text()
    assert expected in card and own not in card
    with pytest.raises(ValueError, match="model.layers.0.lru.nu_log"):
        model.hankel_singular_values(state_dict={})


def test_fsdp1_is_refused_with_what_to_use():
    # FSDP1 needs an accelerator even to wrap a model: a stand-in with its type and its `.module`
    from torch.distributed.fsdp import FullyShardedDataParallel

    class FSDP1StandIn(FullyShardedDataParallel):
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self._fsdp_wrapped_module = module

    model = small_model()
    wrapped = FSDP1StandIn(model)
    with pytest.raises(NotImplementedError, match=r"FSDP1 .*fully_shard"):
        CompreSSMReducer(wrapped, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_two_ranks_for_report(WORKER, tmp_path_factory.mktemp("fsdp"), timeout=300)


def test_reducer_drives_fsdp2_with_one_decision_on_every_rank(report):
    assert report["world_size"] == 2 and report["is_fsdp2"] and report["strategy"] == "FSDP2Strategy"
    events = report["events"]
    assert [(kind, step) for kind, step, _, _ in events] == [("reduction", 3), ("reduction", 6), ("reduction", 9)]
    for (_, _, before, after), (_, _, next_before, _) in zip(events, events[1:]):
        assert after == next_before and sum(after) < sum(before)
    assert report["events_same_on_every_rank"]  # sizes, statuses, kept energy and HSVs of every event
    first = report["first"]
    assert first["config_dims"] == first["dims_after"] == events[0][3]
    n0, n1 = first["dims_after"]
    assert first["shapes"]["model.layers.0.lru.B_re"] == [n0, 16]
    assert first["shapes"]["model.layers.1.lru.C_im"] == [16, n1]
    assert first["shapes"]["model.layers.1.lru.D"] == [16]
    # rank 0 decided on the gathered full parameters: the same event on a plain model gives bit-identical weights
    assert first["plain_dims"] == first["dims_after"] and first["diff_vs_plain_reduce"] == 0.0


def test_optimizer_holds_the_resharded_parameters(report):
    first = report["first"]
    assert first["holds_exactly_model_params"] and report["holds_exactly_model_params_end"]
    assert first["old_params_gone"]  # FSDP2 re-shards reduced parameters into new Parameter objects ...
    assert first["hyper_kept"]  # ... which take the old ones' places: both param groups, their lr / weight decay
    assert first["reduced_state_dropped"]  # "reset"
    assert first["unreduced_state_kept"] and first["unreduced_same_objects"]
    assert first["scheduler_attached"]


def test_repair_mode_runs_on_gathered_full_state(report):
    # "carry_test" maps the old moments through the basis map (so it needs the full old moments and the new full
    # values); the sharded run keeps exactly the shards of what one process computes
    reference = report["reference"]
    assert len(reference["carried_params"]) == 14 and reference["carried_state_present"]
    assert reference["carried_state_relative_diff"] < 1e-4


def test_training_matches_single_process_reference(report):
    # FSDP averages the two ranks' gradients: the same run as one process on both batches at once
    reference = report["reference"]
    per_rank = report["losses_per_rank"]
    assert len(per_rank[0]) == 12
    for step, (loss0, loss1) in enumerate(zip(*per_rank)):
        assert abs((loss0 + loss1) / 2 - reference["losses"][step]) < 1e-5, step
    assert reference["events"] == report["events"]
    assert reference["vs_fsdp_logits"] < 1e-5
    assert report["max_rank_diff"] == 0.0


def test_checkpoint_resumes_through_the_reducer_state(report):
    resume = report["resume"]
    # a fresh model at the ORIGINAL sizes: reducer.load_state_dict re-sized (re-sharded) it to the checkpoint's
    assert resume["checkpoint_dims"] == report["events"][1][3] == resume["dims_after_load_state_dict"]
    assert resume["holds_exactly_model_params"]  # so set_optimizer_state_dict found every parameter
    # ... and it trains like the uninterrupted run, including the event after the checkpoint
    assert resume["same_history"] and resume["diff_resumed_vs_continued"] <= 1e-7 and resume["losses_finite"]
    # the full state dict loads strictly into a plain model of the reduced config
    assert report["plain_load_missing"] == [] and report["plain_vs_fsdp_logits"] == 0.0


def test_save_pretrained_of_a_sharded_model(report):
    saved = report["save_pretrained"]
    refusals = saved["refused_without_full_state_dict"]  # no state dict, or this rank's shards
    assert len(refusals) == 2 and all("pass the gathered full weights" in (text or "") for text in refusals)
    assert saved["dims"] == report["events"][-1][3] and saved["diff"] == 0.0
    assert saved["history_steps"] == [3, 6, 9]
    # saved as the model's own class, not FSDP2's FSDP<class>: loadable with remote code
    assert saved["architectures"] == ["CompreSSMForSequenceClassification"] and saved["card_class"]
    assert saved["card_parameter_count"]  # counted over the full (not the sharded) parameters
    assert "modeling_compressm.py" in saved["files"] and not any(name.startswith("_fsdp") for name in saved["files"])
    # the card's spectrum came from the gathered weights, without a collective on the main process
    assert saved["card_spectrum_matches_plain_model"] and saved["plot"]


def test_rollback_restores_exactly(report):
    rollback = report["rollback"]
    assert sum(rollback["reduced_dims"]) < 31 and rollback["dims"] == [16, 15]
    assert rollback["event"] and rollback["rollback_kind"] == "rollback" and rollback["stopped"]
    assert rollback["history"] == [["reduction", True], ["rollback", False]]
    assert rollback["weights_diff"] == 0.0 and rollback["moments_diff"] == 0.0
    assert rollback["holds_exactly_model_params"] and rollback["trains_after"]
    # a snapshot is per rank under FSDP2: rank 0's re-arms rank 0's check; rank 1 accepts the event and stops
    assert rollback["rank0_snapshot_armed_per_rank"] == [[True, False], [False, True]]


@pytest.mark.parametrize("variant", ["root_only", "bf16_keep_unsharded"])
def test_other_sharding_layouts(report, variant):
    result = report["variants"][variant]
    assert result["dims"] == result["plain_dims"] and sum(result["dims"]) < 31
    # gathered from the fp32 shards even though forward all-gathers bf16; bit-identical to a plain reduction
    assert result["dtypes"] == ["torch.float32"]
    assert result["diff_vs_plain_reduce"] == 0.0
    assert result["losses_finite"] and result["holds_exactly_model_params"]


def test_callback_refuses_an_fsdp2_model(report):
    assert report["callback_refusal"] == TRAINER_FSDP_MESSAGE


def test_failure_while_deciding_reaches_every_rank_at_once(report):
    fault = report["fault_decider"]
    assert fault["errors"][0] == "ValueError: injected failure on rank 0"
    # not a timeout (60 s): rank 0's failure was sent to rank 1
    assert fault["errors"][1].startswith("DistributedReductionError: CompreSSM reduction at step 20: rank 0 failed")
    assert "injected failure on rank 0" in fault["errors"][1]
    assert fault["unchanged"] and fault["history_unchanged"]
    assert fault["holds_exactly_model_params"] and fault["trains_after"]


def test_failure_on_another_rank_restores_every_rank(report):
    fault = report["fault_apply"]
    assert fault["errors"][1] == "ValueError: injected failure on rank 1"
    assert fault["errors"][0].startswith("DistributedReductionError: rank(s) [1] failed during the reduction")
    assert fault["unchanged"] and fault["history_unchanged"]
    assert fault["holds_exactly_model_params"] and fault["trains_after"]


def test_missing_rank_times_out_with_clear_error(report):
    fault = report["fault_timeout"]
    assert fault["error"] is not None
    assert "did not complete on rank 0 within 2 s" in fault["error"]
    assert "every rank must run the reduction at the same step" in fault["error"]
    assert fault["seconds"] < 5.5  # the other rank only returns after 6 s: the error came from the timeout
    assert fault["dims"] == report["events"][-1][3]
