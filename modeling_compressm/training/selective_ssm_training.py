"""In-training state reduction of CompreSSM Mamba-2 and Mamba (Mamba-1) models: Gramian statistics from training
batches (forward hooks, no extra forward passes), optimizer-state repair after a reduction, and a Trainer callback
tying them together.

Glue only: the math lives in `mamba2_reduction.py` / `mamba_reduction.py`, the hooks and the in-place layer surgery in
the modeling files (`attach_gramian_statistics`, `reduce`).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class SelectiveSSMGramianCollector:
    """Accumulates each layer's float64 Gramian statistics from the forward passes the model runs anyway.

    `start(model)` attaches the model's statistics hooks (`attach_gramian_statistics`: Mamba-2 mixers' `scan_inputs`,
    Mamba-1 mixers' `x_proj`), counting training-mode passes only (inputs detached; forwards recomputed by activation
    checkpointing during backward are not counted again); `stop()` removes the hooks; `statistics` holds one
    statistics object per layer (model order)."""

    def __init__(self):
        self.statistics: list = []
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, model: torch.nn.Module) -> None:
        self.stop()
        attach = getattr(model, "attach_gramian_statistics", None)
        if attach is None:
            raise ValueError(f"{type(model).__name__} is not a CompreSSM Mamba-2 or Mamba model (no "
                             "attach_gramian_statistics); convert it with from_mamba2 / from_mamba")
        statistics, handles = attach(accept=_training_forward)
        if not statistics:
            for handle in handles:
                handle.remove()
            raise ValueError(f"{type(model).__name__} has no Mamba mixer layers to collect statistics from")
        self.statistics, self._handles = statistics, handles

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _training_forward(module: torch.nn.Module) -> bool:
    """Count a hooked pass: the model is training and autograd is not re-running the forward in backward."""
    return module.training and not _in_backward()


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


class SelectiveSSMReductionCallback(TrainerCallback):
    """Reduce a CompreSSM Mamba-2 or Mamba (Mamba-1) model once during `Trainer.train`.

    Statistics are collected from the training batches of steps [start_step, start_step + window_steps); at the end of
    step start_step + window_steps - 1 the model is reduced to `ranks` with `method` and the optimizer is repaired.
    method: "balanced" or "select"; None: the model's default ("balanced" for Mamba-2, "select" for Mamba-1, which
    refuses "balanced" when training begins). `self.results` holds the `LayerReduction`s `reduce` returned (None
    before the event)."""

    def __init__(self, ranks, start_step: int = 0, window_steps: int = 1, method: str | None = None):
        if window_steps < 1 or start_step < 0:
            raise ValueError(f"need start_step >= 0 and window_steps >= 1, got {start_step} and {window_steps}")
        self.ranks, self.method = ranks, method
        self.start_step, self.end_step = start_step, start_step + window_steps
        self.collector = SelectiveSSMGramianCollector()
        self.results: list | None = None

    def _method(self) -> dict:
        return {} if self.method is None else {"method": self.method}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:  # the model's own refusal of a method (Mamba-1: select only) before any step
            model.reduce(None, **self._method())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.start_step and self.results is None and not self.collector.active:
            self.collector.start(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # global_step already counts the finished step here
        if state.global_step != self.end_step or not self.collector.active:
            return
        self.collector.stop()
        empty = [layer for layer, statistics in enumerate(self.collector.statistics) if statistics.count == 0]
        if empty:
            raise RuntimeError(
                f"no Gramian statistics reached layers {empty} in steps [{self.start_step}, {self.end_step}): the "
                "training forward did not pass the hooked modules (e.g. transformers' fused Mamba-1 CUDA training "
                "path, mamba_inner_fn, skips x_proj); train without the mamba_ssm kernels during the window"
            )
        old_parameters = dict(model.named_parameters())
        self.results = model.reduce(self.ranks, statistics=self.collector.statistics, **self._method())
        if optimizer is not None:
            repair_optimizer(optimizer, old_parameters, model, self.results)

    def on_train_end(self, args, state, control, **kwargs):
        self.collector.stop()


__all__ = ["SelectiveSSMGramianCollector", "SelectiveSSMReductionCallback", "repair_optimizer"]
