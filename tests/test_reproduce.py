"""Cheap checks of the offline reproduction benchmark's task options (no training)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from modeling_compressm.app import recipe
from modeling_compressm.app.data import DigitsSequenceDataset, load_digits_sequences

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_paper.py"


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_permutation_is_fixed_and_default_unchanged():
    plain = load_digits_sequences()
    permuted = load_digits_sequences(permutation_seed=0)
    again = load_digits_sequences(permutation_seed=0)
    order = np.random.default_rng(0).permutation(64)
    for split in ("train", "test"):
        np.testing.assert_array_equal(plain[split]["labels"], permuted[split]["labels"])
        np.testing.assert_array_equal(permuted[split]["inputs"], plain[split]["inputs"][:, order])
        np.testing.assert_array_equal(permuted[split]["inputs"], again[split]["inputs"])
    with pytest.raises(ValueError):
        load_digits_sequences(permutation_seed=1.5)


def test_train_preset_datasets_take_the_permutation():
    from modeling_compressm.app.presets import load_preset

    config = load_preset("digits")
    train, test = recipe.digits_datasets(config, permutation_seed=0)
    plain_train, _ = recipe.digits_datasets(config)
    reference, reference_test = DigitsSequenceDataset.splits(seed=0, permutation_seed=0)
    assert np.array_equal(train.inputs.numpy(), reference.inputs.numpy())
    assert np.array_equal(test.inputs.numpy(), reference_test.inputs.numpy())
    assert not np.array_equal(train.inputs.numpy(), plain_train.inputs.numpy())
    assert "permuted-digits" in _script().TASKS
