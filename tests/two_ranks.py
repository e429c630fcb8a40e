"""Launching a test worker on two CPU processes (`torchrun --nproc_per_node 2`, gloo), shared by the distributed tests.

    from two_ranks import requires_gloo, run_two_ranks, run_two_ranks_for_report
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

requires_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def worker_env() -> dict:
    """The environment of a worker process: one thread per process, unbuffered output, no GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_two_ranks(worker: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `worker` with `args` on two ranks from the repository root; the timeout only guards against a hang."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    return subprocess.run(command + [str(arg) for arg in args], env=worker_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=str(Path(worker).resolve().parent.parent))


def run_two_ranks_for_report(worker: Path, tmp_path: Path, timeout: int = 600) -> dict:
    """Run a worker called as `WORKER OUTPUT_DIR REPORT_JSON`; return its report (fails with the workers' output)."""
    report_path = tmp_path / "report.json"
    completed = run_two_ranks(worker, tmp_path / "out", report_path, timeout=timeout)
    assert completed.returncode == 0 and report_path.exists(), completed.stdout[-4000:] + completed.stderr[-6000:]
    return json.loads(report_path.read_text())
