"""Worker for tests/test_faults.py's data-parallel loss-contract test, launched by
`torchrun --nproc_per_node 2` (gloo, CPU).

For each head (sequence classifier, causal LM) every rank trains one plain-SGD step with the HF Trainer on its half of
an 8-example dataset (DistributedDataParallel, 4 examples per rank). The Trainer passes `num_items_in_batch`, counted
over both ranks, and scales the loss by the world size; a head that honours the contract then makes exactly the update
of one large batch: -lr * gradient of the mean loss over all 8 examples. Each rank computes that reference itself and
rank 0 writes {"world_size", "<head>": {"max_update_error", "update_size"}} to the report.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/loss_contract_worker.py OUTPUT_DIR REPORT_JSON
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from loss_contract import LEARNING_RATE, build_head, dataset_for, reference_update  # tests/ is sys.path[0]


def main(output_dir: str, report_path: str) -> None:
    torch.set_num_threads(1)
    report = {}
    for head in ("classifier", "lm"):
        model = build_head(head)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        expected = reference_update(build_head(head), dataset_for(head))
        args = TrainingArguments(
            output_dir=os.path.join(output_dir, head), max_steps=1, per_device_train_batch_size=4,
            learning_rate=LEARNING_RATE, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
            weight_decay=0.0, report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True,
            ddp_backend="gloo", seed=0, dataloader_drop_last=False,
        )
        Trainer(model=model, args=args, train_dataset=dataset_for(head)).train()
        errors = [float((p.detach() - before[name] - expected[name]).abs().max()) for name, p in model.named_parameters()]
        sizes = [float(expected[name].abs().max()) for name in expected]
        report[head] = {"max_update_error": max(errors), "update_size": max(sizes)}
    if dist.get_rank() == 0:
        report["world_size"] = dist.get_world_size()
        with open(report_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
