"""transformers' own model test suite, run on the CompreSSM models (the way transformers tests Mamba).

`CompreSSMModelTest` mixes transformers' ModelTesterMixin, GenerationTesterMixin and PipelineTesterMixin, imported from
the transformers source distribution that matches the installed version (see transformers_suite.py; fetched from
PyPI on first use and cached outside the repository). The tiny config gives its layers different state sizes, as a
reduced model has. No test is skipped here: `has_attentions = False` declares the model attention-free, and the mixin
tests that do not apply (attention outputs and implementations, RoPE, sliding windows, mixture-of-experts, multi-GPU,
DeepSpeed, ...) skip themselves with transformers' reason strings. The sdist lacks transformers' generation and export
test modules: the tests at the end of this module check what those would have checked (cached vs uncached decoding,
sampling, beam search, inputs_embeds, continuing from a returned cache, torch.export with and without padding,
torch.compile). If the sdist cannot be fetched (no network and nothing cached), the module skips with the reason.
"""

from __future__ import annotations

import copy
import unittest
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from modeling_compressm import (
    CompreSSMConfig,
    CompreSSMForCausalLM,
    CompreSSMForSequenceClassification,
    CompreSSMModel,
)

import generation_checks as checks
import transformers_suite

TINY_VOCAB = ["[PAD]", "[UNK]", "[EOS]"] + "this is a test b c d e f the quick brown fox hello".split()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a handful of words (built locally, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
        model_input_names=["input_ids", "attention_mask"],
    )


class CompreSSMModelTester:
    """Tiny configs and inputs for the common tests (the role of MambaModelTester in transformers)."""

    def __init__(self, parent=None, batch_size=4, seq_length=7, vocab_size=40, hidden_size=16, state_dims=(6, 3),
                 num_labels=3):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = len(state_dims)
        self.state_dims = list(state_dims)  # different per layer, as after a reduction
        self.num_labels = num_labels
        self.type_sequence_label_size = num_labels
        self.is_training = True
        self.pad_token_id = 0
        self.eos_token_id = 2

    def get_config(self) -> CompreSSMConfig:
        return CompreSSMConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            state_dims=self.state_dims,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.eos_token_id,
        )

    def get_pipeline_config(self) -> CompreSSMConfig:
        return self.get_config()

    def prepare_config_and_inputs(self):
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length), generator=generator)
        # left padding of different lengths plus a hole: every row keeps at least one real step
        attention_mask = torch.ones_like(input_ids)
        for row in range(self.batch_size):
            attention_mask[row, :row] = 0
        attention_mask[0, 3] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, self.pad_token_id)
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


def _write_tiny_models(folder: Path) -> dict:
    """The tiny checkpoints PipelineTesterMixin loads, as transformers' create_dummy_models.py would write them."""
    tokenizer = _tiny_tokenizer()
    config = CompreSSMModelTester().get_pipeline_config()
    summary = {}
    torch.manual_seed(0)
    for model_class in (CompreSSMModel, CompreSSMForCausalLM, CompreSSMForSequenceClassification):
        target = folder / config.model_type / model_class.__name__
        model_class(copy.deepcopy(config)).save_pretrained(target)
        tokenizer.save_pretrained(target)
        summary[model_class.__name__] = {
            "tokenizer_classes": ["PreTrainedTokenizerFast"],
            "processor_classes": [],
            "model_classes": [model_class.__name__],
        }
    return summary


try:
    suite = transformers_suite.load(tiny_model_builder=_write_tiny_models)
except transformers_suite.SuiteUnavailable as error:  # no network and nothing cached
    pytest.skip(f"transformers' test modules are not available: {error}", allow_module_level=True)


def _register_auto_mapping_names() -> None:
    """Add our classes to the auto-mapping name tables the mixins consult, as an in-library model has them."""
    from transformers.models.auto import modeling_auto

    for table, class_name in (
        (modeling_auto.MODEL_MAPPING_NAMES, "CompreSSMModel"),
        (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "CompreSSMForCausalLM"),
        (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "CompreSSMForSequenceClassification"),
    ):
        table.setdefault("compressm", class_name)


_register_auto_mapping_names()


class CompreSSMModelTest(suite.ModelTesterMixin, suite.GenerationTesterMixin, suite.PipelineTesterMixin,
                         unittest.TestCase):
    all_model_classes = (CompreSSMModel, CompreSSMForCausalLM, CompreSSMForSequenceClassification)
    pipeline_model_mapping = {
        "feature-extraction": CompreSSMModel,
        "text-generation": CompreSSMForCausalLM,
        "text-classification": CompreSSMForSequenceClassification,
    }
    has_attentions = False  # attention-free recurrence
    # transformers runs this check only for models with a copyright year >= 2023 in their config file; ours has none.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = CompreSSMModelTester(self)
        self.config_tester = suite.ConfigTester(
            self, config_class=CompreSSMConfig, common_properties=["hidden_size", "num_hidden_layers", "vocab_size"],
            hidden_size=16, num_hidden_layers=2, state_dims=[6, 3],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    # ------------------------------------------------------------------------------------------------------------
    # What transformers' generation and export test mixins (absent from its sdist) would check, for our models.
    def _generative_models(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_generative_model_classes:
            torch.manual_seed(0)
            yield model_class(copy.deepcopy(config)).eval(), inputs

    def test_generate_cached_greedy_sampling_and_beam_search_equal_uncached(self):
        for model, inputs in self._generative_models():
            checks.assert_cached_greedy_matches_uncached(model, inputs["input_ids"], inputs["attention_mask"])
            checks.assert_cached_sampling_matches_uncached(model, inputs["input_ids"], seed=0)
            checks.assert_cached_beam_search_matches_uncached(model, inputs["input_ids"])

    def test_generate_left_padded_batch_equals_each_row_alone(self):
        for model, inputs in self._generative_models():
            # rows 1.. of the tester's batch are left-padded by their row index (row 0 has a hole instead)
            prompts = [inputs["input_ids"][row, row:] for row in range(1, self.model_tester.batch_size)]
            checks.assert_padded_batch_matches_rows(model, prompts, pad_token_id=self.model_tester.pad_token_id)

    def test_generate_from_inputs_embeds(self):
        for model, inputs in self._generative_models():
            checks.assert_generation_from_inputs_embeds_matches_ids(model, inputs["input_ids"][:, 4:])  # no padding

    def test_generate_continues_from_a_returned_cache(self):
        for model, inputs in self._generative_models():
            checks.assert_generation_continues_from_returned_cache(model, inputs["input_ids"][:, 4:])

    def test_torch_export_with_and_without_padding_matches_eager(self):
        """torch.export of every head, traced without a mask and with a left-padding mask that has a hole; the exported
        program is then run on another mask too (no data-dependent branch may be baked in)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        other_mask = attention_mask.flip(0)
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config)).eval()
            for traced_args, replays in (((input_ids,), [(input_ids,)]),
                                         ((input_ids, attention_mask), [(input_ids, attention_mask),
                                                                        (input_ids, other_mask)])):
                with self.subTest(model_class.__name__, masked=len(traced_args) == 2), torch.no_grad():
                    exported = torch.export.export(model, traced_args).module()
                    for args in replays:
                        expected, actual = model(*args), exported(*args)
                        key = "last_hidden_state" if model_class is CompreSSMModel else "logits"
                        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)

    def test_torch_compile_fullgraph_forward_and_decoding_step_match_eager(self):
        """torch.compile(fullgraph=True) captures the forward and a cached decoding step without a graph break (so no
        host read of tensor data); `aot_eager` compiles through dynamo and AOTAutograd without C++ code generation."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = CompreSSMForCausalLM(copy.deepcopy(config)).eval()
        self.assertTrue(model._can_compile_fullgraph)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        torch._dynamo.reset()
        with torch.no_grad():
            eager_prefix = model(input_ids, attention_mask=attention_mask)
            compiled_prefix = compiled(input_ids, attention_mask=attention_mask)
            torch.testing.assert_close(compiled_prefix.logits, eager_prefix.logits, atol=1e-5, rtol=1e-5)
            next_token = eager_prefix.logits[:, -1:].argmax(-1)
            step_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
            eager_cache, compiled_cache = checks.cache_of(eager_prefix), checks.cache_of(compiled_prefix)
            eager_step = model(next_token, attention_mask=step_mask, cache=eager_cache)
            compiled_step = compiled(next_token, attention_mask=step_mask, cache=compiled_cache)
            torch.testing.assert_close(compiled_step.logits, eager_step.logits, atol=1e-5, rtol=1e-5)
            self.assertEqual(compiled_cache.get_seq_length(), input_ids.shape[1] + 1)
            for layer in range(len(self.model_tester.state_dims)):
                torch.testing.assert_close(compiled_cache.get_state(layer), eager_cache.get_state(layer))
