"""Reductions under DistributedDataParallel: `torchrun --nproc_per_node 2` (gloo, CPU) runs tests/ddp_worker.py, which
reduces the model three times during Trainer training, resumes a second run from a checkpoint saved after two
reductions, and reduces a plain DDP loop with CompreSSMReducer. Every rank must hold the same sizes and identical
parameters (gradients are still averaged through the rebuilt DDP reducer), training must have continued, and the
resumed run must end where the uninterrupted one did. Also (issue 20): reduction collectives time out on their own
(shorter) default and name a stalled rank, and docs/fsdp.md's recipe for two CPU processes under accelerate launch."""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from two_ranks import requires_gloo, run_two_ranks, run_two_ranks_for_report  # tests/ helper

WORKER = Path(__file__).with_name("ddp_worker.py")


@requires_gloo
def test_ddp_reduction_keeps_ranks_in_sync(tmp_path):
    report = run_two_ranks_for_report(WORKER, tmp_path)

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


def test_ddp_keeps_its_reducer_when_every_truncation_of_an_event_fails(tmp_path, monkeypatch):
    """An event that releases DDP's reducer to re-size layers, then reduces none (every truncation failed), must
    re-register with DDP: the next training step would otherwise fail ('self.logger must not be None')."""
    import modeling_compressm.modeling_compressm as modeling
    from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM, CompreSSMReducer
    from modeling_compressm.reduction import ReductionError

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        config = CompreSSMConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, state_dims=8)
        ddp = torch.nn.parallel.DistributedDataParallel(CompreSSMForCausalLM(config))
        optimizer = torch.optim.Adam(ddp.parameters())
        ids = torch.randint(0, 16, (2, 6))
        ddp(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        def fail(*args, **kwargs):
            raise ReductionError("forced failure")

        monkeypatch.setattr(modeling, "truncate", fail)
        monkeypatch.setattr(modeling, "balanced_truncation", fail)
        reducer = CompreSSMReducer(ddp, optimizer, policy="fixed", fraction=0.5)
        event = reducer.reduce_now(1)
        assert event.status == ["failed", "failed"] and ddp.module.config.state_dims == [8, 8]
        assert ddp.reducer is not None
        ddp(input_ids=ids, labels=ids).loss.backward()  # raised AssertionError before the fix
        assert all(p.grad is not None for p in ddp.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


STALL_WORKER = Path(__file__).with_name("stall_worker.py")


def test_reduction_collectives_default_to_their_own_timeout_shorter_than_ddp_timeout(tmp_path):
    """Issue 20.11: with default arguments the reduction's collectives waited the Trainer's ddp_timeout (30 min)."""
    from transformers import Trainer, TrainerControl, TrainerState

    from modeling_compressm import CompreSSMCallback
    from modeling_compressm.training.settings import DEFAULTS
    from tasks import SignTask, tiny_classifier, training_arguments

    assert DEFAULTS.collective_timeout == 300
    timeouts = {}
    cases = [("default", {}, 1800), ("short ddp", {}, 20), ("given", {"collective_timeout": 7}, 1800)]
    for name, kwargs, ddp_timeout in cases:
        callback = CompreSSMCallback(policy="fixed", start_step=2, end_step=2, interval=2, **kwargs)
        args = training_arguments(tmp_path / "run", ddp_timeout=ddp_timeout)
        trainer = Trainer(model=tiny_classifier(), args=args, train_dataset=SignTask(16), callbacks=[callback])
        trainer.create_optimizer()
        callback.bind(trainer).on_train_begin(args, TrainerState(max_steps=10), TrainerControl(),
                                              model=trainer.model, optimizer=trainer.optimizer)
        timeouts[name] = callback.reducer.collective_timeout
    assert timeouts == {"default": 300.0, "short ddp": 20.0, "given": 7.0}


@requires_gloo
def test_a_stalled_rank_is_named_and_fails_the_run_within_the_collective_timeout(tmp_path):
    """Issue 20.11: the error named the rank that waited, not the one that stalled."""
    completed = run_two_ranks(STALL_WORKER, tmp_path / "out", 3, timeout=240)
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output[-3000:]
    assert "did not complete on rank 0 within 3 s: rank 1 did not reach it (stalled" in output, output[-5000:]
    left = [float(seconds) for seconds in re.findall(r"rank 0 left training after ([0-9.]+) s", output)]
    assert left and left[0] < 60, output[-3000:]


PROBE = """
import sys
from accelerate import Accelerator
accelerator = Accelerator(cpu=sys.argv[1] == "cpu")
print(f"PROCESS {accelerator.process_index} OF {accelerator.num_processes}", flush=True)
"""


@requires_gloo
def test_fsdp_doc_says_how_accelerate_launch_gets_two_cpu_processes(tmp_path):
    """Issue 20.13: docs/fsdp.md showed `accelerate launch --num_processes 2 train.py` for DDP; without GPUs that starts
    one process, and two processes only train together with Accelerator(cpu=True)."""
    import subprocess
    import sys

    from two_ranks import worker_env

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "fsdp.md").read_text().split())
    assert "`accelerate launch --num_processes 2` starts **one** process" in text
    assert ("`Accelerator(cpu=True, ...)` in the script and `accelerate launch --multi_gpu --num_processes 2 "
            "train.py`") in text
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**worker_env(), "HF_HOME": str(tmp_path / "hf")}  # no accelerate config file

    def launch(*flags, cpu):
        command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", str(probe),
                   "cpu" if cpu else "default"]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return sorted(re.findall(r"PROCESS (\d) OF (\d)", completed.stdout))

    assert launch(cpu=True) == [("0", "1")]  # one process, whatever the script asks
    assert launch("--multi_gpu", cpu=False) == [("0", "1"), ("0", "1")]  # two processes, each training alone
    assert launch("--multi_gpu", cpu=True) == [("0", "2"), ("1", "2")]  # CPU DDP
