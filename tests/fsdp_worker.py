"""Worker for tests/test_fsdp.py, launched by `torchrun --nproc_per_node 2` (gloo, CPU).

A tiny CompreSSM classifier is sharded with FSDP2 (`fully_shard` on each block and on the model; state sizes 16 and
15, so shards are uneven), trained with AdamW (two param groups) and an LR scheduler, and reduced by the package's
`CompreSSMReducer` at steps 3, 6 and 9 (tolerance policy). The first event repairs the optimizer state with "reset",
the later ones with a test mode registered here ("carry_test": maps the old moments through the basis map and
mixes in the new values, so it runs on gathered full tensors under FSDP2). Around that run:

* rank 0 trains a single-process reference (plain model, both ranks' batches concatenated, the same reducer
  settings) and compares losses, sizes, the optimizer state after the "carry_test" event and the final outputs;
* a checkpoint at step 7 (full model / optimizer state dicts from `torch.distributed.checkpoint.state_dict`, the
  scheduler and `reducer.state_dict()`) resumes a fresh FSDP2 model built at the ORIGINAL sizes:
  `reducer.load_state_dict` re-sizes it (re-sharding), then the state dicts load and training continues to step 12;
* `save_pretrained(dir, state_dict=<gathered on rank 0>, is_main_process=rank == 0)` on every rank (no hang; card
  drawn from the state dict), reloaded with `from_pretrained`;
* a rollback (policy "rollback", `resolve_pending(False)`) restores weights, sizes and optimizer state exactly;
* other layouts (root only; bf16 all-gathers with reshard_after_forward=False, reduced right after an eval forward);
* `CompreSSMCallback` refuses an FSDP2 model with a message naming the supported path;
* faults: rank 0 raises while deciding, rank 1 raises while applying, rank 1 never enters the event (timeout).

Over 500 lines because every scenario runs in this one launch: process start-up dominates the cost of a torchrun
test on CI. Rank 0 writes a JSON report (see `main`). Usage:
    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR REPORT_JSON
"""

import copy
import faulthandler
import json
import math
import os
import sys
import time

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
from transformers import TrainerControl, TrainerState, TrainingArguments

from modeling_compressm import (
    CompreSSMCallback,
    CompreSSMConfig,
    CompreSSMForSequenceClassification,
    CompreSSMReducer,
)
from modeling_compressm.training.collectives import DistributedReductionError
from modeling_compressm.training.distributed import LocalStrategy, register_strategy
from modeling_compressm.training.fsdp import is_fsdp2
from modeling_compressm.training.optimizer_state import register_optimizer_state_repair

FULL = StateDictOptions(full_state_dict=True)
SSM_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")
BATCH, LENGTH = 4, 12
SCHEDULE = dict(tau=0.05, start_step=3, end_step=9, interval=3, collective_timeout=60)
CHECKPOINT_STEP, LAST_STEP = 7, 12


def carry_test(optimizer, changes):
    """Optimizer-state repair mode of this test: new moments = |project| applied to the old ones (exp_avg also gets
    1e-3 x the new value), so the result depends on the old state, the basis map and the new parameters."""
    for change in changes:
        weights = change.project.abs().to(torch.float32)  # (r, N), or (r, 2N) on [h; conj h] for the real map
        old_size = change.previous["nu_log"].shape[0]
        if weights.shape[1] == 2 * old_size:
            weights = weights[:, :old_size] + weights[:, old_size:]
        for name, parameter in change.parameters.items():
            old = optimizer.state.get(parameter)
            if not old:
                continue
            new = {"step": old["step"].clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                moment = old[key].float()
                mapped = moment @ weights.to(moment.device).T if name.startswith("C_") else (
                    weights.to(moment.device) @ moment)
                new[key] = mapped + 1e-3 * parameter.detach() if key == "exp_avg" else mapped.abs()
            optimizer.state[parameter] = new


register_optimizer_state_repair("carry_test", carry_test)
# Plain single-process reference models inside this 2-process job: the reducer would otherwise refuse an unwrapped
# model under torch.distributed (it cannot keep the ranks in step).
register_strategy(lambda model: getattr(model, "single_process_reference", False), lambda *args: LocalStrategy())


def make_model(state_dims, seed=0, reference=False):
    torch.manual_seed(seed)
    config = CompreSSMConfig(input_dim=1, hidden_size=16, num_hidden_layers=2, state_dims=state_dims, num_labels=2)
    model = CompreSSMForSequenceClassification(config)
    model.single_process_reference = reference
    return model


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
    """Rank `rank`'s batch at `step`; rank None: both ranks' batches concatenated (the single-process reference)."""
    if rank is None:
        return tuple(map(torch.cat, zip(batch(step, 0), batch(step, 1))))
    generator = torch.Generator().manual_seed(1000 * step + rank)
    inputs = torch.randn(BATCH, LENGTH, 1, generator=generator)
    return inputs, (inputs[:, :4, 0].sum(dim=1) > 0).long()


def train_step(model, optimizer, scheduler, step, rank):
    inputs, labels = batch(step, rank)
    loss = model(inputs_embeds=inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def trains(model, optimizer, step, rank):
    """One more training step gives a finite loss and changes the weights (collective under FSDP2)."""
    before = full_state(model)
    loss = train_step(model, optimizer, None, step, rank)
    return math.isfinite(loss) and max_diff(full_state(model), before) > 0


def full_state(model):
    if not is_fsdp2(model):
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return {name: tensor.detach().clone() for name, tensor in get_model_state_dict(model, options=FULL).items()}


def full_moments(model, optimizer):
    """{parameter name: {"exp_avg", "exp_avg_sq"}} as full tensors (collective under FSDP2)."""
    if is_fsdp2(model):
        state = get_optimizer_state_dict(model, optimizer, options=FULL)["state"]
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        state = {names[id(p)]: s for p, s in optimizer.state.items()}
    return {name: {key: entry[key].detach().clone() for key in ("exp_avg", "exp_avg_sq") if key in entry}
            for name, entry in state.items()}


def max_diff(left, right):
    return max(float((left[name].float() - right[name].float()).abs().max()) for name in left)


def relative_diff(left, right):
    return max(float((left[name][key] - right[name][key]).abs().max() / right[name][key].abs().max().clamp_min(1e-30))
               for name in right for key in right[name])


def probe_logits(model):
    inputs = torch.randn(3, LENGTH, 1, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(inputs_embeds=inputs).logits.detach().clone()


def holds_exactly_model_params(model, optimizer):
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    return sorted(held) == sorted(id(p) for p in model.parameters()) and len(set(held)) == len(held)


def hyper(optimizer):
    return [(group["lr"], group["weight_decay"], len(group["params"])) for group in optimizer.param_groups]


def event_summary(events):
    return [(event.kind, event.step, event.dims_before, event.dims_after) for event in events]


def lru_names(layers):
    return sorted(f"model.layers.{i}.lru.{n}" for i in layers for n in SSM_NAMES)


def run(model, optimizer, scheduler, reducer, steps, rank, probes=None):
    """Train `steps` (calling reducer.step after each optimizer step); `probes[step]` = (before, after) callables run
    around the reducer call at that step (they may run collectives: every rank calls them)."""
    losses = []
    for step in steps:
        losses.append(train_step(model, optimizer, scheduler, step, rank))
        before, after = (probes or {}).get(step, (None, None))
        if before is not None:
            before()
        reducer.step(step)
        if after is not None:
            after()
    return losses


def main_run(rank, output_dir, report):
    model = shard(make_model([16, 15]))
    optimizer, scheduler = make_optimizer(model)
    reducer = CompreSSMReducer(model, optimizer, **SCHEDULE)
    report["strategy"] = type(reducer.strategy).__name__
    report["is_fsdp2"] = is_fsdp2(model)
    facts, captured = {}, {}

    def before_first():
        captured["state"] = full_state(model)
        captured["unreduced"] = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in SSM_NAMES}
        captured["moments"] = {n: optimizer.state[p]["exp_avg"].to_local().clone()
                               for n, p in captured["unreduced"].items()}
        captured["hyper"] = hyper(optimizer)
        captured["lru"] = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in SSM_NAMES]

    def after_first():
        event = reducer.history[-1]
        named = dict(model.named_parameters())
        captured["state_after_first"] = full_state(model)
        facts["first"] = {
            "step": event.step,
            "dims_after": event.dims_after,
            "config_dims": list(model.config.state_dims),
            "holds_exactly_model_params": holds_exactly_model_params(model, optimizer),
            "hyper_kept": hyper(optimizer) == captured["hyper"],
            "old_params_gone": not ({id(p) for p in captured["lru"]} & {id(p) for p in model.parameters()}),
            "reduced_state_dropped": all(named[n] not in optimizer.state for n in named
                                         if n.rsplit(".", 1)[-1] in SSM_NAMES),
            "unreduced_state_kept": all(torch.equal(optimizer.state[p]["exp_avg"].to_local(), captured["moments"][n])
                                        for n, p in captured["unreduced"].items()),
            "unreduced_same_objects": all(p is named[n] for n, p in captured["unreduced"].items()),
            "scheduler_attached": scheduler.optimizer is optimizer,
            "shapes": {n: list(t.shape) for n, t in captured["state_after_first"].items() if ".lru." in n},
        }
        reducer.optimizer_state = "carry_test"  # the later events repair the moments on gathered full tensors

    def after_second():
        captured["moments_after_second"] = full_moments(model, optimizer)
        captured["second_event"] = reducer.history[-1] if reducer.history[-1].step == 6 else None

    def checkpoint():
        saved = {"model": full_state(model), "optimizer": copy.deepcopy(get_optimizer_state_dict(model, optimizer,
                                                                                                 options=FULL)),
                 "scheduler": scheduler.state_dict(), "reducer": reducer.state_dict()}
        if rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(saved, os.path.join(output_dir, "checkpoint.pt"))
        dist.barrier()

    probes = {3: (before_first, after_first), 6: (None, after_second), CHECKPOINT_STEP: (None, checkpoint)}
    losses = run(model, optimizer, scheduler, reducer, range(1, LAST_STEP + 1), rank, probes)
    report["first"] = facts["first"]
    if rank == 0:  # the same event on a plain model from the same weights: bit-identical result
        plain = make_model([16, 15], reference=True)
        plain.load_state_dict(captured["state"])
        CompreSSMReducer(plain, **SCHEDULE).reduce_now(3)
        report["first"]["plain_dims"] = list(plain.config.state_dims)
        report["first"]["diff_vs_plain_reduce"] = max_diff(captured["state_after_first"], plain.state_dict())
    report["events"] = event_summary(reducer.history)
    events = [(e.kind, e.step, e.dims_after, e.status, e.kept_energy, e.hsv) for e in reducer.history]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, events)
    report["events_same_on_every_rank"] = all(other == gathered[0] for other in gathered)
    gathered_losses = [None] * dist.get_world_size()
    dist.all_gather_object(gathered_losses, losses)
    report["losses_per_rank"] = gathered_losses
    report["holds_exactly_model_params_end"] = holds_exactly_model_params(model, optimizer)
    continued = full_state(model)
    flat = torch.cat([t.reshape(-1).float() for t in continued.values()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    report["max_rank_diff"] = max(float((g - flat).abs().max()) for g in everyone)
    return model, optimizer, reducer, continued, captured


def reference_run(report, fsdp_logits, captured):
    """Rank 0: one process, both ranks' batches at once, the same reducer settings and mode switch."""
    model = make_model([16, 15], reference=True)
    optimizer, scheduler = make_optimizer(model)
    reducer = CompreSSMReducer(model, optimizer, **SCHEDULE)
    moments = {}

    def switch():
        reducer.optimizer_state = "carry_test"

    def record():
        moments.update(full_moments(model, optimizer))

    losses = run(model, optimizer, scheduler, reducer, range(1, LAST_STEP + 1), None,
                 {3: (None, switch), 6: (None, record)})
    second = captured["second_event"]
    reduced = lru_names([i for i, s in enumerate(second.status) if s == "reduced"]) if second else []
    fsdp_moments = {n: captured["moments_after_second"].get(n, {}) for n in reduced}
    present = bool(reduced) and all(set(fsdp_moments[n]) == {"exp_avg", "exp_avg_sq"} == set(moments.get(n, {}))
                                    for n in reduced)
    report["reference"] = {
        "losses": losses,
        "events": event_summary(reducer.history),
        "vs_fsdp_logits": float((probe_logits(model) - fsdp_logits).abs().max()),
        "carried_params": reduced,
        "carried_state_present": present,
        "carried_state_relative_diff": relative_diff(fsdp_moments, {n: moments[n] for n in reduced})
        if present else None,
    }


def resume_run(rank, output_dir, report, continued, reference_history):
    """A fresh FSDP2 model at the ORIGINAL sizes, re-sized by reducer.load_state_dict, then the state dicts."""
    saved = torch.load(os.path.join(output_dir, "checkpoint.pt"), weights_only=False)
    model = shard(make_model([16, 15], seed=1))
    optimizer, scheduler = make_optimizer(model)
    reducer = CompreSSMReducer(model, optimizer, **dict(SCHEDULE, optimizer_state="carry_test"))
    reducer.load_state_dict(saved["reducer"])
    dims_loaded = list(model.config.state_dims)
    holds = holds_exactly_model_params(model, optimizer)
    set_model_state_dict(model, saved["model"], options=FULL)
    set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=FULL)
    scheduler.load_state_dict(saved["scheduler"])
    losses = run(model, optimizer, scheduler, reducer, range(CHECKPOINT_STEP + 1, LAST_STEP + 1), rank)
    report["resume"] = {
        "checkpoint_dims": saved["reducer"]["state_dims"],
        "dims_after_load_state_dict": dims_loaded,
        "holds_exactly_model_params": holds and holds_exactly_model_params(model, optimizer),
        "events": event_summary(reducer.history),
        "same_history": event_summary(reducer.history) == reference_history,
        "diff_resumed_vs_continued": max_diff(continued, full_state(model)),
        "losses_finite": all(loss == loss for loss in losses),
    }


def save_pretrained_run(rank, model, output_dir, report, continued):
    """The HF save of a sharded model: gathered state dict (rank 0 only), save_pretrained on every rank."""
    folder = os.path.join(output_dir, "hf")
    refused = []
    for state_dict in (None, model.state_dict()):  # nothing, or this rank's shards (DTensors)
        try:
            model.save_pretrained(os.path.join(output_dir, "refused"), state_dict=state_dict)
            refused.append(None)
        except ValueError as error:
            refused.append(str(error))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(folder, state_dict=state if rank == 0 else {}, is_main_process=rank == 0)
    dist.barrier()
    if rank != 0:
        return
    reloaded = CompreSSMForSequenceClassification.from_pretrained(folder)
    plain = make_model(list(model.config.state_dims), seed=3, reference=True)
    plain.load_state_dict(continued)
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
        card = handle.read()
    spectrum = ", ".join(f"layer {i}: {values[0]:.3g} / {values[-1]:.3g}"
                         for i, values in enumerate(v.tolist() for v in plain.hankel_singular_values()))
    report["card_spectrum_line"] = spectrum
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    report["save_pretrained"] = {
        "refused_without_full_state_dict": refused,
        "dims": list(reloaded.config.state_dims),
        "architectures": config.get("architectures"),
        "diff": max_diff(continued, reloaded.state_dict()),
        "history_steps": [event.step for event in reloaded.reduction_history],
        "card_class": "# CompreSSMForSequenceClassification (CompreSSM)" in card,
        "card_parameter_count": f"parameters: {sum(p.numel() for p in plain.parameters()):,}" in card,
        "card_spectrum_matches_plain_model": spectrum in card,
        "plot": os.path.isfile(os.path.join(folder, "hsv_spectrum.png")),
        "files": sorted(os.listdir(folder)),
    }


def rollback_run(rank, report):
    model = shard(make_model([16, 15], seed=4))
    optimizer, scheduler = make_optimizer(model)
    train_step(model, optimizer, scheduler, 1, rank)
    reducer = CompreSSMReducer(model, optimizer, policy="rollback", tau=0.05, collective_timeout=60)
    before, moments_before = full_state(model), full_moments(model, optimizer)
    event = reducer.reduce_now(1, metric_before=0.5, metric_name="eval_loss")
    reduced_dims = list(model.config.state_dims)
    # the pending check's snapshot is this rank's shards: resuming it on another rank must not restore them
    saved = reducer.state_dict()
    saved["pending"]["snapshot_rank"] = 0  # as if every rank loaded rank 0's file
    other = CompreSSMReducer(model, optimizer, policy="rollback", tau=0.05, collective_timeout=60)
    other.restore_pending(saved["pending"])
    armed = [None] * dist.get_world_size()
    dist.all_gather_object(armed, (other.pending is not None, other.stopped))
    train_step(model, optimizer, scheduler, 2, rank)
    rollback = reducer.resolve_pending(False, 2, metric_after=0.9)
    weights_diff = max_diff(before, full_state(model))
    report["rollback"] = {
        "reduced_dims": reduced_dims,
        "event": event is not None and event.rolled_back,
        "rollback_kind": rollback.kind if rollback else None,
        "dims": list(model.config.state_dims),
        "weights_diff": weights_diff,
        "moments_diff": relative_diff(full_moments(model, optimizer), moments_before),
        "holds_exactly_model_params": holds_exactly_model_params(model, optimizer),
        "stopped": reducer.stopped,
        "history": [(event.kind, event.rolled_back) for event in reducer.history],
        "rank0_snapshot_armed_per_rank": armed,
        "trains_after": trains(model, optimizer, 3, rank),
    }


def variants_run(rank, report):
    """Other layouts, reduced right after an evaluation forward (which leaves unsharded groups behind)."""
    report["variants"] = {}
    for variant in ("root_only", "bf16_keep_unsharded"):
        model = make_model([16, 15])
        if variant == "root_only":  # every parameter in the root's group, which stays unsharded after forward
            fully_shard(model)
        else:  # bf16 all-gathers: the full values must still come from the fp32 shards
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in model.model.layers:
                fully_shard(block, mp_policy=policy, reshard_after_forward=False)
            fully_shard(model, mp_policy=policy)
        optimizer, scheduler = make_optimizer(model)
        train_step(model, optimizer, scheduler, 1, rank)
        before = full_state(model)  # (a state dict reshards every group: take it before the forward)
        probe_logits(model)
        CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.3).reduce_now(1)
        after = full_state(model)
        plain = make_model([16, 15], reference=True)
        plain.load_state_dict(before)
        CompreSSMReducer(plain, policy="fixed", fraction=0.3).reduce_now(1)
        losses = [train_step(model, optimizer, scheduler, step, rank) for step in (2, 3)]
        report["variants"][variant] = {
            "dims": list(model.config.state_dims),
            "plain_dims": list(plain.config.state_dims),
            "diff_vs_plain_reduce": max_diff(after, plain.state_dict()),
            "dtypes": sorted({str(tensor.dtype) for tensor in after.values()}),
            "losses_finite": all(loss == loss for loss in losses),
            "holds_exactly_model_params": holds_exactly_model_params(model, optimizer),
        }


def callback_refuses_fsdp2(model, optimizer, output_dir):
    args = TrainingArguments(os.path.join(output_dir, "trainer"), report_to="none", use_cpu=True)
    try:
        CompreSSMCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)
    except NotImplementedError as error:
        return str(error)
    return None


def reduce_with_injected_failure(reducer, failing_rank, target, attribute, step):
    """reducer.reduce_now(step) while `target.<attribute>` raises on rank `failing_rank`; the error text or None."""
    if dist.get_rank() == failing_rank:
        def broken(*args, **kwargs):
            raise ValueError(f"injected failure on rank {failing_rank}")

        setattr(target, attribute, broken)
    try:
        reducer.reduce_now(step)
        return None
    except (DistributedReductionError, ValueError) as caught:
        return f"{type(caught).__name__}: {caught}"
    finally:
        target.__dict__.pop(attribute, None)


def faults(rank, model, optimizer, report):
    dims = list(model.config.state_dims)

    def outcome(error, events_before):
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, error)
        state_unchanged = max_diff(before, full_state(model)) == 0.0 and list(model.config.state_dims) == dims
        return {"errors": gathered, "unchanged": state_unchanged,
                "history_unchanged": len(model.reduction_history) == events_before,
                "holds_exactly_model_params": holds_exactly_model_params(model, optimizer),
                "trains_after": trains(model, optimizer, 30, rank)}

    # 1. rank 0 (the decider) raises while reducing: rank 1 must learn it at once, not after the timeout
    reducer = CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.5, collective_timeout=60)
    before, events_before = full_state(model), len(model.reduction_history)
    error = reduce_with_injected_failure(reducer, 0, model, "reduce", 20)
    report["fault_decider"] = outcome(error, events_before)

    # 2. rank 1 raises while applying rank 0's decision: every rank restores the parameters and raises
    before, events_before = full_state(model), len(model.reduction_history)
    error = reduce_with_injected_failure(reducer, 1, model.lru_layers()[0], "resize_state", 21)
    report["fault_apply"] = outcome(error, events_before)

    # 3. rank 1 never enters the event: rank 0 must fail with a clear message within the timeout, not hang
    reducer = CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.5, collective_timeout=2)
    dist.barrier()
    if rank == 1:
        time.sleep(6.0)
        return False
    started = time.monotonic()
    try:
        reducer.reduce_now(22)
        report["fault_timeout"] = {"error": None}
    except DistributedReductionError as caught:
        report["fault_timeout"] = {"error": str(caught), "seconds": time.monotonic() - started,
                                   "dims": list(model.config.state_dims)}
    return True


def main(output_dir, report_path):
    faulthandler.enable()  # a crash or a hang shows its stack (the latter before the test's guard kills it)
    faulthandler.dump_traceback_later(200, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"world_size": dist.get_world_size()}

    model, optimizer, reducer, continued, captured = main_run(rank, output_dir, report)
    fsdp_logits = probe_logits(model)
    if rank == 0:
        reference_run(report, fsdp_logits, captured)
        plain = make_model(list(model.config.state_dims), seed=2, reference=True)
        result = plain.load_state_dict(continued, strict=True)
        report["plain_load_missing"] = list(result.missing_keys) + list(result.unexpected_keys)
        report["plain_vs_fsdp_logits"] = float((probe_logits(plain) - fsdp_logits).abs().max())
    resume_run(rank, output_dir, report, continued, report["events"])
    save_pretrained_run(rank, model, output_dir, report, continued)
    rollback_run(rank, report)
    variants_run(rank, report)
    report["callback_refusal"] = callback_refuses_fsdp2(model, optimizer, output_dir)
    writes = faults(rank, model, optimizer, report)
    if writes:
        with open(report_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: the process group is unusable after the timeout above


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
