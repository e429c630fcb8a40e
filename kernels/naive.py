"""Naive sequential PyTorch references for the fused LRU scan kernels (the test oracle).

These follow the flash-linear-attention convention: one plain, obviously-correct reference beside each kernel.
They loop over time in Python, so they are slow, but they are pure torch and differentiable by autograd, and
they work on any device and dtype.

Math (one LRU layer, diagonal complex recurrence), with complex quantities given as (real, imag) pairs::

    x_t = B u_t                      (complex, N)
    h_t = lam * h_{t-1} + x_t        (complex, N), h_{-1} = h0 (default 0)
    y_t = Re(C h_t) + D * u_t        (real, H)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def naive_diagonal_scan(
    x_re: Tensor,
    x_im: Tensor,
    lam_re: Tensor,
    lam_im: Tensor,
    h0_re: Optional[Tensor] = None,
    h0_im: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Sequential diagonal complex scan ``h_t = lam * h_{t-1} + x_t``.

    Args:
        x_re, x_im: real (Bt, L, N) tensors, real and imaginary parts of the input sequence.
        lam_re, lam_im: real (N,) tensors, the diagonal of the (complex) state matrix.
        h0_re, h0_im: optional real (Bt, N) tensors, the initial state ``h_{-1}`` (zeros when omitted).

    Returns:
        (h_re, h_im): real (Bt, L, N) fp32 tensors, all states ``h_0 .. h_{L-1}``.
    """
    Bt, L, N = x_re.shape
    xr, xi = x_re.float(), x_im.float()
    lr, li = lam_re.float(), lam_im.float()
    if h0_re is None:
        hr = xr.new_zeros(Bt, N)
        hi = xr.new_zeros(Bt, N)
    else:
        hr, hi = h0_re.float(), h0_im.float()
    outs_r, outs_i = [], []
    for t in range(L):
        hr, hi = lr * hr - li * hi + xr[:, t], lr * hi + li * hr + xi[:, t]
        outs_r.append(hr)
        outs_i.append(hi)
    if L == 0:
        return xr.new_zeros(Bt, 0, N), xr.new_zeros(Bt, 0, N)
    return torch.stack(outs_r, dim=1), torch.stack(outs_i, dim=1)


def naive_lru_forward(
    u: Tensor,
    lam_re: Tensor,
    lam_im: Tensor,
    B_re: Tensor,
    B_im: Tensor,
    C_re: Tensor,
    C_im: Tensor,
    D: Tensor,
    h0_re: Optional[Tensor] = None,
    h0_im: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sequential reference for one LRU layer.

    Args:
        u: real (Bt, L, H) input, any float dtype (computation in fp32).
        lam_re, lam_im: real (N,) diagonal of the state matrix (|lam| < 1).
        B_re, B_im: real (N, H) input matrix.
        C_re, C_im: real (H, N) output matrix.
        D: real (H,) feed-through.
        h0_re, h0_im: optional real (Bt, N) initial state.

    Returns:
        y: real (Bt, L, H) in ``u.dtype``; hT_re, hT_im: real (Bt, N) fp32 final state ``h_{L-1}``.
    """
    uf = u.float()
    x_re = uf @ B_re.float().t()
    x_im = uf @ B_im.float().t()
    h_re, h_im = naive_diagonal_scan(x_re, x_im, lam_re, lam_im, h0_re, h0_im)
    y = h_re @ C_re.float().t() - h_im @ C_im.float().t() + uf * D.float()
    if u.shape[1] == 0:
        Bt, N = u.shape[0], lam_re.shape[0]
        hT_re = h0_re.float() if h0_re is not None else uf.new_zeros(Bt, N)
        hT_im = h0_im.float() if h0_im is not None else uf.new_zeros(Bt, N)
    else:
        hT_re, hT_im = h_re[:, -1], h_im[:, -1]
    return y.to(u.dtype), hT_re, hT_im
