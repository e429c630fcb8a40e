"""State selection for Mamba-1 layers from data: float64 reference scan and Gramian statistics (pure torch math).

A Mamba-1 layer with D channels and N states runs, per position t (state h_t of shape (D, N)):

    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] B_t[n] x_t[d],     y_t[d] = Σ_n C_t[n] h_t[d, n] + D[d] x_t[d].

The decay differs per channel and state, so no dense change of state basis commutes with it: only keeping a subset K of
the states is exact. The kept states evolve exactly as before (they do not mix), so y_t - ỹ_t = Σ_{n∉K} C_t[n] h_t[:, n]
and, with P = Σ_d E[h_t[d] h_t[d]ᵀ] and Q = E[C_t C_tᵀ] (N, N), E‖y - ỹ‖² ≈ ‖Q^{1/2} (I - V Vᵀ) P^{1/2}‖²_F for the
selection V = I[:, K] (exact if h_t and C_t are independent): the same data-driven quantities as for Mamba-2 with one
group, so `mamba2_reduction.select_states` (pivoted QR of Q^{1/2} P^{1/2}) picks K.

Only tensor math, no nn.Module code. Imported by the remote-code modeling file: imports nothing but its flat sibling
`mamba2_reduction.py` from the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mamba2_reduction import GramianStatistics


@dataclass
class MambaScanInputs:
    """What a Mamba-1 layer feeds its selective scan (after conv1d, SiLU and x_proj).

    Shapes: hidden_states (batch, length, channels); time_step (batch, length, channels) = dt_proj.weight applied to
    the low-rank time step, before `time_step_bias` and softplus; B, C (batch, length, state); A (channels, state) =
    -exp(A_log); time_step_bias (channels,); D (channels,). Any float dtype.
    """

    hidden_states: torch.Tensor
    time_step: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    A: torch.Tensor
    time_step_bias: torch.Tensor
    D: torch.Tensor


def reference_scan(inputs: MambaScanInputs, on_state=None):
    """Sequential float64 Mamba-1 scan (the definition): for checks and for Gramian statistics.

    Args:
        inputs: the layer's scan inputs (see `MambaScanInputs`).
        on_state: optional callable `on_state(t, state, C_t)` called after each position with the float64 state
            (batch, channels, state) and C_t (batch, state).

    Returns:
        (y, final_state): y float64 (batch, length, channels) with the D skip and without the gate; final_state float64
        (batch, channels, state), transformers' cache layout.
    """
    x = inputs.hidden_states.double()
    batch, length, channels = x.shape
    delta = F.softplus(inputs.time_step.double() + inputs.time_step_bias.double())  # (batch, length, channels)
    A, B, C = inputs.A.double(), inputs.B.double(), inputs.C.double()
    h = x.new_zeros(batch, channels, A.shape[-1])
    outputs = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)  # (batch, channels, state)
        h = decay * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        outputs.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
        if on_state is not None:
            on_state(t, h, C[:, t])
    y = torch.stack(outputs, dim=1) + inputs.D.double() * x
    return y, h


class MambaGramianStatistics(GramianStatistics):
    """Running float64 sums for one Mamba-1 layer, as one group: P_sum = Σ_t Σ_d h_t[d] h_t[d]ᵀ and
    Q_sum = Σ_t C_t C_tᵀ, each (1, state, state), over valid positions; `gramians()` returns the means (P, Q)."""

    def update(self, inputs: MambaScanInputs, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch. `mask`: optional (batch, length) with 1 at real tokens, 0 at padding."""
        batch, length, _ = inputs.hidden_states.shape
        state = inputs.A.shape[-1]
        weights = torch.ones(batch, length, dtype=torch.float64, device=inputs.B.device)
        if mask is not None:
            weights = mask.to(device=weights.device, dtype=torch.float64)
        P_sum = weights.new_zeros(1, state, state)
        Q_sum = weights.new_zeros(1, state, state)

        def on_state(t, h, C_t):
            w = weights[:, t]
            P_sum[0].add_(torch.einsum("b,bdn,bdm->nm", w, h, h))
            Q_sum[0].add_(torch.einsum("b,bn,bm->nm", w, C_t, C_t))

        reference_scan(inputs, on_state=on_state)
        self.P_sum = P_sum if self.P_sum is None else self.P_sum + P_sum
        self.Q_sum = Q_sum if self.Q_sum is None else self.Q_sum + Q_sum
        self.count += int(weights.sum().item())


__all__ = ["MambaScanInputs", "MambaGramianStatistics", "reference_scan"]
