"""CompreSSM for Hugging Face: LRU state-space models that shrink themselves while they train.

Importing the package registers the `compressm` model type with the Auto classes (AutoConfig, AutoModel,
AutoModelForCausalLM, AutoModelForSequenceClassification), and `compressm_mamba2` (reducible Mamba-2) with AutoConfig,
AutoModel and AutoModelForCausalLM.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .callback import CompreSSMCallback, CompreSSMTrainer
from .checkpoints import prepare_model_for_resume
from .configuration_compressm import CompreSSMConfig
from .configuration_compressm_mamba2 import CompreSSMMamba2Config
from .events import HistoryError, ReductionEvent, event_metrics
from .fsdp_strategy import FSDP2Strategy as _FSDP2Strategy  # noqa: F401 - registers the reducer's FSDP2 strategy
from .modeling_compressm import (
    CompreSSMCache,
    CompreSSMForCausalLM,
    CompreSSMForSequenceClassification,
    CompreSSMLRU,
    CompreSSMModel,
    CompreSSMPreTrainedModel,
)
from .modeling_compressm_mamba2 import (
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Model,
    CompreSSMMamba2PreTrainedModel,
)
from .optim import compressm_adamw, compressm_parameter_groups
from .optimizer_state import StaleOptimizerStateError
from .presets import build_model_for_tokenizer, build_model_from_preset, list_presets, load_preset
from .reducer import CompreSSMReducer
from .reducibility import ReducibilityRegularizer
from .reduction import (
    ReductionError,
    balanced_truncation,
    gramians,
    hankel_singular_values,
    rank_for_energy,
)
from .text_data import load_text_dataset, pack_dataset, tokenize_for_classification
from .tokenization import byte_level_tokenizer, load_tokenizer

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register(CompreSSMConfig.model_type, CompreSSMConfig, exist_ok=True)
    AutoModel.register(CompreSSMConfig, CompreSSMModel, exist_ok=True)
    AutoModelForCausalLM.register(CompreSSMConfig, CompreSSMForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(CompreSSMConfig, CompreSSMForSequenceClassification, exist_ok=True)
    # save_pretrained writes `auto_map` and copies the (flat) modeling files, so checkpoints load with
    # trust_remote_code=True where this package is not installed.
    CompreSSMConfig.register_for_auto_class()
    CompreSSMModel.register_for_auto_class("AutoModel")
    CompreSSMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    CompreSSMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    AutoConfig.register(CompreSSMMamba2Config.model_type, CompreSSMMamba2Config, exist_ok=True)
    AutoModel.register(CompreSSMMamba2Config, CompreSSMMamba2Model, exist_ok=True)
    AutoModelForCausalLM.register(CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM, exist_ok=True)
    CompreSSMMamba2Config.register_for_auto_class()
    CompreSSMMamba2Model.register_for_auto_class("AutoModel")
    CompreSSMMamba2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")


_register_auto_classes()

__all__ = [
    "load_preset",
    "list_presets",
    "build_model_from_preset",
    "build_model_for_tokenizer",
    "byte_level_tokenizer",
    "load_tokenizer",
    "load_text_dataset",
    "pack_dataset",
    "tokenize_for_classification",
    "CompreSSMConfig",
    "CompreSSMPreTrainedModel",
    "CompreSSMModel",
    "CompreSSMForCausalLM",
    "CompreSSMForSequenceClassification",
    "CompreSSMLRU",
    "CompreSSMCache",
    "CompreSSMMamba2Config",
    "CompreSSMMamba2PreTrainedModel",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2ForCausalLM",
    "ReductionError",
    "gramians",
    "hankel_singular_values",
    "balanced_truncation",
    "rank_for_energy",
    "CompreSSMReducer",
    "ReducibilityRegularizer",
    "CompreSSMCallback",
    "CompreSSMTrainer",
    "prepare_model_for_resume",
    "ReductionEvent",
    "HistoryError",
    "event_metrics",
    "StaleOptimizerStateError",
    "compressm_parameter_groups",
    "compressm_adamw",
]
