"""Worker for tests/test_distributed.py (not a test module): a rank that stalls at a reduction, Trainer defaults.

    python -m torch.distributed.run --nproc_per_node 2 tests/stall_worker.py OUTPUT_DIR COLLECTIVE_TIMEOUT

Two DDP ranks train with `CompreSSMTrainer` and the Trainer's default `ddp_timeout` (1800 s); a reduction is
scheduled at step 2 with the callback's `collective_timeout=COLLECTIVE_TIMEOUT`, and rank 1 stops answering (sleeps)
just before it. Rank 0 must fail within about COLLECTIVE_TIMEOUT seconds naming rank 1 as the rank that did not
arrive (torchrun then stops rank 1).
"""

import os
import sys
import time

import torch
from transformers import TrainerCallback, TrainingArguments

from tasks import SignTask, tiny_classifier  # tests/ is sys.path[0] when this script runs

from modeling_compressm import CompreSSMCallback, CompreSSMTrainer


class StopAnswering(TrainerCallback):  # registered before the CompreSSMCallback: runs first at each step end
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2 and torch.distributed.get_rank() == 1:
            time.sleep(300)


def main(output_dir: str, collective_timeout: float) -> None:
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=4, per_device_train_batch_size=8, learning_rate=3e-3, report_to="none",
        disable_tqdm=True, save_strategy="no", use_cpu=True, ddp_backend="gloo", seed=0,
    )
    assert args.ddp_timeout == 1800
    callback = CompreSSMCallback(policy="fixed", fraction=0.5, start_step=2, end_step=2, interval=2,
                                 collective_timeout=collective_timeout)
    trainer = CompreSSMTrainer(model=tiny_classifier(), args=args, train_dataset=SignTask(64),
                               callbacks=[StopAnswering(), callback])
    started = time.monotonic()
    try:
        trainer.train()
    finally:
        print(f"rank {torch.distributed.get_rank()} left training after {time.monotonic() - started:.1f} s",
              flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], float(sys.argv[2]))
