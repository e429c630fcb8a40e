"""State reduction of Mamba-2 layers from data: Gramians, square-root balancing, state selection (pure torch math).

A Mamba-2 head h of group g runs, per position t (state S_t of shape (N, P), decay a_t a scalar per head):

    S_t = a_t S_{t-1} + B_t (Δ_t x_t)ᵀ,        y_t = S_tᵀ C_t + D x_t.

For any V (N, r) and W (r, N) with W V = I, the layer fed B̃_t = W B_t and C̃_t = Vᵀ C_t has the state S̃_t = W S_t
exactly (the decay is a scalar), so y_t - ỹ_t = ((I - V W) S_t)ᵀ C_t. With the data-driven Gramians
P_g = Σ_{h∈g} E[S_t S_tᵀ] and Q_g = E[C_t C_tᵀ] (expectations over positions), E‖y - ỹ‖² ≈ ‖Q^{1/2} (I - V W) P^{1/2}‖²_F
(exact if S_t and C_t are independent), minimised over rank-r oblique projections by square-root balancing; the minimum
is Σ_{i>r} σ_i², the σ_i being the singular values of Q^{1/2} P^{1/2} (the layer's data-driven Hankel singular values).

This module holds only tensor math (no nn.Module code): a float64 reference scan, Gramian accumulation, balancing,
column-pivoted selection and the rank rule. It is imported by the remote-code modeling file, so it imports nothing else
from the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ScanInputs:
    """What a Mamba-2 layer feeds its selective scan, after conv1d + SiLU (and any state projection).

    Shapes: hidden_states (batch, length, heads * head_dim); B, C (batch, length, groups * state); dt (batch, length,
    heads) before `dt_bias` and softplus; A (heads,) = -exp(A_log); dt_bias (heads,); D (heads,). Any float dtype.
    """

    hidden_states: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    dt_bias: torch.Tensor
    D: torch.Tensor
    num_heads: int
    head_dim: int
    n_groups: int
    dt_limit: tuple[float, float] = (0.0, float("inf"))

    @property
    def state_size(self) -> int:
        return self.B.shape[-1] // self.n_groups


def discretised_step(inputs: ScanInputs) -> torch.Tensor:
    """Δ_t = clamp(softplus(dt + dt_bias), dt_limit), float64, shape (batch, length, heads)."""
    dt = F.softplus(inputs.dt.double() + inputs.dt_bias.double())
    return dt.clamp(min=inputs.dt_limit[0], max=inputs.dt_limit[1])


def reference_scan(inputs: ScanInputs, initial_state: torch.Tensor | None = None, on_state=None):
    """Sequential float64 Mamba-2 scan (the definition, no chunking): for checks and for Gramian statistics.

    Args:
        inputs: the layer's scan inputs (see `ScanInputs`).
        initial_state: optional (batch, heads, head_dim, state) state before the first position.
        on_state: optional callable `on_state(t, state, C_t)` called after each position with the float64 state
            (batch, heads, head_dim, state) and C_t (batch, groups, state).

    Returns:
        (y, final_state): y float64 (batch, length, heads * head_dim) including the D skip; final_state float64
        (batch, heads, head_dim, state) in transformers' cache layout.
    """
    batch, length, _ = inputs.hidden_states.shape
    heads, head_dim, groups, state = inputs.num_heads, inputs.head_dim, inputs.n_groups, inputs.state_size
    x = inputs.hidden_states.double().reshape(batch, length, heads, head_dim)
    heads_per_group = heads // groups
    B = inputs.B.double().reshape(batch, length, groups, state).repeat_interleave(heads_per_group, dim=2)
    C_groups = inputs.C.double().reshape(batch, length, groups, state)
    C = C_groups.repeat_interleave(heads_per_group, dim=2)
    dt = discretised_step(inputs)
    decay = torch.exp(dt * inputs.A.double())  # (batch, length, heads)
    S = x.new_zeros(batch, heads, head_dim, state) if initial_state is None else initial_state.double().clone()
    outputs = []
    for t in range(length):
        S = decay[:, t, :, None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
        if on_state is not None:
            on_state(t, S, C_groups[:, t])
    y = torch.stack(outputs, dim=1) + inputs.D.double()[:, None] * x
    return y.reshape(batch, length, heads * head_dim), S


class GramianStatistics:
    """Running float64 sums for one layer: P_g = Σ_{h∈g} Σ_t S_t S_tᵀ and Q_g = Σ_t C_t C_tᵀ over valid positions.

    `P_sum`, `Q_sum`: float64 (groups, state, state); `count`: number of (sequence, position) pairs accumulated.
    Call `update` once per batch; `gramians()` returns the means (P, Q).
    """

    def __init__(self):
        self.P_sum: torch.Tensor | None = None
        self.Q_sum: torch.Tensor | None = None
        self.count = 0

    def update(self, inputs: ScanInputs, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch. `mask`: optional (batch, length) with 1 at real tokens, 0 at padding."""
        batch, length, _ = inputs.hidden_states.shape
        groups, state = inputs.n_groups, inputs.state_size
        heads_per_group = inputs.num_heads // groups
        weights = torch.ones(batch, length, dtype=torch.float64, device=inputs.B.device)
        if mask is not None:
            weights = mask.to(device=weights.device, dtype=torch.float64)
        P_sum = weights.new_zeros(groups, state, state)
        Q_sum = weights.new_zeros(groups, state, state)

        def on_state(t, S, C_t):
            w = weights[:, t]
            per_head = torch.einsum("b,bhpn,bhpm->hnm", w, S, S)
            P_sum.add_(per_head.reshape(groups, heads_per_group, state, state).sum(1))
            Q_sum.add_(torch.einsum("b,bgn,bgm->gnm", w, C_t, C_t))

        reference_scan(inputs, on_state=on_state)
        self.P_sum = P_sum if self.P_sum is None else self.P_sum + P_sum
        self.Q_sum = Q_sum if self.Q_sum is None else self.Q_sum + Q_sum
        self.count += int(weights.sum().item())

    def gramians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q), each float64 (groups, state, state): the accumulated sums divided by the position count."""
        if self.P_sum is None or self.count == 0:
            raise ValueError("no calibration positions were accumulated: pass at least one batch with real tokens")
        return self.P_sum / self.count, self.Q_sum / self.count


def symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root of (..., n, n) symmetric matrices (negative eigenvalues from round-off clamp to 0)."""
    matrix = 0.5 * (matrix + matrix.transpose(-1, -2))
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    root = eigenvalues.clamp(min=0).sqrt()
    return (eigenvectors * root[..., None, :]) @ eigenvectors.transpose(-1, -2)


def hankel_singular_values(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Data-driven HSVs σ (descending) per group: singular values of Q^{1/2} P^{1/2}; P, Q (groups, n, n) → (groups, n).

    Σ σ_i² = tr(Q P) is the layer's scan-output energy E‖S_tᵀ C_t‖² (under the factorisation assumption)."""
    return torch.linalg.svdvals(symmetric_sqrt(Q) @ symmetric_sqrt(P))


def predicted_error(hsv: torch.Tensor, rank: int) -> float:
    """Σ over groups of Σ_{i>rank} σ_i²: the predicted E‖y - ỹ‖² of balanced truncation to `rank` (hsv: (groups, n))."""
    return float(hsv[..., rank:].double().pow(2).sum())


def rank_for_output_energy(hsv: torch.Tensor, tolerance: float) -> int:
    """Smallest r with Σ_g Σ_{i>r} σ_{g,i}² <= tolerance · Σ σ² (energy of σ², i.e. of the output, not of σ).

    hsv: (groups, n) or (n,), descending per group; tolerance in [0, 1)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance!r}")
    energy = hsv.double().pow(2).reshape(-1, hsv.shape[-1]).sum(0)  # (n,), summed over groups
    total = float(energy.sum())
    if total == 0:
        return 1
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i>=r}
    for rank in range(1, hsv.shape[-1] + 1):
        remaining = float(tail[rank]) if rank < hsv.shape[-1] else 0.0
        if remaining <= tolerance * total:
            return rank
    return hsv.shape[-1]


def balanced_projection(P: torch.Tensor, Q: torch.Tensor, rank: int, relative_floor: float = 1e-12):
    """Square-root balancing per group, truncated to `rank`.

    With L_c = P^{1/2}, L_o = Q^{1/2} (symmetric) and SVD(L_oᵀ L_c) = U Σ Vᵀ:
    V_r = L_c V_{:r} Σ_r^{-1/2} (n, r) and W_r = Σ_r^{-1/2} U_{:r}ᵀ L_oᵀ (r, n), so W_r V_r = I.

    Args:
        P, Q: float64 (groups, n, n) Gramians; rank: 1 <= rank <= n.
    Returns:
        (V, W, hsv): V (groups, n, rank), W (groups, rank, n), hsv (groups, n) descending; all float64.
    Raises:
        ValueError if σ_rank <= relative_floor · σ_1 in a group (rank above the numerical rank: use a smaller rank).
    """
    n = P.shape[-1]
    if not 1 <= rank <= n:
        raise ValueError(f"rank must lie in [1, {n}], got {rank}")
    L_c, L_o = symmetric_sqrt(P.double()), symmetric_sqrt(Q.double())
    U, sigma, Vh = torch.linalg.svd(L_o.transpose(-1, -2) @ L_c)
    kept = sigma[..., :rank]
    if bool((kept[..., -1] <= relative_floor * sigma[..., 0].clamp(min=torch.finfo(torch.float64).tiny)).any()):
        raise ValueError(
            f"rank {rank} exceeds the numerical rank of Q^1/2 P^1/2 in some group (σ = {sigma.tolist()}); "
            "reduce to at most the number of non-zero Hankel singular values"
        )
    scale = kept.rsqrt()
    V = L_c @ Vh[..., :rank, :].transpose(-1, -2) * scale[..., None, :]
    W = scale[..., :, None] * U[..., :, :rank].transpose(-1, -2) @ L_o.transpose(-1, -2)
    return V, W, sigma


def pivoted_qr_order(matrix: torch.Tensor) -> list[int]:
    """Column order of a column-pivoted (rank-revealing) QR of a (m, n) matrix: greedy largest residual column norm."""
    residual = matrix.double().clone()
    order: list[int] = []
    remaining = list(range(matrix.shape[-1]))
    for _ in range(matrix.shape[-1]):
        norms = residual[:, remaining].pow(2).sum(0)
        pick = remaining[int(torch.argmax(norms))]
        order.append(pick)
        remaining.remove(pick)
        column = residual[:, pick]
        length = column.norm()
        if length > 0:
            unit = column / length
            residual = residual - unit[:, None] * (unit @ residual)[None, :]
    return order


def select_states(P: torch.Tensor, Q: torch.Tensor, rank: int) -> list[list[int]]:
    """State channels to keep per group (sorted): the first `rank` pivots of a column-pivoted QR of Q^{1/2} P^{1/2}.

    The columns of Q^{1/2} P^{1/2} (symmetric roots) are the state channels; P, Q: (groups, n, n)."""
    n = P.shape[-1]
    if not 1 <= rank <= n:
        raise ValueError(f"rank must lie in [1, {n}], got {rank}")
    products = symmetric_sqrt(Q.double()) @ symmetric_sqrt(P.double())
    return [sorted(pivoted_qr_order(product)[:rank]) for product in products]


def selection_projection(keep: list[list[int]], n: int, dtype=torch.float64):
    """(V, W) of axis-aligned selection: V (groups, n, r) = identity columns `keep[g]`, W = Vᵀ; W V = I."""
    groups, rank = len(keep), len(keep[0])
    V = torch.zeros(groups, n, rank, dtype=dtype)
    for g, indices in enumerate(keep):
        V[g, torch.as_tensor(indices), torch.arange(rank)] = 1
    return V, V.transpose(-1, -2).clone()


def normalise_keep(keep, groups: int, n: int) -> list[list[int]]:
    """`keep` as one index list per group: a flat list applies to every group; checks range, duplicates, equal length."""
    if keep is None or len(keep) == 0:
        raise ValueError("keep must list the state indices to select")
    per_group = [list(keep)] * groups if isinstance(keep[0], int) else [list(k) for k in keep]
    if len(per_group) != groups:
        raise ValueError(f"keep has {len(per_group)} index lists, the layer has {groups} groups")
    lengths = {len(k) for k in per_group}
    if len(lengths) != 1:
        raise ValueError(f"keep must select the same number of states in every group, got lengths {sorted(lengths)}")
    for indices in per_group:
        if len(set(indices)) != len(indices) or any(not 0 <= int(i) < n for i in indices):
            raise ValueError(f"keep indices must be distinct and lie in [0, {n}), got {indices}")
    return [sorted(int(i) for i in indices) for indices in per_group]


def projection_error(P: torch.Tensor, Q: torch.Tensor, V: torch.Tensor, W: torch.Tensor) -> float:
    """Predicted E‖y - ỹ‖² of the oblique projection V W: Σ_g ‖Q_g^{1/2} (I - V_g W_g) P_g^{1/2}‖²_F (float)."""
    n = P.shape[-1]
    residual = torch.eye(n, dtype=torch.float64) - V.double() @ W.double()
    return float((symmetric_sqrt(Q.double()) @ residual @ symmetric_sqrt(P.double())).pow(2).sum())
