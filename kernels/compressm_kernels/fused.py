"""The fused output kernel of the LRU layer: y = Re(C h) + D u with the states h never written to HBM.

Grid (cdiv(H, BLOCK_H), chunks, Bt), fully parallel over time chunks. Each program starts from the state entering
its chunk (from ``chunked.chunk_end_states``), re-derives the chunk's states in registers block of state lanes by
block, and contracts them with C on tensor cores (``tl.dot``: (CHUNK x BLOCK_N) @ (BLOCK_N x BLOCK_H)), then adds
``D u`` (zero at masked steps) and writes y in u's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import config
from .tile import apply_carry, lam_factors, load_chunk_start, load_lam, real_steps, scan_tile


@triton.heuristics(config.given(HAS_H0="h0_re", HAS_MASK="step_mask"))
@triton.jit
def lru_out_kernel(
    x_re, x_im, stride_x_b, stride_x_t,  # (Bt, L, N) input projection B u
    lam_re, lam_im,  # (N,)
    h0_re, h0_im,  # (Bt, N) (HAS_H0)
    step_mask,  # (Bt, L) uint8, nonzero at real steps (HAS_MASK)
    hs_re, hs_im,  # (Bt, n_chunks, N) state at the end of every chunk
    ct_re, ct_imn,  # (N, H) contiguous: C_re^T and -C_im^T
    D,  # (H,)
    u, stride_u_b, stride_u_t,  # (Bt, L, H), unit stride along H
    y,  # (Bt, L, H) contiguous out, u's dtype
    L, N, H, n_chunks,
    HAS_H0: tl.constexpr, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, USE_ASSOC: tl.constexpr,
):
    pid_h = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hcols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hcols < H
    rows = tl.arange(0, CHUNK)
    t = c * CHUNK + rows
    inside = t < L
    real_rows = real_steps(step_mask, b, L, t, HAS_MASK)
    acc = tl.zeros([CHUNK, BLOCK_H], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        nmask = cols < N
        lr, li = load_lam(lam_re, lam_im, cols, nmask, False)
        cr, ci = load_chunk_start(hs_re, hs_im, h0_re, h0_im, b, c, n_chunks, N, cols, nmask, HAS_H0)
        real = real_rows[:, None] & nmask[None, :]
        ar, ai = lam_factors(lr, li, real)
        Ar, Ai, Sr, Si = scan_tile(x_re, x_im, stride_x_b, stride_x_t, b, t, cols, real, ar, ai,
                                   CHUNK, LOG2_CHUNK, USE_ASSOC)
        hr, hi = apply_carry(Ar, Ai, Sr, Si, cr, ci)
        cm = nmask[:, None] & hmask[None, :]
        offc = cols[:, None] * H + hcols[None, :]
        cre = tl.load(ct_re + offc, mask=cm, other=0.0)
        cimn = tl.load(ct_imn + offc, mask=cm, other=0.0)
        # Re(C h) = C_re h_re - C_im h_im
        acc = tl.dot(hr, cre, acc, input_precision=PRECISION)
        acc = tl.dot(hi, cimn, acc, input_precision=PRECISION)
    out_mask = inside[:, None] & hmask[None, :]
    uu = tl.load(u + b * stride_u_b + t[:, None] * stride_u_t + hcols[None, :],
                 mask=real_rows[:, None] & hmask[None, :], other=0.0).to(tl.float32)
    d = tl.load(D + hcols, mask=hmask, other=0.0).to(tl.float32)
    acc += uu * d[None, :]
    yoff = (b * L + t[:, None]) * H + hcols[None, :]
    tl.store(y + yoff, acc.to(y.dtype.element_ty), mask=out_mask)


def output_projection(x, lam, chunk_states, ct_re, ct_imn, D, u, settings, *, blocks, h0=None, step_mask=None):
    """y = Re(C h) + D u (zero D u at masked steps) as a new (Bt, L, H) tensor in u's dtype.

    Args:
        x: (Bt, L, N) pair, the input projection B u. lam: (N,) pair.
        chunk_states: (Bt, n_chunks, N) pair, the state at the end of every chunk of ``blocks.chunk`` steps.
        ct_re, ct_imn: (N, H) contiguous fp32, C_re^T and -C_im^T. D: (H,) fp32. u: (Bt, L, H), unit stride on H.
        settings: config.KernelSettings. blocks: config.OutputBlocks. h0: optional (Bt, N) pair.
        step_mask: optional (Bt, L) uint8.
    """
    x_re, x_im = x
    Bt, L, H = u.shape
    N = x_re.shape[2]
    n_chunks = triton.cdiv(L, blocks.chunk)
    y = config.new_buffer((Bt, L, H), u.device, settings, dtype=u.dtype)
    h0_re, h0_im = h0 if h0 is not None else (None, None)
    config.launch(
        lru_out_kernel, (triton.cdiv(H, blocks.block_h), n_chunks, Bt), settings,
        x_re=x_re, x_im=x_im, stride_x_b=x_re.stride(0), stride_x_t=x_re.stride(1),
        lam_re=lam[0], lam_im=lam[1], h0_re=h0_re, h0_im=h0_im, step_mask=step_mask,
        hs_re=chunk_states[0], hs_im=chunk_states[1], ct_re=ct_re, ct_imn=ct_imn, D=D,
        u=u, stride_u_b=u.stride(0), stride_u_t=u.stride(1), y=y,
        L=L, N=N, H=H, n_chunks=n_chunks,
        CHUNK=blocks.chunk, LOG2_CHUNK=blocks.chunk.bit_length() - 1, BLOCK_N=blocks.block_n,
        BLOCK_H=blocks.block_h, PRECISION=config.dot_precision(u.device, settings),
        USE_ASSOC=config.use_associative_scan(settings), num_warps=blocks.num_warps,
    )
    return y
