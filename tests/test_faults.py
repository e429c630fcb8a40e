"""Fault cases: inputs and contracts that used to give silently wrong results or unclear errors (issue 11)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from transformers import Trainer, TrainingArguments

from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM, CompreSSMForSequenceClassification, CompreSSMModel

import loss_contract  # tests/ helpers
from generation_checks import cache_of

# --- inputs and loss contract (conformance) ---
# Inputs: shapes are always checked; values (mask entries, token ids, empty rows) where the check reads no device
# memory (CPU tensors in eager mode). Loss: every head divides its summed loss by the Trainer's `num_items_in_batch`.


def _lm() -> CompreSSMForCausalLM:
    return CompreSSMForCausalLM(CompreSSMConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, state_dims=[5, 3],
                                                pad_token_id=0)).eval()


def _classifier(**overrides) -> CompreSSMForSequenceClassification:
    values = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, state_dims=[5, 3], pad_token_id=0, num_labels=3)
    values.update(overrides)
    return CompreSSMForSequenceClassification(CompreSSMConfig(**values)).eval()


@pytest.mark.parametrize("model_class", [CompreSSMModel, CompreSSMForCausalLM, CompreSSMForSequenceClassification])
def test_attention_mask_of_another_batch_size_is_rejected_naming_the_shape(model_class):
    torch.manual_seed(0)
    model = model_class(CompreSSMConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, state_dims=4)).eval()
    ids = torch.randint(1, 40, (1, 5))
    with pytest.raises(ValueError, match=r"attention_mask .*\(1, 5\).* got shape \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got shape \(1, 4\)"):
        model(ids, attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 5\)"):
        model(ids, attention_mask=torch.ones(1, 1, 5, dtype=torch.long))


def test_attention_mask_longer_than_the_input_is_accepted_only_to_cover_cached_steps():
    model = _lm()
    ids = torch.randint(1, 40, (2, 6))
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long), use_cache=False)
    cache = cache_of(model(ids[:, :4], use_cache=True))
    with pytest.raises(ValueError, match=r"\(2, 2\) or \(2, 6\)"):
        model(ids[:, 4:], attention_mask=torch.ones(2, 5, dtype=torch.long), past_key_values=cache)
    step = model(ids[:, 4:], attention_mask=torch.ones(2, 6, dtype=torch.long), past_key_values=cache).logits
    torch.testing.assert_close(step, model(ids, use_cache=False).logits[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad_value", [2, -1, 0.5])
def test_attention_mask_values_other_than_0_and_1_are_rejected(bad_value):
    model = _lm()
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.float32)
    mask[1, 2] = bad_value
    with pytest.raises(ValueError, match=f"only 1 .*and 0 .*found {bad_value}"):
        model(ids, attention_mask=mask)


def test_masks_as_bool_long_and_float_give_the_same_result():
    model = _lm()
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 1]])
    expected = model(ids, attention_mask=mask).logits
    for other in (mask.bool(), mask.float(), mask.to(torch.int32)):
        torch.testing.assert_close(model(ids, attention_mask=other).logits, expected)


@pytest.mark.parametrize("bad_id", [40, 1000, -3])
def test_out_of_range_token_ids_are_rejected_naming_the_vocabulary_size(bad_id):
    model = _lm()
    ids = torch.randint(1, 40, (2, 5))
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"\[0, 39\] \(config.vocab_size = 40\).*{bad_id}"):
        model(ids)


def test_an_all_padding_row_is_refused_by_the_classifier_naming_the_row():
    model = _classifier()
    ids = torch.randint(1, 40, (3, 5))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] .*no real step"):
        model(ids, attention_mask=mask)
    ids[2] = 0  # without a mask, pad_token_id tokens are padding: a row of pad tokens is empty too
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        model(ids)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_an_all_padding_row_gives_nan_logits_where_it_cannot_be_checked(pooling):
    """Traced (torch.export, as on accelerators where a check would synchronise): NaN for the empty row, never silent
    zeros, and the other rows are unaffected."""
    model = _classifier(pooling=pooling)
    ids = torch.randint(1, 40, (3, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    exported = torch.export.export(model, (ids, mask)).module()
    empty_row_mask = mask.clone()
    empty_row_mask[1] = 0
    logits = exported(ids, empty_row_mask).logits
    assert torch.isnan(logits[1]).all()
    expected = model(ids[[0, 2]], attention_mask=mask[[0, 2]]).logits
    torch.testing.assert_close(logits[[0, 2]], expected, atol=1e-5, rtol=1e-5)


def test_an_all_padding_row_leaves_the_lm_state_untouched_and_the_other_rows_unchanged():
    """The causal LM accepts an empty row (a prompt of padding only): nothing enters its state."""
    model = _lm()
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.ones_like(ids)
    mask[0] = 0
    output = model(ids, attention_mask=mask, use_cache=True)
    cache = cache_of(output)
    assert all(torch.count_nonzero(cache.get_state(layer)[0]) == 0 for layer in range(2))
    torch.testing.assert_close(output.logits[1], model(ids[1:]).logits[0], atol=1e-5, rtol=1e-5)


def test_a_misspelt_or_unsupported_forward_argument_is_not_swallowed():
    model = _lm()
    with pytest.raises(TypeError, match="atention_mask"):
        model(torch.randint(1, 40, (1, 4)), atention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="no attention layers"):
        model(torch.randint(1, 40, (1, 4)), output_attentions=True)


def _train_one_step(head: str, tmp_path: Path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    """Parameter change of one plain-SGD Trainer step over the 8 examples."""
    model = loss_contract.build_head(head)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{head}-{batch_size}x{accumulation}"), max_steps=1,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=loss_contract.LEARNING_RATE, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=loss_contract.dataset_for(head)).train()
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


@pytest.mark.parametrize("head", loss_contract.HEADS)
def test_gradient_accumulation_makes_the_update_of_one_large_batch(head, tmp_path):
    """4 accumulated micro-batches of 2 (with different numbers of loss items) update the model exactly as one batch
    of 8 does, and both make the update of the mean loss over all items."""
    expected = loss_contract.reference_update(loss_contract.build_head(head), loss_contract.dataset_for(head))
    accumulated = _train_one_step(head, tmp_path, batch_size=2, accumulation=4)
    single = _train_one_step(head, tmp_path, batch_size=8, accumulation=1)
    # the step is large (a wrong loss scale would show); a float32 parameter change is exact to ~1e-7
    assert max(update.abs().max() for update in expected.values()) > 1e-2
    for name, update in expected.items():
        torch.testing.assert_close(single[name], update, atol=1e-6, rtol=1e-4, msg=f"batch of 8, {name}")
        torch.testing.assert_close(accumulated[name], update, atol=1e-6, rtol=1e-4, msg=f"4 x 2 accumulated, {name}")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_data_parallel_training_makes_the_update_of_one_large_batch(tmp_path):
    """2 DDP ranks (gloo, CPU) with 4 examples each update both heads exactly as one batch of 8 does."""
    worker = Path(__file__).with_name("loss_contract_worker.py")
    report_path = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), str(tmp_path / "out"), str(report_path)]
    # the timeout only guards against a hang
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                               cwd=str(worker.parent.parent))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 2
    for head in ("classifier", "lm"):
        assert report[head]["update_size"] > 1e-3
        assert report[head]["max_update_error"] < 1e-5, (head, report[head])
