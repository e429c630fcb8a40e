"""Unit tests for modeling_compressm.training.rank_selection (pure functions on Hankel singular values)."""

import pytest
import torch

from modeling_compressm.training.rank_selection import (
    apply_gate,
    budget_ranks,
    fixed_fraction_ranks,
    select_ranks,
    tolerance_ranks,
)
from modeling_compressm.reduction import rank_for_energy


def geometric(n: int, ratio: float, scale: float = 1.0) -> torch.Tensor:
    return scale * ratio ** torch.arange(n, dtype=torch.float64)


def test_tolerance_ranks_match_energy_rule():
    hsv = [torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), geometric(10, 0.5)]
    # layer 0: cumulative 4, 7, 9, 10 -> 90% needs 3 states, 70% needs 2
    assert tolerance_ranks(hsv, 0.1) == [3, rank_for_energy(hsv[1], 0.1)]
    assert tolerance_ranks(hsv, 0.3) == [2, rank_for_energy(hsv[1], 0.3)]
    assert tolerance_ranks(hsv, 0.0) == [4, 10]
    # order of the input does not matter
    assert tolerance_ranks([hsv[0].flip(0)], 0.1) == [3]


def test_fixed_fraction_ranks():
    assert fixed_fraction_ranks([16, 12, 4, 1], 0.25) == [12, 9, 3, 1]
    assert fixed_fraction_ranks([10], 0.5) == [5]
    with pytest.raises(ValueError, match="fraction"):
        fixed_fraction_ranks([10], 1.0)
    with pytest.raises(ValueError, match="current_dims"):
        fixed_fraction_ranks([0], 0.5)


def test_gate_and_min_dim():
    # 5% gate: 19 < 0.95 * 20 is false (19 == 19.0) -> unchanged; 18 < 19 -> reduced
    assert apply_gate([20, 20], [19, 18]) == [20, 18]
    assert apply_gate([20], [19], gate=1.0) == [19]
    # min_dim raises the target; a layer already at/below min_dim is never grown or reduced
    assert apply_gate([20, 3], [1, 1], min_dim=4) == [4, 3]
    # a target above the current size is clamped (reductions never grow layers)
    assert apply_gate([8], [30]) == [8]
    with pytest.raises(ValueError, match="gate"):
        apply_gate([8], [4], gate=0.0)
    with pytest.raises(ValueError, match="min_dim"):
        apply_gate([8], [4], min_dim=0)
    with pytest.raises(ValueError, match="2 target sizes for 1 layers"):
        apply_gate([8], [4, 4])


def test_budget_keeps_globally_largest_normalised_hsv():
    # layer 0: energy concentrated in 2 states; layer 1: flat spectrum -> the budget goes mostly to layer 1
    concentrated = torch.tensor([10.0, 10.0, 1e-3, 1e-3, 1e-3, 1e-3], dtype=torch.float64)
    flat = torch.ones(6, dtype=torch.float64)
    ranks = budget_ranks([concentrated, flat], total_budget=8)
    assert sum(ranks) == 8
    assert ranks == [2, 6]
    # scale invariance: multiplying a layer's HSVs by 1000 does not change the allocation
    assert budget_ranks([concentrated * 1000, flat], total_budget=8) == ranks
    # min_dim floor for every layer
    ranks = budget_ranks([concentrated, flat], total_budget=5, min_dim=2)
    assert ranks == [2, 3]
    # a budget above the total keeps everything
    assert budget_ranks([concentrated, flat], total_budget=100) == [6, 6]
    with pytest.raises(ValueError, match="smaller than"):
        budget_ranks([concentrated, flat], total_budget=3, min_dim=2)
    with pytest.raises(ValueError, match="total_budget"):
        budget_ranks([flat], total_budget=0)


def test_select_ranks_policies():
    hsv = [geometric(16, 0.6), geometric(16, 0.9)]
    tolerance = select_ranks(hsv, policy="tolerance", tau=0.05)
    assert tolerance == apply_gate([16, 16], tolerance_ranks(hsv, 0.05))
    assert tolerance[0] < tolerance[1] < 16
    assert select_ranks(hsv, policy="rollback", tau=0.05) == tolerance
    assert select_ranks(hsv, policy="fixed", fraction=0.25) == [12, 12]
    # the budget caps the policy's sizes element-wise
    capped = select_ranks(hsv, policy="tolerance", tau=0.0, total_budget=10, gate=1.0)
    assert sum(capped) == 10
    assert capped == budget_ranks(hsv, 10)
    # min_dim applies on top of every policy
    assert select_ranks(hsv, policy="fixed", fraction=0.9, min_dim=5) == [5, 5]
    with pytest.raises(ValueError, match="policy"):
        select_ranks(hsv, policy="magic")
    with pytest.raises(ValueError, match="do not match"):
        select_ranks(hsv, current_dims=[16, 15])


def test_invalid_hsv_rejected():
    with pytest.raises(ValueError, match="NaN"):
        tolerance_ranks([torch.tensor([1.0, float("nan")])], 0.1)
    with pytest.raises(ValueError, match="negative"):
        tolerance_ranks([torch.tensor([1.0, -1.0])], 0.1)
    with pytest.raises(ValueError, match="empty"):
        tolerance_ranks([], 0.1)
    with pytest.raises(ValueError, match="1-D"):
        tolerance_ranks([torch.ones(2, 2)], 0.1)
