"""Settings of a `compressm train` run: what the reduction callback is asked to do (`ReductionPlan`, with steps as
ints or fractions of the run), the Trainer settings (`TrainingOptions`), the recipe's defaults, and torch's CPU
thread count (`configure_threads`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..training.schedule import is_int, steps_of

__all__ = [
    "ReductionPlan",
    "TrainingOptions",
    "default_num_threads",
    "configure_threads",
]

DEFAULT_PRESET = "digits"  # `compressm train` without --dataset
DEFAULT_TEXT_PRESET = "lm-small"  # `compressm train --dataset ...`
DEFAULT_TAU = 0.05
DEFAULT_EPOCHS = 50.0  # digits
DEFAULT_TEXT_EPOCHS = 1.0
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_BLOCK_SIZE = 128
DEFAULT_START_STEP = 0.02
DEFAULT_END_STEP = 0.3
DEFAULT_NUM_INTERVALS = 6


def _resolve_step(value, max_steps: int, name: str) -> int:
    """An absolute step (int >= 0) or a fraction of the run (float in [0, 1]) as an int step."""
    if is_int(value):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return steps_of(value, max_steps)
    raise ValueError(f"{name} must be an int step or a float fraction of the run in [0, 1], got {value!r}")


@dataclass
class ReductionPlan:
    """What CompreSSMCallback is asked to do in a run. Steps are ints (optimizer steps) or floats (fractions of the
    run's steps), resolved to ints by `resolve` once the run length is known.

    Reductions are scheduled at steps start, start + interval, ... up to end inclusive (never at step 0). Without
    an `interval`, it is (end - start) // num_intervals (at least 1), which schedules num_intervals + 1 events when
    start > 0 and the division leaves a remainder smaller than the interval (for the defaults, 2% to 30% of the run:
    7 events in runs of 127 steps or more, up to 11 in shorter ones; 8 in a 124-step run). `fraction`, `gate`, `min_dim`, `total_budget` left at None take the
    callback's own defaults. `reducibility_weight` (None: off) turns on the reducibility regulariser
    (`ReducibilityRegularizer(weight=...)`, its other settings at their defaults).
    """

    compress: bool = True
    policy: str = "tolerance"
    tau: float = DEFAULT_TAU
    fraction: float | None = None
    start_step: int | float = DEFAULT_START_STEP
    end_step: int | float = DEFAULT_END_STEP
    interval: int | float | None = None
    num_intervals: int = DEFAULT_NUM_INTERVALS
    gate: float | None = None
    min_dim: int | None = None
    total_budget: int | None = None
    final_fraction: float | None = None
    system: str | None = None
    reducibility_weight: float | None = None

    def resolve(self, max_steps: int) -> dict[str, int]:
        """{"start_step", "end_step", "interval"} as ints for a run of `max_steps` steps."""
        start = _resolve_step(self.start_step, max_steps, "start step")
        end = _resolve_step(self.end_step, max_steps, "end step")
        if isinstance(self.end_step, float):
            end = max(start + 1, end)
        if end < start:
            raise ValueError(f"the end step ({end}) comes before the start step ({start})")
        if self.interval is None:
            if not is_int(self.num_intervals) or self.num_intervals < 1:
                raise ValueError(f"num_intervals must be a positive int, got {self.num_intervals!r}")
            interval = max(1, (end - start) // self.num_intervals)
        elif is_int(self.interval) and self.interval >= 1:
            interval = self.interval
        elif isinstance(self.interval, float) and 0.0 < self.interval <= 1.0:
            interval = steps_of(self.interval, max_steps, minimum=1)  # rounded down, as CompreSSMReducer does
        else:
            raise ValueError(
                f"interval must be an int >= 1 or a float fraction of the run in (0, 1], got {self.interval!r}"
            )
        return {"start_step": start, "end_step": end, "interval": interval}

    def settings(self, max_steps: int):
        """The `ReductionSettings` of a run of `max_steps` steps (steps resolved to ints); fields left at None keep
        the library's defaults. ValueError for invalid values."""
        if self.final_fraction is not None and self.policy != "global":
            raise ValueError(f"final_fraction (--final-fraction) applies to the global policy, not {self.policy!r}: "
                             "add --policy global")
        from ..training.settings import ReductionSettings

        optional = {name: getattr(self, name) for name in ("fraction", "gate", "min_dim", "total_budget",
                                                            "final_fraction", "system")}
        if self.reducibility_weight is not None:
            from ..training.reducibility import ReducibilityRegularizer

            optional["regularizer"] = ReducibilityRegularizer(weight=self.reducibility_weight)
        return ReductionSettings.from_arguments(
            policy=self.policy, tau=self.tau, **self.resolve(max_steps),
            **{name: value for name, value in optional.items() if value is not None},
        )

    def make_callback(self, max_steps: int):
        """A CompreSSMCallback with `settings(max_steps)`, or None without compression."""
        if not self.compress:
            return None
        from ..training.callback import CompreSSMCallback

        return CompreSSMCallback(settings=self.settings(max_steps))

    def describe(self, max_steps: int) -> dict:
        if not self.compress:
            return {"compression": "none (baseline)"}
        steps = self.resolve(max_steps)
        out = {"policy": self.policy}
        if self.policy in ("tolerance", "rollback"):
            out["tau"] = self.tau
        if self.policy == "fixed" and self.fraction is not None:
            out["fraction"] = self.fraction
        if self.policy == "global":
            from ..training.settings import DEFAULTS

            out["final fraction"] = self.final_fraction if self.final_fraction is not None else DEFAULTS.final_fraction
        out["reduction steps"] = f"every {steps['interval']} from {steps['start_step']} to {steps['end_step']}"
        if self.reducibility_weight is not None:
            out["reducibility regulariser weight"] = self.reducibility_weight
        for name in ("gate", "min_dim", "total_budget"):
            if getattr(self, name) is not None:
                out[name.replace("_", " ")] = getattr(self, name)
        return out


@dataclass
class TrainingOptions:
    """Trainer settings of a run. `epochs` and `max_steps` are alternatives (max_steps wins); without either the
    recipe's default number of epochs is used."""

    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    eval_batch_size: int | None = None
    learning_rate: float = DEFAULT_LEARNING_RATE
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    seed: int = 0
    bf16: bool = False
    tf32: bool = False
    ssm_lr_factor: float | None = None  # None: optim.DEFAULT_SSM_LR_FACTOR
    report_to: str | list[str] = "none"
    save_steps: int | None = None
    checkpoint_dir: str | None = None
    resume_from_checkpoint: str | None = None
    show_progress: bool = True
    callbacks: list = field(default_factory=list)

    def validate(self) -> None:
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")
        if self.epochs is not None and (not isinstance(self.epochs, (int, float)) or self.epochs <= 0):
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        for name in ("batch_size",) + (("eval_batch_size",) if self.eval_batch_size is not None else ()):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.save_steps is not None and (not is_int(self.save_steps) or self.save_steps < 1):
            raise ValueError(f"save_steps must be a positive int, got {self.save_steps!r}")
        if self.ssm_lr_factor is not None and (
            not isinstance(self.ssm_lr_factor, (int, float)) or not self.ssm_lr_factor > 0
        ):
            raise ValueError(f"ssm_lr_factor must be positive, got {self.ssm_lr_factor!r}")
        if self.tf32:
            self._check_tf32()
        self._check_report_to()

    @staticmethod
    def _check_tf32() -> None:
        """ValueError unless a CUDA GPU of compute capability 8.0+ is present (TF32 exists only there)."""
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
            raise ValueError(
                "--tf32 needs an NVIDIA GPU of compute capability 8.0 or newer (A100, H100, ...), and this machine "
                "has none; drop --tf32 here (on such a GPU it runs the LRU layers' fp32 state projections on "
                "tensor cores: a 1.5x faster training step on an H100, see benchmarks/README.md)"
            )

    def _check_report_to(self) -> None:
        """ValueError for a --report-to integration that is unknown or not installed (the Trainer would fail only
        when it is built)."""
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        requested = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        installed = set(get_available_reporting_integrations())
        for name in requested:
            if name in ("none", "all"):
                continue
            if name not in INTEGRATION_TO_CALLBACK:
                raise ValueError(f"unknown --report-to {name!r}; choose from none, all, "
                                 f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
            if name not in installed:
                raise ValueError(f"--report-to {name}: the {name} package is not installed (pip install {name})")

    def total_steps(self, num_examples: int, default_epochs: float) -> int:
        if self.max_steps is not None:
            return self.max_steps
        epochs = self.epochs if self.epochs is not None else default_epochs
        return max(1, int(round(epochs * math.ceil(num_examples / self.batch_size))))

    def checkpoint_folder(self, output_dir: str | None) -> str | None:
        """Where Trainer checkpoints go: `checkpoint_dir`, else `<output_dir>-checkpoints` when checkpoints are saved
        or resumed from, else None (a temporary folder)."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if (self.save_steps is not None or self.resume_from_checkpoint is not None) and output_dir is not None:
            return os.path.normpath(output_dir) + "-checkpoints"
        return None

    def resolve_resume(self, output_dir: str | None) -> str | None:
        """The checkpoint folder to resume from ("last": the newest one in the checkpoint folder); ValueError when
        it does not exist."""
        if self.resume_from_checkpoint is None:
            return None
        if self.resume_from_checkpoint == "last":
            from transformers.trainer_utils import get_last_checkpoint

            folder = self.checkpoint_folder(output_dir)
            last = get_last_checkpoint(folder) if folder and os.path.isdir(folder) else None
            if last is None:
                raise ValueError(f"--resume-from-checkpoint last: no checkpoint-* folder in {folder!r}")
            return last
        if not os.path.isfile(os.path.join(self.resume_from_checkpoint, "trainer_state.json")):
            raise ValueError(
                f"--resume-from-checkpoint {self.resume_from_checkpoint!r} is not a Trainer checkpoint folder "
                "(no trainer_state.json); give a checkpoint-N folder or 'last'"
            )
        return self.resume_from_checkpoint


def default_num_threads() -> int:
    """torch threads `compressm` uses when neither --threads nor OMP_NUM_THREADS is set: half the CPUs this process
    may run on, at most 4, at least 1. torch's own default (one per core) made a 20 s run take 616 s on a loaded
    2-core machine (47 s with one thread); small LRU models gain little from more threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


def configure_threads(threads: int | None) -> tuple[int, str]:
    """Set torch's intra-op threads: `threads` when given, else keep OMP_NUM_THREADS when set, else
    `default_num_threads()`. Returns (threads in use, where the number came from)."""
    import torch

    if threads is not None:
        if not is_int(threads) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
        return threads, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    torch.set_num_threads(default_num_threads())
    return torch.get_num_threads(), "default"
