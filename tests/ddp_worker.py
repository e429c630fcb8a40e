"""Worker for tests/test_distributed.py, launched by `torchrun --nproc_per_node 2` (gloo, CPU).

Three runs in one launch, the ranks seeing different batches (their parameters stay equal only if gradients are
still averaged after the reductions):

1. `CompreSSMTrainer` + `CompreSSMCallback` under DistributedDataParallel, reductions at steps 5, 10, 15, a checkpoint
   at step 12 (after two reductions);
2. a fresh full-size model resumed from that checkpoint with `CompreSSMTrainer`: must end where run 1 ended;
3. a plain PyTorch loop over `DistributedDataParallel(model)` with `CompreSSMReducer` (reductions at steps 3 and 6).

Rank 0 writes a JSON report (see `test_distributed.py` for the fields).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR REPORT_JSON
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback, TrainingArguments

from tasks import SignTask, tiny_classifier  # tests/ is sys.path[0] when this script runs

from modeling_compressm import CompreSSMCallback, CompreSSMReducer, CompreSSMTrainer

LAST_EVENT_STEP = 15


def flat_parameters(model) -> torch.Tensor:
    return torch.cat([parameter.detach().reshape(-1).float() for parameter in model.parameters()])


def gathered(values: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values)
    return out


def max_difference_across_ranks(model) -> float:
    dims = torch.tensor(model.config.state_dims)
    if not all(torch.equal(other, dims) for other in gathered(dims)):
        return float("nan")
    params = flat_parameters(model)
    return max(float((other - params).abs().max()) for other in gathered(params))


def trainer_run(output_dir: str, resume: str | None = None):
    model = tiny_classifier()
    callback = CompreSSMCallback(tau=0.05, start_step=5, end_step=LAST_EVENT_STEP, interval=5, gate=0.99)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=5,
        report_to="none", disable_tqdm=True, save_strategy="steps", save_steps=12, use_cpu=True, ddp_backend="gloo",
        seed=0, max_grad_norm=1.0,
    )
    trainer = CompreSSMTrainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback])
    snapshots = {}

    class SnapshotCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == LAST_EVENT_STEP:
                snapshots["after_last_event"] = flat_parameters(model).clone()

    trainer.add_callback(SnapshotCallback())
    trainer.train(resume_from_checkpoint=resume)
    return model, callback, trainer, snapshots


def plain_loop() -> dict:
    model = tiny_classifier()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    reducer = CompreSSMReducer(ddp, optimizer, tau=0.05, start_step=3, end_step=6, interval=3, gate=0.99,
                               collective_timeout=60)
    data = SignTask(64, seed=1 + dist.get_rank())  # different data per rank
    losses = []
    for step in range(1, 11):
        loss = ddp(inputs_embeds=data.inputs, labels=data.labels).loss
        loss.backward()  # `loss` stays referenced across the reduction
        optimizer.step()
        optimizer.zero_grad()
        reducer.step(step)
        losses.append(float(loss))
    return {
        "events": [event.step for event in reducer.history],
        "dims": model.config.state_dims,
        "max_param_diff": max_difference_across_ranks(model),
        "losses": losses,
    }


def main(output_dir: str, report_path: str) -> None:
    torch.set_num_threads(1)
    model, callback, trainer, snapshots = trainer_run(os.path.join(output_dir, "full"))
    rank = dist.get_rank()
    params = flat_parameters(model)
    dims_per_rank = [d.tolist() for d in gathered(torch.tensor(model.config.state_dims))]
    max_diff = max_difference_across_ranks(model)
    changed = float((params - snapshots["after_last_event"]).abs().max()) if "after_last_event" in snapshots else -1.0
    checkpoint = os.path.join(output_dir, "full", "checkpoint-12")
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as handle:
        checkpoint_dims = json.load(handle)["state_dims"]

    resumed, resumed_callback, _, _ = trainer_run(os.path.join(output_dir, "resumed"), resume=checkpoint)
    resumed_diff = float((flat_parameters(resumed) - params).abs().max()) if (
        resumed.config.state_dims == model.config.state_dims) else float("nan")
    plain = plain_loop()

    if rank == 0:
        report = {
            "world_size": dist.get_world_size(),
            "dims_per_rank": dims_per_rank,
            "max_param_diff": max_diff,
            "changed_after_last": changed,
            "events": [{k: v for k, v in event.to_dict().items() if k != "hsv"} for event in callback.history],
            "model_history_len": len(model.reduction_history),
            "wrapped_type": type(trainer.model_wrapped).__name__,
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "compressm_logs": [entry for entry in trainer.state.log_history if "compressm/total_state_dim" in entry],
            "checkpoint_dims": checkpoint_dims,
            "resumed_events": [event.step for event in resumed_callback.history],
            "resumed_dims": resumed.config.state_dims,
            "resumed_max_diff_to_full": resumed_diff,
            "resumed_max_param_diff_across_ranks": max_difference_across_ranks(resumed),
            "plain": plain,
        }
        with open(report_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    else:
        max_difference_across_ranks(resumed)  # collective: every rank takes part
    dist.barrier()
    dist.destroy_process_group()  # a gloo process group left to interpreter exit can abort ("terminate called")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
