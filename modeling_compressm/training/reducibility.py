"""Training to be reducible: the Hankel nuclear-norm regulariser's training-side glue (no math; the penalty is
`hankel_penalty.reducibility_penalty`).

    penalty = weight * sum over LRU layers of (sum of the layer's Hankel singular values) / (its number of states)

is added to the training objective from `start_step` until `end_step` (default: the last scheduled reduction event),
so that the states the reductions will remove carry little by the time they are removed (in the LM study, with weight
0.02 the compressed byte LM beat the same sizes trained from scratch, which plain truncation did not).

It acts on the gradients, not on the loss tensor: every `every` optimizer steps the penalty and its gradient w.r.t.
the SSM parameters are computed (one differentiable factorisation per layer, float64), and at every step of the
window that gradient, times `weight`, is added to the parameters' `.grad` after the backward pass and gradient
clipping, just before `optimizer.step()`. So it works with a plain `transformers.Trainer` + `CompreSSMCallback`
(through the `on_pre_optimizer_step` event), with `CompreSSMTrainer`, and in a plain loop
(`CompreSSMReducer.apply_regularizer(step)` between `loss.backward()` and `optimizer.step()`); with gradient
accumulation it is added once per optimizer step. The logged training loss does not include it; the callback logs
its value as `compressm/reducibility_penalty`. Between evaluations the gradient is the one of the last evaluation
(parameters move little in `every` steps); a reduction event, which changes the shapes, triggers a new evaluation.

Not supported (refused with an error when the reducer is built): FSDP2-sharded models (the penalty needs each
layer's full parameters on every rank).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..hankel_penalty import reducibility_penalty
from .schedule import is_int

__all__ = ["ReducibilityRegularizer", "regularizer_from"]



@dataclass
class ReducibilityRegularizer:
    """Settings of the reducibility regulariser (see the module docstring), with its cached gradient.

    weight: multiplier of the penalty (> 0); 0.02 was measured on a byte LM (design notes).
    every: evaluate the penalty and its gradient every this many optimizer steps (int >= 1); the gradient of the
        last evaluation is applied at the steps between.
    start_step: first optimizer step (1-based) at which the gradient is applied (int >= 1).
    end_step: last such step (int >= start_step), or None: the reducer's last scheduled reduction event.
    """

    weight: float = 0.02
    every: int = 10
    start_step: int = 1
    end_step: int | None = None
    _gradients: dict | None = field(default=None, init=False, repr=False, compare=False)
    _evaluated_at: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
            math.isfinite(self.weight) and self.weight > 0
        ):
            raise ValueError(f"ReducibilityRegularizer.weight must be a positive number, got {self.weight!r}")
        if not is_int(self.every) or self.every < 1:
            raise ValueError(f"ReducibilityRegularizer.every must be an int >= 1 (steps), got {self.every!r}")
        if not is_int(self.start_step) or self.start_step < 1:
            raise ValueError(f"ReducibilityRegularizer.start_step must be an int >= 1, got {self.start_step!r}")
        if self.end_step is not None and (not is_int(self.end_step) or self.end_step < self.start_step):
            raise ValueError(
                f"ReducibilityRegularizer.end_step must be None (the last reduction event) or an int >= start_step "
                f"({self.start_step}), got {self.end_step!r}"
            )

    def settings(self) -> dict:
        """The constructor arguments (JSON-serialisable)."""
        return {name: value for name, value in asdict(self).items() if not name.startswith("_")}

    def window(self, last_event_step: int | None) -> tuple[int, int]:
        """(first, last) optimizer step at which the gradient is applied; last < first means never."""
        end = self.end_step if self.end_step is not None else (last_event_step or 0)
        return self.start_step, end

    def apply(self, model, step: int, system: str, last_event_step: int | None) -> float | None:
        """Add weight x the penalty's gradient to the `.grad` of `model`'s LRU SSM parameters if `step` lies in the
        window; `model` is the bare CompreSSM model. Returns the penalty value when it was evaluated at this step,
        else None."""
        first, last = self.window(last_event_step)
        if not first <= step <= last:
            self._gradients = None
            return None
        layers = model.lru_layers()
        parameters = [parameter for layer in layers for parameter in layer.ssm_parameters()]
        value = None
        stale = self._gradients is None or self._evaluated_at is None or step - self._evaluated_at >= self.every
        if stale or any(id(p) not in self._gradients or self._gradients[id(p)].shape != p.shape for p in parameters):
            with torch.enable_grad():
                penalty = reducibility_penalty([layer.to_lti()[:3] for layer in layers], system)
                gradients = torch.autograd.grad(penalty, parameters, allow_unused=True)
            self._gradients = {
                id(parameter): (torch.zeros_like(parameter) if gradient is None else gradient.detach())
                for parameter, gradient in zip(parameters, gradients)
            }
            self._evaluated_at = step
            value = float(penalty.detach())
        for parameter in parameters:
            gradient = self.weight * self._gradients[id(parameter)].to(parameter.dtype)
            parameter.grad = gradient.clone() if parameter.grad is None else parameter.grad.add_(gradient)
        return value


def regularizer_from(value) -> ReducibilityRegularizer | None:
    """None, a ReducibilityRegularizer (returned as is) or its `settings()` dict (as saved in a checkpoint's
    trainer_state.json); anything else raises TypeError."""
    if value is None or isinstance(value, ReducibilityRegularizer):
        return value
    if isinstance(value, dict):
        return ReducibilityRegularizer(**value)
    raise TypeError(f"regularizer must be a ReducibilityRegularizer, its settings dict or None, got {value!r}")
