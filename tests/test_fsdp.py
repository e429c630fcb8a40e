"""Reductions under FSDP2 (`fully_shard` on blocks and model), 2 processes on gloo/CPU: tests/fsdp_worker.py reduces
twice, trains on, checkpoints, resumes, compares with a single-process reference and injects two faults; this
test checks its report. One torchrun launch for all of it (process start-up dominates the cost)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

from modeling_compressm import CompreSSMConfig, CompreSSMForSequenceClassification
from modeling_compressm.fsdp import (
    DistributedReductionError,
    full_lru_parameters,
    is_fsdp2,
    replace_optimizer_parameters,
)

WORKER = Path(__file__).with_name("fsdp_worker.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


class _Wrapper:
    """Stands for accelerate's AcceleratedOptimizer: the torch optimizer is `.optimizer`."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_replace_optimizer_parameters_in_place():
    kept, same_shape, reshaped = (torch.nn.Parameter(torch.randn(shape)) for shape in ((3,), (4, 2), (5, 2)))
    optimizer = torch.optim.AdamW(
        [{"params": [kept, same_shape], "lr": 0.1}, {"params": [reshaped], "weight_decay": 0.5}]
    )
    for parameter in (kept, same_shape, reshaped):
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    groups, kept_state, moved_state = optimizer.param_groups, optimizer.state[kept], optimizer.state[same_shape]
    new_same, new_reshaped = torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(3, 2))
    replace_optimizer_parameters(_Wrapper(optimizer), {same_shape: new_same, reshaped: new_reshaped})
    assert optimizer.param_groups is groups
    assert [group["params"] for group in optimizer.param_groups] == [[kept, new_same], [new_reshaped]]
    assert [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups] == [(0.1, 0.01), (1e-3, 0.5)]
    assert optimizer.state[kept] is kept_state and optimizer.state[new_same] is moved_state
    assert new_reshaped not in optimizer.state and same_shape not in optimizer.state and reshaped not in optimizer.state
    new_reshaped.grad = torch.ones_like(new_reshaped)
    optimizer.step()  # the reshaped parameter starts afresh
    assert optimizer.state[new_reshaped]["exp_avg"].shape == (3, 2)


def test_full_lru_parameters_needs_a_process_group():
    model = CompreSSMForSequenceClassification(
        CompreSSMConfig(input_dim=1, hidden_size=8, num_hidden_layers=1, state_dims=4, num_labels=2)
    )
    assert not is_fsdp2(model)
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(DistributedReductionError, match="initialised torch.distributed process group"):
        with full_lru_parameters(model):
            pass


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp")
    report_path = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "out"), str(report_path)]
    # the timeout is a hang guard only
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=str(WORKER.parent.parent)
    )
    assert completed.returncode == 0 and report_path.exists(), completed.stdout[-4000:] + completed.stderr[-6000:]
    return json.loads(report_path.read_text())


def test_reduction_reshards_and_matches_plain_reduce(report):
    assert report["world_size"] == 2 and report["is_fsdp2"]
    first = report["reduction1"]
    assert first["changed_layers"] == [0, 1]
    assert first["state_dims"] == first["config_dims"] == [9, 7]
    assert first["replaced"] == 14  # 7 SSM parameters per layer; D keeps its sharded parameter
    assert first["shapes"]["model.layers.0.lru.B_re"] == [9, 16]
    assert first["shapes"]["model.layers.1.lru.C_im"] == [16, 7]
    assert first["shapes"]["model.layers.1.lru.D"] == [16]
    # rank 0 reduced alone; what every rank holds afterwards is bit-identical to model.reduce on a plain model
    assert first["diff_vs_plain_reduce"] == 0.0
    second = report["reduction2"]
    assert second["changed_layers"] == [0] and second["state_dims"] == [6, 7]


def test_optimizer_is_repaired_in_place(report):
    first = report["reduction1"]
    assert first["holds_exactly_model_params"] and report["reduction2"]["holds_exactly_model_params"]
    assert first["old_params_gone"]
    assert first["hyper_kept"]  # both param groups, their lr / weight decay and sizes
    assert first["reduced_state_dropped"]
    assert first["unreduced_state_kept"] and first["unreduced_same_objects"]
    assert first["scheduler_attached"]


def test_training_matches_single_process_reference(report):
    # FSDP averages the two ranks' gradients: the same run as one process on both batches at once
    per_rank = report["losses_per_rank"]
    assert len(per_rank[0]) == 9
    for step, (loss0, loss1) in enumerate(zip(*per_rank)):
        assert abs((loss0 + loss1) / 2 - report["reference_losses"][step]) < 1e-5, step
    assert report["reference_dims"] == [6, 7]
    assert report["reference_vs_fsdp_logits"] < 1e-5
    assert report["max_rank_diff"] == 0.0


def test_checkpoint_loads_into_reduced_config_and_resumes(report):
    assert report["resume"]["state_dims"] == [6, 7]
    assert report["plain_load_missing"] == []
    assert report["plain_vs_fsdp_logits"] == 0.0
    # a fresh FSDP2 model of the reduced config, resumed from the full state dicts, trains exactly like the original
    assert report["resume"]["diff_resumed_vs_continued"] <= 1e-7


def test_failure_on_one_rank_restores_every_rank(report):
    fault = report["fault_raise"]
    assert fault["errors"][1] == "ValueError: injected failure on rank 1"
    assert fault["errors"][0].startswith("DistributedReductionError: rank(s) [1] failed during the reduction")
    assert fault["unchanged"] and fault["holds_exactly_model_params"] and fault["trains_after"]


def test_missing_rank_times_out_with_clear_error(report):
    fault = report["fault_timeout"]
    assert fault["error"] is not None
    assert "did not complete on rank 0 within 2 s" in fault["error"]
    assert "every rank must run the reduction at the same step" in fault["error"]
    assert fault["seconds"] < 5.5  # the other rank only returns after 6 s: the error came from the timeout
    assert fault["dims"] == [6, 7]


@pytest.mark.parametrize("variant", ["root_only", "bf16_keep_unsharded"])
def test_other_sharding_layouts(report, variant):
    result = report["variants"][variant]
    assert result["changed_layers"] == [0, 1]
    # gathered from the fp32 shards even though forward all-gathers bf16; bit-identical to a plain reduction
    assert result["dtypes"] == ["torch.float32"]
    assert result["diff_vs_plain_reduce"] == 0.0
    assert result["losses_finite"] and result["holds_exactly_model_params"]
