"""Rank selection for in-training balanced truncation: pure functions on Hankel singular values (no nn, no Trainer).

Every function takes, per layer, the Hankel singular values `hsv` (float tensor (N_i,), non-negative, any order) and
the current state size N_i, and returns the new sizes as a list of ints (one per layer). A returned size equal to the
current one means "leave this layer alone"; `model.reduce` accepts the list as is.

Policies:
    * tolerance: smallest r with sum(sigma_1..r) >= (1 - tau) sum(sigma) (`reduction.rank_for_energy`).
    * fixed: r = floor((1 - fraction) * N) per event.
    * global: the total state (summed over layers) shrinks by the same factor at every scheduled event, so that it
      reaches `final_fraction` of its size after the last of `events` events; the kept states are the ones with the
      largest per-layer normalised HSVs over all layers (`budget_ranks`).
    * global budget: keep the `total_budget` states with the largest per-layer normalised HSVs over all layers.
Then the 5% gate (reduce a layer only if r < gate * N) and the floor `min_dim` are applied by `select_ranks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..reduction import rank_for_energy

POLICIES = ("tolerance", "fixed", "rollback", "global")


def _check_hsv(hsv_per_layer: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(hsv_per_layer) == 0:
        raise ValueError("hsv_per_layer must hold one tensor per layer, got an empty sequence")
    checked = []
    for index, hsv in enumerate(hsv_per_layer):
        if not isinstance(hsv, torch.Tensor):
            hsv = torch.as_tensor(hsv, dtype=torch.float64)
        if hsv.dim() != 1 or hsv.numel() == 0:
            raise ValueError(f"hsv of layer {index} must be a non-empty 1-D tensor, got shape {tuple(hsv.shape)}")
        hsv = hsv.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(hsv).all():
            raise ValueError(f"hsv of layer {index} contains NaN or Inf")
        if (hsv < 0).any():
            raise ValueError(f"hsv of layer {index} has negative entries")
        checked.append(torch.sort(hsv, descending=True).values)
    return checked


def _check_min_dim(min_dim: int) -> None:
    if isinstance(min_dim, bool) or not isinstance(min_dim, int) or min_dim < 1:
        raise ValueError(f"min_dim must be an int >= 1, got {min_dim!r}")


def tolerance_ranks(hsv_per_layer: Sequence[torch.Tensor], tau: float) -> list[int]:
    """Per layer, the smallest r keeping (1 - tau) of the HSV energy (sum of sigma).

    Args:
        hsv_per_layer: per layer a float tensor (N_i,) of Hankel singular values.
        tau: tolerance in [0, 1).
    Returns:
        list of ints r_i in [1, N_i].
    """
    return [rank_for_energy(hsv, tau) for hsv in _check_hsv(hsv_per_layer)]


def fixed_fraction_ranks(current_dims: Sequence[int], fraction: float) -> list[int]:
    """Per layer r = floor((1 - fraction) * N_i), at least 1: remove `fraction` of the states per event.

    Args:
        current_dims: current state sizes N_i (ints >= 1).
        fraction: share of states removed per event, in (0, 1).
    Returns:
        list of ints r_i in [1, N_i].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction!r}")
    dims = _check_dims(current_dims)
    return [max(1, math.floor((1.0 - float(fraction)) * dim + 1e-9)) for dim in dims]


def global_ranks(hsv_per_layer: Sequence[torch.Tensor], final_fraction: float, events: int = 1, min_dim: int = 1) -> list[int]:
    """One event of the "global" policy: keep final_fraction ** (1 / events) of the current total state, shared
    between layers by one ranking of the per-layer normalised HSVs (`budget_ranks`).

    Args:
        hsv_per_layer: per layer a float tensor (N_i,) of Hankel singular values (N_i = current size).
        final_fraction: share of the total state left after `events` such events, in (0, 1).
        events: number of events the shrink is spread over (int >= 1).
        min_dim: least number of states per layer.
    Returns:
        list of ints r_i in [min(min_dim, N_i), N_i], summing to max(round(keep * sum(N_i)), layers' floors).
    """
    if isinstance(final_fraction, bool) or not isinstance(final_fraction, (int, float)) or not (
        0.0 < float(final_fraction) < 1.0
    ):
        raise ValueError(f"final_fraction must lie strictly between 0 and 1, got {final_fraction!r}")
    if isinstance(events, bool) or not isinstance(events, int) or events < 1:
        raise ValueError(f"events must be an int >= 1, got {events!r}")
    _check_min_dim(min_dim)
    values = _check_hsv(hsv_per_layer)
    total = sum(hsv.numel() for hsv in values)
    floor = sum(min(min_dim, hsv.numel()) for hsv in values)
    keep = float(final_fraction) ** (1.0 / events)
    return budget_ranks(values, max(floor, int(round(keep * total))), min_dim)


def budget_ranks(hsv_per_layer: Sequence[torch.Tensor], total_budget: int, min_dim: int = 1) -> list[int]:
    """Share `total_budget` states between layers by Hankel-singular-value energy.

    Each layer first gets min(min_dim, N_i) states; the rest of the budget goes to the globally largest remaining
    HSVs, each normalised by its layer's HSV sum (so layers whose maps differ in scale compete on their share of
    energy, and the choice is invariant to rescaling a layer's B or C). Ties are broken towards lower layers.

    Args:
        hsv_per_layer: per layer a float tensor (N_i,) of Hankel singular values.
        total_budget: total number of states to keep over all layers (>= number of layers * min_dim, unless the
            layers are already smaller).
        min_dim: least number of states per layer.
    Returns:
        list of ints r_i in [min(min_dim, N_i), N_i] with sum(r_i) == min(total_budget, sum(N_i)).
    """
    _check_min_dim(min_dim)
    if isinstance(total_budget, bool) or not isinstance(total_budget, int) or total_budget < 1:
        raise ValueError(f"total_budget must be a positive int, got {total_budget!r}")
    values = _check_hsv(hsv_per_layer)
    floors = [min(min_dim, hsv.numel()) for hsv in values]
    if total_budget < sum(floors):
        raise ValueError(
            f"total_budget={total_budget} is smaller than the {sum(floors)} states that min_dim={min_dim} keeps in "
            f"{len(values)} layers"
        )
    candidates = []  # (normalised hsv, layer) for every state above the floor
    for layer, (hsv, floor) in enumerate(zip(values, floors)):
        total = float(hsv.sum())
        normalised = hsv / total if total > 0 else torch.zeros_like(hsv)
        candidates += [(float(value), layer) for value in normalised[floor:]]
    candidates.sort(key=lambda item: (-item[0], item[1]))
    ranks = list(floors)
    for _, layer in candidates[: total_budget - sum(floors)]:
        ranks[layer] += 1
    return ranks


def apply_gate(current_dims: Sequence[int], target_dims: Sequence[int], gate: float = 0.95, min_dim: int = 1) -> list[int]:
    """Clamp targets to [min_dim, N_i] and keep a layer's size unless the cut is worth it (r < gate * N_i).

    Args:
        current_dims: current sizes N_i.   target_dims: proposed sizes r_i.
        gate: in (0, 1]; a layer is reduced only if max(r_i, min_dim) < gate * N_i. gate=1 reduces on any shrink.
        min_dim: least size a reduction may produce (layers already smaller are left alone).
    Returns:
        list of ints: r_i where the layer is reduced, N_i elsewhere.
    """
    _check_min_dim(min_dim)
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0.0 < float(gate) <= 1.0:
        raise ValueError(f"gate must lie in (0, 1], got {gate!r}")
    dims = _check_dims(current_dims)
    if len(target_dims) != len(dims):
        raise ValueError(f"got {len(target_dims)} target sizes for {len(dims)} layers")
    result = []
    for dim, target in zip(dims, target_dims):
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ValueError(f"target sizes must be positive ints, got {target!r}")
        new = min(max(target, min_dim), dim)
        result.append(new if new < float(gate) * dim else dim)
    return result


def select_ranks(
    hsv_per_layer: Sequence[torch.Tensor],
    current_dims: Sequence[int] | None = None,
    policy: str = "tolerance",
    tau: float = 0.01,
    fraction: float = 0.25,
    gate: float = 0.95,
    min_dim: int = 1,
    total_budget: int | None = None,
    final_fraction: float = 0.5,
    events: int = 1,
) -> list[int]:
    """New state size per layer for one reduction event.

    Target: `tolerance_ranks(tau)` for the "tolerance" and "rollback" policies, `fixed_fraction_ranks(fraction)`
    for "fixed", `global_ranks(final_fraction, events)` for "global"; with `total_budget` the target is the
    element-wise minimum with `budget_ranks`. Then `apply_gate`.

    Args:
        hsv_per_layer: per layer a float tensor (N_i,) of Hankel singular values (N_i = current size).
        current_dims: current sizes; defaults to the lengths of the hsv tensors (and must equal them if given).
    Returns:
        list of ints, one per layer; an entry equal to N_i means the layer is not reduced.
    """
    values = _check_hsv(hsv_per_layer)
    dims = [hsv.numel() for hsv in values]
    if current_dims is not None and list(current_dims) != dims:
        raise ValueError(f"current_dims {list(current_dims)} do not match the hsv lengths {dims}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "fixed":
        targets = fixed_fraction_ranks(dims, fraction)
    elif policy == "global":
        targets = global_ranks(values, final_fraction, events, min_dim)
    else:
        targets = tolerance_ranks(values, tau)
    if total_budget is not None:
        targets = [min(a, b) for a, b in zip(targets, budget_ranks(values, total_budget, min_dim))]
    return apply_gate(dims, targets, gate=gate, min_dim=min_dim)


def _check_dims(dims: Sequence[int]) -> list[int]:
    dims = list(dims)
    if not dims:
        raise ValueError("current_dims must hold one size per layer, got an empty sequence")
    for index, dim in enumerate(dims):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"current_dims[{index}] must be a positive int, got {dim!r}")
    return dims
