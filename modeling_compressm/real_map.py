"""Balanced truncation of the real output map of an LRU layer, in torch (float64 / complex128), no nn.Module code.

An LRU layer computes y_k = Re(C h_k) + D u_k with h_k = diag(lam) h_{k-1} + B u_k: on real inputs a real linear
map with 2N real states x = [Re h; Im h]:

    A_x = [[Re diag(lam), -Im diag(lam)], [Im diag(lam), Re diag(lam)]],   B_x = [Re B; Im B],   C_x = [Re C, -Im C],

equivalently the conjugate-augmented complex system z = [h; conj(h)] = J x, J = [[I, iI], [I, -iI]], with
lam_z = [lam; conj(lam)], B_z = [B; conj(B)], C_z = 1/2 [C, conj(C)] (diagonal, so its Gramians are closed-form).
The Hankel singular values of this system (2N of them) measure what the layer computes; those of (lam, B, C)
(`reduction.balance(..., system="complex")`, the paper's choice) do not.

Truncating the real system to real order q and re-diagonalising gives conjugate pairs (mu, conj(mu)) and real poles.
Folding them back into LRU states:

    * a pair contributes c z + conj(c z) = Re(2 c z) with z_k = mu z_{k-1} + b u_k: one LRU state with lam = mu
      (the member with positive imaginary part), B row b, C column 2 c;
    * a real pole mu with real b, c contributes c z: one LRU state with lam = mu, B row b, C column c
      (`reduction.lru_parameters_from_system` stores a positive real pole at phase 2 pi and a negative one at pi).

So q real orders cost (q + number of real poles) / 2 LRU states; `truncate_real_map` picks the largest q whose
folded system has at most the requested number of LRU states.

Functions:
    real_map_gramians(lam, B, C)       -> P_x, Q_x   float64 (2N, 2N) each
    balance_real_map(lam, B, C)        -> reduction.Balancing with system="real", hsv float64 (2N,)
    truncate_real_map(balancing, rank) -> reduction.ReducedSystem with at most `rank` LRU states
    augmented_system(lam, B, C)        -> lam_z (2N,), B_z (2N, H), C_z (H, 2N) complex128
    real_system(lam, B, C)             -> A_x (2N, 2N), B_x (2N, H), C_x (H, 2N) float64
"""

from __future__ import annotations

import math

import torch

from .reduction import (
    Balancing,
    ReducedSystem,
    ReductionError,
    _as_system,
    _check_reduced,
    _eigendecomposition,
    _is_zero_system,
    _psd_factor,
    _truncate_zero_system,
    gramians_unchecked,
)

__all__ = ["augmented_system", "real_system", "real_map_gramians", "balance_real_map", "truncate_real_map"]


def augmented_system(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """The conjugate-augmented system of (lam (N,), B (N, H), C (H, N)): lam_z complex128 (2N,), B_z (2N, H),
    C_z (H, 2N), whose complex transfer function equals the layer's real map u -> Re(C h)."""
    lam, B, C = (t.to(torch.complex128) for t in (lam, B, C))
    return torch.cat([lam, lam.conj()]), torch.cat([B, B.conj()]), 0.5 * torch.cat([C, C.conj()], dim=1)


def real_system(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """The 2N-real-state system of (lam (N,), B (N, H), C (H, N)): A_x float64 (2N, 2N), B_x (2N, H), C_x (H, 2N)."""
    lam, B, C = (t.to(torch.complex128) for t in (lam, B, C))
    re, im = torch.diag(lam.real), torch.diag(lam.imag)
    A_x = torch.cat([torch.cat([re, -im], dim=1), torch.cat([im, re], dim=1)])
    return A_x, torch.cat([B.real, B.imag]), torch.cat([C.real, -C.imag], dim=1)


def _basis_change(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """W (x = W z) and J = W^{-1} (z = J x), complex128 (2N, 2N), for z = [h; conj(h)], x = [Re h; Im h]."""
    eye = torch.eye(n, dtype=torch.complex128, device=device)
    W = 0.5 * torch.cat([torch.cat([eye, eye], dim=1), torch.cat([-1j * eye, 1j * eye], dim=1)])
    J = torch.cat([torch.cat([eye, 1j * eye], dim=1), torch.cat([eye, -1j * eye], dim=1)])
    return W, J


def real_gramians_unchecked(lam, B, C) -> tuple[torch.Tensor, torch.Tensor]:
    """P_x, Q_x float64 (2N, 2N) from N x N complex blocks (differentiable): with the Gramian P = sum h h^H and
    M = sum h h^T (closed form, like P), sum Re h Re h^T = Re(P + M) / 2, sum Im h Im h^T = Re(P - M) / 2 and
    sum Re h Im h^T = Im(M - P) / 2; likewise Q_x from Q = C^H C / (1 - conj(lam_i) lam_j) and
    N = C^T C / (1 - lam_i lam_j) (y = Re(C h): |Re g|^2 = (Re(g^H g) + Re(g^T g)) / 2)."""
    outer = lam[:, None] * lam[None, :]
    P, Q = gramians_unchecked(lam, B, C)
    M = (B @ B.T) / (1.0 - outer)
    N = (C.T @ C) / (1.0 - outer)
    P_x = 0.5 * torch.cat([torch.cat([(P + M).real, (M - P).imag], dim=1),
                           torch.cat([(M - P).imag.T, (P - M).real], dim=1)])
    Q_x = 0.5 * torch.cat([torch.cat([(Q + N).real, -(Q + N).imag], dim=1),
                           torch.cat([-(Q + N).imag.T, (Q - N).real], dim=1)])
    return 0.5 * (P_x + P_x.T), 0.5 * (Q_x + Q_x.T)


def real_map_gramians(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Controllability and observability Gramians of the layer's real map (`real_system`), in closed form through
    the diagonal augmented system: P_x = W P_z W^H, Q_x = J^H Q_z J.

    Args:
        lam: complex (N,), |lam| < 1.   B: complex (N, H).   C: complex (H, N).
    Returns:
        P_x, Q_x: float64 (2N, 2N), symmetric positive semi-definite.
    """
    return real_gramians_unchecked(*_as_system(lam, B, C))


def balance_real_map(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> Balancing:
    """Square-root balancing of the layer's real map: real factors Lc, Lo (P_x = Lc Lc^T, Q_x = Lo Lo^T) and
    SVD(Lo^T Lc) = U diag(hsv) Vh, all float64 (2N, 2N); hsv float64 (2N,) descending; lam, B, C the layer's system
    (complex128). Raises ReductionError for NaN/Inf input, |lam| >= 1 or non-finite singular values."""
    lam, B, C = _as_system(lam, B, C)
    P_x, Q_x = real_gramians_unchecked(lam, B, C)
    controllability_factor, observability_factor = _psd_factor(P_x).real, _psd_factor(Q_x).real
    U, sigma, Vh = torch.linalg.svd(observability_factor.T @ controllability_factor)
    if not torch.isfinite(sigma).all():
        raise ReductionError("Hankel singular values of the real map are not finite")
    return Balancing(lam, B, C, controllability_factor, observability_factor, U, sigma, Vh, system="real")


# Two real eigenvalues closer than this times (1 - |mu|) are one real double pole split by round-off (a conjugate pair
# within ~1e-13 rad of the real axis comes out of eig that way): they fold into one LRU state, changing the map by
# about this much relative to its gain.
MERGE_TOLERANCE = 1e-8
# Hankel singular values below this times the largest are treated as zero by `truncate_real_map`.
NEGLIGIBLE_HSV = math.sqrt(torch.finfo(torch.float64).eps)


def _fold_modes(mu, rows, columns, upper, real):
    """LRU states of the eigenmodes (mu (q,), rows (q, 2N), columns (2N, q)): a conjugate pair keeps its upper member
    with its C column doubled; a real pole is one state; two (numerically) equal real poles mu_i ~ mu_j are one
    state with b = b_i + i b_j, c = c_i - i c_j, since Re(c b^T) = c_i b_i^T + c_j b_j^T.
    Returns lam (r,), rows (r, 2N), columns (2N, r), all complex128."""
    lam, new_rows, new_columns = [mu[upper]], [rows[upper]], [2.0 * columns[:, upper]]
    reals = torch.nonzero(real).flatten()
    reals = reals[torch.argsort(mu[reals].real)].tolist()
    index = 0
    while index < len(reals):
        first = reals[index]
        second = reals[index + 1] if index + 1 < len(reals) else None
        if second is not None and (mu[second] - mu[first]).abs() <= MERGE_TOLERANCE * (1 - mu[first].abs()):
            lam.append(0.5 * (mu[first] + mu[second])[None])
            new_rows.append((rows[first].real + 1j * rows[second].real)[None])
            new_columns.append((columns[:, first].real - 1j * columns[:, second].real)[:, None])
            index += 2
        else:
            lam.append(mu[first][None])
            new_rows.append(rows[first][None])
            new_columns.append(columns[:, first][:, None])
            index += 1
    return torch.cat(lam), torch.cat(new_rows), torch.cat(new_columns, dim=1)


def _fold(balancing: Balancing, order: int) -> ReducedSystem:
    """Truncate the balanced real system to real order `order`, re-diagonalise and fold into LRU states."""
    lam, B, C, sigma = balancing.lam, balancing.B, balancing.C, balancing.hsv
    n = lam.shape[0]
    inv_sqrt = sigma[:order].rsqrt()
    transform = balancing.controllability_factor @ balancing.Vh[:order].T * inv_sqrt[None, :]  # (2N, q)
    inverse_transform = inv_sqrt[:, None] * (balancing.U[:, :order].T @ balancing.observability_factor.T)  # (q, 2N)
    A_x, B_x, C_x = real_system(lam, B, C)
    A_r = inverse_transform @ A_x @ transform  # real (q, q)
    mu, eigenvectors = _eigendecomposition(A_r)
    upper, real = mu.imag > 0, mu.imag == 0
    if int(upper.sum()) != int((mu.imag < 0).sum()):
        raise ReductionError("the reduced real map's eigenvalues do not come in conjugate pairs")
    rows = torch.linalg.solve(eigenvectors, inverse_transform.to(torch.complex128))  # (q, 2N): modes = rows @ x
    columns = transform.to(torch.complex128) @ eigenvectors  # (2N, q): C_x @ columns = the modes' output columns
    lam_r, rows, columns = _fold_modes(mu, rows, columns, upper, real)
    # Each state's phase (and a real pole's sign) is free: b -> b e^{i phi}, c -> c e^{-i phi} keeps Re(c h). Fix it so
    # that the largest entry of each C column is real and positive, so the result is a continuous function of the
    # layer (eig's sign or phase choice of an eigenvector can flip under a change of the input at round-off level).
    unaligned = C_x.to(torch.complex128) @ columns  # (H, r)
    largest = unaligned.gather(0, unaligned.abs().argmax(dim=0, keepdim=True))[0]
    phase = torch.where(largest.abs() > 0, largest / largest.abs().clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    rows, columns = rows * phase[:, None], columns * phase.conj()[None, :]
    B_r = rows @ B_x.to(torch.complex128)
    C_r = C_x.to(torch.complex128) @ columns
    _check_reduced(lam_r, B_r, C_r)
    # In terms of the layer's complex state: x = W [h; conj h], and C_x = 1/2 [C, conj C] J, so
    # new state = (rows W) [h; conj h] and new C = [C, conj C] (1/2 J columns).
    W, J = _basis_change(n, lam.device)
    return ReducedSystem(lam=lam_r, B=B_r, C=C_r, hsv=sigma, project=rows @ W, lift=0.5 * J @ columns,
                         order=order, system="real")


def truncate_real_map(balancing: Balancing, rank: int) -> ReducedSystem:
    """Reduce a layer balanced on its real map (`balance_real_map`) to at most `rank` LRU states.

    The real order starts at q = min(2 rank, number of non-zero HSVs) and decreases until the folded system (a
    conjugate pair = one LRU state, a real pole = one LRU state) has at most `rank` states; the H-infinity error of
    the real map is then at most 2 * sum(hsv[q:]) (`ReducedSystem.order` is q).

    Args:
        balancing: `balance_real_map(lam, B, C)` of an N-state layer.
        rank: LRU states to keep at most, 1 <= rank <= N.
    Returns:
        ReducedSystem with lam complex128 (r,), B (r, H), C (H, r), r <= rank; hsv float64 (2N,); project complex128
        (r, 2N) with new state = project @ [h; conj h] (new B = project @ [B; conj B]); lift complex128 (2N, r) with
        new C = [C, conj C] @ lift.
    Raises:
        ReductionError: bad rank, an unstable or ill-conditioned reduced system, or eigenvalues that are not in
            conjugate pairs.
    """
    n = balancing.lam.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ReductionError(f"rank must be an int in [1, {n}], got {rank!r}")
    sigma = balancing.hsv
    if _is_zero_system(sigma):
        return _truncate_zero_system(balancing, rank)._replace(order=0, system="real")
    # HSVs below sqrt(eps) sigma_1 are round-off of the eigendecomposition-based square-root factors (a real map of
    # lower order than 2N, e.g. a real pole, shows them): keeping them only makes the transform ill-conditioned.
    nonzero = int((sigma > NEGLIGIBLE_HSV * sigma[0]).sum())
    order = min(2 * rank, nonzero)
    while True:
        reduced = _fold(balancing, order)
        states = reduced.lam.shape[0]
        if states <= rank:
            return reduced
        order -= max(1, states - rank)  # order <= rank always fits: every LRU state holds at least one real order
