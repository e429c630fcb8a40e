"""Worker for tests/test_fsdp.py, launched by `torchrun --nproc_per_node 2` (gloo, CPU).

A tiny CompreSSM classifier is sharded with FSDP2 (`fully_shard` on each block and on the model; state sizes
16 and 15, so shards are uneven), trained with AdamW (two param groups) and an LR scheduler, and reduced twice
through `modeling_compressm.fsdp`:

1. rank 0 alone runs `model.reduce` inside `full_lru_parameters` (the other ranks receive the result);
2. `gather_lru_systems` -> balanced truncation on rank 0 -> `apply_reduced_systems`.

Then it trains on, checkpoints (full model / optimizer / scheduler state dicts, written by rank 0), trains on,
resumes a fresh FSDP2 model of the reduced config from the checkpoint and trains the same steps again. Rank 0 also
trains a single-process reference (plain model, both ranks' batches concatenated, same reductions) and checks that
a full state dict loads strictly into a plain model of the reduced config. Finally two fault cases: a rank that
raises inside the reduction, and a rank that never enters it (the other must time out with a clear error).

Rank 0 writes a JSON report (see `main`). Usage:
    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR REPORT_JSON
"""

import copy
import faulthandler
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from modeling_compressm import CompreSSMConfig, CompreSSMForSequenceClassification
from modeling_compressm.fsdp import (
    DistributedReductionError,
    apply_reduced_systems,
    full_lru_parameters,
    gather_lru_systems,
    is_fsdp2,
)
from modeling_compressm.reduction import balanced_truncation

FULL = StateDictOptions(full_state_dict=True)
SSM_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im")
BATCH, LENGTH = 4, 12
FIRST_RANKS = [9, 7]  # reduction 1 (both layers)
SECOND_RANKS = [6, None]  # reduction 2 (layer 0 only)


def make_model(state_dims, seed=0):
    torch.manual_seed(seed)
    config = CompreSSMConfig(input_dim=1, hidden_size=16, num_hidden_layers=2, state_dims=state_dims, num_labels=2)
    return CompreSSMForSequenceClassification(config)


def shard(model):
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def make_optimizer(model):
    """AdamW with the SSM parameters in their own group (other lr, no weight decay) + a step LR schedule."""
    ssm = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in SSM_NAMES]
    other = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in SSM_NAMES]
    optimizer = torch.optim.AdamW(
        [{"params": ssm, "lr": 5e-3, "weight_decay": 0.0}, {"params": other, "lr": 1e-2, "weight_decay": 0.01}]
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    return optimizer, scheduler


def batch(step, rank):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    inputs = torch.randn(BATCH, LENGTH, 1, generator=generator)
    return inputs, (inputs[:, :4, 0].sum(dim=1) > 0).long()


def train(model, optimizer, scheduler, steps, rank):
    losses = []
    for step in steps:
        inputs, labels = batch(step, rank) if rank is not None else map(torch.cat, zip(batch(step, 0), batch(step, 1)))
        loss = model(inputs_embeds=inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def full_state(model):
    return {name: tensor.detach().clone() for name, tensor in get_model_state_dict(model, options=FULL).items()}


def max_diff(left, right):
    return max(float((left[name].float() - right[name].float()).abs().max()) for name in left)


def probe_logits(model):
    inputs = torch.randn(3, LENGTH, 1, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(inputs_embeds=inputs).logits.detach().clone()


def optimizer_facts(model, optimizer):
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    return {
        "holds_exactly_model_params": sorted(held) == sorted(id(p) for p in model.parameters())
        and len(set(held)) == len(held),
        "hyper": [(group["lr"], group["weight_decay"], len(group["params"])) for group in optimizer.param_groups],
    }


def main(output_dir, report_path):
    faulthandler.enable()  # a crash or a hang shows its stack (the latter before the test's guard kills it)
    faulthandler.dump_traceback_later(200, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"world_size": world}

    model = shard(make_model([16, 15]))
    optimizer, scheduler = make_optimizer(model)
    report["is_fsdp2"] = is_fsdp2(model)
    report["losses"] = train(model, optimizer, scheduler, range(0, 3), rank)

    # ---- reduction 1: rank 0 decides and reduces, the others receive it when the block ends
    before = full_state(model)
    unreduced = {n: p for n, p in model.named_parameters() if ".lru." not in n or n.endswith(".D")}
    moments_before = {n: optimizer.state[p]["exp_avg"].to_local().clone() for n, p in unreduced.items()}
    hyper_before = optimizer_facts(model, optimizer)["hyper"]
    old_lru = {n: p for n, p in model.named_parameters() if ".lru." in n and not n.endswith(".D")}
    with full_lru_parameters(model, optimizer) as session:
        if rank == 0:
            model.reduce(FIRST_RANKS)
    after = full_state(model)
    facts = optimizer_facts(model, optimizer)
    report["reduction1"] = {
        "changed_layers": session.changed_layers,
        "state_dims": session.state_dims,
        "config_dims": list(model.config.state_dims),
        "replaced": len(session.replaced),
        "shapes": {n: list(t.shape) for n, t in after.items() if ".lru." in n},
        "holds_exactly_model_params": facts["holds_exactly_model_params"],
        "hyper_kept": facts["hyper"] == [(lr, wd, n) for lr, wd, n in hyper_before],
        "old_params_gone": all(id(p) not in {id(q) for q in model.parameters()} for p in old_lru.values()),
        "reduced_state_dropped": all(
            p not in optimizer.state for n, p in model.named_parameters() if ".lru." in n and not n.endswith(".D")
        ),
        "unreduced_state_kept": all(
            "exp_avg" in optimizer.state.get(p, {})
            and torch.equal(optimizer.state[p]["exp_avg"].to_local(), moments_before[n])
            for n, p in unreduced.items()
        ),
        "unreduced_same_objects": all(p is dict(model.named_parameters())[n] for n, p in unreduced.items()),
        "scheduler_attached": scheduler.optimizer is optimizer,
    }
    if rank == 0:  # the same reduction on a plain model gives bit-identical parameters
        plain = make_model([16, 15])
        plain.load_state_dict(before)
        plain.reduce(FIRST_RANKS)
        report["reduction1"]["diff_vs_plain_reduce"] = max_diff(after, plain.state_dict())
    report["losses"] += train(model, optimizer, scheduler, range(3, 6), rank)

    # ---- reduction 2: gather the systems, rank 0 truncates, every rank loads rank 0's result
    systems = gather_lru_systems(model)
    reduced = None
    if rank == 0:
        reduced = [None if r is None else balanced_truncation(*system, r) for system, r in zip(systems, SECOND_RANKS)]
    session = apply_reduced_systems(model, reduced, optimizer)
    report["reduction2"] = {
        "changed_layers": session.changed_layers,
        "state_dims": session.state_dims,
        "holds_exactly_model_params": optimizer_facts(model, optimizer)["holds_exactly_model_params"],
    }
    report["losses"] += train(model, optimizer, scheduler, range(6, 9), rank)

    # ---- checkpoint (rank 0 writes), train on, resume a fresh model from it and train the same steps again
    checkpoint = os.path.join(output_dir, "checkpoint.pt")
    model_state = full_state(model)
    optimizer_state = copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=FULL))
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        torch.save({"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "state_dims": list(model.config.state_dims)}, checkpoint)
    dist.barrier()
    train(model, optimizer, scheduler, range(9, 12), rank)
    continued = full_state(model)

    saved = torch.load(checkpoint, weights_only=False)
    resumed = shard(make_model(saved["state_dims"], seed=1))
    resumed_optimizer, resumed_scheduler = make_optimizer(resumed)
    set_model_state_dict(resumed, saved["model"], options=FULL)
    set_optimizer_state_dict(resumed, resumed_optimizer, saved["optimizer"], options=FULL)
    resumed_scheduler.load_state_dict(saved["scheduler"])
    train(resumed, resumed_optimizer, resumed_scheduler, range(9, 12), rank)
    report["resume"] = {
        "state_dims": saved["state_dims"],
        "diff_resumed_vs_continued": max_diff(continued, full_state(resumed)),
    }

    # ---- identical on every rank
    flat = torch.cat([t.reshape(-1).float() for t in continued.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    report["max_rank_diff"] = max(float((g - flat).abs().max()) for g in gathered)
    fsdp_logits = probe_logits(model)

    if rank == 0:
        # the full state dict loads strictly into a plain model of the reduced config and computes the same outputs
        plain = make_model(list(model.config.state_dims), seed=2)
        result = plain.load_state_dict(continued, strict=True)
        report["plain_load_missing"] = list(result.missing_keys) + list(result.unexpected_keys)
        report["plain_vs_fsdp_logits"] = float((probe_logits(plain) - fsdp_logits).abs().max())
        # single-process reference: same init, both ranks' batches at once, same reductions at the same steps
        reference = make_model([16, 15])
        ref_optimizer, ref_scheduler = make_optimizer(reference)
        reference_losses = train(reference, ref_optimizer, ref_scheduler, range(0, 3), None)
        reference.reduce(FIRST_RANKS)
        for layer in reference.lru_layers():
            for p in layer.ssm_parameters():
                ref_optimizer.state.pop(p, None)
        reference_losses += train(reference, ref_optimizer, ref_scheduler, range(3, 6), None)
        reference.reduce(SECOND_RANKS)
        for p in reference.lru_layers()[0].ssm_parameters():
            ref_optimizer.state.pop(p, None)
        reference_losses += train(reference, ref_optimizer, ref_scheduler, range(6, 12), None)
        report["reference_dims"] = list(reference.config.state_dims)
        report["reference_vs_fsdp_logits"] = float((probe_logits(reference) - fsdp_logits).abs().max())
        report["reference_losses"] = reference_losses
    all_losses = [None] * world
    dist.all_gather_object(all_losses, report["losses"])
    report["losses_per_rank"] = all_losses

    # ---- other sharding layouts, reduced right after an evaluation forward (which leaves unsharded groups behind)
    report["variants"] = {}
    for variant in ("root_only", "bf16_keep_unsharded"):
        other = make_model([16, 15])
        if variant == "root_only":  # every parameter in the root's group, which stays unsharded after forward
            fully_shard(other)
        else:  # bf16 all-gathers: the full values must still come from the fp32 shards
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in other.model.layers:
                fully_shard(block, mp_policy=policy, reshard_after_forward=False)
            fully_shard(other, mp_policy=policy)
        other_optimizer, other_scheduler = make_optimizer(other)
        train(other, other_optimizer, other_scheduler, range(1), rank)
        before_variant = full_state(other)  # (a state dict reshards every group: take it before the forward)
        probe_logits(other)
        with full_lru_parameters(other, other_optimizer) as session:
            if rank == 0:
                other.reduce(FIRST_RANKS)
        after_variant = full_state(other)
        plain = make_model([16, 15])
        plain.load_state_dict(before_variant)
        plain.reduce(FIRST_RANKS)
        losses = train(other, other_optimizer, other_scheduler, range(1, 3), rank)
        report["variants"][variant] = {
            "changed_layers": session.changed_layers,
            "diff_vs_plain_reduce": max_diff(after_variant, plain.state_dict()),
            "dtypes": sorted({str(tensor.dtype) for tensor in after_variant.values()}),
            "losses_finite": all(loss == loss for loss in losses),
            "holds_exactly_model_params": optimizer_facts(other, other_optimizer)["holds_exactly_model_params"],
        }

    # ---- fault 1: rank 1 raises inside the block -> every rank raises, nothing changes, training goes on
    before = full_state(model)
    errors = ""
    try:
        with full_lru_parameters(model, optimizer, timeout=timedelta(seconds=60)):
            model.reduce([3, 3]) if rank == 0 else None
            if rank == 1:
                raise ValueError("injected failure on rank 1")
    except (DistributedReductionError, ValueError) as error:
        errors = f"{type(error).__name__}: {error}"
    gathered_errors = [None] * world
    dist.all_gather_object(gathered_errors, errors)
    report["fault_raise"] = {
        "errors": gathered_errors,
        "unchanged": max_diff(before, full_state(model)) == 0.0
        and list(model.config.state_dims) == saved["state_dims"],
        "holds_exactly_model_params": optimizer_facts(model, optimizer)["holds_exactly_model_params"],
        "trains_after": all(loss == loss for loss in train(model, optimizer, scheduler, range(12, 13), rank)),
    }

    # ---- fault 2: rank 1 never enters the reduction; rank 0 must fail with a clear message, not hang
    dist.barrier()
    if rank == 1:
        time.sleep(6.0)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the process group is unusable after the other rank's timeout
    started = time.monotonic()
    try:
        with full_lru_parameters(model, optimizer, timeout=timedelta(seconds=2)):
            model.reduce([3, 3])
        report["fault_timeout"] = {"error": None}
    except DistributedReductionError as error:
        report["fault_timeout"] = {"error": str(error), "seconds": time.monotonic() - started,
                                   "dims": list(model.config.state_dims)}
    with open(report_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: the process group is unusable after the timeout above


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
