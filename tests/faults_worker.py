"""Worker processes for tests/test_faults.py (not a test module).

    python tests/faults_worker.py kill OUTPUT_DIR KILL_STEP
        Trains a tiny classifier with CompreSSMTrainer, saving every 2 steps, and SIGKILLs itself in the middle of
        saving the checkpoint of step KILL_STEP (after the weights, while the history is being written).
    python -m torch.distributed.run --nproc_per_node 2 tests/faults_worker.py ddp-timeout OUTPUT_DIR
        Two DDP ranks, reduction scheduled at step 2 with ddp_timeout=5; rank 1 stops answering (sleeps) just before
        the reduction, so rank 0 waits in the reduction's collectives. Rank 0 must fail with a clear message.
"""

import os
import signal
import sys
import time

import torch
from transformers import TrainerCallback, TrainingArguments

from tasks import SignTask, tiny_classifier  # tests/ is sys.path[0] when this script runs

from modeling_compressm import CompreSSMCallback, CompreSSMTrainer
from modeling_compressm import modeling_compressm as modeling


def make_model():
    return tiny_classifier()


def kill_run_arguments(output_dir, **overrides):
    values = dict(
        output_dir=output_dir, max_steps=12, per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=100,
        report_to="none", disable_tqdm=True, save_strategy="steps", save_steps=2, use_cpu=True, seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def kill_run_callback():
    return CompreSSMCallback(policy="fixed", fraction=0.25, start_step=3, end_step=9, interval=3)


def kill(output_dir: str, kill_step: int) -> None:
    original = modeling.CompreSSMPreTrainedModel._write_compressm_files

    def write_then_die(self, directory):
        if f"checkpoint-{kill_step}" in os.fspath(directory):
            os.kill(os.getpid(), signal.SIGKILL)  # weights and config are on disk, history and trainer state are not
        return original(self, directory)

    modeling.CompreSSMPreTrainedModel._write_compressm_files = write_then_die
    trainer = CompreSSMTrainer(model=make_model(), args=kill_run_arguments(output_dir), train_dataset=SignTask(256),
                               callbacks=[kill_run_callback()])
    trainer.train()


def ddp_timeout(output_dir: str) -> None:
    torch.set_num_threads(1)

    class StopAnswering(TrainerCallback):  # registered before the CompreSSMCallback: runs first at each step end
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and torch.distributed.get_rank() == 1:
                time.sleep(120)

    args = TrainingArguments(
        output_dir=output_dir, max_steps=4, per_device_train_batch_size=8, learning_rate=3e-3, report_to="none",
        disable_tqdm=True, save_strategy="no", use_cpu=True, ddp_backend="gloo", seed=0, ddp_timeout=5,
    )
    callback = CompreSSMCallback(policy="fixed", fraction=0.5, start_step=2, end_step=2, interval=2)
    trainer = CompreSSMTrainer(model=make_model(), args=args, train_dataset=SignTask(64),
                               callbacks=[StopAnswering(), callback])
    trainer.train()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mode = sys.argv[1]
    if mode == "kill":
        kill(sys.argv[2], int(sys.argv[3]))
    elif mode == "ddp-timeout":
        ddp_timeout(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
