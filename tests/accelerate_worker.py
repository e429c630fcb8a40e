"""Worker for tests/test_accelerate.py: `CompreSSMReducer` inside an `accelerate` training loop, 2 processes on
gloo/CPU, with accelerate's DDP and with accelerate's FSDP2 preparation, one after the other in the same processes.

  ddp    `Accelerator(cpu=True)` -> DistributedDataParallel (the reducer's DDP strategy).
  fsdp2  accelerate's FSDP2 preparation (`FullyShardedDataParallelPlugin(fsdp_version=2)`, blocks wrapped by
         `transformer_based_wrap`; the reducer's FSDP2 strategy).
         CPU-ONLY TEST HACK: accelerate 1.15 turns FSDP on only for accelerators; on CPU it silently keeps
         MULTI_CPU (DDP) and ignores the plugin. To run accelerate's real FSDP2 `prepare` (fully_shard, parameter
         swap in the optimizer) and `get_state_dict` on CPU, this worker sets `distributed_type = FSDP` (and the
         plugin) on the accelerator state after constructing the Accelerator. On GPUs no such step is needed.

Both: gradient accumulation over 2 micro-batches (`accelerator.accumulate`), an LR scheduler prepared by accelerate,
one reduction event after optimizer step 3 (`reducer.step(step)` when `accelerator.sync_gradients`), train 3 more
steps, save with the standard recipe (`accelerator.unwrap_model(model).save_pretrained(dir,
state_dict=accelerator.get_state_dict(model), is_main_process=..., save_function=accelerator.save)`), reload with
`from_pretrained` (reduced sizes from config.json, history from compressm_history.json), prepare it and train on.
Rank 0 writes a JSON report {"ddp": {...}, "fsdp2": {...}}.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/accelerate_worker.py OUTPUT_DIR REPORT_JSON
"""

import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from modeling_compressm import CompreSSMConfig, CompreSSMForSequenceClassification, CompreSSMReducer
from modeling_compressm.training.fsdp import is_fsdp2

LENGTH = 12
REDUCER = dict(tau=0.05, start_step=3, end_step=3, interval=3, collective_timeout=60)


def make_model(seed=0):
    torch.manual_seed(seed)
    config = CompreSSMConfig(input_dim=1, hidden_size=16, num_hidden_layers=2, state_dims=[16, 15], num_labels=2)
    return CompreSSMForSequenceClassification(config)


def make_optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def batch(step, micro, rank):
    generator = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    inputs = torch.randn(4, LENGTH, 1, generator=generator)
    return inputs, (inputs[:, :4, 0].sum(dim=1) > 0).long()


def train(accelerator, model, optimizer, scheduler, steps, reducer=None):
    losses = []
    for step in steps:
        for micro in range(2):  # gradient accumulation: the first micro-batch runs without gradient sync
            with accelerator.accumulate(model):
                inputs, labels = batch(step, micro, accelerator.process_index)
                loss = model(inputs_embeds=inputs, labels=labels).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            if reducer is not None and accelerator.sync_gradients:
                reducer.step(step)
    return losses


def full_parameters(accelerator, model) -> dict:
    """Full parameter values on every rank (FSDP2: gathered; DDP: the local copy)."""
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def max_rank_diff(parameters: dict) -> float:
    flat = torch.cat([t.reshape(-1).float() for t in parameters.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - flat).abs().max()) for g in gathered)


def make_accelerator(mode):
    """A fresh Accelerator for `mode` (the singleton states of the previous mode are reset first)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    if mode == "ddp":
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        return accelerator, str(accelerator.distributed_type)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=2)
    distributed_type_on_cpu = str(accelerator.distributed_type)
    # CPU-ONLY TEST HACK (see the module docstring): AcceleratorState re-reads PartialState's shared dict when
    # re-instantiated, so both get the FSDP type.
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator, distributed_type_on_cpu


def run(mode, output_dir) -> dict:
    accelerator, distributed_type_on_cpu = make_accelerator(mode)
    report = {"distributed_type_on_cpu": distributed_type_on_cpu}

    model = make_model()
    optimizer, scheduler = make_optimizer(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    reducer = CompreSSMReducer(model, optimizer, **REDUCER)
    report["types"] = [type(model).__name__, type(optimizer).__name__, type(optimizer.optimizer).__name__,
                       type(scheduler).__name__, type(reducer.strategy).__name__]
    report["is_fsdp2"] = is_fsdp2(model)
    from torch.distributed.fsdp import FSDPModule

    report["fsdp_modules"] = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    hyper = [(g["initial_lr"], g["weight_decay"], g["betas"], len(g["params"])) for g in optimizer.param_groups]
    lru_before = {id(p) for layer in reducer.model.lru_layers() for p in layer.ssm_parameters()}
    losses = train(accelerator, model, optimizer, scheduler, range(1, 4), reducer)

    inner = accelerator.unwrap_model(model)
    report["events"] = [(event.step, event.dims_before, event.dims_after) for event in reducer.history]
    held = [id(p) for g in optimizer.optimizer.param_groups for p in g["params"]]
    report["holds_exactly_model_params"] = sorted(held) == sorted(id(p) for p in model.parameters())
    report["lru_parameters_replaced"] = not (lru_before & {id(p) for p in model.parameters()})
    report["hyper_kept"] = hyper == [(g["initial_lr"], g["weight_decay"], g["betas"], len(g["params"]))
                                     for g in optimizer.param_groups]
    report["scheduler_attached"] = scheduler.scheduler.optimizer is optimizer.optimizer
    report["dims_after_reduction"] = list(inner.config.state_dims)
    snapshot = full_parameters(accelerator, model)
    losses += train(accelerator, model, optimizer, scheduler, range(4, 7), reducer)
    trained = full_parameters(accelerator, model)
    report["changed_after_reduction"] = max(float((trained[k] - snapshot[k]).abs().max()) for k in trained)
    report["max_rank_diff"] = max_rank_diff(trained)
    report["losses"] = losses

    # the standard accelerate recipe (FSDP2: get_state_dict gathers on the main process; the card needs no
    # collective, so only the main process draws it)
    save_dir = os.path.join(output_dir, mode, "saved")
    accelerator.unwrap_model(model).save_pretrained(
        save_dir, state_dict=accelerator.get_state_dict(model), is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
    )
    accelerator.wait_for_everyone()
    reloaded = CompreSSMForSequenceClassification.from_pretrained(save_dir)
    report["reloaded_dims"] = list(reloaded.config.state_dims)
    report["reloaded_events"] = [event.step for event in reloaded.reduction_history]
    report["reloaded_diff"] = max(float((reloaded.state_dict()[k] - trained[k]).abs().max()) for k in trained)
    with open(os.path.join(save_dir, "README.md"), encoding="utf-8") as handle:
        report["card_has_spectrum"] = "## Hankel singular values" in handle.read()
    reloaded_optimizer, reloaded_scheduler = make_optimizer(reloaded)
    reloaded, reloaded_optimizer, reloaded_scheduler = accelerator.prepare(
        reloaded, reloaded_optimizer, reloaded_scheduler
    )
    report["reloaded_losses"] = train(accelerator, reloaded, reloaded_optimizer, reloaded_scheduler, range(7, 9))
    report["reloaded_rank_diff"] = max_rank_diff(full_parameters(accelerator, reloaded))
    accelerator.wait_for_everyone()
    return report


def main(output_dir, report_path):
    faulthandler.enable()  # a crash or a hang shows its stack (the latter before the test's guard kills it)
    faulthandler.dump_traceback_later(200, exit=True)
    torch.set_num_threads(1)
    report = {mode: run(mode, output_dir) for mode in ("ddp", "fsdp2")}
    if dist.get_rank() == 0:
        with open(report_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    dist.barrier()
    # Leave without interpreter teardown: gloo's threads racing the exit sometimes abort a finished worker
    # ("terminate called without an active exception").
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
