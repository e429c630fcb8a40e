"""What a reduction did to one layer: `LayerReduction` (returned by `model.reduce` of the LRU, Mamba-2 and Mamba-1
models, one per layer, and the per-layer view of a `ReductionEvent`) and `LayerChange` (the layer's parameters before
and after, for repairing an optimizer's state in the training library).

Copied next to the weights of `trust_remote_code` checkpoints (the modeling file uses it), so it imports only the
standard library; tensors are typed by name only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerChange", "LayerReduction"]


@dataclass
class LayerChange:
    """What happened to one LRU layer's parameters in a reduction (or a re-allocation).

    layer: layer index.
    parameters: name -> the nn.Parameter, now holding the new values (state size r).
    previous: name -> the values before (state size N), same dtype/device.
    project: complex128 (r, N), new state = project @ old state; None when the layer was re-allocated rather than
        reduced (no basis relation between old and new values). A reduction of the real map (`system="real"`, the
        default) gives (r, 2N): new state = project @ [old state; conj(old state)] (`reduction.ReducedSystem`).
    lift: complex128 (N, r), old state ~ lift @ new state; None likewise. Real map: (2N, r), new C = [C, conj(C)] @ lift.
    slicers: Mamba layers (whose `parameters` and `previous` are keyed by full parameter names in the model, and
        whose `previous` holds the replaced nn.Parameters themselves, absent for a parameter that did not exist):
        name -> function slicing a tensor of the previous parameter's shape as the parameter was sliced (selection;
        for optimizer moments). A parameter without a slicer was replaced with no such relation (a new balanced
        projection). Empty for LRU layers, whose state maps are `project` and `lift`.
    """

    layer: int
    parameters: dict
    previous: dict = field(default_factory=dict)
    project: Any = None
    lift: Any = None
    slicers: dict = field(default_factory=dict)


@dataclass
class LayerReduction:
    """The result of a reduction for one layer.

    layer: layer index.   old_dim / new_dim: state sizes before and after.
    status: "reduced" | "unchanged" (rank None or >= the size) | "failed" (the truncation raised; `error` says why).
    error: the error text, or None.
    rank_requested: the size asked for (None: leave the layer alone).
    hsv: float64 tensor of the balanced system's Hankel singular values (2N of them for the real map), or None.
        Mamba layers: the data-driven HSVs, float64 (groups, old_dim) (Mamba-1: one group), or None without data.
    kept_energy: share of the HSV sum kept (1.0 for a layer left alone, None where unknown). Mamba layers: share of
        Σσ², the predicted scan-output energy, kept (1 - relative_error).
    hinf_bound: H-infinity error bound 2 * sum(discarded HSVs), or None if the layer did not change (always None for
        Mamba layers: their data-driven HSVs give a predicted error, not a bound).
    hinf_bound_relative: that bound over a lower bound of the layer's H-infinity gain, so an upper bound of the
        relative change of the layer's map; None if the layer did not change.
    change: the layer's `LayerChange` (parameters, previous values, basis maps or slicers) when it was reduced, else
        None.
    Mamba layers only (None otherwise):
    method: "balanced" (projection of B and C) or "select" (kept state channels).
    predicted_error: E‖Δy‖² of the scan output on the calibration data (Σ_{i>r} σ_i² for balanced truncation).
    relative_error: predicted_error / Σσ².
    keep: the selected state indices (Mamba-2: one sorted list per group; Mamba-1: one sorted list).
    """

    layer: int
    old_dim: int
    new_dim: int
    status: str = "unchanged"
    error: str | None = None
    rank_requested: int | None = None
    hsv: Any = None
    kept_energy: float | None = 1.0
    hinf_bound: float | None = None
    hinf_bound_relative: float | None = None
    change: LayerChange | None = None
    method: str | None = None
    predicted_error: float | None = None
    relative_error: float | None = None
    keep: Any = None

    @property
    def reduced(self) -> bool:
        return self.status == "reduced"
