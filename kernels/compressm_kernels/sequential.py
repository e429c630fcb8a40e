"""Sequential-in-time scan kernels: grid (cdiv(N, BLOCK_N), Bt), each program walks all time chunks in order.

The state (forward) or the reverse-scan carry G (backward) stays in registers between chunks, so the input is read
once and the output written once: the least traffic a scan can have. The grid is small, though (one program per
block of state lanes and batch element); ``chunked.py`` has the chunk-parallel alternative, ``config.scan_strategy``
picks one. See README.md in this folder for the recurrence and its gradient.

Pair arguments are ``(re, im)`` tuples of fp32 tensors with unit stride along N; optional inputs are None, which
turns the matching ``triton.heuristics`` flag (HAS_H0, HAS_MASK, ...) off so the kernel never touches them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from .tile import (
    apply_carry,
    carry_through,
    chunk_power,
    dlam_tile,
    lam_factors,
    last_row,
    load_factors,
    load_lam,
    load_row,
    real_steps,
    scan_tile,
    store_tile,
)


@triton.heuristics(config.given(HAS_H0="h0_re", HAS_MASK="step_mask", HAS_FACTORS="f_re", STORE_STATES="h_re",
                                STORE_FINAL="hT_re"))
@triton.jit
def scan_fwd_kernel(
    x_re, x_im, stride_x_b, stride_x_t,  # (Bt, L, N) inputs
    lam_re, lam_im,  # (N,) constant factor (unless HAS_FACTORS)
    pow_re, pow_im,  # (CHUNK + 1, N) powers lam^0..lam^CHUNK (unless HAS_FACTORS)
    f_re, f_im, stride_f_b, stride_f_t,  # (Bt, L, N) per-step factors (HAS_FACTORS; stride 0 broadcasts)
    h0_re, h0_im,  # (Bt, N) initial state (HAS_H0)
    step_mask,  # (Bt, L) uint8, nonzero at real steps (HAS_MASK)
    h_re, h_im, stride_h_b, stride_h_t,  # (Bt, L, N) all states out (STORE_STATES)
    hT_re, hT_im,  # (Bt, N) final state out (STORE_FINAL)
    L, N,
    HAS_H0: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FACTORS: tl.constexpr,
    STORE_STATES: tl.constexpr, STORE_FINAL: tl.constexpr,
    CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASSOC: tl.constexpr,
):
    """h_t = a_t h_{t-1} + x_t with a_t = lam (1 and x_t ignored at masked steps) or per-step factors."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    rows = tl.arange(0, CHUNK)
    if not HAS_FACTORS:
        lr, li = load_lam(lam_re, lam_im, cols, nmask, False)
    if HAS_H0:
        cr, ci = load_row(h0_re, h0_im, b, N, cols, nmask)
    else:
        cr = tl.zeros([BLOCK_N], dtype=tl.float32)
        ci = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in range(0, tl.cdiv(L, CHUNK)):
        t = c * CHUNK + rows
        inside = (t < L)[:, None] & nmask[None, :]
        real_rows = real_steps(step_mask, b, L, t, HAS_MASK)
        real = real_rows[:, None] & nmask[None, :]
        if HAS_FACTORS:
            ar, ai = load_factors(f_re, f_im, stride_f_b, stride_f_t, b, t, cols, real)
        else:
            ar, ai = lam_factors(lr, li, real)
        Ar, Ai, Sr, Si = scan_tile(x_re, x_im, stride_x_b, stride_x_t, b, t, cols, real, ar, ai,
                                   CHUNK, LOG2_CHUNK, USE_ASSOC)
        hr, hi = apply_carry(Ar, Ai, Sr, Si, cr, ci)
        if STORE_STATES:
            store_tile(h_re, h_im, stride_h_b, stride_h_t, b, t, cols, hr, hi, inside)
        if HAS_FACTORS:
            cr, ci = last_row(hr, hi, rows, CHUNK)
        else:  # lam^(real steps in the chunk) from the exact table, so rounding does not compound across chunks
            sr, si = last_row(Sr, Si, rows, CHUNK)
            pr, pi = chunk_power(pow_re, pow_im, tl.sum(real_rows.to(tl.int32), axis=0), N, cols, nmask, False)
            cr, ci = carry_through(sr, si, pr, pi, cr, ci)
    if STORE_FINAL:
        tl.store(hT_re + b * N + cols, cr, mask=nmask)
        tl.store(hT_im + b * N + cols, ci, mask=nmask)


@triton.heuristics(config.given(HAS_H0="h0_re", HAS_MASK="step_mask"))
@triton.jit
def scan_bwd_kernel(
    dh_re, dh_im, stride_dh_b, stride_dh_t,  # (Bt, L, N) dL/dh_t
    h_re, h_im, stride_h_b, stride_h_t,  # (Bt, L, N) forward states
    lam_re, lam_im,  # (N,)
    pow_re, pow_im,  # (CHUNK + 1, N) powers lam^0..lam^CHUNK
    h0_re, h0_im,  # (Bt, N) (HAS_H0)
    step_mask,  # (Bt, L) uint8 (HAS_MASK)
    dx_re, dx_im, stride_dx_b, stride_dx_t,  # (Bt, L, N) out: dL/dx_t = G_t at real steps, 0 at masked ones
    dlam_re, dlam_im,  # (Bt, N) out: per-batch partial dL/dlam
    g0_re, g0_im,  # (Bt, N) out: G_0
    L, N,
    HAS_H0: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASSOC: tl.constexpr,
):
    """Reverse scan G_t = dL/dh_t + conj(a_{t+1}) G_{t+1}; tiles are loaded in reversed time order and scanned
    forwards, the carry G flowing from later to earlier chunks."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    rows = tl.arange(0, CHUNK)
    lr, li = load_lam(lam_re, lam_im, cols, nmask, True)  # conj(lam)
    if HAS_H0:
        h0r, h0i = load_row(h0_re, h0_im, b, N, cols, nmask)
    else:
        h0r = tl.zeros([BLOCK_N], dtype=tl.float32)
        h0i = tl.zeros([BLOCK_N], dtype=tl.float32)
    gr = tl.zeros([BLOCK_N], dtype=tl.float32)
    gi = tl.zeros([BLOCK_N], dtype=tl.float32)
    dlr = tl.zeros([BLOCK_N], dtype=tl.float32)
    dli = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_chunks = tl.cdiv(L, CHUNK)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * CHUNK + (CHUNK - 1) - rows  # reversed time inside the chunk
        inside = (t < L)[:, None] & nmask[None, :]
        real = real_steps(step_mask, b, L, t, HAS_MASK)[:, None] & nmask[None, :]
        next_real_rows = real_steps(step_mask, b, L, t + 1, HAS_MASK)
        ar, ai = lam_factors(lr, li, next_real_rows[:, None] & nmask[None, :])
        Ar, Ai, Sr, Si = scan_tile(dh_re, dh_im, stride_dh_b, stride_dh_t, b, t, cols, inside, ar, ai,
                                   CHUNK, LOG2_CHUNK, USE_ASSOC)
        Gr, Gi = apply_carry(Ar, Ai, Sr, Si, gr, gi)
        store_tile(dx_re, dx_im, stride_dx_b, stride_dx_t, b, t, cols,
                   tl.where(real, Gr, 0.0), tl.where(real, Gi, 0.0), inside)
        pr, pi = dlam_tile(Gr, Gi, h_re, h_im, stride_h_b, stride_h_t, b, t, cols, real, h0r, h0i, HAS_H0)
        dlr += pr
        dli += pi
        # carry: G at the chunk's first time step (the last row in reversed order), with the exact factor product
        sr, si = last_row(Sr, Si, rows, CHUNK)
        pr, pi = chunk_power(pow_re, pow_im, tl.sum(next_real_rows.to(tl.int32), axis=0), N, cols, nmask, True)
        gr, gi = carry_through(sr, si, pr, pi, gr, gi)
    tl.store(dlam_re + b * N + cols, dlr, mask=nmask)
    tl.store(dlam_im + b * N + cols, dli, mask=nmask)
    tl.store(g0_re + b * N + cols, gr, mask=nmask)
    tl.store(g0_im + b * N + cols, gi, mask=nmask)


def power_table(lam, chunk: int):
    """lam^0 .. lam^chunk as a (chunk + 1, N) fp32 pair, computed in float64 from the (N,) pair `lam`."""
    base = torch.complex(lam[0].double(), lam[1].double())
    exponents = torch.arange(chunk + 1, dtype=torch.float64, device=base.device)
    powers = torch.exp(exponents[:, None] * torch.log(base)[None, :])
    powers[0] = 1  # also for lam = 0
    return powers.real.float().contiguous(), powers.imag.float().contiguous()


def _strides(pair):
    """(stride along batch, stride along time) of a (Bt, T, N) pair; a (T, N) pair broadcasts over the batch."""
    if pair is None:
        return 0, 0
    t = pair[0]
    if t.dim() == 2:
        return 0, t.stride(0)
    return t.stride(0), t.stride(1)


def _tile_meta(blocks: config.ScanBlocks, settings: config.KernelSettings):
    return dict(CHUNK=blocks.chunk, LOG2_CHUNK=blocks.chunk.bit_length() - 1, BLOCK_N=blocks.block_n,
                USE_ASSOC=config.use_associative_scan(settings), num_warps=blocks.num_warps)


def scan_forward(x, lam, settings, *, h0=None, step_mask=None, factors=None, states_out=None, store_final=False):
    """h_t = a_t h_{t-1} + x_t over a (Bt, L, N) input pair, one program per (N block, batch element).

    Args:
        x: (x_re, x_im) inputs. lam: (lam_re, lam_im) (N,) factors, or None with `factors`.
        settings: config.KernelSettings. h0: optional (Bt, N) pair. step_mask: optional (Bt, L) uint8.
        factors: optional per-step factors, a (Bt, L, N) or (L, N) pair (instead of lam).
        states_out: optional (Bt, L, N) pair to write every state into.
        store_final: also return the final state.
    Returns:
        (hT_re, hT_im) fp32 (Bt, N) when `store_final`, else None.
    """
    x_re, x_im = x
    Bt, L, N = x_re.shape
    blocks = config.scan_blocks(N, settings)
    final = config.new_pair((Bt, N), x_re.device, settings) if store_final else (None, None)
    lam_re, lam_im = lam if lam is not None else (None, None)
    pow_re, pow_im = power_table(lam, blocks.chunk) if lam is not None else (None, None)
    f_re, f_im = factors if factors is not None else (None, None)
    h_re, h_im = states_out if states_out is not None else (None, None)
    h0_re, h0_im = h0 if h0 is not None else (None, None)
    stride_f_b, stride_f_t = _strides(factors)
    stride_h_b, stride_h_t = _strides(states_out)
    config.launch(
        scan_fwd_kernel, (triton.cdiv(N, blocks.block_n), Bt), settings,
        x_re=x_re, x_im=x_im, stride_x_b=x_re.stride(0), stride_x_t=x_re.stride(1),
        lam_re=lam_re, lam_im=lam_im, pow_re=pow_re, pow_im=pow_im,
        f_re=f_re, f_im=f_im, stride_f_b=stride_f_b, stride_f_t=stride_f_t,
        h0_re=h0_re, h0_im=h0_im, step_mask=step_mask,
        h_re=h_re, h_im=h_im, stride_h_b=stride_h_b, stride_h_t=stride_h_t,
        hT_re=final[0], hT_im=final[1],
        L=L, N=N, **_tile_meta(blocks, settings),
    )
    return final if store_final else None


def scan_backward(dh, h, lam, settings, *, dx_out, h0=None, step_mask=None):
    """Reverse scan G_t = dL/dh_t + conj(a_{t+1}) G_{t+1} over (Bt, L, N) pairs, one program per (N block, batch).

    Writes dL/dx (G at real steps, 0 at masked ones) into the `dx_out` pair. Returns (dlam_re, dlam_im), fp32 (N,)
    sums of G_t conj(h_{t-1}) over batch and real steps (h_{-1} = h0), and (g0_re, g0_im), fp32 (Bt, N) = G_0.
    """
    dh_re, dh_im = dh
    h_re, h_im = h
    Bt, L, N = dh_re.shape
    dev = dh_re.device
    blocks = config.scan_blocks(N, settings)
    dlam_re, dlam_im = config.new_pair((Bt, N), dev, settings)
    g0_re, g0_im = config.new_pair((Bt, N), dev, settings)
    h0_re, h0_im = h0 if h0 is not None else (None, None)
    powers = power_table(lam, blocks.chunk)
    config.launch(
        scan_bwd_kernel, (triton.cdiv(N, blocks.block_n), Bt), settings,
        dh_re=dh_re, dh_im=dh_im, stride_dh_b=dh_re.stride(0), stride_dh_t=dh_re.stride(1),
        h_re=h_re, h_im=h_im, stride_h_b=h_re.stride(0), stride_h_t=h_re.stride(1),
        lam_re=lam[0], lam_im=lam[1], h0_re=h0_re, h0_im=h0_im, step_mask=step_mask,
        pow_re=powers[0], pow_im=powers[1],
        dx_re=dx_out[0], dx_im=dx_out[1], stride_dx_b=dx_out[0].stride(0), stride_dx_t=dx_out[0].stride(1),
        dlam_re=dlam_re, dlam_im=dlam_im, g0_re=g0_re, g0_im=g0_im,
        L=L, N=N, **_tile_meta(blocks, settings),
    )
    return (dlam_re.sum(0), dlam_im.sum(0)), (g0_re, g0_im)
