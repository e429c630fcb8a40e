"""CompreSSM for Hugging Face: LRU state-space models that shrink themselves while they train.

Importing the package registers the `compressm` model type with the Auto classes (AutoConfig, AutoModel,
AutoModelForCausalLM, AutoModelForSequenceClassification), and `compressm_mamba2` (reducible Mamba-2) and
`compressm_mamba` (Mamba-1, reducible by state selection) with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_compressm import CompreSSMConfig
from .configuration_compressm_mamba import CompreSSMMambaConfig
from .configuration_compressm_mamba2 import CompreSSMMamba2Config
from .events import HistoryError, ReductionEvent, event_metrics
from .layer_reduction import LayerReduction
from .modeling_compressm import (
    CompreSSMCache,
    CompreSSMForCausalLM,
    CompreSSMForSequenceClassification,
    CompreSSMLRU,
    CompreSSMModel,
    CompreSSMPreTrainedModel,
)
from .modeling_compressm_mamba import CompreSSMMambaForCausalLM, CompreSSMMambaModel, CompreSSMMambaPreTrainedModel
from .modeling_compressm_mamba2 import (
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Model,
    CompreSSMMamba2PreTrainedModel,
)
from .reduction import (
    ReductionError,
    balanced_truncation,
    gramians,
    hankel_singular_values,
    rank_for_energy,
)

# The training library and the application (subpackages; the model bundle above imports neither).
from .training import (
    CompreSSMCallback,
    CompreSSMReducer,
    CompreSSMTrainer,
    ReducibilityRegularizer,
    ReductionSettings,
    StaleOptimizerStateError,
    compressm_adamw,
    compressm_parameter_groups,
    prepare_model_for_resume,
    reduce_with_optimizer,
)
from .app import (
    build_model_for_tokenizer,
    build_model_from_preset,
    byte_level_tokenizer,
    list_presets,
    load_preset,
    load_text_dataset,
    load_tokenizer,
    pack_dataset,
    tokenize_for_classification,
)

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
    selective_ssm_models = (
        (CompreSSMMamba2Config, CompreSSMMamba2Model, CompreSSMMamba2ForCausalLM),
        (CompreSSMMambaConfig, CompreSSMMambaModel, CompreSSMMambaForCausalLM),
    )
    for config_class, base_class, causal_lm_class in selective_ssm_models:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)
        config_class.register_for_auto_class()
        base_class.register_for_auto_class("AutoModel")
        causal_lm_class.register_for_auto_class("AutoModelForCausalLM")


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
    "CompreSSMMambaConfig",
    "CompreSSMMambaPreTrainedModel",
    "CompreSSMMambaModel",
    "CompreSSMMambaForCausalLM",
    "ReductionError",
    "gramians",
    "hankel_singular_values",
    "balanced_truncation",
    "rank_for_energy",
    "CompreSSMReducer",
    "ReductionSettings",
    "ReducibilityRegularizer",
    "CompreSSMCallback",
    "CompreSSMTrainer",
    "prepare_model_for_resume",
    "ReductionEvent",
    "LayerReduction",
    "HistoryError",
    "event_metrics",
    "StaleOptimizerStateError",
    "reduce_with_optimizer",
    "compressm_parameter_groups",
    "compressm_adamw",
]
