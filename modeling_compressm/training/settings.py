"""`ReductionSettings`: everything a run's reductions are configured by, as one frozen value, validated once.

`CompreSSMReducer(model, optimizer, settings=...)`, `CompreSSMCallback(settings=...)` and the `compressm` command
line (`app.run_settings.ReductionPlan`) all take one; their keyword arguments (`policy=`, `tau=`, `interval=`, ...)
are shortcuts that build the same value (`ReductionSettings.from_arguments`). Its field defaults are the package's
one set of defaults (`DEFAULTS`); `to_dict()` / `from_dict()` carry it through a checkpoint's trainer_state.json.

The parts it builds (in `schedule.py`): `schedule` (a `ReductionSchedule`: when), `rank_policy` (a `RankPolicy`: to
which sizes) and `rollback_rule` (a `RollbackRule`: when an event is undone).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property

from ..reduction import check_system
from .optimizer_state import optimizer_state_repair
from .reducibility import ReducibilityRegularizer, regularizer_from
from .schedule import RankPolicy, ReductionSchedule, RollbackRule, is_number

__all__ = ["ReductionSettings", "DEFAULTS", "SettingsView", "settings_from"]


@dataclass(frozen=True)
class ReductionSettings:
    """How a run reduces its model. Every field is checked when the value is made (ValueError naming the field).

    The defaults are the recipe that did best overall in the language-modelling study (benchmarks/results/
    lm_study_*.md, docs/callback.md): four events at 2.5%, 5%, 7.5% and 10% of `max_steps` (the schedule scales with
    the run, so short runs reduce too), each keeping the same share of the total state so that half of it is left
    after the last event, the states picked by one global ranking of the per-layer normalised HSVs, and the Adam state
    of reduced SSM parameters reset.

    Schedule (`schedule.ReductionSchedule`): start_step, end_step, interval: ints are optimizer steps, floats in
        (0, 1] fractions of the run's `max_steps`.
    Rank policy (`schedule.RankPolicy`): policy ("global", "tolerance", "fixed" or "rollback"), tau, fraction,
        final_fraction, gate, min_dim, total_budget.
    system: the balanced system, "complex" (the paper's map (lam, B~, C), the in-training default) or "real" (the map
        u -> Re(C h) each layer computes, the default of post-hoc `model.reduce`). In training the complex map did as
        well or better: on the LM study's BPE model it ended 0.008 bits per byte lower than the real map on 5 of 5
        seeds, and within seed noise of it on bytes and permuted digits (docs/callback.md, "Which map is balanced").
    Rollback rule (`schedule.RollbackRule`): rollback_metric, rollback_tolerance, greater_is_better.
    optimizer_state: optimizer-state repair mode (`optimizer_state.OPTIMIZER_STATE_REPAIRS`; "reset" deletes it).
    log_hsv: store each layer's HSVs in the events.
    regularizer: a `reducibility.ReducibilityRegularizer` (or its settings dict), or None for none.
    selective_method: Mamba-2 / Mamba models only (`selective_ssm_training.SelectiveSSMReducer`): "balanced" or
        "select", the method of the model's `reduce`; None: the model's default ("balanced" for Mamba-2, "select" for
        Mamba-1, which refuses "balanced").
    statistics_steps: Mamba-2 / Mamba models only: how many optimizer steps' training batches, ending with an event's
        step, the Gramian statistics of that event are collected from (an int >= 1).
    collective_timeout: seconds a collective of a distributed reduction may wait for the other ranks before failing
        (rank 0 decides the event while the others wait, so this also bounds the time one event takes to decide).
        Shorter than a Trainer's ddp_timeout (1800 s): a stalled rank fails the run within minutes, not half an hour.
    """

    policy: str = "global"
    tau: float = 0.01
    fraction: float = 0.25
    final_fraction: float = 0.5
    start_step: int | float = 0
    end_step: int | float = 0.1
    interval: int | float = 0.025
    gate: float = 0.95
    min_dim: int = 1
    total_budget: int | None = None
    system: str = "complex"
    rollback_metric: str = "eval_loss"
    rollback_tolerance: float = 0.01
    greater_is_better: bool | None = None
    optimizer_state: str = "reset"
    log_hsv: bool = True
    regularizer: ReducibilityRegularizer | None = None
    collective_timeout: float = 300.0
    selective_method: str | None = None
    statistics_steps: int = 1

    def __post_init__(self):
        check_system(self.system)
        optimizer_state_repair(self.optimizer_state)
        if not isinstance(self.log_hsv, bool):
            raise ValueError(f"log_hsv must be a bool, got {self.log_hsv!r}")
        if not is_number(self.collective_timeout) or not self.collective_timeout > 0 or not math.isfinite(
            self.collective_timeout
        ):
            raise ValueError(f"collective_timeout must be a positive number of seconds, got {self.collective_timeout!r}")
        object.__setattr__(self, "collective_timeout", float(self.collective_timeout))
        if self.selective_method not in (None, "balanced", "select"):
            raise ValueError(f"selective_method must be None, 'balanced' or 'select', got {self.selective_method!r}")
        if isinstance(self.statistics_steps, bool) or not isinstance(self.statistics_steps, int) or (
            self.statistics_steps < 1
        ):
            raise ValueError(f"statistics_steps must be an int >= 1, got {self.statistics_steps!r}")
        object.__setattr__(self, "regularizer", regularizer_from(self.regularizer))
        self.schedule, self.rank_policy, self.rollback_rule  # noqa: B018 - build (and so check) the parts now

    # ------------------------------------------------------------------------------------------------- parts
    @cached_property
    def schedule(self) -> ReductionSchedule:
        return ReductionSchedule(self.start_step, self.end_step, self.interval)

    @cached_property
    def rank_policy(self) -> RankPolicy:
        return RankPolicy(self.policy, self.tau, self.fraction, self.gate, self.min_dim, self.total_budget,
                          self.final_fraction)

    @cached_property
    def rollback_rule(self) -> RollbackRule:
        return RollbackRule(self.rollback_metric, self.rollback_tolerance, self.greater_is_better)

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_arguments(cls, policy: str | None = None, tau: float | None = None, fraction: float | None = None,
                       **fields) -> "ReductionSettings":
        """The settings of the keyword shortcuts of CompreSSMReducer / CompreSSMCallback: fields left out keep their
        defaults; policy None is inferred from what was passed: "tolerance" when tau is given, "fixed" when fraction
        is given, otherwise the default, so `CompreSSMCallback(tau=0.05)` keeps meaning a tolerance of 0.05. Both
        without a policy is ambiguous (ValueError); a name that is no field raises TypeError naming it."""
        unknown = sorted(set(fields) - {item.name for item in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown reduction setting(s) {unknown}: the settings are the fields of ReductionSettings")
        if policy is None:
            if tau is not None and fraction is not None:
                raise ValueError(
                    "tau (tolerance policy) and fraction (fixed policy) were both given without a policy: pass "
                    "policy='tolerance', 'fixed', 'rollback' or 'global'"
                )
            policy = "tolerance" if tau is not None else "fixed" if fraction is not None else cls.policy
        if fields.get("collective_timeout", 0) is None:  # None: the default (written so by earlier releases)
            del fields["collective_timeout"]
        given = {"tau": tau, "fraction": fraction}
        return cls(policy=policy, **{name: value for name, value in given.items() if value is not None}, **fields)

    def replace(self, **fields) -> "ReductionSettings":
        """A copy with these fields changed (checked again)."""
        return dataclasses.replace(self, **fields)

    # ------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """The fields as JSON-serialisable keyword arguments (the regularizer as its settings dict)."""
        data = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        data["regularizer"] = self.regularizer.settings() if self.regularizer is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ReductionSettings":
        """`to_dict()` back (as saved in a checkpoint); fields missing from `data` keep their defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"reduction settings must be a dict of ReductionSettings fields, got {data!r}")
        return cls.from_arguments(**data)


DEFAULTS = ReductionSettings()


def settings_from(settings, shortcuts: dict, owner: str) -> ReductionSettings:
    """The settings of `owner` (CompreSSMReducer / CompreSSMCallback): `settings` (a ReductionSettings or its
    `to_dict()`), or the keyword shortcuts (`ReductionSettings.from_arguments`); TypeError if given both."""
    if settings is None:
        return ReductionSettings.from_arguments(**shortcuts)
    if shortcuts:
        raise TypeError(
            f"{owner}: pass settings= or the keyword settings {sorted(shortcuts)}, not both (settings.replace(...) "
            "changes fields of a ReductionSettings)"
        )
    if isinstance(settings, dict):
        return ReductionSettings.from_dict(settings)
    if not isinstance(settings, ReductionSettings):
        raise TypeError(f"{owner}: settings must be a ReductionSettings or its to_dict(), got {type(settings).__name__}")
    return settings


_VIEWED = frozenset(item.name for item in dataclasses.fields(ReductionSettings)) | {
    "schedule", "rank_policy", "rollback_rule"
}


class SettingsView:
    """Mixin: the fields of `self.settings` (a ReductionSettings) and its parts (`schedule`, `rank_policy`,
    `rollback_rule`) read as attributes of the object holding it (`reducer.policy`, `callback.interval`, ...)."""

    settings: ReductionSettings

    def __getattr__(self, name: str):
        settings = self.__dict__.get("settings")
        if settings is not None and name in _VIEWED:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
