"""What a reduction did to one LRU layer: `LayerReduction` (returned by `model.reduce`, one per layer, and the per-layer
view of a `ReductionEvent`) and `LayerChange` (the layer's parameters before and after, for repairing an optimizer's
state in the training library).

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
    """

    layer: int
    parameters: dict
    previous: dict = field(default_factory=dict)
    project: Any = None
    lift: Any = None


@dataclass
class LayerReduction:
    """The result of a reduction for one layer.

    layer: layer index.   old_dim / new_dim: state sizes before and after.
    status: "reduced" | "unchanged" (rank None or >= the size) | "failed" (the truncation raised; `error` says why).
    error: the error text, or None.
    rank_requested: the size asked for (None: leave the layer alone).
    hsv: float64 tensor of the balanced system's Hankel singular values (2N of them for the real map), or None.
    kept_energy: share of the HSV sum kept (1.0 for a layer left alone, None where unknown).
    hinf_bound: H-infinity error bound 2 * sum(discarded HSVs), or None if the layer did not change.
    hinf_bound_relative: that bound over a lower bound of the layer's H-infinity gain, so an upper bound of the
        relative change of the layer's map; None if the layer did not change.
    change: the layer's `LayerChange` (parameters, previous values, basis maps) when it was reduced, else None.
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

    @property
    def reduced(self) -> bool:
        return self.status == "reduced"
