"""Differentiable Hankel nuclear norm of LRU layers, the reducibility penalty's math (torch, float64 / complex128, no
nn.Module code).

The sum of a layer's Hankel singular values (its Hankel nuclear norm) is the error bound of truncating all of it;
pushing it down in training leaves fewer states that matter, so later truncation loses less (see the design
notes). With P = Lc Lc^H and Q = Lo Lo^H (Cholesky factors of the closed-form Gramians), the HSVs are the singular
values of Lo^H Lc, so

    sum(HSV) = || Lo^H Lc ||_*      (nuclear norm)

which differentiates stably: the gradient of a sum of singular values is U V^H, defined also where singular values
repeat (unlike the eigenvectors that sqrt(eigvals(P Q)) would differentiate through), and has no 1/sigma blow-up at
small HSVs (unlike sqrt of eigenvalues). A jitter of `JITTER` x the mean diagonal keeps the Cholesky factorisations
defined when a Gramian is numerically singular.

Functions:
    hankel_nuclear_norm(lam, B, C, system)        -> float64 scalar, differentiable in lam, B, C
    reducibility_penalty(systems, system)         -> float64 scalar: sum over layers of the mean HSV per LRU state
"""

from __future__ import annotations

import torch

from .reduction import check_system, gramians_unchecked

__all__ = ["JITTER", "hankel_nuclear_norm", "reducibility_penalty"]

# Relative diagonal jitter added to the Gramians before their Cholesky factorisation.
JITTER = 1e-10


def _cholesky(gramian: torch.Tensor) -> torch.Tensor:
    hermitian = 0.5 * (gramian + gramian.mH)
    scale = hermitian.diagonal().real.mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(hermitian.shape[0], dtype=hermitian.dtype, device=hermitian.device)
    return torch.linalg.cholesky(hermitian + JITTER * scale * eye)


def hankel_nuclear_norm(lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor, system: str = "real") -> torch.Tensor:
    """Sum of the Hankel singular values of a diagonal LRU layer, differentiable w.r.t. lam, B and C.

    Args:
        lam: complex (N,), |lam| < 1.   B: complex (N, H), input gain included.   C: complex (H, N).
        system: "real" (default): of the layer's real map u -> Re(C h) (2N HSVs, `real_map`); "complex": of the
            complex map (lam, B, C) (N HSVs).
    Returns:
        float64 scalar tensor (0-dim) on the inputs' device, carrying autograd history.
    """
    lam, B, C = (t.to(torch.complex128) for t in (lam, B, C))
    if check_system(system) == "real":
        from .real_map import real_gramians_unchecked

        P, Q = real_gramians_unchecked(lam, B, C)  # float64 (2N, 2N), from N x N complex blocks
    else:
        P, Q = gramians_unchecked(lam, B, C)
    return torch.linalg.matrix_norm(_cholesky(Q).mH @ _cholesky(P), ord="nuc").to(torch.float64)


def reducibility_penalty(systems, system: str = "real") -> torch.Tensor:
    """Sum over layers of each layer's Hankel nuclear norm divided by its number of LRU states N_i (the mean HSV per
    state: `reduction.Balancing.state_hsv`'s mean), so layers of different sizes weigh alike and the value does not
    grow as reductions remove states that carried little.

    Args:
        systems: per layer (lam (N_i,), B (N_i, H), C (H, N_i)), complex, differentiable.
        system: "real" or "complex", see `hankel_nuclear_norm`.
    Returns:
        float64 scalar tensor.
    """
    terms = [hankel_nuclear_norm(lam, B, C, system) / lam.shape[0] for lam, B, C in systems]
    if not terms:
        raise ValueError("reducibility_penalty needs at least one layer")
    return torch.stack(terms).sum()
