"""Balanced truncation of diagonal complex linear systems, in torch (float64 / complex128), no nn.Module code.

The system of one LRU layer (discrete time, complex state of size N, real input/output of width H):

    h_k = diag(lam) h_{k-1} + B u_k,      y_k = Re(C h_k) + D u_k

with `lam` complex (N,), `B` complex (N, H) (the input gain gamma already folded in), `C` complex (H, N).
D is a feed-through and is never changed by a reduction. Two systems can be balanced (`system=`, see `SYSTEMS`):

    "real"    (default) the map the layer computes, u -> Re(C h): 2N real states, 2N Hankel singular values, ranks
              counted in LRU states (a kept conjugate pair or a real pole is one state); see `real_map`.
    "complex" the complex map (lam, B, C) with N states, as in the paper and its reference implementation; its error
              bound holds for Re(.) too but is loose, and it loses more at the same number of states.

Functions:
    gramians(lam, B, C)                        -> P, Q           complex128 (N, N) each, of the complex map
    balance(lam, B, C, system)                 -> Balancing      square-root factors and HSVs, computed once
    hankel_singular_values(lam, B, C, system)  -> sigma          float64 (2N,) real map / (N,) complex map, descending
    truncate(balancing, rank)                  -> ReducedSystem  (lam_r, B_r, C_r, hsv, project, lift), re-diagonalised
    balanced_truncation(lam, B, C, rank, system) -> ReducedSystem balance + truncate in one call
    hinf_error_bound(hsv, order)               -> float          2 * sum(hsv[order:]), the H-infinity error bound
    gain_lower_bound(lam, B, C, system=...)    -> float          a lower bound of the H-infinity norm (layer gain)
    rank_for_energy(hsv, tau)                  -> int
    check_tau(tau, must)                       -> float          the one check of an energy tolerance tau
    lru_parameters_from_system(lam, B)         -> nu_log, theta_log, gamma_log, B_normalised (LRU storage form)

One reduction event factorises each layer once (`balance`): the Hankel singular values that pick the rank and the
truncation to that rank come from the same factors.

Guards raise `ReductionError` (a ValueError) so a caller can skip one layer and go on.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "SYSTEMS",
    "check_system",
    "ReductionError",
    "ReducedSystem",
    "Balancing",
    "gramians",
    "balance",
    "truncate",
    "hinf_error_bound",
    "gain_lower_bound",
    "hankel_singular_values",
    "balanced_truncation",
    "rank_for_energy",
    "check_tau",
    "lru_parameters_from_system",
]

# Reduced eigenvalues must satisfy |lam| <= 1 - STABILITY_MARGIN; an LRU cannot represent |lam| >= 1.
STABILITY_MARGIN = 1e-6
# Largest accepted condition number of the eigenvector matrix used to re-diagonalise the reduced system.
MAX_EIGENVECTOR_CONDITION = 1e8
# The systems a layer can be balanced on: "real" (default) is the map u -> Re(C h) the layer computes, "complex" the
# complex map (lam, B, C) of the paper.
SYSTEMS = ("real", "complex")
DEFAULT_SYSTEM = "real"


class ReductionError(ValueError):
    """A reduction could not be carried out safely (NaN/Inf, unstable or ill-conditioned result, bad rank)."""


def check_system(system) -> str:
    """Return `system` if it names a system in `SYSTEMS`, else raise ValueError saying which names are accepted."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS} (\"real\": the layer's real output map, the default; "
                         f"\"complex\": the paper's complex map), got {system!r}")
    return system


class ReducedSystem(NamedTuple):
    """A reduced, re-diagonalised system, the Hankel singular values of the system it came from, and the basis maps.

    lam:     complex128 (r,) eigenvalues, |lam| < 1.
    B:       complex128 (r, H) input matrix (input gain included).
    C:       complex128 (H, r) output matrix.
    hsv:     float64 (N,) (complex map) or (2N,) (real map) Hankel singular values of the original system, descending.
    project: complex map: complex128 (r, N): new state = project @ old state (so B_r = project @ B).
             real map: complex128 (r, 2N): new state = project @ [h; conj(h)] (B_r = project @ [B; conj(B)]).
    lift:    complex map: complex128 (N, r): old state ~ lift @ new state (so C_r = C @ lift); project @ lift = I_r.
             real map: complex128 (2N, r): C_r = [C, conj(C)] @ lift.
    order:   number of balanced states kept (r for the complex map, the real order q <= 2r for the real map), so
             the H-infinity error of the balanced map is at most `hinf_error_bound(hsv, order)`; None if unknown.
    system:  "complex" or "real" (see `SYSTEMS`).
    """

    lam: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    hsv: torch.Tensor
    project: torch.Tensor
    lift: torch.Tensor
    order: int | None = None
    system: str = "complex"


class Balancing(NamedTuple):
    """Square-root balancing of one diagonal system (`balance`): everything a truncation to any rank needs.

    lam, B, C:              the layer's system, complex128 (N,), (N, H), (H, N).
    controllability_factor: Lc with P = Lc Lc^H: complex128 (N, N) (complex map) or float64 (2N, 2N) (real map).
    observability_factor:   Lo with Q = Lo Lo^H, likewise.
    U, Vh:                  SVD(Lo^H Lc) = U diag(hsv) Vh, likewise.
    hsv:                    float64 (N,) or (2N,), the Hankel singular values of the balanced system, descending.
    system:                 "complex" or "real" (see `SYSTEMS`).
    """

    lam: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    controllability_factor: torch.Tensor
    observability_factor: torch.Tensor
    U: torch.Tensor
    hsv: torch.Tensor
    Vh: torch.Tensor
    system: str = "complex"

    @property
    def state_hsv(self) -> torch.Tensor:
        """Per LRU state, float64 (N,) descending: the HSVs themselves for the complex map; for the real map the 2N
        HSVs summed in consecutive pairs (state i holds real orders 2i-1, 2i), so the energy of the first k entries is
        that of real order 2k, sums are unchanged, and rank rules on these values count LRU states."""
        if self.system == "complex":
            return self.hsv
        return self.hsv.reshape(-1, 2).sum(dim=1)


def _as_system(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Validate shapes/values and promote to complex128 on the inputs' device."""
    if lam.dim() != 1:
        raise ReductionError(f"lam must be 1-D (N,), got shape {tuple(lam.shape)}")
    n = lam.shape[0]
    if B.dim() != 2 or B.shape[0] != n:
        raise ReductionError(f"B must have shape (N={n}, H), got {tuple(B.shape)}")
    if C.dim() != 2 or C.shape[1] != n:
        raise ReductionError(f"C must have shape (H, N={n}), got {tuple(C.shape)}")
    lam, B, C = (t.detach().to(torch.complex128) for t in (lam, B, C))
    for name, tensor in (("lam", lam), ("B", B), ("C", C)):
        if not torch.isfinite(torch.view_as_real(tensor)).all():
            raise ReductionError(f"{name} contains NaN or Inf")
    if (lam.abs() >= 1.0).any():
        raise ReductionError(f"the system is not stable: max |lam| = {lam.abs().max().item():.6g} >= 1")
    return lam, B, C


def gramians(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Controllability and observability Gramians of the diagonal system, in closed form.

    P solves P = A P A^H + B B^H and Q solves Q = A^H Q A + C^H C for A = diag(lam):
        P_ij = (B B^H)_ij / (1 - lam_i conj(lam_j)),   Q_ij = (C^H C)_ij / (1 - conj(lam_i) lam_j).

    Args:
        lam: complex (N,), |lam| < 1.   B: complex (N, H).   C: complex (H, N).
    Returns:
        P, Q: complex128 (N, N), Hermitian positive semi-definite.
    """
    return gramians_unchecked(*_as_system(lam, B, C))


def gramians_unchecked(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gramians` without its checks of the system (differentiable): for callers that checked it already."""
    outer = lam[:, None] * lam.conj()[None, :]
    P = (B @ B.conj().T) / (1.0 - outer)
    Q = (C.conj().T @ C) / (1.0 - outer.conj())
    return P, Q


def _psd_factor(matrix: torch.Tensor) -> torch.Tensor:
    """A factor L with L L^H = matrix for a Hermitian PSD matrix, robust to numerical rank deficiency.

    Cholesky fails on the (often numerically singular) Gramians of SSM layers; the eigendecomposition with negative
    round-off eigenvalues clipped to zero does not. Returns complex128 (N, N).
    """
    hermitian = 0.5 * (matrix + matrix.conj().T)
    eigenvalues, eigenvectors = torch.linalg.eigh(hermitian)
    return eigenvectors * eigenvalues.clamp_min(0.0).sqrt()[None, :]


def balance(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor, system: str = DEFAULT_SYSTEM) -> Balancing:
    """Gramians, their square-root factors and SVD(Lo^H Lc) of the diagonal system: computed once per layer and event.

    Args:
        lam: complex (N,), |lam| < 1.   B: complex (N, H).   C: complex (H, N).
        system: "real" (default): balance the layer's real map u -> Re(C h) (2N states, `real_map.balance_real_map`);
            "complex": the complex map (lam, B, C) (N states), as in the paper.
    Returns:
        Balancing (complex128 / float64 tensors on the inputs' device); `.hsv` are the Hankel singular values.
    Raises:
        ReductionError: NaN/Inf input, |lam| >= 1, or non-finite singular values.
        ValueError: unknown `system`.
    """
    if check_system(system) == "real":
        from .real_map import balance_real_map

        return balance_real_map(lam, B, C)
    lam, B, C = _as_system(lam, B, C)
    P, Q = gramians_unchecked(lam, B, C)
    controllability_factor = _psd_factor(P)
    observability_factor = _psd_factor(Q)
    # Square-root method: SVD of Lo^H Lc (conjugate transpose, not a plain transpose).
    U, sigma, Vh = torch.linalg.svd(observability_factor.conj().T @ controllability_factor)
    if not torch.isfinite(sigma).all():
        raise ReductionError("Hankel singular values are not finite")
    return Balancing(lam, B, C, controllability_factor, observability_factor, U, sigma, Vh)


def hankel_singular_values(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           system: str = DEFAULT_SYSTEM) -> torch.Tensor:
    """Hankel singular values sigma_i = sqrt(eig(P Q)) of the layer's real map (default) or of its complex map,
    computed by the square-root method.

    Args:
        lam: complex (N,), |lam| < 1.   B: complex (N, H).   C: complex (H, N).   system: see `balance`.
    Returns:
        float64 (2N,) for system="real", (N,) for "complex", sorted descending, on the inputs' device
        (`balance(...).state_hsv` gives N per-state values for either system).
    Raises:
        ReductionError: NaN/Inf input or |lam| >= 1.
    """
    return balance(lam, B, C, system).hsv


def hinf_error_bound(hsv: torch.Tensor, order: int) -> float:
    """The balanced-truncation bound ||G - G_r||_inf <= 2 * sum(hsv[order:]) (hsv float (N,) or (2N,), descending;
    `order` the number of balanced states kept, `ReducedSystem.order`)."""
    return 2.0 * float(hsv[order:].sum())


def gain_lower_bound(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor, peaks: int = 16, iterations: int = 12,
                     system: str = "complex") -> float:
    """A lower bound of the H-infinity norm ||G||_inf = max_w sigma_max(C (e^{iw} - diag(lam))^{-1} B).

    sigma_max(G(e^{iw})) is estimated by power iteration at w = 0, pi and the phases of the `peaks` modes with the
    largest single-mode peak |c_i| |b_i| / (1 - |lam_i|) (where near-unit-modulus modes put the maximum); every
    estimate is a Rayleigh quotient, so the result never exceeds the true norm. Cost O(iterations * peaks * N * H).

    Args:
        lam: complex (N,), |lam| < 1.   B: complex (N, H).   C: complex (H, N).
        system: "complex": of the map (lam, B, C); "real": of the layer's real map u -> Re(C h) (through the
            conjugate-augmented system, whose transfer function it is).
    Returns:
        float >= 0.
    """
    lam, B, C = (t.detach().to(torch.complex128) for t in (lam, B, C))
    if check_system(system) == "real":
        from .real_map import augmented_system

        lam, B, C = augmented_system(lam, B, C)
    strength = B.abs().pow(2).sum(1).sqrt() * C.abs().pow(2).sum(0).sqrt() / (1.0 - lam.abs()).clamp_min(1e-12)
    chosen = torch.argsort(strength, descending=True)[: min(peaks, lam.shape[0])]
    phases = torch.cat([torch.angle(lam[chosen]), lam.real.new_tensor([0.0, math.pi])])
    resolvent = 1.0 / (torch.exp(1j * phases)[:, None] - lam[None, :])  # (K, N)
    generator = torch.Generator(device="cpu").manual_seed(0)
    vectors = torch.randn(phases.shape[0], B.shape[1], 2, generator=generator, dtype=torch.float64)
    vectors = torch.view_as_complex(vectors).to(lam.device)
    gain = torch.zeros((), dtype=torch.float64, device=lam.device)
    for _ in range(iterations):
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
        outputs = (resolvent * (vectors @ B.T)) @ C.T  # G(w) v, (K, H)
        gain = torch.maximum(gain, outputs.norm(dim=1).max())
        vectors = (resolvent.conj() * (outputs @ C.conj())) @ B.conj()  # G(w)^H G(w) v
    return float(gain)


def _is_zero_system(hsv: torch.Tensor) -> bool:
    return not float(hsv[0]) > torch.finfo(torch.float64).tiny


def _truncate_zero_system(balancing: Balancing, rank: int) -> ReducedSystem:
    """All Hankel singular values are zero: the layer's map u -> Re(C h) is identically zero (B or C vanished).

    Any subset of the (distinct) diagonal modes then realises the same zero map, so keep the `rank` modes with the
    largest ||b_i|| + ||c_i|| (the directions training can still move) unchanged; the basis maps are selections.
    """
    lam, B, C = balancing.lam, balancing.B, balancing.C
    score = B.abs().pow(2).sum(1).sqrt() + C.abs().pow(2).sum(0).sqrt()
    keep = torch.sort(torch.argsort(score, descending=True, stable=True)[:rank]).values
    selection = torch.zeros(rank, lam.shape[0], dtype=torch.complex128, device=lam.device)
    selection[torch.arange(rank, device=lam.device), keep] = 1.0
    return ReducedSystem(
        lam=lam[keep], B=B[keep], C=C[:, keep], hsv=balancing.hsv, project=selection, lift=selection.conj().T,
        order=rank,
    )


def _eigendecomposition(A_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eig of a reduced (q, q) matrix: eigenvalues complex128 (q,), eigenvectors (q, q); ReductionError when the
    eigenvector matrix has a condition number above MAX_EIGENVECTOR_CONDITION."""
    eigenvalues, eigenvectors = torch.linalg.eig(A_r)
    condition = torch.linalg.cond(eigenvectors).real.item()
    if not math.isfinite(condition) or condition > MAX_EIGENVECTOR_CONDITION:
        raise ReductionError(
            f"re-diagonalising the reduced system is ill-conditioned (cond(V) = {condition:.3g} > "
            f"{MAX_EIGENVECTOR_CONDITION:.0e})"
        )
    return eigenvalues, eigenvectors


def _check_reduced(lam_r: torch.Tensor, B_r: torch.Tensor, C_r: torch.Tensor) -> None:
    """ReductionError if the reduced diagonal system has NaN/Inf entries or |lam| >= 1 - STABILITY_MARGIN."""
    for name, tensor in (("lam", lam_r), ("B", B_r), ("C", C_r)):
        if not torch.isfinite(torch.view_as_real(tensor)).all():
            raise ReductionError(f"reduced {name} contains NaN or Inf")
    max_modulus = lam_r.abs().max().item()
    if max_modulus >= 1.0 - STABILITY_MARGIN:
        raise ReductionError(f"reduced system is not stable enough: max |lam| = {max_modulus:.9f}")


def truncate(balancing: Balancing, rank: int) -> ReducedSystem:
    """Reduce a balanced system (`balance`) to `rank` states, then re-diagonalise it.

    Square-root balancing with P = Lc Lc^H, Q = Lo Lo^H and SVD(Lo^H Lc) = U S V^H gives the truncated balancing
    transform T_r = Lc V_r S_r^{-1/2}, T_r^+ = S_r^{-1/2} U_r^H Lo^H (T_r^+ T_r = I_r), so

        A_r = T_r^+ diag(lam) T_r,   B_r = T_r^+ B,   C_r = C T_r.

    A_r is dense; its eigendecomposition A_r = V diag(lam_r) V^{-1} maps it back to diagonal form:
    B_r <- V^{-1} B_r, C_r <- C_r V. The basis maps are project = V^{-1} T_r^+ (r, N) and lift = T_r V (N, r).
    The H-infinity error of the complex map is at most 2 * sum(hsv[rank:]). A balancing of the real map
    (system="real") is truncated by `real_map.truncate_real_map` instead.

    A system whose Hankel singular values are all zero (B or C vanished: the layer outputs nothing) is truncated
    by keeping `rank` of its modes, which realises the same zero map.

    Args:
        balancing: `balance(lam, B, C)` of the system, N states.
        rank: number of states to keep, 1 <= rank <= N.
    Returns:
        ReducedSystem(lam complex128 (rank,), B (rank, H), C (H, rank), hsv float64 (N,), project (rank, N),
        lift (N, rank)).
    Raises:
        ReductionError: bad rank, a kept Hankel singular value of zero (while others are not), a reduced eigenvalue
            with |lam| >= 1 - STABILITY_MARGIN, or an eigenvector matrix with condition number >
            MAX_EIGENVECTOR_CONDITION.
    """
    if balancing.system == "real":
        from .real_map import truncate_real_map

        return truncate_real_map(balancing, rank)
    lam, B, C = balancing.lam, balancing.B, balancing.C
    sigma = balancing.hsv
    n = lam.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ReductionError(f"rank must be an int in [1, {n}], got {rank!r}")
    if _is_zero_system(sigma):
        return _truncate_zero_system(balancing, rank)
    kept = sigma[:rank]
    if kept[-1] <= torch.finfo(torch.float64).eps * max(kept[0].item(), 1e-300):
        nonzero = int((sigma > torch.finfo(torch.float64).eps * sigma[0]).sum())
        raise ReductionError(
            f"rank {rank} keeps a numerically zero Hankel singular value ({kept[-1].item():.3g}); only {nonzero} "
            f"state(s) carry energy, choose a rank <= {nonzero}"
        )
    inv_sqrt = kept.rsqrt().to(torch.complex128)
    transform = balancing.controllability_factor @ balancing.Vh[:rank].conj().T * inv_sqrt[None, :]  # (N, r)
    inverse_transform = inv_sqrt[:, None] * (balancing.U[:, :rank].conj().T @ balancing.observability_factor.conj().T)

    A_r = inverse_transform @ (lam[:, None] * transform)

    lam_r, eigenvectors = _eigendecomposition(A_r)
    project = torch.linalg.solve(eigenvectors, inverse_transform)  # V^{-1} T_r^+, (r, N)
    lift = transform @ eigenvectors  # T_r V, (N, r)
    B_diag = project @ B
    C_diag = C @ lift
    _check_reduced(lam_r, B_diag, C_diag)
    return ReducedSystem(lam=lam_r, B=B_diag, C=C_diag, hsv=sigma, project=project, lift=lift, order=rank)


def balanced_truncation(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor, rank: int,
                        system: str = DEFAULT_SYSTEM) -> ReducedSystem:
    """Reduce the diagonal system to `rank` LRU states by balanced truncation: `truncate(balance(lam, B, C, system),
    rank)` (with system="real", at most `rank` states: see `real_map.truncate_real_map`).

    Args:
        lam: complex (N,), |lam| < 1.   B: complex (N, H).   C: complex (H, N).
        rank: number of states to keep, 1 <= rank <= N.   system: see `balance`.
    Returns:
        ReducedSystem (see `truncate`).
    Raises:
        ReductionError: see `balance` and `truncate`.
    """
    lam, B, C = _as_system(lam, B, C)
    n = lam.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ReductionError(f"rank must be an int in [1, {n}], got {rank!r}")
    return truncate(balance(lam, B, C, system), rank)


def check_tau(tau, must: str = "lie in") -> float:
    """The one check of an energy tolerance `tau` (`rank_for_energy`, `schedule.RankPolicy`): an int or float, not a
    bool, in [0, 1). Returns it as a float; otherwise raises ValueError "tau must {must} [0, 1), got {tau!r}", where
    `must` is the caller's wording (the rank policy says "be a number in", the tools that take a float "lie in")."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) < 1.0:
        raise ValueError(f"tau must {must} [0, 1), got {tau!r}")
    return float(tau)


def rank_for_energy(hsv: torch.Tensor, tau: float) -> int:
    """Smallest r whose top-r Hankel singular values hold at least (1 - tau) of their sum.

    The energy is the sum of sigma (not sigma^2), so the discarded part tau * sum(sigma) is exactly what enters the
    error bound 2 * sum(sigma_{i>r}).

    Args:
        hsv: float (N,), any order, non-negative.
        tau: tolerance in [0, 1).
    Returns:
        int in [1, N].
    """
    tau = check_tau(tau)
    if hsv.dim() != 1 or hsv.numel() == 0:
        raise ValueError(f"hsv must be a non-empty 1-D tensor, got shape {tuple(hsv.shape)}")
    values = torch.sort(hsv.detach().to(torch.float64), descending=True).values
    total = values.sum()
    if not torch.isfinite(total):
        raise ValueError("hsv contains NaN or Inf")
    if total <= 0:
        return 1
    cumulative = torch.cumsum(values, dim=0)
    # Relative slack against round-off so tau = 0 keeps every state with non-zero energy, not N + 1.
    threshold = (1.0 - float(tau)) * total * (1.0 - 1e-12)
    return int(torch.searchsorted(cumulative, threshold).item()) + 1


def lru_parameters_from_system(lam: torch.Tensor, B: torch.Tensor, min_phase: float = 1e-12):
    """Map a diagonal stable system back to the LRU parametrisation.

    lam = exp(-exp(nu_log) + i exp(theta_log)), B = B_normalised * exp(gamma_log) with the LRU normalisation
    exp(gamma_log) = sqrt(1 - |lam|^2).

    Phases are taken in (0, 2 pi]: theta = log(phase) needs phase > 0, so a positive real lam (phase 0) is stored
    at phase 2 pi, which gives the same lam (to round-off, 2e-16 in float64) with an ordinary, trainable theta_log
    (log 2 pi, no -inf); a negative real lam has phase pi. Other phases below `min_phase` (a complex pair within
    1e-12 rad of the real axis) are raised to it, which moves lam by less than 1e-12 |lam|.

    Args:
        lam: complex (N,), 0 < |lam| < 1.   B: complex (N, H), input gain included.
        min_phase: least phase stored for a non-real lam (> 0).
    Returns:
        nu_log float64 (N,), theta_log float64 (N,), gamma_log float64 (N,), B_normalised complex128 (N, H).
    Raises:
        ReductionError: |lam| outside (0, 1 - STABILITY_MARGIN) or non-finite results.
    """
    lam = lam.detach().to(torch.complex128)
    modulus = lam.abs()
    if (modulus <= 0).any() or (modulus >= 1.0 - STABILITY_MARGIN).any():
        raise ReductionError(f"eigenvalue moduli must lie in (0, 1), got range [{modulus.min():.3g}, {modulus.max():.9f}]")
    nu_log = torch.log(-torch.log(modulus))
    phase = torch.remainder(torch.angle(lam), 2 * math.pi)
    phase = torch.where(phase == 0, 2 * math.pi, phase.clamp_min(min_phase))
    theta_log = torch.log(phase)
    gamma = torch.sqrt(1.0 - modulus**2)
    gamma_log = torch.log(gamma)
    B_normalised = B.detach().to(torch.complex128) / gamma[:, None]
    for name, tensor in (("nu_log", nu_log), ("theta_log", theta_log), ("gamma_log", gamma_log)):
        if not torch.isfinite(tensor).all():
            raise ReductionError(f"{name} is not finite after the mapping")
    return nu_log, theta_log, gamma_log, B_normalised
