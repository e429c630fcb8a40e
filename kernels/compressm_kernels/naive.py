"""Naive sequential PyTorch references for the LRU scan kernels: the one oracle every test and benchmark uses.

Following flash-linear-attention's op folders (a naive reference beside the kernels) and mamba_ssm's ``*_ref``
functions: a plain python loop over time, obviously correct, differentiable by autograd, on any device. Slow.

Math (one LRU layer, diagonal complex recurrence), with complex quantities given as (real, imag) pairs::

    x_t = B u_t                          (complex, N)
    h_t = a_t * h_{t-1} + k_t x_t        (complex, N), h_{-1} = h0 (default 0)
    y_t = Re(C h_t) + D * k_t u_t        (real, H)

where k_t = step_mask[:, t] (1 at real steps, 0 at masked steps) and a_t = lam at real steps, 1 at masked steps:
a masked step has zero input and holds the state, so its output is Re(C h_held). Without a mask every step is real.

Precision: float32 arithmetic, or float64 when any floating input is float64 (the high-precision oracle of the
hard-mode tests).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def naive_diagonal_scan(
    x_re: Tensor,
    x_im: Tensor,
    lam_re: Tensor,
    lam_im: Tensor,
    h0_re: Optional[Tensor] = None,
    h0_im: Optional[Tensor] = None,
    step_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Sequential diagonal complex scan ``h_t = a_t * h_{t-1} + k_t x_t`` (a_t = lam, or 1 at masked steps).

    Args:
        x_re, x_im: real (Bt, L, N) tensors, real and imaginary parts of the input sequence.
        lam_re, lam_im: real (N,) tensors, the diagonal of the (complex) state matrix.
        h0_re, h0_im: optional real (Bt, N) tensors, the initial state ``h_{-1}`` (zeros when omitted).
        step_mask: optional bool (Bt, L); False marks a masked step (input ignored, state held).

    Returns:
        (h_re, h_im): real (Bt, L, N) tensors (fp32, or fp64 for fp64 inputs), all states ``h_0 .. h_{L-1}``.
    """
    Bt, L, N = x_re.shape
    dtype = _compute_dtype(x_re, x_im, lam_re, lam_im, h0_re, h0_im)
    xr, xi = x_re.to(dtype), x_im.to(dtype)
    lr, li = lam_re.to(dtype), lam_im.to(dtype)
    if h0_re is None:
        hr = xr.new_zeros(Bt, N)
        hi = xr.new_zeros(Bt, N)
    else:
        hr, hi = h0_re.to(dtype), h0_im.to(dtype)
    if L == 0:
        return xr.new_zeros(Bt, 0, N), xr.new_zeros(Bt, 0, N)
    outs_r, outs_i = [], []
    for t in range(L):
        new_r, new_i = lr * hr - li * hi + xr[:, t], lr * hi + li * hr + xi[:, t]
        if step_mask is not None:
            keep = step_mask[:, t].to(torch.bool)[:, None]
            new_r, new_i = torch.where(keep, new_r, hr), torch.where(keep, new_i, hi)
        hr, hi = new_r, new_i
        outs_r.append(hr)
        outs_i.append(hi)
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
    step_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sequential reference for one LRU layer.

    Args:
        u: real (Bt, L, H) input, any float dtype (computation in fp32, or fp64 for fp64 inputs).
        lam_re, lam_im: real (N,) diagonal of the state matrix (|lam| < 1).
        B_re, B_im: real (N, H) input matrix.
        C_re, C_im: real (H, N) output matrix.
        D: real (H,) feed-through.
        h0_re, h0_im: optional real (Bt, N) initial state.
        step_mask: optional bool (Bt, L); False marks a masked step: zero input (no ``D u`` term either) and the
            state held, so the output there is ``Re(C h_held)``.

    Returns:
        y: real (Bt, L, H) in ``u.dtype``; hT_re, hT_im: real (Bt, N) final state ``h_{L-1}`` (fp32, or fp64).
    """
    dtype = _compute_dtype(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im)
    uf = u.to(dtype)
    if step_mask is not None:
        uf = torch.where(step_mask.to(torch.bool)[:, :, None], uf, 0.0)
    x_re = uf @ B_re.to(dtype).t()
    x_im = uf @ B_im.to(dtype).t()
    h_re, h_im = naive_diagonal_scan(x_re, x_im, lam_re.to(dtype), lam_im.to(dtype), h0_re, h0_im, step_mask)
    y = h_re @ C_re.to(dtype).t() - h_im @ C_im.to(dtype).t() + uf * D.to(dtype)
    if u.shape[1] == 0:
        Bt, N = u.shape[0], lam_re.shape[0]
        hT_re = h0_re.to(dtype) if h0_re is not None else uf.new_zeros(Bt, N)
        hT_im = h0_im.to(dtype) if h0_im is not None else uf.new_zeros(Bt, N)
    else:
        hT_re, hT_im = h_re[:, -1], h_im[:, -1]
    return y.to(u.dtype), hT_re, hT_im
