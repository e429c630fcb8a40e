"""Mamba-2 state reduction: the projection identity (float64 reference scan), balancing and selection, the model
classes (conversion, per-layer sizes, cached decode, save/load and remote-code loading)."""

import warnings

import pytest
import torch

from modeling_compressm import mamba2_reduction as math2
from modeling_compressm import modeling_compressm_mamba2 as modeling2

if modeling2.MISSING_FROM_TRANSFORMERS:
    pytest.skip(
        f"this transformers release lacks the Mamba-2 5.x pieces ({modeling2.MISSING_FROM_TRANSFORMERS}); the model refuses there",
        allow_module_level=True,
    )

from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402

from modeling_compressm import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM, LayerReduction  # noqa: E402
from selective_ssm_checks import check_save_load_and_generate, stepwise_cached_logits  # noqa: E402 - tests/ helper

VOCAB, GROUPS, STATE = 32, 2, 8


def _stock_model(dtype=torch.float32, state_size=STATE, seed=0) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, state_size=state_size, n_groups=GROUPS,
        num_hidden_layers=2, chunk_size=8, expand=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return Mamba2ForCausalLM(config).to(dtype).eval()


def _calibration(batches=3, length=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, length), generator=generator) for _ in range(batches)]


def _random_scan_inputs(seed=0, batch=2, length=20, heads=4, head_dim=3, groups=2, state=6) -> math2.ScanInputs:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return math2.ScanInputs(
        hidden_states=randn(batch, length, heads * head_dim), B=randn(batch, length, groups * state),
        C=randn(batch, length, groups * state), dt=randn(batch, length, heads),
        A=-torch.rand(heads, generator=generator, dtype=torch.float64) - 0.05, dt_bias=randn(heads),
        D=randn(heads), num_heads=heads, head_dim=head_dim, n_groups=groups,
    )


def _projected(inputs: math2.ScanInputs, V: torch.Tensor, W: torch.Tensor) -> math2.ScanInputs:
    """The same inputs with B̃ = W B and C̃ = Vᵀ C per group."""
    batch, length, _ = inputs.B.shape
    B = inputs.B.view(batch, length, inputs.n_groups, -1)
    C = inputs.C.view(batch, length, inputs.n_groups, -1)
    B = torch.einsum("blgn,grn->blgr", B, W).reshape(batch, length, -1)
    C = torch.einsum("blgn,gnr->blgr", C, V).reshape(batch, length, -1)
    return math2.ScanInputs(**{**inputs.__dict__, "B": B, "C": C})


def _states(inputs: math2.ScanInputs) -> list[torch.Tensor]:
    states = []
    math2.reference_scan(inputs, on_state=lambda t, S, C_t: states.append(S.clone()))
    return states


def test_projected_layer_state_is_W_times_full_state():
    inputs = _random_scan_inputs()
    generator = torch.Generator().manual_seed(5)
    V = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    W = torch.linalg.pinv(V) + torch.randn(2, 3, 6, generator=generator, dtype=torch.float64) @ (
        torch.eye(6, dtype=torch.float64) - V @ torch.linalg.pinv(V)
    )  # an oblique left inverse: W V = I, W ≠ Vᵀ
    assert torch.allclose(W @ V, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-12)
    heads_per_group = inputs.num_heads // inputs.n_groups
    W_heads = W.repeat_interleave(heads_per_group, dim=0)  # (heads, r, N)
    for full, reduced in zip(_states(inputs), _states(_projected(inputs, V, W))):
        assert torch.allclose(reduced, torch.einsum("hrn,bhpn->bhpr", W_heads, full), atol=1e-12, rtol=0)


def test_full_rank_change_of_basis_changes_nothing():
    inputs = _random_scan_inputs(seed=3)
    T = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    T = T + 3 * torch.eye(6, dtype=torch.float64)
    y, _ = math2.reference_scan(inputs)
    y_transformed, _ = math2.reference_scan(_projected(inputs, T, torch.linalg.inv(T)))
    assert torch.allclose(y_transformed, y, atol=1e-10, rtol=0)


def test_balancing_gives_a_left_inverse_and_its_predicted_error():
    inputs = _random_scan_inputs(seed=4)
    statistics = math2.GramianStatistics()
    statistics.update(inputs)
    P, Q = statistics.gramians()
    V, W, hsv = math2.balanced_projection(P, Q, 3)
    assert torch.allclose(W @ V, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-10)
    assert math2.projection_error(P, Q, V, W) == pytest.approx(math2.predicted_error(hsv, 3), rel=1e-9)
    # total output energy Σσ² = tr(Q P); no selection of 3 channels predicts less than balancing
    assert float(hsv.pow(2).sum()) == pytest.approx(float(torch.einsum("gij,gji->", Q, P)), rel=1e-9)
    V_s, W_s = math2.selection_projection(math2.select_states(P, Q, 3), 6)
    assert math2.projection_error(P, Q, V_s, W_s) > math2.predicted_error(hsv, 3)


def test_rank_rule_uses_the_energy_of_squared_hsvs():
    hsv = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)  # σ² = 9, 4, 1, 0 (total 14)
    assert math2.rank_for_output_energy(hsv, 0.0) == 3
    assert math2.rank_for_output_energy(hsv, 1 / 14) == 2  # drops σ² = 1
    assert math2.rank_for_output_energy(hsv, 5 / 14) == 1  # a rule on Σσ (total 6) would keep 2 here
    with pytest.raises(ValueError, match="tolerance"):
        math2.rank_for_output_energy(hsv, 1.0)


def _scan_outputs(model, mixer_index, batches):
    """Float64 reference-scan outputs of one mixer on `batches` (one tensor per batch)."""
    mixer = model.backbone.layers[mixer_index].mixer
    captured = []
    handle = mixer.scan_inputs.register_forward_hook(
        lambda module, args, output: captured.append(mixer.scan_inputs_of(*output))
    )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return [math2.reference_scan(inputs)[0] for inputs in captured]


def test_from_mamba2_gives_identical_logits():
    stock = _stock_model()
    model = CompreSSMMamba2ForCausalLM.from_mamba2(stock)
    tokens = _calibration(batches=1)[0]
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, stock(tokens).logits)
    assert model.config.state_dims == [STATE, STATE] and model.config.model_type == "compressm_mamba2"


def test_zeroed_state_channels_get_zero_hsvs_and_are_truncated_exactly():
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model(torch.float64))
    mixer = model.backbone.layers[0].mixer
    inner, dead = mixer.intermediate_size, [1, 5]
    with torch.no_grad():
        for group in range(GROUPS):
            for channel in dead:  # B channel of the conv input; in_proj rows start after the gate
                conv_channel = inner + group * STATE + channel
                mixer.in_proj.weight[inner + conv_channel] = 0
                mixer.conv1d.bias[conv_channel] = 0
    calibration, held_out = _calibration(), _calibration(batches=2, seed=9)
    hsv = model.hankel_singular_values(calibration)[0]
    assert hsv.shape == (GROUPS, STATE)
    # σ = singular values of Q^1/2 P^1/2: zero up to the float64 square root's ~1e-8 relative precision
    assert bool((hsv[:, -2:] <= 1e-7 * hsv[:, :1]).all()) and bool((hsv[:, :-2] > 1e-4 * hsv[:, :1]).all())
    before = _scan_outputs(model, 0, held_out)
    report = model.reduce([STATE - 2, None], calibration=calibration)
    assert report[0].status == "reduced" and report[0].predicted_error < 1e-12 * float(hsv.pow(2).sum())
    assert model.config.state_dims == [STATE - 2, STATE] and model.config.channel_dims == [STATE, STATE]
    for y_full, y_reduced in zip(before, _scan_outputs(model, 0, held_out)):
        assert torch.allclose(y_reduced, y_full, atol=1e-10 * float(y_full.abs().max()), rtol=0)


def _sliced_stock_copy(stock: Mamba2ForCausalLM, keep: list[list[int]]) -> Mamba2ForCausalLM:
    """A stock Mamba2ForCausalLM of state size len(keep[g]) holding `stock`'s weights with layer 0's B and C channels
    sliced to `keep` (layer 1 keeps the first channels), written out from the in_proj/conv1d layouts."""
    rank = len(keep[0])
    small = Mamba2ForCausalLM(Mamba2Config(**{**stock.config.to_dict(), "state_size": rank})).eval()
    state = stock.state_dict()
    inner = stock.backbone.layers[0].mixer.intermediate_size
    for layer, layer_keep in ((0, keep), (1, [list(range(rank))] * GROUPS)):
        b = [inner + g * STATE + i for g in range(GROUPS) for i in layer_keep[g]]
        c = [inner + GROUPS * STATE + g * STATE + i for g in range(GROUPS) for i in layer_keep[g]]
        conv = list(range(inner)) + b + c
        heads = list(range(inner + inner + 2 * GROUPS * STATE, inner + inner + 2 * GROUPS * STATE + 4))
        rows = list(range(inner)) + [inner + channel for channel in conv] + heads
        prefix = f"backbone.layers.{layer}.mixer."
        state[prefix + "in_proj.weight"] = state[prefix + "in_proj.weight"][rows]
        state[prefix + "conv1d.weight"] = state[prefix + "conv1d.weight"][conv]
        state[prefix + "conv1d.bias"] = state[prefix + "conv1d.bias"][conv]
    small.load_state_dict(state)
    return small


def test_selection_equals_a_sliced_stock_mamba2():
    stock = _stock_model()
    keep = [[0, 2, 5, 7], [1, 2, 3, 6]]
    model = CompreSSMMamba2ForCausalLM.from_mamba2(stock)
    report = model.reduce(None, keep=[keep, [0, 1, 2, 3]])
    assert [entry.method for entry in report] == ["select", "select"] and report[0].keep == keep
    assert model.config.state_dims == [4, 4] and model.config.channel_dims == [4, 4]
    tokens = _calibration(batches=1)[0]
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, _sliced_stock_copy(stock, keep)(tokens).logits)


def test_reduce_returns_the_lru_models_result_type_with_the_changed_parameters():
    """One result type for every model's `reduce` (`LayerReduction`); its `change` names the new parameters, the old
    ones and, for selection, how to slice tensors of the old shapes (optimizer moments)."""
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    before = dict(model.named_parameters())
    balanced = model.reduce([4, None], calibration=_calibration(), method="balanced")
    assert all(isinstance(entry, LayerReduction) for entry in balanced)
    assert [(entry.status, entry.old_dim, entry.new_dim, entry.method) for entry in balanced] == [
        ("reduced", 8, 4, "balanced"), ("unchanged", 8, 8, None)]
    first = balanced[0]
    assert first.rank_requested == 4 and first.hinf_bound is None and first.hsv.shape == (GROUPS, STATE)
    assert first.kept_energy == pytest.approx(1 - first.relative_error) and 0 < first.relative_error < 1
    projections = {f"backbone.layers.0.mixer.state_projection_{side}" for side in ("in", "out")}
    current = dict(model.named_parameters())
    assert set(first.change.parameters) == projections and first.change.slicers == {} and first.change.previous == {}
    assert all(first.change.parameters[name] is current[name] for name in projections)
    assert balanced[1].change is None and balanced[1].kept_energy == 1.0

    selected = model.reduce([None, 5], calibration=_calibration(), method="select")
    change = selected[1].change
    assert selected[1].method == "select" and len(selected[1].keep) == GROUPS and selected[1].new_dim == 5
    assert {"backbone.layers.1.mixer.in_proj.weight", "backbone.layers.1.mixer.conv1d.weight"} <= set(change.slicers)
    for name, slicer in change.slicers.items():
        assert change.previous[name] is before[name] and torch.equal(slicer(before[name]), change.parameters[name])


def _randomised_layers(model, seed):
    """Random layers with memory: in_proj ~ N(0, 0.25), decays exp(-Δ·a) with a ~ U(0.05, 0.55), Δ ≈ softplus(0.5)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.backbone.layers:
            mixer = block.mixer
            weight = mixer.in_proj.weight
            weight.copy_(0.5 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
            rates = 0.5 * torch.rand(mixer.num_heads, generator=generator, dtype=weight.dtype) + 0.05
            mixer.A_log.copy_(torch.log(rates))
            mixer.dt_bias.fill_(0.5)
    return model


def test_balanced_projection_beats_the_best_selection_at_half_the_state():
    models = {
        name: _randomised_layers(CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model(torch.float64, seed=2)), 0)
        for name in ("balanced", "pivoted_qr", "ghost_score")
    }
    calibration, held_out = _calibration(batches=4, length=32), _calibration(batches=2, length=32, seed=9)
    reference = _scan_outputs(models["balanced"], 0, held_out)
    P, Q = models["ghost_score"].gramian_statistics(calibration)[0].gramians()
    ghost_keep = [sorted(torch.argsort(P[g].diagonal() * Q[g].diagonal(), descending=True)[: STATE // 2].tolist())
                  for g in range(GROUPS)]
    models["balanced"].reduce([STATE // 2, None], calibration=calibration, method="balanced")
    models["pivoted_qr"].reduce([STATE // 2, None], calibration=calibration, method="select")
    models["ghost_score"].reduce(None, keep=[ghost_keep, None])

    def relative_error(model):
        outputs = _scan_outputs(model, 0, held_out)
        error = sum(float((y - y_ref).pow(2).sum()) for y, y_ref in zip(outputs, reference))
        return error / sum(float(y_ref.pow(2).sum()) for y_ref in reference)

    errors = {name: relative_error(model) for name, model in models.items()}
    assert errors["balanced"] < 0.8 * min(errors["pivoted_qr"], errors["ghost_score"]), errors


def _reduced_lm() -> CompreSSMMamba2ForCausalLM:
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    model.reduce([5, 3], calibration=_calibration())
    model.reduce([None, 2], calibration=_calibration(), method="select")  # layer 1: projected, then selected
    assert model.config.state_dims == [5, 2] and model.config.channel_dims == [STATE, STATE]
    return model


def test_cached_decode_equals_the_full_forward_with_per_layer_state_sizes():
    model = _reduced_lm()
    tokens = _calibration(batches=1, length=12)[0]
    with torch.no_grad():
        full = model(tokens).logits
    stepped, cache = stepwise_cached_logits(model, tokens, prefix=5)
    assert torch.allclose(stepped, full, atol=1e-5, rtol=1e-5)
    shapes = [tuple(cache.layers[layer].recurrent_states[0].shape) for layer in range(2)]
    assert shapes == [(2, 4, 8, 5), (2, 4, 8, 2)]


def test_save_load_and_generate_with_per_layer_state_sizes(tmp_path):
    model = _reduced_lm()
    assert type(model) is CompreSSMMamba2ForCausalLM
    check_save_load_and_generate(
        model, tmp_path, _calibration(batches=1, length=6)[0],
        {"modeling_compressm_mamba2.py", "configuration_compressm_mamba2.py", "mamba2_reduction.py"},
        "compressm_mamba2", [5, 2],
    )


def test_bad_reduce_arguments_are_refused_and_change_nothing():
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    with pytest.raises(ValueError, match="calibration"):
        model.reduce([4, None])
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 8\]"):
        model.reduce([9, None], calibration=_calibration())
    with pytest.raises(ValueError, match="method"):
        model.reduce(4, calibration=_calibration(), method="pod")
    with pytest.raises(ValueError, match="distinct"):
        model.reduce(None, keep=[[0, 0, 1], None])
    with pytest.raises(TypeError, match="calibration batches"):
        model.hankel_singular_values(["some text"])
    assert model.config.state_dims == [STATE, STATE]


def test_old_transformers_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(modeling2, "MISSING_FROM_TRANSFORMERS", ["mamba2_scan_forward"])
    with pytest.raises(ImportError, match="need transformers' 5.x Mamba-2 modules.*mamba2_scan_forward"):
        CompreSSMMamba2ForCausalLM(CompreSSMMamba2Config(vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8,
                                                         state_size=8, n_groups=2, num_hidden_layers=1))


def test_training_forward_never_takes_the_fused_path_that_would_skip_the_projection(monkeypatch):
    model = _reduced_lm()
    tokens = _calibration(batches=1)[0]
    with torch.no_grad():
        expected = model(tokens).logits

    def fused(*args, **kwargs):
        raise AssertionError("the fused split-conv1d-scan kernel ignores the state projection")

    monkeypatch.setattr(modeling2._mamba2, "mamba2_split_conv1d_scan_combined", fused)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(tokens, use_cache=False).logits, expected)


def test_padding_positions_do_not_enter_the_gramians():
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model(torch.float64))
    long, short = _calibration(batches=2, length=10, seed=11)
    short = short[:1, 3:]  # 7 tokens
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    batch = {"input_ids": torch.cat([long[:1], padded]), "attention_mask": torch.cat([torch.ones_like(mask), mask])}
    with_padding = model.gramian_statistics([batch])
    separately = model.gramian_statistics([long[:1], short])
    for padded_stats, separate_stats in zip(with_padding, separately):
        assert padded_stats.count == separate_stats.count == 17
        assert torch.allclose(padded_stats.P_sum, separate_stats.P_sum, rtol=1e-9, atol=1e-14)
        assert torch.allclose(padded_stats.Q_sum, separate_stats.Q_sum, rtol=1e-9, atol=1e-14)


def test_tolerance_picks_each_layers_rank_from_its_squared_hsvs():
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model(torch.float64))
    calibration = _calibration()
    hsv = model.hankel_singular_values(calibration)
    expected = [math2.rank_for_output_energy(h, 0.05) for h in hsv]
    assert all(rank < STATE for rank in expected), expected
    report = model.reduce(tolerance=0.05, calibration=calibration)
    assert model.config.state_dims == expected
    assert all(entry.relative_error <= 0.05 for entry in report)
    with pytest.raises(ValueError, match="ranks or tolerance"):
        model.reduce(2, tolerance=0.05, calibration=calibration)


def test_gpu_kernel_state_width_is_the_next_power_of_two_and_at_least_16():
    assert [modeling2.gpu_kernel_state_width(r) for r in (1, 8, 15, 16, 17, 24, 32, 48, 64, 128)] == [
        16, 16, 16, 16, 32, 32, 32, 64, 64, 128
    ]


def test_reduce_warns_once_about_padded_ranks_where_cuda_kernels_would_run(monkeypatch):
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on CPU (no CUDA kernels) a small rank warns nothing
        model.reduce([5, 3], calibration=_calibration())
    assert not modeling2.cuda_scan_kernels_in_use(model)
    monkeypatch.setattr(modeling2, "cuda_scan_kernels_in_use", lambda module: True)
    model = CompreSSMMamba2ForCausalLM.from_mamba2(_stock_model())
    with pytest.warns(UserWarning, match=r"pad the state.*layer 0: r=5 runs as 16, layer 1: r=3 runs as 16") as caught:
        model.reduce([5, 3], calibration=_calibration())
    assert len([w for w in caught if "pad the state" in str(w.message)]) == 1
    stock = _stock_model(state_size=32)
    model = CompreSSMMamba2ForCausalLM.from_mamba2(stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r = 16 is what the kernels compute anyway
        model.reduce([16, None], calibration=_calibration())
