import json

import pytest

from modeling_compressm import CompreSSMConfig


def test_int_state_dims_expand_to_one_entry_per_layer():
    config = CompreSSMConfig(num_hidden_layers=3, state_dims=16)
    assert config.state_dims == [16, 16, 16]
    assert config.total_state_dim == 48
    assert config.layer_types == ["linear_attention"] * 3


def test_per_layer_state_dims_round_trip(tmp_path):
    config = CompreSSMConfig(num_hidden_layers=3, state_dims=[5, 7, 2], input_dim=1, num_labels=4)
    config.save_pretrained(tmp_path)
    loaded = CompreSSMConfig.from_pretrained(tmp_path)
    assert loaded.state_dims == [5, 7, 2]
    assert loaded.input_dim == 1
    assert loaded.num_labels == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_hidden_layers": 2, "state_dims": [4, 4, 4]}, "state_dims"),
        ({"num_hidden_layers": 2, "state_dims": [4, 0]}, "state_dims[1]"),
        ({"state_dims": -3}, "state_dims[0]"),
        ({"state_dims": "64"}, "state_dims"),
        ({"r_min": 0.99, "r_max": 0.9}, "r_min"),
        ({"r_min": 0.0}, "r_min"),
        ({"r_max": 1.0}, "r_max"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"dropout": 1.5}, "dropout"),
        ({"norm_type": "batchnorm"}, "norm_type"),
        ({"max_phase": 0}, "max_phase"),
        ({"input_dim": 0}, "input_dim"),
        ({"pooling": "max"}, "pooling"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as error:
        CompreSSMConfig(**kwargs)
    assert field in str(error.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vocab_size": 50, "pad_token_id": 50}, "pad_token_id"),
        ({"vocab_size": 50, "bos_token_id": 77}, "bos_token_id"),
        ({"vocab_size": 50, "eos_token_id": [3, 50]}, "eos_token_id"),
        ({"vocab_size": 50, "pad_token_id": -1}, "pad_token_id"),
    ],
)
def test_special_token_ids_outside_the_vocabulary_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field} must be a token id in \[0, 49\] \(vocab_size = 50\)"):
        CompreSSMConfig(**kwargs)


def test_special_token_ids_inside_the_vocabulary_are_kept():
    config = CompreSSMConfig(vocab_size=50, pad_token_id=0, bos_token_id=49, eos_token_id=[1, 2])
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 49, [1, 2])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value",
    [
        ("norm_eps", NAN), ("norm_eps", INF), ("norm_eps", 0.0), ("norm_eps", 1e-40), ("norm_eps", 1.5),
        ("max_phase", INF), ("max_phase", NAN), ("max_phase", 1e30), ("max_phase", 10**400),
        ("r_min", NAN), ("r_max", NAN), ("r_max", 1.0 - 1e-9),
        ("dropout", NAN), ("dropout", -INF),
        ("initializer_range", NAN), ("initializer_range", INF), ("initializer_range", -0.02), ("initializer_range", 1e30),
        ("norm_eps", "1e-5"), ("max_phase", True),
    ],
)
def test_non_finite_or_out_of_range_floats_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number in "):
        CompreSSMConfig(**{field: value})


def test_edge_values_inside_the_ranges_are_kept_as_floats():
    config = CompreSSMConfig(norm_eps=1e-12, max_phase=6.2832, r_min=0.5, r_max=0.9999999, initializer_range=0,
                             dropout=0)
    assert (config.norm_eps, config.max_phase, config.r_max, config.initializer_range) == (1e-12, 6.2832, 0.9999999, 0.0)
    assert isinstance(config.initializer_range, float) and isinstance(config.dropout, float)


def test_values_set_after_the_config_was_made_are_checked_when_a_model_is_built(tmp_path):
    from modeling_compressm import CompreSSMForCausalLM

    config = CompreSSMConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, state_dims=4)
    CompreSSMForCausalLM(config).save_pretrained(tmp_path)
    config.norm_eps = NAN
    with pytest.raises(ValueError, match="^norm_eps must be a finite number"):
        CompreSSMForCausalLM(config)
    for override in ({"norm_eps": INF}, {"max_phase": INF}):  # a keyword argument of from_pretrained
        with pytest.raises(ValueError, match=f"^{next(iter(override))} must be a finite number"):
            CompreSSMForCausalLM.from_pretrained(tmp_path, **override)


def test_a_config_file_with_a_non_finite_value_is_refused_by_from_pretrained(tmp_path):
    from modeling_compressm import CompreSSMForCausalLM

    CompreSSMForCausalLM(CompreSSMConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, state_dims=4)).save_pretrained(
        tmp_path)
    document = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(document, norm_eps=INF)))  # written as Infinity
    for load in (CompreSSMForCausalLM.from_pretrained, CompreSSMConfig.from_pretrained):
        with pytest.raises(ValueError) as error:
            load(tmp_path)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / 'config.json'}: norm_eps must be a finite number in [1e-30, 1]")
        assert message.endswith(", got inf. Correct norm_eps in that file")
