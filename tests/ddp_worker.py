"""Worker for tests/test_distributed.py, launched by `torchrun --nproc_per_node 2` (gloo, CPU).

Trains a tiny CompreSSM classifier with `CompreSSMTrainer` + `CompreSSMCallback` under DistributedDataParallel; the
ranks see different batches, so their parameters stay equal only if gradients are still averaged after the
reductions. Rank 0 writes a JSON report: {"world_size", "dims_per_rank", "max_param_diff", "changed_after_last",
"events", "wrapped_type", "losses"}.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR REPORT_JSON
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import TrainingArguments

from tasks import SignTask  # tests/ is sys.path[0] when this script runs

from modeling_compressm import CompreSSMCallback, CompreSSMConfig, CompreSSMForSequenceClassification, CompreSSMTrainer


def flat_parameters(model) -> torch.Tensor:
    return torch.cat([parameter.detach().reshape(-1).float() for parameter in model.parameters()])


def main(output_dir: str, report_path: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = CompreSSMConfig(input_dim=1, hidden_size=16, num_hidden_layers=2, state_dims=16, num_labels=2)
    model = CompreSSMForSequenceClassification(config)
    callback = CompreSSMCallback(tau=0.05, start_step=5, end_step=15, interval=5, gate=0.99)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=5,
        report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True, ddp_backend="gloo", seed=0,
        max_grad_norm=1.0,
    )
    trainer = CompreSSMTrainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback])

    snapshots = {}

    last_event_step = 15

    from transformers import TrainerCallback

    class SnapshotCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == last_event_step:
                snapshots["after_last_event"] = flat_parameters(model).clone()

    trainer.add_callback(SnapshotCallback())
    result = trainer.train()

    rank = dist.get_rank()
    world_size = dist.get_world_size()
    params = flat_parameters(model)
    dims = torch.tensor(model.config.state_dims)
    gathered_dims = [torch.zeros_like(dims) for _ in range(world_size)]
    dist.all_gather(gathered_dims, dims)
    same_shape = all(torch.equal(d, dims) for d in gathered_dims)
    max_diff = float("nan")
    if same_shape:
        gathered = [torch.zeros_like(params) for _ in range(world_size)]
        dist.all_gather(gathered, params)
        max_diff = max(float((g - params).abs().max()) for g in gathered)
    changed = float((params - snapshots["after_last_event"]).abs().max()) if "after_last_event" in snapshots else -1.0
    if rank == 0:
        report = {
            "world_size": world_size,
            "dims_per_rank": [d.tolist() for d in gathered_dims],
            "max_param_diff": max_diff,
            "changed_after_last": changed,
            "events": [{k: v for k, v in event.to_dict().items() if k != "hsv"} for event in callback.history],
            "model_history_len": len(model.reduction_history),
            "wrapped_type": type(trainer.model_wrapped).__name__,
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "compressm_logs": [entry for entry in trainer.state.log_history if "compressm/total_state_dim" in entry],
            "train_loss": result.training_loss,
        }
        with open(report_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()  # a gloo process group left to interpreter exit can abort ("terminate called")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
