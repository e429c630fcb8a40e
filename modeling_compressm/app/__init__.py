"""The application: the `compressm` command line (`cli.py`) and what it runs: recipes (`recipe.py`,
`run_settings.py`), model presets (`presets.py`), data (`data.py`, `text_data.py`, `data_files.py`), tokenizers
(`tokenization.py`), the output folder (`output_folder.py`), post-hoc reduction and generation (`posthoc.py`) and Hub
publishing (`publish.py`). Built on the training library (`modeling_compressm.training`) and the model bundle."""

from .presets import build_model_for_tokenizer, build_model_from_preset, list_presets, load_preset
from .text_data import load_text_dataset, pack_dataset, tokenize_for_classification
from .tokenization import byte_level_tokenizer, load_tokenizer

__all__ = [
    "build_model_for_tokenizer",
    "build_model_from_preset",
    "byte_level_tokenizer",
    "list_presets",
    "load_preset",
    "load_text_dataset",
    "load_tokenizer",
    "pack_dataset",
    "tokenize_for_classification",
]
