"""Reductions under DistributedDataParallel: `torchrun --nproc_per_node 2` (gloo, CPU) runs tests/ddp_worker.py, which
reduces the model three times during Trainer training, resumes a second run from a checkpoint saved after two
reductions, and reduces a plain DDP loop with CompreSSMReducer. Every rank must hold the same sizes and identical
parameters (gradients are still averaged through the rebuilt DDP reducer), training must have continued, and the
resumed run must end where the uninterrupted one did."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_ddp_reduction_keeps_ranks_in_sync(tmp_path):
    report_path = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(tmp_path / "out"), str(report_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                               cwd=str(WORKER.parent.parent))
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-6000:]
    report = json.loads(report_path.read_text())

    assert report["world_size"] == 2
    assert report["wrapped_type"] == "DistributedDataParallel"
    assert [event["step"] for event in report["events"]] == [5, 10, 15]
    final_dims = report["events"][-1]["dims_after"]
    assert sum(final_dims) < 32
    assert report["dims_per_rank"] == [final_dims, final_dims]
    assert report["model_history_len"] == 3
    # identical parameters on both ranks after 15 more steps on different data, and they did change
    assert report["max_param_diff"] == 0.0
    assert report["changed_after_last"] > 1e-4
    assert [entry["step"] for entry in report["compressm_logs"]] == [5, 10, 15]
    assert len(report["losses"]) == 6 and all(loss == loss for loss in report["losses"])
    # checkpoint after two reductions, resumed by a fresh full-size model on both ranks
    assert report["checkpoint_dims"] == report["events"][1]["dims_after"]
    assert report["resumed_events"] == [5, 10, 15] and report["resumed_dims"] == final_dims
    assert report["resumed_max_param_diff_across_ranks"] == 0.0
    assert report["resumed_max_diff_to_full"] < 1e-5
    # plain PyTorch loop over DistributedDataParallel with CompreSSMReducer
    plain = report["plain"]
    assert plain["events"] == [3, 6] and sum(plain["dims"]) < 32
    assert plain["max_param_diff"] == 0.0
    assert all(loss == loss for loss in plain["losses"]) and plain["losses"][-1] < plain["losses"][0]
