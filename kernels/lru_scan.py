"""Triton kernels for the LRU diagonal complex scan and the fused LRU layer.

Math (complex quantities are always carried as pairs of REAL fp32 tensors, ``*_re`` / ``*_im``)::

    x_t = B u_t                      x: (Bt, L, N) complex
    h_t = lam * h_{t-1} + x_t        h: (Bt, L, N) complex, h_{-1} = h0 (default 0)
    y_t = Re(C h_t) + D * u_t        y: (Bt, L, H) real

Design
------
Every program owns a block of ``BLOCK_N`` state lanes of one batch element (loads are coalesced along the
contiguous state dimension) and works on time chunks of ``CHUNK`` steps. Inside a chunk the recurrence is solved
in registers with ``tl.associative_scan`` over the first-order linear-recurrence monoid
``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)`` (complex, 4 real tensors); the carry (the state entering the chunk)
is then applied as ``h_k = S_k + A_k h_carry`` with ``A_k = lam^(k+1)``. Any length works (1, 63, 1000, ...), with
fp32 accumulation throughout. A scan over all L steps runs by one of two strategies (``_scan_strategy``):

* sequential: grid (N blocks, Bt); each program walks the chunks in order with the carry in registers. Least
  traffic (x read once, h written once), but only ``cdiv(N, BLOCK_N) * Bt`` programs;
* chunked: grid (N blocks, chunks, Bt), three launches: (1) every chunk's local scan from a zero carry, keeping
  its end value ``e_c``; (2) a short sequential scan over the chunk ends, ``hs_c = lam^CHUNK hs_{c-1} + e_c``
  (every chunk but the last is full, so one factor serves all), giving the carry into every chunk; (3) the local
  scans again from their carries. ``L / CHUNK`` times more programs for one more read of x (the backward runs the
  same three passes in reverse with ``conj(lam)``).

The automatic choice is chunked when the sequential grid has fewer than two programs per SM (small states after
truncation, small batches); ``_FORCE_STRATEGY`` forces either (tests run both; the benchmark times both).

* ``diagonal_scan`` (plain scan): forward writes all states; backward is the reverse scan
  ``G_t = dL/dh_t + conj(lam) G_{t+1}`` (tiles are loaded in reversed time order and scanned forwards), giving
  ``dL/dx_t = G_t``, ``dL/dlam = sum_t G_t conj(h_{t-1})`` and ``dL/dh0 = conj(lam) G_0``. These are the
  real-valued chain rule of the complex multiply ``h = lam h'``::

      h_re = l_re h'_re - l_im h'_im        dh'_re = l_re G_re + l_im G_im
      h_im = l_re h'_im + l_im h'_re   =>   dh'_im = l_re G_im - l_im G_re
                                            dl_re  = G_re h'_re + G_im h'_im
                                            dl_im  = G_im h'_re - G_re h'_im

  (all gradients are plain real gradients of real tensors: no Wirtinger convention is involved).

* ``fused_lru_forward`` (fused layer), forward:

  1. chunk ends: passes (1) and (2) of the chunked scan (x read once, only (Bt, cdiv(L, CHUNK), N) chunk-end
     states written), parallel over chunks whatever the shape; the final state hT follows from the last chunk's
     start and local end;
  2. output pass: grid (H blocks, chunks, Bt), fully parallel over time chunks; each program re-derives the
     chunk's states in registers from the chunk-start state, and contracts them with C on tensor cores
     (``tl.dot``: (CHUNK x BLOCK_N) @ (BLOCK_N x BLOCK_H), looping over N), adds ``D u`` and writes y in u's
     dtype. The (Bt, L, N) state sequence never touches HBM.

  The input projection ``x = B u`` is one cuBLAS GEMM ((Bt L) x H) @ (H x 2N) (B_re and B_im concatenated):
  it is a dense tensor-core GEMM that cuBLAS runs near peak, while fusing it into the scan kernels would force
  every (batch, N-block) program to stream a full (BLOCK_N x H) slice of B per time chunk and either serialise
  the H contraction or recompute it per output block. The price is one write + two reads of x (8 bytes per
  state lane per step), documented in ``benchmarks/bench_scan.py``'s byte model.

  Backward (checkpoint-style recompute): x = B u (cuBLAS) and the state sequence h are recomputed by the plain
  scan, ``dL/dh = C^H dy`` is a GEMM, the reverse scan gives G = dL/dx, dlam and dh0, and
  dB, dC, du, dD are GEMMs/reductions. Nothing but the inputs is saved between forward and backward.

Chunk scan algorithm: compiled kernels use ``tl.associative_scan`` (forward direction only: ``reverse=True``
scans with non-commutative combines have had upstream bugs, so reverse scans load tiles in reversed order).
Triton's CPU interpreter runs a custom-combine associative_scan one element at a time (~0.5 ms each), so in
interpreter mode the same combine is applied by a Hillis-Steele doubling scan whose row shifts are exact 0/1
``tl.dot``s; ``_FORCE_ASSOC_SCAN`` selects either path (the tests cover both). Launch limits: Bt <= 65535 and
cdiv(L, CHUNK) <= 65535 (CUDA grid y/z dimensions). Block sizes live in ``_scan_config`` / ``_out_config``:
untuned heuristics until a GPU run of ``benchmarks/bench_scan.py`` is available; ``benchmarks/compile_report.py``
shows their registers, shared memory and occupancy on a GPU target without a GPU (``compressm_kernels.aot``).

Registration: the ops are registered with ``torch.library.custom_op`` (namespace ``compressm_kernels``) with
fake (meta) implementations and ``register_autograd``, so ``torch.compile`` treats them as opaque ops without
graph breaks. ``torch.library.triton_op`` was not used: it would let Inductor see inside the kernels, but it
requires every launch to go through ``wrap_triton`` and was judged too fragile for the CPU interpreter path
that CI tests run on.

Device: CUDA tensors, or any tensors when ``TRITON_INTERPRET=1`` was set before triton was imported (the CPU
interpreter, used by the tests). On CPU without the interpreter a clear RuntimeError is raised.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_AVAILABLE = False

_CPU_MSG = (
    "compressm_kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); "
    "use the torch path for CPU"
)
_NO_TRITON_MSG = "compressm_kernels needs triton (pip install triton); use the torch path instead"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if TRITON_AVAILABLE:

    @triton.jit
    def _lin_combine(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
        # Compose h -> a1 h + b1 followed by h -> a2 h + b2 (complex, as real pairs).
        ar = ar1 * ar2 - ai1 * ai2
        ai = ar1 * ai2 + ai1 * ar2
        br = ar2 * br1 - ai2 * bi1 + br2
        bi = ar2 * bi1 + ai2 * br1 + bi2
        return ar, ai, br, bi


    @triton.jit
    def _chunk_scan(ar, ai, br, bi, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, USE_ASSOC: tl.constexpr):
        """Inclusive scan of (a, b) pairs along axis 0 of [CHUNK, BLOCK_N] tiles under _lin_combine.

        USE_ASSOC: tl.associative_scan (the GPU path). Otherwise a Hillis-Steele doubling scan whose row shifts
        are exact 0/1 matmuls: same math, but ~1000x faster in triton's CPU interpreter, whose generic
        associative_scan runs the combine function one element at a time.
        """
        if USE_ASSOC:
            Ar, Ai, Sr, Si = tl.associative_scan((ar, ai, br, bi), 0, _lin_combine)
        else:
            rows = tl.arange(0, CHUNK)
            Ar, Ai, Sr, Si = ar, ai, br, bi
            for lvl in tl.static_range(LOG2_CHUNK):
                d = 1 << lvl
                shift = ((rows[:, None] - d) == rows[None, :]).to(tl.float32)  # row k picks row k - d
                valid = (rows >= d)[:, None]
                pr = tl.where(valid, tl.dot(shift, Ar, input_precision="ieee"), 1.0)
                pi = tl.where(valid, tl.dot(shift, Ai, input_precision="ieee"), 0.0)
                qr = tl.where(valid, tl.dot(shift, Sr, input_precision="ieee"), 0.0)
                qi = tl.where(valid, tl.dot(shift, Si, input_precision="ieee"), 0.0)
                Ar, Ai, Sr, Si = _lin_combine(pr, pi, qr, qi, Ar, Ai, Sr, Si)
        return Ar, Ai, Sr, Si

    @triton.jit
    def _load_lam(lam_re, lam_im, cols, nmask, CONJ: tl.constexpr):
        """lam (or conj(lam)) for the state lanes `cols`: two fp32 [BLOCK_N] vectors."""
        lr = tl.load(lam_re + cols, mask=nmask, other=0.0).to(tl.float32)
        li = tl.load(lam_im + cols, mask=nmask, other=0.0).to(tl.float32)
        if CONJ:
            li = -li
        return lr, li

    @triton.jit
    def _load_row(v_re, v_im, b, N, cols, mask, HAS: tl.constexpr):
        """Row b of a (Bt, N) pair at lanes `cols` as fp32 [BLOCK_N] vectors (0 where not `mask`), or zeros when
        HAS is False."""
        if HAS:
            vr = tl.load(v_re + b * N + cols, mask=mask, other=0.0).to(tl.float32)
            vi = tl.load(v_im + b * N + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            vr = tl.zeros(cols.shape, dtype=tl.float32)
            vi = tl.zeros(cols.shape, dtype=tl.float32)
        return vr, vi

    @triton.jit
    def _load_chunk_start(hs_re, hs_im, h0_re, h0_im, b, c, n_chunks, N, cols, nmask, HAS_H0: tl.constexpr):
        """State entering chunk c: the end state of chunk c - 1 from (Bt, n_chunks, N) chunk states, or h0 (zeros
        without one) for the first chunk. Two fp32 [BLOCK_N] vectors."""
        cr, ci = _load_chunk_row(hs_re, hs_im, b, c - 1, n_chunks, N, cols, nmask)
        if HAS_H0:
            first = nmask & ((tl.zeros(cols.shape, dtype=tl.int32) + c) == 0)
            h0r, h0i = _load_row(h0_re, h0_im, b, N, cols, first, True)
            cr += h0r
            ci += h0i
        return cr, ci

    @triton.jit
    def _load_chunk_row(s_re, s_im, b, k, n_chunks, N, cols, nmask):
        """Entry k of a (Bt, n_chunks, N) pair of per-chunk states, zeros where k is outside [0, n_chunks)."""
        kvec = tl.zeros(cols.shape, dtype=tl.int32) + k
        mask = nmask & (kvec >= 0) & (kvec < n_chunks)
        off = (b * n_chunks + k) * N + cols
        return tl.load(s_re + off, mask=mask, other=0.0), tl.load(s_im + off, mask=mask, other=0.0)

    @triton.jit
    def _store_chunk_row(s_re, s_im, vr, vi, b, k, n_chunks, N, cols, nmask):
        off = (b * n_chunks + k) * N + cols
        tl.store(s_re + off, vr, mask=nmask)
        tl.store(s_im + off, vi, mask=nmask)

    @triton.jit
    def _scan_tile(src_re, src_im, s_b, s_t, b, t, cols, m, lr, li,
                   CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, USE_ASSOC: tl.constexpr):
        """Load the [CHUNK, BLOCK_N] tile of rows `t` (in the order given) and scan it with factor (lr, li).

        Returns (Ar, Ai, Sr, Si): row k holds the product of the factors of rows 0..k (A) and the scan of the tile
        from a zero carry (S). Masked rows are identities (a = 1, b = 0), so trailing invalid rows repeat the last
        valid state and the last row of the tile always holds it.
        """
        off = b * s_b + t[:, None] * s_t + cols[None, :]
        xr = tl.load(src_re + off, mask=m, other=0.0).to(tl.float32)
        xi = tl.load(src_im + off, mask=m, other=0.0).to(tl.float32)
        ar = tl.where(m, lr[None, :], 1.0)
        ai = tl.where(m, li[None, :], 0.0)
        return _chunk_scan(ar, ai, xr, xi, CHUNK, LOG2_CHUNK, USE_ASSOC)

    @triton.jit
    def _apply_carry(Ar, Ai, Sr, Si, cr, ci):
        """States of a tile from the carry (cr, ci) entering it: h_k = S_k + A_k * carry (complex)."""
        hr = Sr + Ar * cr[None, :] - Ai * ci[None, :]
        hi = Si + Ar * ci[None, :] + Ai * cr[None, :]
        return hr, hi

    @triton.jit
    def _last_row(vr, vi, rows, CHUNK: tl.constexpr):
        sel = (rows == CHUNK - 1)[:, None]
        return tl.sum(tl.where(sel, vr, 0.0), axis=0), tl.sum(tl.where(sel, vi, 0.0), axis=0)

    @triton.jit
    def _dlam_tile(Gr, Gi, h_re, h_im, shb, sht, b, t, cols, nmask, m, h0r, h0i, HAS_H0: tl.constexpr):
        """sum over the tile's rows of G_t * conj(h_{t-1}) (h_{-1} = h0), as two fp32 [BLOCK_N] vectors."""
        tp = t - 1
        mp = (tp >= 0)[:, None] & m
        offp = b * shb + tp[:, None] * sht + cols[None, :]
        hpr = tl.load(h_re + offp, mask=mp, other=0.0)
        hpi = tl.load(h_im + offp, mask=mp, other=0.0)
        if HAS_H0:
            first = (t == 0)[:, None]
            hpr = tl.where(first, h0r[None, :], hpr)
            hpi = tl.where(first, h0i[None, :], hpi)
        dlr = tl.sum(tl.where(m, Gr * hpr + Gi * hpi, 0.0), axis=0)
        dli = tl.sum(tl.where(m, Gi * hpr - Gr * hpi, 0.0), axis=0)
        return dlr, dli

    # ------------------------------------------------------------------------------------------------------------
    # sequential-in-time kernels: grid (N blocks, Bt), each program walks all chunks carrying the state
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def _scan_fwd_kernel(
        x_re, x_im, sxb, sxt,  # (Bt, L, N), unit stride along N
        lam_re, lam_im,  # (N,)
        h0_re, h0_im,  # (Bt, N) contiguous (unused unless HAS_H0)
        h_re, h_im, shb, sht,  # (Bt, L, N) outputs, unit stride along N (unused unless STORE_H)
        hT_re, hT_im,  # (Bt, N) final state
        L, N,
        HAS_H0: tl.constexpr, STORE_H: tl.constexpr,
        CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASSOC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        rows = tl.arange(0, CHUNK)
        lr, li = _load_lam(lam_re, lam_im, cols, nmask, False)
        cr, ci = _load_row(h0_re, h0_im, b, N, cols, nmask, HAS_H0)
        for c in range(0, tl.cdiv(L, CHUNK)):
            t = c * CHUNK + rows
            m = (t < L)[:, None] & nmask[None, :]
            Ar, Ai, Sr, Si = _scan_tile(x_re, x_im, sxb, sxt, b, t, cols, m, lr, li, CHUNK, LOG2_CHUNK, USE_ASSOC)
            hr, hi = _apply_carry(Ar, Ai, Sr, Si, cr, ci)
            if STORE_H:
                offh = b * shb + t[:, None] * sht + cols[None, :]
                tl.store(h_re + offh, hr, mask=m)
                tl.store(h_im + offh, hi, mask=m)
            cr, ci = _last_row(hr, hi, rows, CHUNK)
        tl.store(hT_re + b * N + cols, cr, mask=nmask)
        tl.store(hT_im + b * N + cols, ci, mask=nmask)

    @triton.jit
    def _scan_bwd_kernel(
        dh_re, dh_im, sdb, sdt,  # (Bt, L, N) dL/dh_t, unit stride along N
        h_re, h_im, shb, sht,  # (Bt, L, N) forward states
        lam_re, lam_im,  # (N,)
        h0_re, h0_im,  # (Bt, N) (unused unless HAS_H0)
        dx_re, dx_im, sgb, sgt,  # (Bt, L, N) outputs dL/dx_t = G_t
        dlam_re, dlam_im,  # (Bt, N) per-batch partial dL/dlam
        g0_re, g0_im,  # (Bt, N) G_0 (dL/dh0 = conj(lam) G_0)
        L, N,
        HAS_H0: tl.constexpr, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_ASSOC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        rows = tl.arange(0, CHUNK)
        lr, li = _load_lam(lam_re, lam_im, cols, nmask, True)  # conj(lam)
        h0r, h0i = _load_row(h0_re, h0_im, b, N, cols, nmask, HAS_H0)
        gr = tl.zeros([BLOCK_N], dtype=tl.float32)
        gi = tl.zeros([BLOCK_N], dtype=tl.float32)
        dlr = tl.zeros([BLOCK_N], dtype=tl.float32)
        dli = tl.zeros([BLOCK_N], dtype=tl.float32)
        n_chunks = tl.cdiv(L, CHUNK)
        for cc in range(0, n_chunks):
            c = n_chunks - 1 - cc
            t = c * CHUNK + (CHUNK - 1) - rows  # reversed time inside the chunk
            m = (t < L)[:, None] & nmask[None, :]
            Ar, Ai, Sr, Si = _scan_tile(dh_re, dh_im, sdb, sdt, b, t, cols, m, lr, li, CHUNK, LOG2_CHUNK, USE_ASSOC)
            Gr, Gi = _apply_carry(Ar, Ai, Sr, Si, gr, gi)
            offg = b * sgb + t[:, None] * sgt + cols[None, :]
            tl.store(dx_re + offg, Gr, mask=m)
            tl.store(dx_im + offg, Gi, mask=m)
            pr, pi = _dlam_tile(Gr, Gi, h_re, h_im, shb, sht, b, t, cols, nmask, m, h0r, h0i, HAS_H0)
            dlr += pr
            dli += pi
            # carry: G at the chunk's first time step (last row in reversed order, always valid)
            gr, gi = _last_row(Gr, Gi, rows, CHUNK)
        tl.store(dlam_re + b * N + cols, dlr, mask=nmask)
        tl.store(dlam_im + b * N + cols, dli, mask=nmask)
        tl.store(g0_re + b * N + cols, gr, mask=nmask)
        tl.store(g0_im + b * N + cols, gi, mask=nmask)

    # ------------------------------------------------------------------------------------------------------------
    # chunk-parallel kernels: grid (N blocks, chunks, Bt), one program per time chunk. A scan is three launches:
    # local chunk scans from a zero carry (their end values), a short scan over the chunk ends with the factor
    # lam^CHUNK (the carries), and the local scans again with their carry in.
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def _chunk_fwd_kernel(
        x_re, x_im, sxb, sxt,  # (Bt, L, N), unit stride along N
        lam_re, lam_im,  # (N,)
        h0_re, h0_im,  # (Bt, N) (read by chunk 0 when HAS_START and HAS_H0)
        hs_re, hs_im,  # (Bt, n_chunks, N) state at the end of every chunk (read when HAS_START)
        h_re, h_im, shb, sht,  # (Bt, L, N) all states out (STORE_H)
        e_re, e_im,  # (Bt, n_chunks, N) chunk-local end states out (STORE_END)
        L, N, n_chunks,
        HAS_H0: tl.constexpr, HAS_START: tl.constexpr, STORE_H: tl.constexpr, STORE_END: tl.constexpr,
        CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASSOC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        rows = tl.arange(0, CHUNK)
        lr, li = _load_lam(lam_re, lam_im, cols, nmask, False)
        t = c * CHUNK + rows
        m = (t < L)[:, None] & nmask[None, :]
        Ar, Ai, Sr, Si = _scan_tile(x_re, x_im, sxb, sxt, b, t, cols, m, lr, li, CHUNK, LOG2_CHUNK, USE_ASSOC)
        if HAS_START:
            cr, ci = _load_chunk_start(hs_re, hs_im, h0_re, h0_im, b, c, n_chunks, N, cols, nmask, HAS_H0)
            hr, hi = _apply_carry(Ar, Ai, Sr, Si, cr, ci)
        else:
            hr, hi = Sr, Si
        if STORE_H:
            offh = b * shb + t[:, None] * sht + cols[None, :]
            tl.store(h_re + offh, hr, mask=m)
            tl.store(h_im + offh, hi, mask=m)
        if STORE_END:
            er, ei = _last_row(hr, hi, rows, CHUNK)
            _store_chunk_row(e_re, e_im, er, ei, b, c, n_chunks, N, cols, nmask)

    @triton.jit
    def _chunk_bwd_kernel(
        dh_re, dh_im, sdb, sdt,  # (Bt, L, N) dL/dh_t, unit stride along N
        h_re, h_im, shb, sht,  # (Bt, L, N) forward states (read when HAS_CARRY)
        lam_re, lam_im,  # (N,)
        h0_re, h0_im,  # (Bt, N) (unused unless HAS_H0)
        gs_re, gs_im,  # (Bt, n_chunks, N) G at the first step of every chunk (read when HAS_CARRY)
        dx_re, dx_im, sgb, sgt,  # (Bt, L, N) dL/dx_t = G_t out (HAS_CARRY)
        dlam_re, dlam_im,  # (Bt, n_chunks, N) per-chunk partial dL/dlam out (HAS_CARRY)
        f_re, f_im,  # (Bt, n_chunks, N) chunk-local G at the chunk's first step out (not HAS_CARRY)
        L, N, n_chunks,
        HAS_H0: tl.constexpr, HAS_CARRY: tl.constexpr,
        CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASSOC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        rows = tl.arange(0, CHUNK)
        lr, li = _load_lam(lam_re, lam_im, cols, nmask, True)  # conj(lam)
        t = c * CHUNK + (CHUNK - 1) - rows  # reversed time inside the chunk
        m = (t < L)[:, None] & nmask[None, :]
        Ar, Ai, Sr, Si = _scan_tile(dh_re, dh_im, sdb, sdt, b, t, cols, m, lr, li, CHUNK, LOG2_CHUNK, USE_ASSOC)
        if HAS_CARRY:
            gr, gi = _load_chunk_row(gs_re, gs_im, b, c + 1, n_chunks, N, cols, nmask)  # zero after the last chunk
            Gr, Gi = _apply_carry(Ar, Ai, Sr, Si, gr, gi)
            offg = b * sgb + t[:, None] * sgt + cols[None, :]
            tl.store(dx_re + offg, Gr, mask=m)
            tl.store(dx_im + offg, Gi, mask=m)
            h0r, h0i = _load_row(h0_re, h0_im, b, N, cols, nmask, HAS_H0)
            dlr, dli = _dlam_tile(Gr, Gi, h_re, h_im, shb, sht, b, t, cols, nmask, m, h0r, h0i, HAS_H0)
            _store_chunk_row(dlam_re, dlam_im, dlr, dli, b, c, n_chunks, N, cols, nmask)
        else:
            fr, fi = _last_row(Sr, Si, rows, CHUNK)  # the chunk's first time step (always valid)
            _store_chunk_row(f_re, f_im, fr, fi, b, c, n_chunks, N, cols, nmask)

    # ------------------------------------------------------------------------------------------------------------
    # fused output projection: grid (H blocks, chunks, Bt)
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def _lru_out_kernel(
        x_re, x_im, sxb, sxt,  # (Bt, L, N) input projection, unit stride along N
        lam_re, lam_im,  # (N,)
        h0_re, h0_im,  # (Bt, N) (unused unless HAS_H0)
        hs_re, hs_im,  # (Bt, n_chunks, N) state at the end of every chunk
        ct_re, ct_imn,  # (N, H) contiguous: C_re^T and -C_im^T
        D,  # (H,)
        u, sub, sut,  # (Bt, L, H), unit stride along H
        y,  # (Bt, L, H) contiguous, u's dtype
        L, N, H, n_chunks,
        HAS_H0: tl.constexpr, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, USE_ASSOC: tl.constexpr,
    ):
        pid_h = tl.program_id(0)
        c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        hcols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = hcols < H
        rows = tl.arange(0, CHUNK)
        t = c * CHUNK + rows
        tm = t < L
        acc = tl.zeros([CHUNK, BLOCK_H], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            nmask = cols < N
            lr, li = _load_lam(lam_re, lam_im, cols, nmask, False)
            cr, ci = _load_chunk_start(hs_re, hs_im, h0_re, h0_im, b, c, n_chunks, N, cols, nmask, HAS_H0)
            m = tm[:, None] & nmask[None, :]
            Ar, Ai, Sr, Si = _scan_tile(x_re, x_im, sxb, sxt, b, t, cols, m, lr, li, CHUNK, LOG2_CHUNK, USE_ASSOC)
            hr, hi = _apply_carry(Ar, Ai, Sr, Si, cr, ci)
            cm = nmask[:, None] & hmask[None, :]
            offc = cols[:, None] * H + hcols[None, :]
            cre = tl.load(ct_re + offc, mask=cm, other=0.0)
            cimn = tl.load(ct_imn + offc, mask=cm, other=0.0)
            # Re(C h) = C_re h_re - C_im h_im
            acc = tl.dot(hr, cre, acc, input_precision=PRECISION)
            acc = tl.dot(hi, cimn, acc, input_precision=PRECISION)
        om = tm[:, None] & hmask[None, :]
        uu = tl.load(u + b * sub + t[:, None] * sut + hcols[None, :], mask=om, other=0.0).to(tl.float32)
        d = tl.load(D + hcols, mask=hmask, other=0.0).to(tl.float32)
        acc += uu * d[None, :]
        yoff = (b * L + t[:, None]) * H + hcols[None, :]
        tl.store(y + yoff, acc.to(y.dtype.element_ty), mask=om)


def _detect_interpreter() -> bool:
    if not TRITON_AVAILABLE:
        return False
    try:  # the decision triton itself made when the kernels were decorated
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(_scan_fwd_kernel, InterpretedFunction)
    except Exception:  # pragma: no cover - triton internals moved
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: True when the kernels run in triton's CPU interpreter (TRITON_INTERPRET=1 before triton was imported).
_INTERPRET = _detect_interpreter()

#: Chunk-scan algorithm: None = automatic (tl.associative_scan when compiled, the doubling scan in the
#: interpreter), True / False to force one (the tests force True on a tiny problem to cover the GPU path).
_FORCE_ASSOC_SCAN: Optional[bool] = None


def _use_assoc_scan() -> bool:
    return (not _INTERPRET) if _FORCE_ASSOC_SCAN is None else bool(_FORCE_ASSOC_SCAN)


# ----------------------------------------------------------------------------------------------------------------
# configuration and small helpers
# ----------------------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _scan_config(N: int) -> Tuple[int, int, int]:
    """(CHUNK, BLOCK_N, num_warps) for the scan kernels (tuning hook; see benchmarks/bench_scan.py)."""
    block_n = min(32, max(16, _next_pow2(N)))
    return 64, block_n, 4


def _out_config(N: int, H: int) -> Tuple[int, int, int, int]:
    """(CHUNK, BLOCK_N, BLOCK_H, num_warps) for the fused output kernel (tl.dot needs every dim >= 16)."""
    block_n = min(32, max(16, _next_pow2(N)))
    block_h = min(64, max(16, _next_pow2(H)))
    return 32, block_n, block_h, 4


def _precision_for_capability(major: int) -> str:
    """tl.dot input precision for fp32 operands on a GPU of compute capability ``major``.x: TF32 needs sm_80+;
    follow torch's fp32 matmul policy there (TF32 only when the user allowed it, else 3xTF32, ~fp32 accuracy)."""
    if major < 8:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _dot_precision(device: torch.device) -> str:
    if _INTERPRET or device.type != "cuda":
        return "ieee"
    major, _ = torch.cuda.get_device_capability(device)
    return _precision_for_capability(major)


def _check_runtime(device: torch.device) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(_NO_TRITON_MSG)
    if device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(_CPU_MSG)


def _f32c(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _rows_ok(t: Tensor) -> Tensor:
    """(Bt, L, K) tensor with unit stride along K (a copy only if needed), fp32."""
    t = t.to(torch.float32)
    return t if t.stride(-1) == 1 else t.contiguous()


def _pair(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """A (re, im) pair of (Bt, L, K) fp32 tensors with unit stride along K and identical strides (the kernels
    take one set of strides per pair)."""
    a, b = _rows_ok(a), _rows_ok(b)
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _new_pair(shape: Tuple[int, ...], device: torch.device) -> Tuple[Tensor, Tensor]:
    """Two uninitialised fp32 tensors of `shape` (real and imaginary part)."""
    re = torch.empty(shape, device=device, dtype=torch.float32)
    return re, torch.empty_like(re)


def _complex_power(lam_re: Tensor, lam_im: Tensor, k: int, conj: bool = False) -> Tuple[Tensor, Tensor]:
    """lam^k (or conj(lam)^k) for a (N,) pair, computed in float64 and returned as contiguous fp32 (N,) tensors."""
    power = torch.complex(lam_re.double(), lam_im.double()) ** int(k)
    if conj:
        power = power.conj()
    return power.real.float().contiguous(), power.imag.float().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# scan strategy
# ----------------------------------------------------------------------------------------------------------------
#: The two ways to run a scan over all L steps (`_scan_strategy` picks one per call):
#:   "sequential": grid (N blocks, Bt); each program walks all of time carrying the state in registers. Minimum
#:                 traffic (x read once, h written once) but only cdiv(N, BLOCK_N) * Bt programs, fewer than the
#:                 GPU has SMs at the small state sizes that truncation produces.
#:   "chunked":    three launches -- local scans of every chunk from a zero carry (grid (N blocks, chunks, Bt)),
#:                 a short sequential scan over the chunk ends with the factor lam^CHUNK, and the local scans
#:                 again with their carry in. L / CHUNK times more programs, for one more read of the input.
STRATEGIES = ("sequential", "chunked")

#: None = automatic (`_scan_strategy`); "sequential" / "chunked" forces one (tests, benchmarks).
_FORCE_STRATEGY: Optional[str] = None

_SM_COUNTS = {}


def _multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached); 1 elsewhere (the interpreter: the strategy only matters for speed)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _scan_strategy(N: int, Bt: int, device: torch.device) -> str:
    """"sequential" or "chunked" for a scan over (Bt, L, N) (see STRATEGIES).

    Automatic rule: chunked when the sequential grid would have fewer than two programs per SM, where a sequential
    scan cannot keep the memory system busy. The factor is an initial choice, not yet tuned on a GPU:
    ``benchmarks/bench_scan.py`` times both strategies so that it can be set from measurements.
    """
    if _FORCE_STRATEGY is not None:
        if _FORCE_STRATEGY not in STRATEGIES:
            raise ValueError(f"_FORCE_STRATEGY must be one of {STRATEGIES} or None, got {_FORCE_STRATEGY!r}")
        return _FORCE_STRATEGY
    _, block_n, _ = _scan_config(N)
    programs = triton.cdiv(N, block_n) * Bt
    return "chunked" if programs < 2 * _multiprocessor_count(device) else "sequential"


# ----------------------------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------------------------
def _launch_sequential_fwd(x_re, x_im, lam_re, lam_im, h0_re, h0_im, h_out=None):
    """h_t = lam h_{t-1} + x_t over (Bt, L, N) inputs, one program per (N block, batch) walking all of time.

    h_out: optional (h_re, h_im) (Bt, L, N) views (unit stride along N) to write every state into.
    Returns the final state (hT_re, hT_im), fp32 (Bt, N)."""
    Bt, L, N = x_re.shape
    CHUNK, BLOCK_N, warps = _scan_config(N)
    hT_re, hT_im = _new_pair((Bt, N), x_re.device)
    has_h0 = h0_re is not None
    h_re, h_im = h_out if h_out is not None else (hT_re, hT_im)
    _scan_fwd_kernel[(triton.cdiv(N, BLOCK_N), Bt)](
        x_re, x_im, x_re.stride(0), x_re.stride(1),
        lam_re, lam_im,
        h0_re if has_h0 else hT_re, h0_im if has_h0 else hT_im,
        h_re, h_im, h_re.stride(0) if h_out is not None else 0, h_re.stride(1) if h_out is not None else 0,
        hT_re, hT_im,
        L, N,
        HAS_H0=has_h0, STORE_H=h_out is not None,
        CHUNK=CHUNK, LOG2_CHUNK=CHUNK.bit_length() - 1, BLOCK_N=BLOCK_N,
        USE_ASSOC=_use_assoc_scan(), num_warps=warps,
    )
    return hT_re, hT_im


def _launch_chunk_fwd(x_re, x_im, lam_re, lam_im, chunk, *, h0=None, chunk_states=None, h_out=None, ends_out=None):
    """One chunk-parallel pass over (Bt, L, N) inputs, grid (N blocks, cdiv(L, chunk), Bt).

    chunk_states: (hs_re, hs_im) (Bt, n_chunks, N), the state at the end of every chunk; chunk c starts from entry
    c - 1 (h0, or zeros, for c = 0). Without it every chunk starts from zero (the local scans of pass 1).
    h_out: (Bt, L, N) views to store every state into. ends_out: (Bt, n_chunks, N) for each chunk's last state."""
    Bt, L, N = x_re.shape
    _, BLOCK_N, warps = _scan_config(N)
    n_chunks = triton.cdiv(L, chunk)
    has_h0 = h0 is not None and h0[0] is not None
    dummy = x_re  # never dereferenced: the matching constexpr flag is off
    h_re, h_im = h_out if h_out is not None else (dummy, dummy)
    hs_re, hs_im = chunk_states if chunk_states is not None else (dummy, dummy)
    e_re, e_im = ends_out if ends_out is not None else (dummy, dummy)
    _chunk_fwd_kernel[(triton.cdiv(N, BLOCK_N), n_chunks, Bt)](
        x_re, x_im, x_re.stride(0), x_re.stride(1),
        lam_re, lam_im,
        h0[0] if has_h0 else dummy, h0[1] if has_h0 else dummy,
        hs_re, hs_im,
        h_re, h_im, h_re.stride(0) if h_out is not None else 0, h_re.stride(1) if h_out is not None else 0,
        e_re, e_im,
        L, N, n_chunks,
        HAS_H0=has_h0, HAS_START=chunk_states is not None, STORE_H=h_out is not None,
        STORE_END=ends_out is not None,
        CHUNK=chunk, LOG2_CHUNK=chunk.bit_length() - 1, BLOCK_N=BLOCK_N,
        USE_ASSOC=_use_assoc_scan(), num_warps=warps,
    )


def _chunk_end_states(x_re, x_im, lam_re, lam_im, h0_re, h0_im, chunk):
    """Passes 1 and 2 of the chunked forward scan.

    Returns (e_re, e_im), each chunk's local end state from a zero carry, and (hs_re, hs_im), the true state at the
    end of every chunk: hs[c] = lam^chunk hs[c-1] + e[c] with hs[-1] = h0 (or 0). All (Bt, n_chunks, N) fp32.
    hs is exact for every full chunk; the entry of a partial last chunk is not (see `_chunked_final_state`)."""
    Bt, L, N = x_re.shape
    n_chunks = triton.cdiv(L, chunk)
    ends = _new_pair((Bt, n_chunks, N), x_re.device)
    _launch_chunk_fwd(x_re, x_im, lam_re, lam_im, chunk, ends_out=ends)
    lam_chunk = _complex_power(lam_re, lam_im, chunk)
    chunk_states = _new_pair((Bt, n_chunks, N), x_re.device)
    _launch_sequential_fwd(*ends, *lam_chunk, h0_re, h0_im, h_out=chunk_states)
    return ends, chunk_states


def _chunked_final_state(ends, chunk_states, lam_re, lam_im, h0_re, h0_im, L, chunk):
    """h_{L-1} from the chunk ends: the last chunk holds r = L - (n_chunks - 1) * chunk steps, so
    hT = lam^r * (state before the last chunk) + e[last]. Returns fp32 (Bt, N) (re, im)."""
    e_re, e_im = ends
    n_chunks = e_re.shape[1]
    steps = L - (n_chunks - 1) * chunk
    pr, pi = _complex_power(lam_re, lam_im, steps)
    if n_chunks > 1:
        sr, si = chunk_states[0][:, -2], chunk_states[1][:, -2]
    elif h0_re is not None:
        sr, si = h0_re, h0_im
    else:
        return e_re[:, -1].contiguous(), e_im[:, -1].contiguous()
    return e_re[:, -1] + pr * sr - pi * si, e_im[:, -1] + pr * si + pi * sr


def _forward_states(x_re, x_im, lam_re, lam_im, h0_re, h0_im, h_out) -> None:
    """Every state of h_t = lam h_{t-1} + x_t into h_out ((Bt, L, N) views), by the strategy for this shape."""
    Bt, L, N = x_re.shape
    if _scan_strategy(N, Bt, x_re.device) == "sequential":
        _launch_sequential_fwd(x_re, x_im, lam_re, lam_im, h0_re, h0_im, h_out=h_out)
        return
    chunk = _scan_config(N)[0]
    _, chunk_states = _chunk_end_states(x_re, x_im, lam_re, lam_im, h0_re, h0_im, chunk)
    _launch_chunk_fwd(x_re, x_im, lam_re, lam_im, chunk, h0=(h0_re, h0_im), chunk_states=chunk_states, h_out=h_out)


def _launch_chunk_bwd(dh, h, lam_re, lam_im, h0, chunk, *, carries=None, dx_out=None, dlam_out=None, firsts_out=None):
    """One chunk-parallel pass of the reverse scan G_t = dh_t + conj(lam) G_{t+1}, grid (N blocks, chunks, Bt).

    Without `carries`: each chunk's local G at its first step from a zero carry into `firsts_out`. With `carries`
    ((Bt, n_chunks, N), G at every chunk's first step): chunk c continues from carries[c + 1] (zero for the last
    chunk), writes G into dx_out and its partial sum of G_t conj(h_{t-1}) into dlam_out[:, c]."""
    dh_re, dh_im = dh
    Bt, L, N = dh_re.shape
    _, BLOCK_N, warps = _scan_config(N)
    n_chunks = triton.cdiv(L, chunk)
    has_h0 = h0 is not None and h0[0] is not None
    dummy = dh_re
    h_re, h_im = h if h is not None else (dummy, dummy)
    gs_re, gs_im = carries if carries is not None else (dummy, dummy)
    dx_re, dx_im = dx_out if dx_out is not None else (dummy, dummy)
    dl_re, dl_im = dlam_out if dlam_out is not None else (dummy, dummy)
    f_re, f_im = firsts_out if firsts_out is not None else (dummy, dummy)
    _chunk_bwd_kernel[(triton.cdiv(N, BLOCK_N), n_chunks, Bt)](
        dh_re, dh_im, dh_re.stride(0), dh_re.stride(1),
        h_re, h_im, h_re.stride(0), h_re.stride(1),
        lam_re, lam_im,
        h0[0] if has_h0 else dummy, h0[1] if has_h0 else dummy,
        gs_re, gs_im,
        dx_re, dx_im, dx_re.stride(0), dx_re.stride(1),
        dl_re, dl_im,
        f_re, f_im,
        L, N, n_chunks,
        HAS_H0=has_h0, HAS_CARRY=carries is not None,
        CHUNK=chunk, LOG2_CHUNK=chunk.bit_length() - 1, BLOCK_N=BLOCK_N,
        USE_ASSOC=_use_assoc_scan(), num_warps=warps,
    )


def _reverse_scan(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im, dx_re, dx_im):
    """Backward of the scan: G_t = dL/dh_t + conj(lam) G_{t+1} into (dx_re, dx_im) (dL/dx_t = G_t).

    Returns (dlam_re, dlam_im), fp32 (N,) = sum_t G_t conj(h_{t-1}) over batch and time (h_{-1} = h0), and
    (g0_re, g0_im), fp32 (Bt, N) = G_0 (so dL/dh0 = conj(lam) G_0)."""
    Bt, L, N = dh_re.shape
    dev = dh_re.device
    CHUNK, BLOCK_N, warps = _scan_config(N)
    has_h0 = h0_re is not None
    if _scan_strategy(N, Bt, dev) == "sequential":
        dlam_re, dlam_im = _new_pair((Bt, N), dev)
        g0_re, g0_im = _new_pair((Bt, N), dev)
        _scan_bwd_kernel[(triton.cdiv(N, BLOCK_N), Bt)](
            dh_re, dh_im, dh_re.stride(0), dh_re.stride(1),
            h_re, h_im, h_re.stride(0), h_re.stride(1),
            lam_re, lam_im,
            h0_re if has_h0 else dlam_re, h0_im if has_h0 else dlam_im,
            dx_re, dx_im, dx_re.stride(0), dx_re.stride(1),
            dlam_re, dlam_im, g0_re, g0_im,
            L, N,
            HAS_H0=has_h0, CHUNK=CHUNK, LOG2_CHUNK=CHUNK.bit_length() - 1, BLOCK_N=BLOCK_N,
            USE_ASSOC=_use_assoc_scan(), num_warps=warps,
        )
        return dlam_re.sum(0), dlam_im.sum(0), g0_re, g0_im
    n_chunks = triton.cdiv(L, CHUNK)
    # pass 1: local G at every chunk's first step
    firsts = _new_pair((Bt, n_chunks, N), dev)
    _launch_chunk_bwd((dh_re, dh_im), None, lam_re, lam_im, None, CHUNK, firsts_out=firsts)
    # pass 2: true G at every chunk's first step, gs[c] = firsts[c] + conj(lam)^CHUNK gs[c + 1] (every chunk but the
    # last is full, and nothing follows the last): a forward scan over the chunks in reversed order
    lam_chunk_conj = _complex_power(lam_re, lam_im, CHUNK, conj=True)
    reversed_carries = _new_pair((Bt, n_chunks, N), dev)
    _launch_sequential_fwd(firsts[0].flip(1).contiguous(), firsts[1].flip(1).contiguous(), *lam_chunk_conj, None, None,
                           h_out=reversed_carries)
    carries = (reversed_carries[0].flip(1).contiguous(), reversed_carries[1].flip(1).contiguous())
    # pass 3: G everywhere, and the per-chunk dlam partial sums
    dlam_parts = _new_pair((Bt, n_chunks, N), dev)
    _launch_chunk_bwd((dh_re, dh_im), (h_re, h_im), lam_re, lam_im, (h0_re, h0_im), CHUNK, carries=carries,
                      dx_out=(dx_re, dx_im), dlam_out=dlam_parts)
    return dlam_parts[0].sum((0, 1)), dlam_parts[1].sum((0, 1)), carries[0][:, 0], carries[1][:, 0]


def _initial_state_grad(g0_re, g0_im, lam_re, lam_im):
    """dL/dh0 = conj(lam) G_0 as fp32 (Bt, N) (re, im)."""
    return lam_re * g0_re + lam_im * g0_im, lam_re * g0_im - lam_im * g0_re


# ----------------------------------------------------------------------------------------------------------------
# op implementations (eager); registered as torch.library custom ops below
# ----------------------------------------------------------------------------------------------------------------
def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else _f32c(t)


def _scan_fwd_impl(x_re, x_im, lam_re, lam_im, h0_re, h0_im):
    Bt, L, N = x_re.shape
    xr, xi = _pair(x_re, x_im)
    h = _new_pair((Bt, L, N), x_re.device)
    _forward_states(xr, xi, _f32c(lam_re), _f32c(lam_im), _opt(h0_re), _opt(h0_im), h)
    return h


def _scan_bwd_impl(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im):
    Bt, L, N = h_re.shape
    lr, li = _f32c(lam_re), _f32c(lam_im)
    dx_re, dx_im = _new_pair((Bt, L, N), h_re.device)
    dlr, dli, g0r, g0i = _reverse_scan(
        *_pair(dh_re, dh_im), *_pair(h_re, h_im), lr, li, _opt(h0_re), _opt(h0_im), dx_re, dx_im
    )
    if h0_re is None:
        dh0r, dh0i = dlr.new_empty(0), dli.new_empty(0)
    else:
        dh0r, dh0i = _initial_state_grad(g0r, g0i, lr, li)
    return dx_re, dx_im, dlr, dli, dh0r, dh0i


def _lru_fwd_impl(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im):
    Bt, L, H = u.shape
    N = lam_re.shape[0]
    dev = u.device
    uf = u.to(torch.float32)
    Bcat = torch.cat([B_re, B_im], 0).to(torch.float32)  # (2N, H)
    x = uf @ Bcat.t()  # (Bt, L, 2N) -- cuBLAS
    x_re, x_im = x[..., :N], x[..., N:]
    lr, li = _f32c(lam_re), _f32c(lam_im)
    h0r, h0i = _opt(h0_re), _opt(h0_im)

    CHUNK, BLOCK_N, BLOCK_H, warps = _out_config(N, H)
    n_chunks = triton.cdiv(L, CHUNK)
    ends, (hs_re, hs_im) = _chunk_end_states(x_re, x_im, lr, li, h0r, h0i, CHUNK)
    hT_re, hT_im = _chunked_final_state(ends, (hs_re, hs_im), lr, li, h0r, h0i, L, CHUNK)

    ct_re = C_re.to(torch.float32).t().contiguous()  # (N, H)
    ct_imn = (-C_im.to(torch.float32)).t().contiguous()
    Df = _f32c(D)
    u_k = u if u.stride(-1) == 1 else u.contiguous()
    y = torch.empty(Bt, L, H, device=dev, dtype=u.dtype)
    has_h0 = h0r is not None
    grid = (triton.cdiv(H, BLOCK_H), n_chunks, Bt)
    _lru_out_kernel[grid](
        x_re, x_im, x_re.stride(0), x_re.stride(1),
        lr, li,
        h0r if has_h0 else hT_re, h0i if has_h0 else hT_im,
        hs_re, hs_im, ct_re, ct_imn, Df,
        u_k, u_k.stride(0), u_k.stride(1),
        y, L, N, H, n_chunks,
        HAS_H0=has_h0, CHUNK=CHUNK, LOG2_CHUNK=CHUNK.bit_length() - 1, BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H,
        PRECISION=_dot_precision(dev), USE_ASSOC=_use_assoc_scan(), num_warps=warps,
    )
    return y, hT_re, hT_im


def _lru_bwd_impl(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im):
    Bt, L, H = u.shape
    N = lam_re.shape[0]
    dev = u.device
    uf = u.to(torch.float32)
    dyf = dy.to(torch.float32)
    lr, li = _f32c(lam_re), _f32c(lam_im)
    h0r, h0i = _opt(h0_re), _opt(h0_im)
    Bcat = torch.cat([B_re, B_im], 0).to(torch.float32)  # (2N, H)
    # recompute the states (checkpoint style)
    x = uf @ Bcat.t()  # (Bt, L, 2N)
    hbuf = torch.empty(Bt, L, 2 * N, device=dev, dtype=torch.float32)
    _forward_states(x[..., :N], x[..., N:], lr, li, h0r, h0i, (hbuf[..., :N], hbuf[..., N:]))
    del x
    # dL/dh_t: h_re gets C_re^T dy, h_im gets -C_im^T dy
    Ccat = torch.cat([C_re, -C_im], 1).to(torch.float32)  # (H, 2N)
    dh = dyf @ Ccat  # (Bt, L, 2N)
    if dhT_re is not None:
        dh[:, -1, :N] += dhT_re.to(torch.float32)
    if dhT_im is not None:
        dh[:, -1, N:] += dhT_im.to(torch.float32)
    gbuf = torch.empty_like(hbuf)
    dlr, dli, g0r, g0i = _reverse_scan(
        dh[..., :N], dh[..., N:], hbuf[..., :N], hbuf[..., N:], lr, li, h0r, h0i, gbuf[..., :N], gbuf[..., N:]
    )
    del dh
    dy2 = dyf.reshape(-1, H)
    dCcat = dy2.t() @ hbuf.reshape(-1, 2 * N)  # (H, 2N)
    dBcat = gbuf.reshape(-1, 2 * N).t() @ uf.reshape(-1, H)  # (2N, H)
    du = gbuf @ Bcat + dyf * D.to(torch.float32)
    dD = (dyf * uf).sum(dim=(0, 1))
    if h0_re is None:
        dh0r, dh0i = dlr.new_empty(0), dli.new_empty(0)
    else:
        dh0r, dh0i = _initial_state_grad(g0r, g0i, lr, li)
    return (
        du.to(u.dtype), dlr, dli,
        dBcat[:N].clone(), dBcat[N:].clone(),
        dCcat[:, :N].contiguous(), (-dCcat[:, N:]).contiguous(),
        dD, dh0r, dh0i,
    )


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ----------------------------------------------------------------------------------------------------------------
_lib_ops = {}


def _register_ops():
    from torch.library import custom_op

    @custom_op("compressm_kernels::diagonal_scan_fwd", mutates_args=())
    def diagonal_scan_fwd(
        x_re: Tensor, x_im: Tensor, lam_re: Tensor, lam_im: Tensor, h0_re: Optional[Tensor], h0_im: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        return _scan_fwd_impl(x_re, x_im, lam_re, lam_im, h0_re, h0_im)

    @diagonal_scan_fwd.register_fake
    def _(x_re, x_im, lam_re, lam_im, h0_re, h0_im):
        return x_re.new_empty(x_re.shape, dtype=torch.float32), x_re.new_empty(x_re.shape, dtype=torch.float32)

    @custom_op("compressm_kernels::diagonal_scan_bwd", mutates_args=())
    def diagonal_scan_bwd(
        dh_re: Tensor, dh_im: Tensor, h_re: Tensor, h_im: Tensor, lam_re: Tensor, lam_im: Tensor,
        h0_re: Optional[Tensor], h0_im: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _scan_bwd_impl(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im)

    @diagonal_scan_bwd.register_fake
    def _(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im):
        Bt, L, N = h_re.shape
        f = lambda *s: h_re.new_empty(s, dtype=torch.float32)  # noqa: E731
        h0s = (Bt, N) if h0_re is not None else (0,)
        return f(Bt, L, N), f(Bt, L, N), f(N), f(N), f(*h0s), f(*h0s)

    def _scan_setup(ctx, inputs, output):
        x_re, x_im, lam_re, lam_im, h0_re, h0_im = inputs
        h_re, h_im = output
        ctx.has_h0 = h0_re is not None
        ctx.dtypes = (x_re.dtype, x_im.dtype, lam_re.dtype, lam_im.dtype)
        ctx.h0_dtypes = (h0_re.dtype, h0_im.dtype) if ctx.has_h0 else None
        ctx.save_for_backward(h_re, h_im, lam_re, lam_im, h0_re, h0_im)

    def _scan_backward(ctx, dh_re, dh_im):
        h_re, h_im, lam_re, lam_im, h0_re, h0_im = ctx.saved_tensors
        if dh_re is None:
            dh_re = torch.zeros_like(h_re)
        if dh_im is None:
            dh_im = torch.zeros_like(h_im)
        dx_re, dx_im, dlr, dli, dh0r, dh0i = diagonal_scan_bwd(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im)
        dt = ctx.dtypes
        g_h0r = g_h0i = None
        if ctx.has_h0:
            g_h0r, g_h0i = dh0r.to(ctx.h0_dtypes[0]), dh0i.to(ctx.h0_dtypes[1])
        return dx_re.to(dt[0]), dx_im.to(dt[1]), dlr.to(dt[2]), dli.to(dt[3]), g_h0r, g_h0i

    diagonal_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)

    @custom_op("compressm_kernels::lru_fwd", mutates_args=())
    def lru_fwd(
        u: Tensor, lam_re: Tensor, lam_im: Tensor, B_re: Tensor, B_im: Tensor, C_re: Tensor, C_im: Tensor,
        D: Tensor, h0_re: Optional[Tensor], h0_im: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return _lru_fwd_impl(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im)

    @lru_fwd.register_fake
    def _(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im):
        Bt, N = u.shape[0], lam_re.shape[0]
        return (
            u.new_empty(u.shape),
            u.new_empty((Bt, N), dtype=torch.float32),
            u.new_empty((Bt, N), dtype=torch.float32),
        )

    @custom_op("compressm_kernels::lru_bwd", mutates_args=())
    def lru_bwd(
        dy: Tensor, dhT_re: Optional[Tensor], dhT_im: Optional[Tensor], u: Tensor, lam_re: Tensor,
        lam_im: Tensor, B_re: Tensor, B_im: Tensor, C_re: Tensor, C_im: Tensor, D: Tensor,
        h0_re: Optional[Tensor], h0_im: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _lru_bwd_impl(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im)

    @lru_bwd.register_fake
    def _(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im):
        Bt, N, H = u.shape[0], lam_re.shape[0], u.shape[2]
        f = lambda *s: u.new_empty(s, dtype=torch.float32)  # noqa: E731
        h0s = (Bt, N) if h0_re is not None else (0,)
        return (u.new_empty(u.shape), f(N), f(N), f(N, H), f(N, H), f(H, N), f(H, N), f(H), f(*h0s), f(*h0s))

    def _lru_setup(ctx, inputs, output):
        ctx.has_h0 = inputs[8] is not None
        ctx.dtypes = [t.dtype if t is not None else None for t in inputs]
        ctx.save_for_backward(*inputs)

    def _lru_backward(ctx, dy, dhT_re, dhT_im):
        u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        grads = lru_bwd(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im)
        out = [g.to(dt) for g, dt in zip(grads[:8], ctx.dtypes[:8])]
        if ctx.has_h0:
            out += [grads[8].to(ctx.dtypes[8]), grads[9].to(ctx.dtypes[9])]
        else:
            out += [None, None]
        return tuple(out)

    lru_fwd.register_autograd(_lru_backward, setup_context=_lru_setup)

    _lib_ops.update(
        diagonal_scan_fwd=diagonal_scan_fwd, diagonal_scan_bwd=diagonal_scan_bwd, lru_fwd=lru_fwd, lru_bwd=lru_bwd
    )


if TRITON_AVAILABLE:
    _register_ops()


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def _check_float(name: str, t: Tensor, dtypes=(torch.float32,)) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def _check_shape(name: str, t: Tensor, shape: Tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_h0(h0_re, h0_im, Bt, N):
    if (h0_re is None) != (h0_im is None):
        raise ValueError("h0_re and h0_im must be given together (or both omitted)")
    if h0_re is not None:
        _check_float("h0_re", h0_re, _PARAM_DTYPES)
        _check_float("h0_im", h0_im, _PARAM_DTYPES)
        _check_shape("h0_re", h0_re, (Bt, N))
        _check_shape("h0_im", h0_im, (Bt, N))


def _check_same_device(named) -> torch.device:
    dev = named[0][1].device
    for name, t in named:
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {dev}; all tensors must share a device")
    return dev


def diagonal_scan(
    x_re: Tensor,
    x_im: Tensor,
    lam_re: Tensor,
    lam_im: Tensor,
    h0_re: Optional[Tensor] = None,
    h0_im: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Diagonal complex scan ``h_t = lam * h_{t-1} + x_t`` (Triton), differentiable.

    Args:
        x_re, x_im: real (Bt, L, N) fp32/bf16/fp16 tensors, the input sequence (real / imaginary part).
        lam_re, lam_im: real (N,) tensors, the diagonal state matrix (|lam| < 1 for stability).
        h0_re, h0_im: optional real (Bt, N) initial state ``h_{-1}``; zeros when omitted.

    Returns:
        (h_re, h_im): real (Bt, L, N) fp32 tensors, all states. The final state is ``h[:, -1]``.
    Gradients flow to x, lam and h0.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError(_NO_TRITON_MSG)
    _check_float("x_re", x_re, _ACT_DTYPES)
    _check_float("x_im", x_im, _ACT_DTYPES)
    if x_re.dim() != 3:
        raise ValueError(f"x_re must be 3-D (Bt, L, N), got shape {tuple(x_re.shape)}")
    _check_shape("x_im", x_im, tuple(x_re.shape))
    Bt, L, N = x_re.shape
    if Bt < 1 or L < 1 or N < 1:
        raise ValueError(f"x_re must have non-empty (Bt, L, N), got {tuple(x_re.shape)}")
    _check_float("lam_re", lam_re, _PARAM_DTYPES)
    _check_float("lam_im", lam_im, _PARAM_DTYPES)
    _check_shape("lam_re", lam_re, (N,))
    _check_shape("lam_im", lam_im, (N,))
    _check_h0(h0_re, h0_im, Bt, N)
    dev = _check_same_device(
        [("x_re", x_re), ("x_im", x_im), ("lam_re", lam_re), ("lam_im", lam_im), ("h0_re", h0_re), ("h0_im", h0_im)]
    )
    _check_runtime(dev)
    return _lib_ops["diagonal_scan_fwd"](x_re, x_im, lam_re, lam_im, h0_re, h0_im)


def fused_lru_forward(
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
    """One LRU layer ``y_t = Re(C h_t) + D u_t``, ``h_t = lam h_{t-1} + B u_t`` (Triton, fused), differentiable.

    Args:
        u: real (Bt, L, H) input, fp32 / bf16 / fp16 (accumulation is fp32).
        lam_re, lam_im: real (N,) diagonal state matrix (|lam| < 1).
        B_re, B_im: real (N, H) input matrix.
        C_re, C_im: real (H, N) output matrix.
        D: real (H,) feed-through.
        h0_re, h0_im: optional real (Bt, N) initial state; zeros when omitted.

    Returns:
        y: real (Bt, L, H) in ``u.dtype``; hT_re, hT_im: real (Bt, N) fp32 final state ``h_{L-1}``.
    Gradients flow to u, lam, B, C, D and h0 (states are recomputed in the backward pass).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError(_NO_TRITON_MSG)
    _check_float("u", u, _ACT_DTYPES)
    if u.dim() != 3:
        raise ValueError(f"u must be 3-D (Bt, L, H), got shape {tuple(u.shape)}")
    Bt, L, H = u.shape
    if Bt < 1 or L < 1 or H < 1:
        raise ValueError(f"u must have non-empty (Bt, L, H), got {tuple(u.shape)}")
    for name, t in (("lam_re", lam_re), ("lam_im", lam_im), ("B_re", B_re), ("B_im", B_im), ("C_re", C_re),
                    ("C_im", C_im), ("D", D)):
        _check_float(name, t, _PARAM_DTYPES)
    if lam_re.dim() != 1:
        raise ValueError(f"lam_re must be 1-D (N,), got shape {tuple(lam_re.shape)}")
    N = lam_re.shape[0]
    if N < 1:
        raise ValueError("state size N must be >= 1")
    _check_shape("lam_im", lam_im, (N,))
    _check_shape("B_re", B_re, (N, H))
    _check_shape("B_im", B_im, (N, H))
    _check_shape("C_re", C_re, (H, N))
    _check_shape("C_im", C_im, (H, N))
    _check_shape("D", D, (H,))
    _check_h0(h0_re, h0_im, Bt, N)
    dev = _check_same_device(
        [("u", u), ("lam_re", lam_re), ("lam_im", lam_im), ("B_re", B_re), ("B_im", B_im), ("C_re", C_re),
         ("C_im", C_im), ("D", D), ("h0_re", h0_re), ("h0_im", h0_im)]
    )
    _check_runtime(dev)
    return _lib_ops["lru_fwd"](u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im)
