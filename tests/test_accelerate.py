"""`CompreSSMReducer` inside an `accelerate` training loop, 2 processes on gloo/CPU (tests/accelerate_worker.py, one
launch for both): with accelerate's DDP and with accelerate's FSDP2 preparation (forced on CPU by a test-only hack,
see the worker). Both reduce through the package's reducer, train on with gradient accumulation, save with the
standard recipe (`unwrap_model(model).save_pretrained(dir, state_dict=accelerator.get_state_dict(model), ...)`),
reload at the reduced sizes and train again."""

from pathlib import Path

import pytest

from two_ranks import requires_gloo, run_two_ranks_for_report  # tests/ helper

WORKER = Path(__file__).with_name("accelerate_worker.py")

pytestmark = requires_gloo


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_two_ranks_for_report(WORKER, tmp_path_factory.mktemp("accelerate"), timeout=300)


def check_reduced_run(run):
    [(step, dims_before, dims_after)] = run["events"]  # one event, at optimizer step 3 (not at a micro-step)
    assert step == 3 and dims_before == [16, 15] and sum(dims_after) < sum(dims_before)
    assert run["dims_after_reduction"] == dims_after
    assert run["holds_exactly_model_params"] and run["hyper_kept"] and run["scheduler_attached"]
    assert run["changed_after_reduction"] > 1e-4  # it trained on after the reduction
    assert run["max_rank_diff"] == 0.0  # ... with gradients still averaged across the ranks
    assert len(run["losses"]) == 12 and all(loss == loss for loss in run["losses"])
    # saved with the standard recipe and reloaded at the reduced sizes with the history and the card's spectrum,
    # then prepared and trained again
    assert run["reloaded_dims"] == dims_after and run["reloaded_diff"] == 0.0 and run["reloaded_events"] == [3]
    assert run["card_has_spectrum"]
    assert len(run["reloaded_losses"]) == 4 and run["reloaded_rank_diff"] == 0.0


def test_accelerate_ddp_reduction(report):
    run = report["ddp"]
    assert run["types"] == ["DistributedDataParallel", "AcceleratedOptimizer", "AdamW", "AcceleratedScheduler",
                            "DDPStrategy"]
    assert not run["lru_parameters_replaced"]  # DDP: the same Parameter objects, new tensors inside
    check_reduced_run(run)


def test_accelerate_fsdp2_reduction(report):
    run = report["fsdp2"]
    # accelerate keeps FSDP off on CPU (MULTI_CPU); the worker forces its FSDP2 path (CPU-only test hack)
    assert run["distributed_type_on_cpu"] == "DistributedType.MULTI_CPU"
    assert run["is_fsdp2"]
    assert run["types"] == ["FSDPCompreSSMForSequenceClassification", "AcceleratedOptimizer", "AdamW",
                            "AcceleratedScheduler", "FSDP2Strategy"]
    assert {"", "model.layers.0", "model.layers.1"} <= set(run["fsdp_modules"])
    assert run["lru_parameters_replaced"]  # re-sharded: new Parameter objects, in the optimizer's groups
    check_reduced_run(run)


def test_ddp_and_fsdp2_train_the_same_model(report):
    # same seed, data and schedule: sharding must not change the decision or what is learned
    ddp, fsdp2 = report["ddp"], report["fsdp2"]
    assert ddp["events"] == fsdp2["events"]
    for step, (ddp_loss, fsdp_loss) in enumerate(zip(ddp["losses"] + ddp["reloaded_losses"],
                                                      fsdp2["losses"] + fsdp2["reloaded_losses"])):
        assert abs(ddp_loss - fsdp_loss) < 1e-5, step
