"""When to reduce and to which sizes: the defaults, the schedule, the rank policy and the rollback rule.

No model, optimizer or Trainer code here: these are plain values, validated at construction, built from one
`settings.ReductionSettings` (which holds the defaults: `settings.DEFAULTS`) and shared by the reducer core
(`reducer.py`) and the Trainer adapter (`callback.py`).

* `ReductionSchedule`: events at steps s > 0 with start <= s <= end and (s - start) % interval == 0; each of
  start/end/interval is an int (absolute optimizer step) or a float in (0, 1] (a fraction of `max_steps`).
* `RankPolicy`: per-layer sizes from Hankel singular values (`rank_selection.select_ranks`), with layers whose
  factorisation failed left out (they keep their size and their states count against `total_budget`).
* `RollbackRule`: whether an evaluation metric degraded by more than a tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..reduction import check_tau
from .rank_selection import POLICIES, select_ranks


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def steps_of(value: int | float, max_steps: int | None, minimum: int = 0) -> int:
    """An absolute step (an int, returned as is) or a fraction of a run of `max_steps` steps (a float, rounded down,
    at least `minimum`): the one rounding rule of every schedule in the package."""
    if isinstance(value, float):
        return max(minimum, int(math.floor(value * max_steps + 1e-9)))
    return int(value)


def _check_point(name: str, value) -> None:
    if not is_number(value):
        raise ValueError(f"{name} must be an int (absolute step) or a float in (0, 1] (fraction of max_steps), got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(
            f"a float {name} is a fraction of max_steps and must lie in (0, 1], got {value!r} "
            "(pass an int for an absolute step)"
        )


@dataclass(frozen=True)
class ReductionSchedule:
    """Steps at which reduction events happen.

    start_step: first step at which an event may happen (int >= 0, or a float fraction of max_steps).
    end_step: last such step (int, or a float in (0, 1]: fraction of max_steps).
    interval: steps between events (int >= 1, or a float in (0, 1]: fraction of max_steps, at least 1 step).
    """

    start_step: int | float
    end_step: int | float
    interval: int | float

    def __post_init__(self):
        if is_int(self.start_step) and self.start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {self.start_step!r}")
        _check_point("start_step", self.start_step)
        _check_point("end_step", self.end_step)
        if is_int(self.interval) and self.interval < 1:
            raise ValueError(f"interval must be an int >= 1 or a float in (0, 1], got {self.interval!r}")
        _check_point("interval", self.interval)
        if is_int(self.start_step) and is_int(self.end_step) and self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")

    @property
    def needs_max_steps(self) -> bool:
        return any(isinstance(value, float) for value in (self.start_step, self.end_step, self.interval))

    def resolve(self, max_steps: int | None) -> tuple[int, int, int]:
        """(start, end, interval) as absolute steps for a run of `max_steps` optimizer steps."""
        if self.needs_max_steps and (not is_int(max_steps) or max_steps < 1):
            raise ValueError(
                "start_step / end_step / interval given as fractions need the run's max_steps (a positive int), got "
                f"max_steps={max_steps!r}"
            )

        return (steps_of(self.start_step, max_steps), steps_of(self.end_step, max_steps),
                steps_of(self.interval, max_steps, minimum=1))

    def is_due(self, step: int, max_steps: int | None) -> bool:
        """Whether an event is scheduled after optimizer step `step`."""
        start, end, interval = self.resolve(max_steps)
        return step > 0 and start <= step <= end and (step - start) % interval == 0

    def steps(self, max_steps: int | None) -> list[int]:
        """All scheduled steps (for checks and messages)."""
        start, end, interval = self.resolve(max_steps)
        first = start if start > 0 else interval
        return list(range(first, end + 1, interval)) if first <= end else []


@dataclass(frozen=True)
class RankPolicy:
    """How many states each layer keeps at an event.

    policy: "global" (every scheduled event keeps the same share of the total state, so that `final_fraction` of it
        is left after the last one; states ranked by per-layer normalised HSV over all layers), "tolerance" (keep
        (1 - tau) of each layer's HSV sum), "fixed" (remove `fraction` of each layer's states per event) or
        "rollback" (tolerance sizes; the event is checked afterwards, see RollbackRule).
    gate: a layer is reduced only if its new size < gate * current size.   min_dim: least size a reduction produces.
    total_budget: optional total state size over all layers, shared by normalised HSV energy.
    final_fraction: "global" policy: share of the total state left after the last scheduled event, in (0, 1).
    """

    policy: str
    tau: float
    fraction: float
    gate: float
    min_dim: int
    total_budget: int | None
    final_fraction: float

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        check_tau(self.tau, must="be a number in")
        if not is_number(self.fraction) or not 0.0 < float(self.fraction) < 1.0:
            raise ValueError(f"fraction must be a number strictly between 0 and 1, got {self.fraction!r}")
        if not is_number(self.final_fraction) or not 0.0 < float(self.final_fraction) < 1.0:
            raise ValueError(f"final_fraction must be a number strictly between 0 and 1, got {self.final_fraction!r}")
        if not is_number(self.gate) or not 0.0 < float(self.gate) <= 1.0:
            raise ValueError(f"gate must be a number in (0, 1], got {self.gate!r}")
        if not is_int(self.min_dim) or self.min_dim < 1:
            raise ValueError(f"min_dim must be an int >= 1, got {self.min_dim!r}")
        if self.total_budget is not None:
            if not is_int(self.total_budget) or self.total_budget < 1:
                raise ValueError(f"total_budget must be None or a positive int, got {self.total_budget!r}")
            if self.total_budget < self.min_dim:
                raise ValueError(
                    f"total_budget={self.total_budget} is smaller than min_dim={self.min_dim}: not even one layer fits"
                )

    def check_budget(self, state_dims: list[int]) -> None:
        """Raise if `total_budget` cannot hold min(min_dim, N_i) states in every layer (known once the model is)."""
        if self.total_budget is None:
            return
        floor = sum(min(self.min_dim, dim) for dim in state_dims)
        if self.total_budget < floor:
            raise ValueError(
                f"total_budget={self.total_budget} is smaller than the {floor} states that min_dim={self.min_dim} keeps "
                f"in the model's {len(state_dims)} layers (sizes {list(state_dims)}): raise total_budget or lower min_dim"
            )

    def select(self, hsv_per_layer: list[torch.Tensor | None], current_dims: list[int], events: int = 1) -> list[int]:
        """New size per layer. Layers whose HSVs are None (their factorisation failed) keep their size; the budget
        available to the others is what those layers do not already hold.

        Args:
            hsv_per_layer: per layer float64 (N_i,) Hankel singular values, or None.
            current_dims: current sizes N_i.
            events: number of scheduled events ("global" policy: each keeps final_fraction ** (1 / events)).
        Returns:
            list of ints (== N_i where the layer is left alone).
        """
        healthy = [index for index, hsv in enumerate(hsv_per_layer) if hsv is not None]
        ranks = list(current_dims)
        if not healthy:
            return ranks
        budget = self.total_budget
        if budget is not None:
            held_by_failed = sum(dim for index, dim in enumerate(current_dims) if index not in healthy)
            floor = sum(min(self.min_dim, current_dims[index]) for index in healthy)
            budget = max(budget - held_by_failed, floor)
        chosen = select_ranks(
            [hsv_per_layer[index] for index in healthy], [current_dims[index] for index in healthy],
            policy=self.policy, tau=self.tau, fraction=self.fraction, gate=self.gate, min_dim=self.min_dim,
            total_budget=budget, final_fraction=self.final_fraction, events=events,
        )
        for index, rank in zip(healthy, chosen):
            ranks[index] = rank
        return ranks


@dataclass(frozen=True)
class RollbackRule:
    """Whether a reduction degraded an evaluation metric by more than `tolerance` (relative to the value before).

    metric: metric name ("eval_" is prefixed if missing).   tolerance: relative degradation (>= 0) that triggers a
    rollback.   greater_is_better: None infers it from the name (names ending in "loss" are lower-is-better).
    """

    metric: str
    tolerance: float
    greater_is_better: bool | None

    def __post_init__(self):
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"rollback_metric must be a non-empty string, got {self.metric!r}")
        if not is_number(self.tolerance) or not self.tolerance >= 0 or not math.isfinite(self.tolerance):
            raise ValueError(f"rollback_tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if self.greater_is_better is not None and not isinstance(self.greater_is_better, bool):
            raise ValueError(f"greater_is_better must be None or a bool, got {self.greater_is_better!r}")

    @property
    def metric_name(self) -> str:
        return self.metric if self.metric.startswith("eval_") else f"eval_{self.metric}"

    @property
    def lower_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return not self.greater_is_better
        return self.metric_name.endswith("loss")

    def relative_degradation(self, before: float, after: float) -> float:
        degradation = (after - before) if self.lower_is_better else (before - after)
        return degradation / max(abs(before), 1e-12)

    def degraded(self, before: float, after: float) -> bool:
        return bool(self.relative_degradation(before, after) > self.tolerance)


def evaluation_steps(eval_steps: int, max_steps: int, eval_delay: float = 0) -> list[int]:
    """The optimizer steps after which a Trainer with `eval_strategy="steps"` evaluates: multiples of `eval_steps`
    (an int >= 1, as `TrainerState.eval_steps` holds it) from `eval_delay` on, plus the last step."""
    steps = [step for step in range(eval_steps, max_steps + 1, eval_steps) if step >= eval_delay]
    if max_steps >= eval_delay and max_steps not in steps:
        steps.append(max_steps)
    return steps


def unchecked_rollback_events(event_steps: list[int], checks: list[int]) -> list[tuple[int, int]]:
    """Rollback policy: (event, next event) pairs where no check (evaluation) falls in [event, next event).

    An event stays pending until the first evaluation at or after its step, and no event runs while one is pending,
    so the next event would be skipped. `event_steps` and `checks` are optimizer steps in increasing order."""
    return [
        (step, following) for step, following in zip(event_steps, event_steps[1:])
        if not any(step <= check < following for check in checks)
    ]
