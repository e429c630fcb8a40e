"""Model family: forward passes, caching and generation, pooling, reduction in place, save/load round trips."""

import logging

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from modeling_compressm import (
    CompreSSMCache,
    CompreSSMConfig,
    CompreSSMForCausalLM,
    CompreSSMForSequenceClassification,
    CompreSSMModel,
    reduction,
)

from generation_checks import cache_of


def lm_config(**overrides):
    values = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_dims=[12, 7])
    values.update(overrides)
    return CompreSSMConfig(**values)


@pytest.fixture
def lm():
    return CompreSSMForCausalLM(lm_config()).eval()


@pytest.fixture
def classifier():
    config = CompreSSMConfig(hidden_size=12, num_hidden_layers=2, state_dims=[10, 6], input_dim=1, num_labels=3)
    return CompreSSMForSequenceClassification(config).eval()


def test_lm_forward_shapes_and_loss(lm):
    ids = torch.randint(0, 40, (3, 9))
    out = lm(ids, labels=ids)
    assert out.logits.shape == (3, 9, 40) and out.logits.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = lm_config(dropout=0.0)
    torch.manual_seed(3)
    plain = CompreSSMForCausalLM(config).train()
    checkpointed = CompreSSMForCausalLM(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5 (the older name is deprecated)
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in checkpointed.model.layers)
    ids = torch.randint(0, 40, (2, 11))
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_prefix_then_single_steps_equal_the_full_forward(lm):
    ids = torch.randint(0, 40, (2, 13))
    full = lm(ids, use_cache=False).logits
    prefix = lm(ids[:, :6], use_cache=True)
    cache = cache_of(prefix)
    assert isinstance(cache, CompreSSMCache) and cache.get_seq_length() == 6
    pieces = [prefix.logits]
    for t in range(6, 13):
        step = lm(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(step.logits)
    assert cache.get_seq_length() == 13
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    # Layers have different state sizes and the cache holds one state per layer.
    assert [cache.get_state(i).shape[-1] for i in range(2)] == [12, 7]


def test_classifier_mean_pooling_ignores_padding(classifier):
    x = torch.randn(1, 20, 1)
    logits = classifier(inputs_embeds=x).logits
    padded = torch.cat([x, torch.randn(1, 6, 1)], dim=1)
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 6)], dim=1)
    assert torch.allclose(classifier(inputs_embeds=padded, attention_mask=mask).logits, logits, atol=1e-5)
    out = classifier(inputs_embeds=torch.randn(4, 20, 1), labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3) and out.loss.ndim == 0


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_classifier_without_a_mask_treats_pad_tokens_as_padding(pooling, side):
    """transformers' convention for decoder classifiers: without an attention_mask, pad_token_id marks padding."""
    config = CompreSSMConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, state_dims=[6, 4], num_labels=3,
                             pad_token_id=0, pooling=pooling)
    model = CompreSSMForSequenceClassification(config).eval()
    ids = torch.randint(1, 30, (2, 9))
    if side == "right":
        ids[0, 6:] = 0
    else:
        ids[0, :3] = 0
    with_mask = model(ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(model(ids).logits, with_mask)
    torch.testing.assert_close(model(ids[:1][ids[:1] != 0][None]).logits[0], with_mask[0], atol=1e-5, rtol=1e-5)


def test_classifier_warns_that_padding_in_inputs_embeds_without_a_mask_cannot_be_detected(caplog):
    """transformers' decoder classifiers warn here too: the pad embeddings are pooled as if they were real steps."""
    from modeling_compressm import modeling_compressm as modeling

    config = CompreSSMConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, state_dims=4, num_labels=2,
                             pad_token_id=0)
    model = CompreSSMForSequenceClassification(config).eval()
    embeds = model.get_input_embeddings()(torch.randint(0, 30, (2, 5)))
    modeling._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=modeling.__name__):
        model(inputs_embeds=embeds, attention_mask=torch.ones(2, 5))
        model(input_ids=torch.randint(0, 30, (2, 5)))
        assert not caplog.records
        model(inputs_embeds=embeds)
    assert len(caplog.records) == 1 and "attention_mask" in caplog.records[0].getMessage()


def test_classifier_last_pooling_and_regression():
    config = CompreSSMConfig(hidden_size=8, num_hidden_layers=1, state_dims=4, input_dim=2, num_labels=1, pooling="last")
    model = CompreSSMForSequenceClassification(config).eval()
    x = torch.randn(2, 10, 2)
    hidden = model.model(inputs_embeds=x).last_hidden_state
    assert torch.allclose(model(inputs_embeds=x).logits, model.score(hidden[:, -1]), atol=1e-6)
    out = model(inputs_embeds=x, labels=torch.tensor([0.5, -1.0]))
    assert model.config.problem_type == "regression" and out.loss.ndim == 0


def test_bad_inputs_raise_clear_errors(lm, classifier):
    with pytest.raises(ValueError, match="exactly one"):
        lm(None)
    with pytest.raises(ValueError, match="input_ids must be"):
        lm(torch.randint(0, 40, (5,)))
    with pytest.raises(ValueError, match="inputs_embeds"):
        classifier(input_ids=torch.randint(0, 3, (1, 4)))
    with pytest.raises(ValueError, match=r"\(batch, length, 1\)"):
        classifier(inputs_embeds=torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        lm(torch.randint(0, 40, (1, 5)), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="input_dim"):
        CompreSSMForCausalLM(lm_config(input_dim=3))


def test_reduce_shrinks_in_place_and_rewrites_the_config(lm):
    parameters_before = {name: p for name, p in lm.named_parameters()}
    report = lm.reduce([5, 20])
    assert lm.config.state_dims == [5, 7]  # never grows a layer
    assert [entry.status for entry in report] == ["reduced", "unchanged"]
    assert report[0].old_dim == 12 and report[0].new_dim == 5 and 0 < report[0].kept_energy <= 1
    layer = lm.lru_layers()[0]
    assert layer.B_re.shape == (5, 16) and layer.C_im.shape == (16, 5) and layer.nu_log.shape == (5,)
    # The Parameter objects survive, so optimizers keep pointing at them.
    assert all(parameters_before[name] is p for name, p in lm.named_parameters())
    assert [h.shape[0] for h in lm.hankel_singular_values()] == [5, 7]
    (event,) = lm.reduction_history
    assert event["policy"] == "manual" and event["dims_before"] == [12, 7] and event["dims_after"] == [5, 7]
    assert event["status"] == ["reduced", "unchanged"] and event["kept_energy"][1] == 1.0
    lm.reduce([None, None])
    assert len(lm.reduction_history) == 1  # nothing changed, nothing recorded
    ids = torch.randint(0, 40, (2, 8))
    assert lm(ids).logits.shape == (2, 8, 40)
    with pytest.raises(ValueError, match="entries"):
        lm.reduce([3])


def test_reduced_layer_output_error_is_within_the_hsv_bound():
    model = CompreSSMModel(CompreSSMConfig(hidden_size=6, num_hidden_layers=1, state_dims=24, r_min=0.5, r_max=0.95))
    layer = model.lru_layers()[0]
    u = torch.randn(4, 200, 6)
    y_full, _ = layer(u)
    hsv = model.hankel_singular_values()[0]
    model.reduce([8])
    y_reduced, _ = layer(u)
    bound = 2 * hsv[8:].sum().item()
    error = (y_full - y_reduced).flatten(1).norm(dim=1)
    # fp32 forward: allow round-off on the order of 1e-5 of the output size on top of the bound
    slack = 1e-5 * y_full.flatten(1).norm(dim=1)
    assert torch.all(error <= bound * u.flatten(1).norm(dim=1) + slack)


def test_failing_layer_is_skipped_with_a_warning(lm, monkeypatch, caplog):
    calls = {"n": 0}
    real = reduction.balanced_truncation

    def flaky(lam, B, C, rank, system="real"):
        calls["n"] += 1
        if calls["n"] == 1:
            raise reduction.ReductionError("unstable eigenvalue")
        return real(lam, B, C, rank, system)

    monkeypatch.setattr("modeling_compressm.modeling_compressm.balanced_truncation", flaky)
    with caplog.at_level(logging.WARNING):
        report = lm.reduce([4, 3])
    assert [entry.status for entry in report] == ["failed", "reduced"]
    assert lm.config.state_dims == [12, 3]
    assert "unstable eigenvalue" in caplog.text
    with pytest.raises(reduction.ReductionError):
        monkeypatch.setattr(
            "modeling_compressm.modeling_compressm.balanced_truncation",
            lambda *a: (_ for _ in ()).throw(reduction.ReductionError("boom")),
        )
        lm.reduce([2, None], strict=True)


def test_reduced_model_round_trips_with_identical_logits(lm, tmp_path, transformers_warnings):
    lm.reduce([4, 3])
    lm.save_pretrained(tmp_path)
    ids = torch.randint(0, 40, (2, 10))
    expected = lm(ids).logits
    loaded = CompreSSMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.state_dims == [4, 3]
    assert torch.equal(loaded(ids).logits, expected)
    via_auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(via_auto, CompreSSMForCausalLM)
    assert torch.equal(via_auto(ids).logits, expected)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert isinstance(backbone, CompreSSMModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CompreSSMConfig)
    joined = "\n".join(transformers_warnings).lower()
    assert "mismatch" not in joined and "newly initialized" not in joined and "not used" not in joined


def test_from_pretrained_returns_the_loading_info_and_restores_the_history(lm, tmp_path):
    lm.reduce([4, 3])
    lm.save_pretrained(tmp_path)
    loaded, info = CompreSSMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, CompreSSMForCausalLM) and loaded.config.state_dims == [4, 3]
    assert {"missing_keys", "unexpected_keys", "mismatched_keys"} <= set(info)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.reduction_history == lm.reduction_history and len(loaded.reduction_history) == 1
    via_auto, _ = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert via_auto.reduction_history == lm.reduction_history


def test_from_pretrained_reads_the_history_beside_the_weights_of_a_subfolder(lm, tmp_path):
    """`subfolder=` loads the weights from a subfolder: the history must come from there too, not from the root
    (which may hold another checkpoint's history) or nowhere."""
    lm.reduce([4, 3])
    lm.save_pretrained(tmp_path / "sub")
    other = CompreSSMForCausalLM(lm_config()).eval()
    other.reduce([6, 5])
    other.reduce([5, 5])
    other.save_pretrained(tmp_path)  # a root checkpoint with a history of two events
    loaded = CompreSSMForCausalLM.from_pretrained(tmp_path, subfolder="sub")
    assert loaded.config.state_dims == [4, 3]
    assert loaded.reduction_history == lm.reduction_history and len(loaded.reduction_history) == 1


def trained_like(model):
    """The model with every weight moved off its initial value, so freshly initialised tensors are told apart from
    loaded ones (a fresh gamma_log is derived from nu_log: perturbed, it differs from the derived value)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return model


def rewrite_weights(folder, change):
    """Apply `change` to the tensors of folder/model.safetensors (a dict name -> tensor) and write them back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("lost", ["B_re", "gamma_log", "nu_log", "D"])
def test_a_tensor_missing_from_the_weights_file_initialises_only_that_tensor(lm, tmp_path, caplog, lost):
    trained_like(lm).save_pretrained(tmp_path)
    name = f"model.layers.0.lru.{lost}"
    rewrite_weights(tmp_path, lambda tensors: tensors.pop(name))
    with caplog.at_level(logging.WARNING):
        loaded, info = CompreSSMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {name}
    saved, restored = lm.state_dict(), loaded.state_dict()
    assert [key for key in saved if not torch.equal(saved[key], restored[key])] == [name]
    assert torch.isfinite(restored[name]).all()
    warnings = [record.getMessage() for record in caplog.records if record.getMessage().startswith("CompreSSM:")]
    assert len(warnings) == 1 and f"{name} (layer 0)" in warnings[0] and "Only these were initialised" in warnings[0]
    assert str(tmp_path / "model.safetensors") in warnings[0]


def set_value(name, index, value):
    return lambda tensors: tensors[name].__setitem__(index, value)


@pytest.mark.parametrize("tensor, index, value, problem", [
    ("model.layers.1.lru.B_im", (2, 3), float("nan"), "NaN or infinite"),
    ("model.embeddings.weight", (5, 0), float("inf"), "NaN or infinite"),
    ("model.layers.0.lru.nu_log", 0, float("-inf"), "NaN or infinite"),
    ("model.layers.1.lru.nu_log", 4, -20.0, "an eigenvalue of modulus |λ| = exp(-exp(nu_log)) = 1"),
])
def test_weights_with_non_finite_values_or_an_unstable_eigenvalue_are_refused_naming_file_tensor_and_layer(
        lm, tmp_path, tensor, index, value, problem):
    """nu_log = -20 is finite but gives |λ| = exp(-exp(-20)), which float32 rounds to 1: a state that never decays."""
    lm.save_pretrained(tmp_path)
    rewrite_weights(tmp_path, set_value(tensor, index, value))
    with pytest.raises(ValueError) as error:
        CompreSSMForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'model.safetensors'}: tensor '{tensor}'")
    layer = tensor.split(".")[2] if ".layers." in tensor else None
    assert (f"(layer {layer})" in message) if layer else "(layer" not in message
    assert problem in message and "intact copy" in message


def test_classifier_round_trips_through_auto_class(classifier, tmp_path):
    classifier.reduce([3, None])
    classifier.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 15, 1)
    assert loaded.config.state_dims == [3, 6]
    assert torch.equal(loaded(inputs_embeds=x).logits, classifier(inputs_embeds=x).logits)


def test_set_state_dims_rebuilds_at_checkpoint_sizes(lm, tmp_path):
    lm.reduce([5, 4])
    lm.save_pretrained(tmp_path)
    fresh = CompreSSMForCausalLM(lm_config()).eval()
    fresh.set_state_dims([5, 4])
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    ids = torch.randint(0, 40, (1, 6))
    assert torch.equal(fresh(ids).logits, lm(ids).logits)
    with pytest.raises(ValueError, match="positive int"):
        fresh.set_state_dims([0, 4])


def test_cache_is_rejected_after_a_reduction(lm):
    cache = cache_of(lm(torch.randint(0, 40, (1, 4)), use_cache=True))
    lm.reduce([3, 3])
    with pytest.raises(ValueError, match="reduction"):
        lm(torch.randint(0, 40, (1, 1)), cache=cache, use_cache=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only with a CUDA device")
def test_cuda_forward_and_decoding_step_do_not_synchronise_with_the_host():
    """On CUDA no input check or dispatch decision may read device memory: torch raises on any synchronising call."""
    model = CompreSSMForCausalLM(lm_config(pad_token_id=0)).cuda().eval()
    classifier = CompreSSMForSequenceClassification(lm_config(pad_token_id=0, num_labels=2)).cuda().eval()
    ids = torch.randint(1, 40, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, 5] = 0
    next_ids = torch.randint(1, 40, (2, 1), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
            model(next_ids, attention_mask=torch.cat([mask, torch.ones_like(next_ids)], 1), cache=cache)
            classifier(ids)
            classifier(ids, attention_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)
