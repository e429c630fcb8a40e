"""Chunk-parallel scan kernels: grid (cdiv(N, BLOCK_N), chunks, Bt), one program per time chunk.

A scan over L steps is three passes:

1. every chunk's local scan from a zero carry, keeping its end value ``e_c`` (and, with a step mask, the product
   ``P_c`` of its factors: lam^(number of real steps in the chunk));
2. a short sequential scan over the chunk ends, ``hs_c = P_c hs_{c-1} + e_c`` (``sequential.scan_forward`` with
   per-step factors; without a mask ``P_c = lam^CHUNK``, lam^(steps) for a partial last chunk), giving the state at
   the end of every chunk, the last one being the final state;
3. the local scans again, each from the state entering its chunk.

``L / CHUNK`` times more programs than the sequential kernels, for one more read of the input. The backward runs
the same passes in reverse time with ``conj(lam)``. See README.md in this folder for the math.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config, sequential
from .tile import (
    apply_carry,
    chunk_power,
    dlam_tile,
    lam_factors,
    last_row,
    load_chunk_row,
    load_chunk_start,
    load_lam,
    load_row,
    real_steps,
    scan_tile,
    store_chunk_row,
    store_tile,
)


@triton.heuristics(config.given(HAS_H0="h0_re", HAS_MASK="step_mask", HAS_START="hs_re", STORE_STATES="h_re",
                                STORE_END="e_re", STORE_PRODUCT="p_re"))
@triton.jit
def chunk_fwd_kernel(
    x_re, x_im, stride_x_b, stride_x_t,  # (Bt, L, N) inputs
    lam_re, lam_im,  # (N,)
    pow_re, pow_im,  # (CHUNK + 1, N) powers lam^0..lam^CHUNK (STORE_PRODUCT)
    h0_re, h0_im,  # (Bt, N): entering chunk 0 (HAS_START and HAS_H0)
    step_mask,  # (Bt, L) uint8, nonzero at real steps (HAS_MASK)
    hs_re, hs_im,  # (Bt, n_chunks, N) state at the end of every chunk (HAS_START)
    h_re, h_im, stride_h_b, stride_h_t,  # (Bt, L, N) all states out (STORE_STATES)
    e_re, e_im,  # (Bt, n_chunks, N) out: each chunk's last state (STORE_END)
    p_re, p_im,  # (Bt, n_chunks, N) out: each chunk's product of factors (STORE_PRODUCT)
    L, N, n_chunks,
    HAS_H0: tl.constexpr, HAS_MASK: tl.constexpr, HAS_START: tl.constexpr, STORE_STATES: tl.constexpr,
    STORE_END: tl.constexpr, STORE_PRODUCT: tl.constexpr,
    CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASSOC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    rows = tl.arange(0, CHUNK)
    lr, li = load_lam(lam_re, lam_im, cols, nmask, False)
    t = c * CHUNK + rows
    inside = (t < L)[:, None] & nmask[None, :]
    real_rows = real_steps(step_mask, b, L, t, HAS_MASK)
    real = real_rows[:, None] & nmask[None, :]
    ar, ai = lam_factors(lr, li, real)
    Ar, Ai, Sr, Si = scan_tile(x_re, x_im, stride_x_b, stride_x_t, b, t, cols, real, ar, ai,
                               CHUNK, LOG2_CHUNK, USE_ASSOC)
    if HAS_START:
        cr, ci = load_chunk_start(hs_re, hs_im, h0_re, h0_im, b, c, n_chunks, N, cols, nmask, HAS_H0)
        hr, hi = apply_carry(Ar, Ai, Sr, Si, cr, ci)
    else:
        hr, hi = Sr, Si
    if STORE_STATES:
        store_tile(h_re, h_im, stride_h_b, stride_h_t, b, t, cols, hr, hi, inside)
    if STORE_END:
        er, ei = last_row(hr, hi, rows, CHUNK)
        store_chunk_row(e_re, e_im, er, ei, b, c, n_chunks, N, cols, nmask)
    if STORE_PRODUCT:  # lam^(real steps in the chunk), exact (see tile.chunk_power)
        pr, pi = chunk_power(pow_re, pow_im, tl.sum(real_rows.to(tl.int32), axis=0), N, cols, nmask, False)
        store_chunk_row(p_re, p_im, pr, pi, b, c, n_chunks, N, cols, nmask)


@triton.heuristics(config.given(HAS_H0="h0_re", HAS_MASK="step_mask", HAS_CARRY="gs_re", STORE_PRODUCT="q_re"))
@triton.jit
def chunk_bwd_kernel(
    dh_re, dh_im, stride_dh_b, stride_dh_t,  # (Bt, L, N) dL/dh_t
    h_re, h_im, stride_h_b, stride_h_t,  # (Bt, L, N) forward states (HAS_CARRY)
    lam_re, lam_im,  # (N,)
    pow_re, pow_im,  # (CHUNK + 1, N) powers lam^0..lam^CHUNK (STORE_PRODUCT)
    h0_re, h0_im,  # (Bt, N) (HAS_H0)
    step_mask,  # (Bt, L) uint8 (HAS_MASK)
    gs_re, gs_im,  # (Bt, n_chunks, N) G at the first step of every chunk (HAS_CARRY)
    dx_re, dx_im, stride_dx_b, stride_dx_t,  # (Bt, L, N) out: dL/dx_t (HAS_CARRY)
    dlam_re, dlam_im,  # (Bt, n_chunks, N) out: per-chunk partial dL/dlam (HAS_CARRY)
    f_re, f_im,  # (Bt, n_chunks, N) out: chunk-local G at the chunk's first step (not HAS_CARRY)
    q_re, q_im,  # (Bt, n_chunks, N) out: each chunk's product of reverse factors (STORE_PRODUCT)
    L, N, n_chunks,
    HAS_H0: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CARRY: tl.constexpr, STORE_PRODUCT: tl.constexpr,
    CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASSOC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    rows = tl.arange(0, CHUNK)
    lr, li = load_lam(lam_re, lam_im, cols, nmask, True)  # conj(lam)
    t = c * CHUNK + (CHUNK - 1) - rows  # reversed time inside the chunk
    inside = (t < L)[:, None] & nmask[None, :]
    next_real_rows = real_steps(step_mask, b, L, t + 1, HAS_MASK)
    ar, ai = lam_factors(lr, li, next_real_rows[:, None] & nmask[None, :])
    Ar, Ai, Sr, Si = scan_tile(dh_re, dh_im, stride_dh_b, stride_dh_t, b, t, cols, inside, ar, ai,
                               CHUNK, LOG2_CHUNK, USE_ASSOC)
    if HAS_CARRY:
        gr, gi = load_chunk_row(gs_re, gs_im, b, c + 1, n_chunks, N, cols, nmask)  # zero after the last chunk
        Gr, Gi = apply_carry(Ar, Ai, Sr, Si, gr, gi)
        real = real_steps(step_mask, b, L, t, HAS_MASK)[:, None] & nmask[None, :]
        store_tile(dx_re, dx_im, stride_dx_b, stride_dx_t, b, t, cols,
                   tl.where(real, Gr, 0.0), tl.where(real, Gi, 0.0), inside)
        if HAS_H0:
            h0r, h0i = load_row(h0_re, h0_im, b, N, cols, nmask)
        else:
            h0r = tl.zeros([BLOCK_N], dtype=tl.float32)
            h0i = tl.zeros([BLOCK_N], dtype=tl.float32)
        dlr, dli = dlam_tile(Gr, Gi, h_re, h_im, stride_h_b, stride_h_t, b, t, cols, real, h0r, h0i, HAS_H0)
        store_chunk_row(dlam_re, dlam_im, dlr, dli, b, c, n_chunks, N, cols, nmask)
    else:
        fr, fi = last_row(Sr, Si, rows, CHUNK)  # the chunk's first time step (always inside)
        store_chunk_row(f_re, f_im, fr, fi, b, c, n_chunks, N, cols, nmask)
        if STORE_PRODUCT:  # conj(lam)^(steps followed by a real step), exact
            count = tl.sum(next_real_rows.to(tl.int32), axis=0)
            qr, qi = chunk_power(pow_re, pow_im, count, N, cols, nmask, True)
            store_chunk_row(q_re, q_im, qr, qi, b, c, n_chunks, N, cols, nmask)


# ----------------------------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------------------------
def _meta(N: int, chunk: int, settings: config.KernelSettings):
    blocks = config.scan_blocks(N, settings)
    return blocks.block_n, dict(CHUNK=chunk, LOG2_CHUNK=chunk.bit_length() - 1, BLOCK_N=blocks.block_n,
                                USE_ASSOC=config.use_associative_scan(settings), num_warps=blocks.num_warps)


def _unpack(pair):
    return pair if pair is not None else (None, None)


def chunk_factors(lam, L: int, chunk: int, conj: bool = False):
    """Per-chunk factors of an unmasked scan, a (n_chunks, N) fp32 pair: lam^chunk for every chunk but the last,
    lam^(its steps) for the last (conj(lam) powers with `conj`), from ``sequential.power_table``."""
    n_chunks = triton.cdiv(L, chunk)
    factors = []
    for table in sequential.power_table(lam, chunk):
        rows = table[chunk].expand(n_chunks, -1).clone()
        rows[-1] = table[L - (n_chunks - 1) * chunk]
        factors.append(rows)
    if conj:
        factors[1] = -factors[1]
    return factors[0], factors[1]


def chunk_end_states(x, lam, chunk, settings, *, h0=None, step_mask=None):
    """Passes 1 and 2 of the chunked forward scan over a (Bt, L, N) input pair.

    Returns the state at the end of every chunk, a (Bt, n_chunks, N) fp32 pair (its last entry is the final
    state), computed from the chunks' local end states and factor products."""
    x_re, x_im = x
    Bt, L, N = x_re.shape
    dev = x_re.device
    n_chunks = triton.cdiv(L, chunk)
    block_n, meta = _meta(N, chunk, settings)
    ends = config.new_pair((Bt, n_chunks, N), dev, settings)
    products = config.new_pair((Bt, n_chunks, N), dev, settings) if step_mask is not None else None
    powers = sequential.power_table(lam, chunk) if step_mask is not None else None
    config.launch(
        chunk_fwd_kernel, (triton.cdiv(N, block_n), n_chunks, Bt), settings,
        x_re=x_re, x_im=x_im, stride_x_b=x_re.stride(0), stride_x_t=x_re.stride(1),
        lam_re=lam[0], lam_im=lam[1], pow_re=_unpack(powers)[0], pow_im=_unpack(powers)[1],
        h0_re=None, h0_im=None, step_mask=step_mask, hs_re=None, hs_im=None,
        h_re=None, h_im=None, stride_h_b=0, stride_h_t=0, e_re=ends[0], e_im=ends[1],
        p_re=_unpack(products)[0], p_im=_unpack(products)[1],
        L=L, N=N, n_chunks=n_chunks, **meta,
    )
    if products is None:
        products = chunk_factors(lam, L, chunk)
    chunk_states = config.new_pair((Bt, n_chunks, N), dev, settings)
    sequential.scan_forward(ends, None, settings, h0=h0, factors=products, states_out=chunk_states)
    return chunk_states


def scan_forward(x, lam, settings, *, h0=None, step_mask=None, states_out):
    """Every state of h_t = a_t h_{t-1} + x_t into the (Bt, L, N) pair `states_out`, by the three chunked passes."""
    x_re, x_im = x
    Bt, L, N = x_re.shape
    chunk = config.scan_blocks(N, settings).chunk
    chunk_states = chunk_end_states(x, lam, chunk, settings, h0=h0, step_mask=step_mask)
    n_chunks = triton.cdiv(L, chunk)
    block_n, meta = _meta(N, chunk, settings)
    config.launch(
        chunk_fwd_kernel, (triton.cdiv(N, block_n), n_chunks, Bt), settings,
        x_re=x_re, x_im=x_im, stride_x_b=x_re.stride(0), stride_x_t=x_re.stride(1),
        lam_re=lam[0], lam_im=lam[1], pow_re=None, pow_im=None,
        h0_re=_unpack(h0)[0], h0_im=_unpack(h0)[1], step_mask=step_mask, hs_re=chunk_states[0], hs_im=chunk_states[1],
        h_re=states_out[0], h_im=states_out[1],
        stride_h_b=states_out[0].stride(0), stride_h_t=states_out[0].stride(1),
        e_re=None, e_im=None, p_re=None, p_im=None,
        L=L, N=N, n_chunks=n_chunks, **meta,
    )


def scan_backward(dh, h, lam, settings, *, dx_out, h0=None, step_mask=None):
    """Reverse scan G_t = dL/dh_t + conj(a_{t+1}) G_{t+1} by the chunked passes; same contract as
    ``sequential.scan_backward``: writes dL/dx into `dx_out`, returns ((dlam_re, dlam_im), (g0_re, g0_im))."""
    dh_re, dh_im = dh
    Bt, L, N = dh_re.shape
    dev = dh_re.device
    chunk = config.scan_blocks(N, settings).chunk
    n_chunks = triton.cdiv(L, chunk)
    block_n, meta = _meta(N, chunk, settings)
    grid = (triton.cdiv(N, block_n), n_chunks, Bt)
    common = dict(dh_re=dh_re, dh_im=dh_im, stride_dh_b=dh_re.stride(0), stride_dh_t=dh_re.stride(1),
                  lam_re=lam[0], lam_im=lam[1], step_mask=step_mask, L=L, N=N, n_chunks=n_chunks, **meta)
    powers = sequential.power_table(lam, chunk) if step_mask is not None else (None, None)
    # pass 1: local G at every chunk's first step, and the chunk products of the reverse factors (masked)
    firsts = config.new_pair((Bt, n_chunks, N), dev, settings)
    products: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    if step_mask is not None:
        products = config.new_pair((Bt, n_chunks, N), dev, settings)
    config.launch(
        chunk_bwd_kernel, grid, settings, **common,
        h_re=None, h_im=None, stride_h_b=0, stride_h_t=0, h0_re=None, h0_im=None, gs_re=None, gs_im=None,
        pow_re=powers[0], pow_im=powers[1], dx_re=None, dx_im=None, stride_dx_b=0, stride_dx_t=0,
        dlam_re=None, dlam_im=None,
        f_re=firsts[0], f_im=firsts[1], q_re=_unpack(products)[0], q_im=_unpack(products)[1],
    )
    # pass 2: true G at every chunk's first step, gs[c] = firsts[c] + Q_c gs[c + 1] (nothing follows the last
    # chunk): a forward scan over the chunks in reversed order
    if products is None:
        reversed_factors = tuple(f.flip(0).contiguous() for f in chunk_factors(lam, L, chunk, conj=True))
    else:
        reversed_factors = tuple(p.flip(1).contiguous() for p in products)
    reversed_carries = config.new_pair((Bt, n_chunks, N), dev, settings)
    sequential.scan_forward(tuple(f.flip(1).contiguous() for f in firsts), None, settings,
                            factors=reversed_factors, states_out=reversed_carries)
    carries = tuple(r.flip(1).contiguous() for r in reversed_carries)
    # pass 3: G everywhere, and the per-chunk dlam partial sums
    dlam_parts = config.new_pair((Bt, n_chunks, N), dev, settings)
    h0_re, h0_im = _unpack(h0)
    config.launch(
        chunk_bwd_kernel, grid, settings, **common,
        h_re=h[0], h_im=h[1], stride_h_b=h[0].stride(0), stride_h_t=h[0].stride(1), h0_re=h0_re, h0_im=h0_im,
        gs_re=carries[0], gs_im=carries[1], pow_re=None, pow_im=None,
        dx_re=dx_out[0], dx_im=dx_out[1], stride_dx_b=dx_out[0].stride(0), stride_dx_t=dx_out[0].stride(1),
        dlam_re=dlam_parts[0], dlam_im=dlam_parts[1], f_re=None, f_im=None, q_re=None, q_im=None,
    )
    return (dlam_parts[0].sum((0, 1)), dlam_parts[1].sum((0, 1))), (carries[0][:, 0], carries[1][:, 0])
