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
