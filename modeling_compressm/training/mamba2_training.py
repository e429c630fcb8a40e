"""In-training state reduction of CompreSSM Mamba-2 models: Gramian statistics from training batches (forward hooks,
no extra forward passes), optimizer-state repair after a reduction, and a Trainer callback tying them together.

Glue only: the math lives in `mamba2_reduction.py`, the in-place layer surgery in `modeling_compressm_mamba2.py`.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..mamba2_reduction import GramianStatistics
from ..modeling_compressm_mamba2 import CompreSSMMamba2Mixer


class Mamba2GramianCollector:
    """Accumulates each layer's float64 Gramian statistics from the forward passes the model runs anyway.

    `start(model)` hooks every mixer's `scan_inputs` (training-mode passes only, inputs detached; forwards recomputed
    by activation checkpointing during backward are not counted again); `stop()` removes the hooks; `statistics` holds one `GramianStatistics` per layer (model order)."""

    def __init__(self):
        self.statistics: list[GramianStatistics] = []
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, model: torch.nn.Module) -> None:
        self.stop()
        mixers = [module for module in model.modules() if isinstance(module, CompreSSMMamba2Mixer)]
        if not mixers:
            raise ValueError(f"{type(model).__name__} has no CompreSSMMamba2Mixer layers to collect statistics from")
        self.statistics = [GramianStatistics() for _ in mixers]
        self._handles = [
            mixer.scan_inputs.register_forward_hook(self._hook(mixer, statistics))
            for mixer, statistics in zip(mixers, self.statistics)
        ]

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _hook(mixer: CompreSSMMamba2Mixer, statistics: GramianStatistics):
        def hook(module, args, output):
            if not module.training or _in_backward():  # activation checkpointing re-runs the forward in backward
                return
            with torch.no_grad():
                mask = args[4] if len(args) > 4 else None
                statistics.update(mixer.scan_inputs_of(*output), mask)

        return hook


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes forwards)."""
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    return current_task is not None and current_task() != -1


def repair_optimizer(optimizer: torch.optim.Optimizer, old_parameters: dict, model: torch.nn.Module,
                     results: list) -> None:
    """Point `optimizer` at the parameters `model.reduce` created, carrying their per-parameter state.

    Args:
        optimizer: the torch optimizer (an accelerate wrapper is unwrapped) whose param_groups held `old_parameters`.
        old_parameters: {full name: parameter} of the model taken before `reduce`.
        model: the reduced model.
        results: the `LayerReduction`s `reduce` returned. A selected parameter's state tensors of the old parameter's
            shape (Adam's exp_avg, exp_avg_sq, ...) are sliced exactly like the parameter (`LayerChange.slicers`);
            scalars (step) are kept. A replaced parameter (a new balanced projection) starts with empty state in the
            group of its layer's in_proj.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)
    changes = [result.change for result in results if result.change is not None]
    sliced = {name: slicer for change in changes for name, slicer in change.slicers.items()}
    replaced = {name for change in changes for name in change.parameters if name not in change.slicers}
    current = dict(model.named_parameters())
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name in sorted(set(sliced) | replaced):
        new = current[name]
        old = old_parameters.get(name)
        if old is not None and old is new:
            continue
        state = optimizer.state.pop(old, {}) if old is not None else {}
        group = group_of.get(id(old)) if old is not None else None
        if group is None:  # a new projection: join the group of the same layer's in_proj
            group = group_of.get(id(current[name.rsplit(".", 1)[0] + ".in_proj.weight"]))
        if group is None:
            raise ValueError(f"optimizer holds no parameter group for {name} (nor for its layer's in_proj.weight)")
        if name in sliced:
            optimizer.state[new] = {
                key: sliced[name](value) if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }
        params = group["params"]
        if old is not None and any(p is old for p in params):
            params[next(i for i, p in enumerate(params) if p is old)] = new
        else:
            params.append(new)
        group_of[id(new)] = group


class Mamba2ReductionCallback(TrainerCallback):
    """Reduce a CompreSSM Mamba-2 model once during `Trainer.train`.

    Statistics are collected from the training batches of steps [start_step, start_step + window_steps); at the end of
    step start_step + window_steps - 1 the model is reduced to `ranks` with `method` ("balanced" or "select") and the
    optimizer is repaired. `self.results` holds the `LayerReduction`s `reduce` returned (None before the event)."""

    def __init__(self, ranks, start_step: int = 0, window_steps: int = 1, method: str = "balanced"):
        if window_steps < 1 or start_step < 0:
            raise ValueError(f"need start_step >= 0 and window_steps >= 1, got {start_step} and {window_steps}")
        self.ranks, self.method = ranks, method
        self.start_step, self.end_step = start_step, start_step + window_steps
        self.collector = Mamba2GramianCollector()
        self.results: list | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.start_step and self.results is None and not self.collector.active:
            self.collector.start(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # global_step already counts the finished step here
        if state.global_step != self.end_step or not self.collector.active:
            return
        self.collector.stop()
        old_parameters = dict(model.named_parameters())
        self.results = model.reduce(self.ranks, method=self.method, statistics=self.collector.statistics)
        if optimizer is not None:
            repair_optimizer(optimizer, old_parameters, model, self.results)

    def on_train_end(self, args, state, control, **kwargs):
        self.collector.stop()


__all__ = ["Mamba2GramianCollector", "Mamba2ReductionCallback", "repair_optimizer"]
