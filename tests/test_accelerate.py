"""A reduction inside an `accelerate` training loop, 2 processes on gloo/CPU (tests/accelerate_worker.py): with
accelerate's DDP (the DDP recipe: broadcast, optimizer-state reset inside `AcceleratedOptimizer`, DDP reducer
rebuilt) and with accelerate's FSDP2 preparation (`modeling_compressm.fsdp.full_lru_parameters`). Both train on with
gradient accumulation, save the HF way, reload at the reduced sizes and train again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

WORKER = Path(__file__).with_name("accelerate_worker.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def run_worker(mode, tmp_path):
    report_path = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), mode, str(tmp_path / "out"), str(report_path)]
    # the timeout is a hang guard only
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=str(WORKER.parent.parent)
    )
    assert completed.returncode == 0 and report_path.exists(), completed.stdout[-4000:] + completed.stderr[-6000:]
    return json.loads(report_path.read_text())


@pytest.fixture(scope="module")
def ddp_report(tmp_path_factory):
    return run_worker("ddp", tmp_path_factory.mktemp("accelerate_ddp"))


@pytest.fixture(scope="module")
def fsdp2_report(tmp_path_factory):
    return run_worker("fsdp2", tmp_path_factory.mktemp("accelerate_fsdp2"))


def check_reduced_run(report):
    assert report["dims_after_reduction"] == [10, 6]
    assert report["holds_exactly_model_params"] and report["hyper_kept"] and report["scheduler_attached"]
    assert report["changed_after_reduction"] > 1e-4  # it trained on after the reduction
    assert report["max_rank_diff"] == 0.0  # ... with gradients still averaged across the ranks
    assert len(report["losses"]) == 12 and all(loss == loss for loss in report["losses"])
    # saved the HF way and reloaded at the reduced sizes, then prepared and trained again
    assert report["reloaded_dims"] == [10, 6] and report["reloaded_diff"] == 0.0
    assert len(report["reloaded_losses"]) == 4 and report["reloaded_rank_diff"] == 0.0


def test_accelerate_ddp_reduction(ddp_report):
    assert ddp_report["types"] == ["DistributedDataParallel", "AcceleratedOptimizer", "AdamW", "AcceleratedScheduler"]
    assert ddp_report["ddp_rebuilt"]
    check_reduced_run(ddp_report)


def test_accelerate_fsdp2_reduction(fsdp2_report):
    # accelerate keeps FSDP off on CPU (MULTI_CPU); the worker forces its FSDP2 path (see accelerate_worker.py)
    assert fsdp2_report["distributed_type_on_cpu"] == "DistributedType.MULTI_CPU"
    assert fsdp2_report["is_fsdp2"]
    assert fsdp2_report["types"] == ["FSDPCompreSSMForSequenceClassification", "AcceleratedOptimizer", "AdamW",
                                     "AcceleratedScheduler"]
    assert {"", "model.layers.0", "model.layers.1"} <= set(fsdp2_report["fsdp_modules"])
    assert fsdp2_report["changed_layers"] == [0, 1]
    check_reduced_run(fsdp2_report)


def test_ddp_and_fsdp2_train_the_same_model(ddp_report, fsdp2_report):
    # same seed, data and reduction: sharding must not change what is learned
    for step, (ddp_loss, fsdp_loss) in enumerate(zip(ddp_report["losses"] + ddp_report["reloaded_losses"],
                                                      fsdp2_report["losses"] + fsdp2_report["reloaded_losses"])):
        assert abs(ddp_loss - fsdp_loss) < 1e-5, step
