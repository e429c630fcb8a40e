"""The training library: everything that changes a CompreSSM model's sizes while it trains.

- `settings.py`: `ReductionSettings`, the one value that configures a run's reductions (and the defaults).
- `reducer.py`: `CompreSSMReducer`, the one loop-side owner of a reduction (schedule, rank policy, rollback,
  optimizer repair, distributed strategy); `schedule.py` / `rank_selection.py`: when and to what sizes.
- `optimizer_state.py` / `optim.py` / `optimizer_regroup.py`: optimizer state across a change of size, parameter
  groups, and regrouping a saved optimizer state; `reduce_with_optimizer` (here) is `model.reduce` plus that repair.
- `distributed.py` / `collectives.py` / `fsdp.py` / `fsdp_strategy.py`: DDP and FSDP2.
- `callback.py` / `checkpoints.py` / `trainer_checks.py` / `trainer_hooks.py`: the Hugging Face Trainer adapter.
- `reducibility.py`: the Hankel-nuclear-norm regulariser; `selective_ssm_training.py`: in-training Mamba-2 and Mamba-1 reduction.

Nothing in the remote-code bundle (the flat modules of `modeling_compressm/`) imports this package.
"""

from .distributed import register_strategy
from .fsdp import is_fsdp2
from .fsdp_strategy import FSDP2Strategy
from .optim import compressm_adamw, compressm_parameter_groups, project_optimizer_state
from .optimizer_state import StaleOptimizerStateError, reduce_with_optimizer, register_optimizer_state_repair

# The built-in plug-ins, registered here and nowhere else (importing their modules registers nothing).
register_strategy(is_fsdp2, FSDP2Strategy)
register_optimizer_state_repair("project", project_optimizer_state)

from .callback import CompreSSMCallback, CompreSSMTrainer  # noqa: E402
from .checkpoints import prepare_model_for_resume  # noqa: E402
from .reducer import CompreSSMReducer  # noqa: E402
from .reducibility import ReducibilityRegularizer  # noqa: E402
from .selective_ssm_training import SelectiveSSMReducer  # noqa: E402
from .settings import DEFAULTS, ReductionSettings  # noqa: E402

__all__ = [
    "CompreSSMReducer",
    "CompreSSMCallback",
    "CompreSSMTrainer",
    "ReducibilityRegularizer",
    "ReductionSettings",
    "SelectiveSSMReducer",
    "DEFAULTS",
    "StaleOptimizerStateError",
    "compressm_adamw",
    "compressm_parameter_groups",
    "prepare_model_for_resume",
    "reduce_with_optimizer",
    "register_optimizer_state_repair",
    "register_strategy",
]
