"""Worker for tests/test_fsdp.py: a reduction inside an `accelerate` training loop, 2 processes on gloo/CPU.

Modes:
  ddp    `Accelerator(cpu=True)` -> DistributedDataParallel. The reduction is the DDP recipe (the one
         `CompreSSMCallback.reduce_now` uses): rank 0 reduces, the other ranks re-allocate the new sizes and receive
         the reduced parameters by broadcast (Parameter objects keep their identity, so the optimizer still holds
         them), the state of the reduced parameters is deleted from the torch optimizer inside accelerate's
         `AcceleratedOptimizer` (`.optimizer`), and the DDP reducer is rebuilt in place (`rebuild_ddp_reducer`).
  fsdp2  accelerate's FSDP2 preparation (`FullyShardedDataParallelPlugin(fsdp_version=2)`, blocks wrapped by
         `transformer_based_wrap`). accelerate 1.15 turns FSDP on only for accelerators: on CPU it silently keeps
         MULTI_CPU (DDP) and ignores the plugin, so this worker sets `distributed_type = FSDP` after constructing the
         Accelerator to run accelerate's real FSDP2 `prepare` (fully_shard, parameter swap in the optimizer) on CPU.
         The reduction is `modeling_compressm.fsdp.full_lru_parameters(model, accelerated_optimizer)`.

Both: gradient accumulation over 2 micro-batches (`accelerator.accumulate`), an LR scheduler prepared by accelerate,
reduce after 3 steps, train 3 more, save with `accelerator.get_state_dict` + `save_pretrained`, reload with
`from_pretrained` (reduced sizes from config.json), prepare it and train on. Rank 0 writes a JSON report.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/accelerate_worker.py MODE OUTPUT_DIR REPORT_JSON
"""

import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from modeling_compressm import CompreSSMConfig, CompreSSMForSequenceClassification
from modeling_compressm.fsdp import full_lru_parameters, is_fsdp2

RANKS = [10, 6]
LENGTH = 12


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


def train(accelerator, model, optimizer, scheduler, steps):
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


def reduce_ddp(accelerator, model, optimizer):
    """The DDP recipe (see the module docstring)."""
    from modeling_compressm.callback import rebuild_ddp_reducer

    inner = accelerator.unwrap_model(model)
    dims = [RANKS if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        inner.reduce(RANKS)
    dist.broadcast_object_list(dims, src=0)
    if not accelerator.is_main_process:
        inner.set_state_dims(dims[0])
    for layer in inner.lru_layers():
        for parameter in layer.parameters():
            dist.broadcast(parameter.data, src=0)
        for parameter in layer.ssm_parameters():
            optimizer.optimizer.state.pop(parameter, None)
    return rebuild_ddp_reducer(model)


def main(mode, output_dir, report_path):
    faulthandler.enable()  # a crash or a hang shows its stack (the latter before the test's guard kills it)
    faulthandler.dump_traceback_later(200, exit=True)
    torch.set_num_threads(1)
    if mode == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=2)
        report = {"distributed_type_on_cpu": str(accelerator.distributed_type)}
        # see the module docstring; AcceleratorState re-reads PartialState's shared dict when re-instantiated
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    else:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        report = {"distributed_type_on_cpu": str(accelerator.distributed_type)}
    rank = accelerator.process_index

    model = make_model()
    optimizer, scheduler = make_optimizer(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    report["types"] = [type(model).__name__, type(optimizer).__name__, type(optimizer.optimizer).__name__,
                       type(scheduler).__name__]
    report["is_fsdp2"] = is_fsdp2(model)
    from torch.distributed.fsdp import FSDPModule

    report["fsdp_modules"] = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    losses = train(accelerator, model, optimizer, scheduler, range(3))

    inner = accelerator.unwrap_model(model)
    hyper = [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    if mode == "fsdp2":
        with full_lru_parameters(model, optimizer) as session:
            if accelerator.is_main_process:
                inner.reduce(RANKS)
        report["changed_layers"] = session.changed_layers
    else:
        report["ddp_rebuilt"] = reduce_ddp(accelerator, model, optimizer)
    held = [id(p) for g in optimizer.optimizer.param_groups for p in g["params"]]
    report["holds_exactly_model_params"] = sorted(held) == sorted(id(p) for p in model.parameters())
    report["hyper_kept"] = hyper == [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    report["scheduler_attached"] = scheduler.scheduler.optimizer is optimizer.optimizer
    report["dims_after_reduction"] = list(inner.config.state_dims)
    snapshot = full_parameters(accelerator, model)
    losses += train(accelerator, model, optimizer, scheduler, range(3, 6))
    trained = full_parameters(accelerator, model)
    report["changed_after_reduction"] = max(float((trained[k] - snapshot[k]).abs().max()) for k in trained)
    report["max_rank_diff"] = max_rank_diff(trained)
    report["losses"] = losses

    # checkpoint the HF way and reload it: the reduced sizes come back from config.json
    state_dict = accelerator.get_state_dict(model)  # FSDP2: gathered, on the main process only
    save_dir = os.path.join(output_dir, "saved")
    if mode == "ddp":
        accelerator.unwrap_model(model).save_pretrained(
            save_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
    elif accelerator.is_main_process:
        # Not unwrap_model(model).save_pretrained(...): CompreSSM's save_pretrained draws the model card from the
        # live model's Hankel singular values, which under FSDP2 are DTensor collectives run by the main process
        # alone -> the other ranks wait forever. A plain model of the reduced config holds the gathered weights.
        plain = CompreSSMForSequenceClassification(type(inner.config).from_dict(inner.config.to_dict()))
        plain.load_state_dict(state_dict, strict=True)
        plain.save_pretrained(save_dir)
    accelerator.wait_for_everyone()
    reloaded = CompreSSMForSequenceClassification.from_pretrained(save_dir)
    report["reloaded_dims"] = list(reloaded.config.state_dims)
    report["reloaded_diff"] = max(float((reloaded.state_dict()[k] - trained[k]).abs().max()) for k in trained)
    reloaded_optimizer, reloaded_scheduler = make_optimizer(reloaded)
    reloaded, reloaded_optimizer, reloaded_scheduler = accelerator.prepare(
        reloaded, reloaded_optimizer, reloaded_scheduler
    )
    report["reloaded_losses"] = train(accelerator, reloaded, reloaded_optimizer, reloaded_scheduler, range(6, 8))
    report["reloaded_rank_diff"] = max_rank_diff(full_parameters(accelerator, reloaded))

    if accelerator.is_main_process:
        with open(report_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    accelerator.wait_for_everyone()
    # Leave without interpreter teardown: gloo's threads racing the exit sometimes abort a finished worker
    # ("terminate called without an active exception").
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2], sys.argv[3])
