"""Stand-ins for the transformers test modules that its source distribution does not ship.

transformers' `tests/test_modeling_common.py`, `test_configuration_common.py` and `test_pipeline_mixin.py` import a few
modules from sub-packages of its repository (generation and export test mixins, shared config kwargs, the per-task
pipeline test classes). `transformers_suite.load()` registers the objects below under those module names.

- `GenerationTesterMixin`, `ExportTesterMixin`: empty markers (ModelTesterMixin only checks that a generative model's
  test class inherits the former). What their tests would check for CompreSSM (cached vs uncached greedy, sampling
  and beam search, generating from inputs_embeds, continuing from a returned cache, torch.export with and without
  padding) is tested in tests/test_modeling_common.py and tests/test_modeling_generation.py.
- `config_common_kwargs`: keyword arguments every `PretrainedConfig` must store (ConfigTester checks them).
- Pipeline test classes for the three tasks our models serve: each builds the pipeline around the tiny model and
  checks its outputs against the model called directly, and batched against unbatched calls.
"""

from __future__ import annotations

import types
import unittest

import torch
from transformers import pipeline


class GenerationTesterMixin:
    """Marker for generative model test classes (transformers' generation test mixin is not in its sdist)."""


class ExportTesterMixin:
    """Marker base of ModelTesterMixin (transformers' export test mixin is not in its sdist)."""


# Arguments every configuration stores as given (values differ from the PretrainedConfig defaults).
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 3,
    "is_encoder_decoder": False,
    "architectures": ["CompreSSMForCausalLM"],
    "id2label": {0: "negative", 1: "positive"},
    "label2id": {"negative": 0, "positive": 1},
    "problem_type": "single_label_classification",
    "tokenizer_class": "PreTrainedTokenizerFast",
    "prefix": "tiny",
    "sep_token_id": 2,
    "decoder_start_token_id": 3,
    "task_specific_params": {"text-generation": {"max_new_tokens": 4}},
}

EXAMPLES = ["This is a test", "a b c d e f", "the quick brown fox", "hello"]


class _PipelineTests(unittest.TestCase):
    task = ""

    def get_test_pipeline(self, model, tokenizer, image_processor=None, feature_extractor=None, processor=None,
                          dtype="float32", **kwargs):
        model = model.to(getattr(torch, dtype))
        return pipeline(self.task, model=model, tokenizer=tokenizer, **self.pipeline_kwargs()), list(EXAMPLES)

    def pipeline_kwargs(self) -> dict:
        return {}


class TextGenerationPipelineTests(_PipelineTests):
    task = "text-generation"

    def pipeline_kwargs(self):
        return {"max_new_tokens": 5, "do_sample": False}

    def run_pipeline_test(self, text_generator, examples):
        model, tokenizer = text_generator.model, text_generator.tokenizer
        (output,) = text_generator(examples[0])
        self.assertTrue(output["generated_text"].startswith(examples[0]))
        # the pipeline's greedy continuation is the model's own
        (ids_output,) = text_generator(examples[0], return_tensors=True)
        prompt = tokenizer(examples[0], return_tensors="pt")
        expected = model.generate(**prompt, max_new_tokens=5, do_sample=False)[0]
        self.assertEqual(list(ids_output["generated_token_ids"]), expected.tolist())
        (new_only,) = text_generator(examples[0], return_full_text=False)
        self.assertEqual(output["generated_text"], examples[0] + new_only["generated_text"])
        # batched (padded) generation continues every prompt as it would be continued alone
        if tokenizer.pad_token_id is not None:
            batched = text_generator(examples, batch_size=len(examples))
            self.assertEqual(batched, [text_generator(example) for example in examples])


class FeatureExtractionPipelineTests(_PipelineTests):
    task = "feature-extraction"

    def run_pipeline_test(self, feature_extractor, examples):
        model, tokenizer = feature_extractor.model, feature_extractor.tokenizer
        features = torch.tensor(feature_extractor(examples[0]))
        inputs = tokenizer(examples[0], return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state.float()
        self.assertEqual(tuple(features.shape), (1, inputs["input_ids"].shape[1], model.config.hidden_size))
        torch.testing.assert_close(features, expected, atol=1e-3, rtol=1e-3)


class TextClassificationPipelineTests(_PipelineTests):
    task = "text-classification"

    def run_pipeline_test(self, text_classifier, examples):
        labels = set(text_classifier.model.config.id2label.values())
        (output,) = text_classifier(examples[0])
        self.assertIn(output["label"], labels)
        self.assertTrue(0.0 <= output["score"] <= 1.0)
        scores = text_classifier(examples[0], top_k=None)
        self.assertEqual({entry["label"] for entry in scores}, labels)
        self.assertAlmostEqual(sum(entry["score"] for entry in scores), 1.0, places=3)
        # padding in a batch changes no row's result
        batched = text_classifier(examples, batch_size=len(examples), top_k=None)
        for example, row in zip(examples, batched):
            alone = {entry["label"]: entry["score"] for entry in text_classifier(example, top_k=None)}
            for entry in row:
                self.assertAlmostEqual(entry["score"], alone[entry["label"]], places=3)


def modules() -> dict[str, types.ModuleType]:
    """Module name (as transformers' test modules import it) -> stand-in module."""
    contents = {
        "tests.generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        "tests.exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "tests.utils.test_configuration_utils": {"config_common_kwargs": config_common_kwargs},
        "tests.pipelines.test_pipelines_text_generation": {"TextGenerationPipelineTests": TextGenerationPipelineTests},
        "tests.pipelines.test_pipelines_feature_extraction": {
            "FeatureExtractionPipelineTests": FeatureExtractionPipelineTests
        },
        "tests.pipelines.test_pipelines_text_classification": {
            "TextClassificationPipelineTests": TextClassificationPipelineTests
        },
    }
    result = {}
    for name, attributes in contents.items():
        module = types.ModuleType(name, f"CompreSSM stand-in for transformers' {name} (see transformers_standins.py)")
        module.__dict__.update(attributes)
        result[name] = module
    return result
