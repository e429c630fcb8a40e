"""Tile-level Triton building blocks shared by the scan kernels (sequential.py, chunked.py, fused.py).

A tile is ``CHUNK`` time steps x ``BLOCK_N`` state lanes of one batch element, with complex values carried as
pairs of fp32 tensors. The recurrence ``h_k = a_k h_{k-1} + b_k`` inside a tile is an inclusive scan over the
first-order linear-recurrence monoid ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``; a tile's states from a
carry c entering it are then ``h_k = S_k + A_k c`` (A = running product of the factors, S = scan from zero).

Rows that do not take part -- past the end of the sequence, or masked steps in the forward direction -- are
identities (a = 1, b = 0): they hold the state, so the last row of a tile always holds the tile's last state.
Only triton is imported here; the module is loaded only when triton is installed.
"""

import triton
import triton.language as tl


@triton.jit
def lin_combine(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    """Compose h -> a1 h + b1 followed by h -> a2 h + b2 (complex, as real pairs)."""
    ar = ar1 * ar2 - ai1 * ai2
    ai = ar1 * ai2 + ai1 * ar2
    br = ar2 * br1 - ai2 * bi1 + br2
    bi = ar2 * bi1 + ai2 * br1 + bi2
    return ar, ai, br, bi


@triton.jit
def chunk_scan(ar, ai, br, bi, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, USE_ASSOC: tl.constexpr):
    """Inclusive scan of (a, b) pairs along axis 0 of [CHUNK, BLOCK_N] tiles under lin_combine.

    USE_ASSOC: tl.associative_scan (the GPU path). Otherwise a Hillis-Steele doubling scan whose row shifts are
    exact 0/1 matmuls: same math, but ~1000x faster in triton's CPU interpreter, whose generic associative_scan
    runs the combine function one element at a time.
    """
    if USE_ASSOC:
        Ar, Ai, Sr, Si = tl.associative_scan((ar, ai, br, bi), 0, lin_combine)
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
            Ar, Ai, Sr, Si = lin_combine(pr, pi, qr, qi, Ar, Ai, Sr, Si)
    return Ar, Ai, Sr, Si


@triton.jit
def load_lam(lam_re, lam_im, cols, nmask, CONJ: tl.constexpr):
    """lam (or conj(lam)) for the state lanes `cols`: two fp32 [BLOCK_N] vectors."""
    lr = tl.load(lam_re + cols, mask=nmask, other=0.0).to(tl.float32)
    li = tl.load(lam_im + cols, mask=nmask, other=0.0).to(tl.float32)
    if CONJ:
        li = -li
    return lr, li


@triton.jit
def load_row(v_re, v_im, b, N, cols, mask):
    """Row b of a (Bt, N) pair at lanes `cols` as fp32 [BLOCK_N] vectors (0 where not `mask`)."""
    vr = tl.load(v_re + b * N + cols, mask=mask, other=0.0).to(tl.float32)
    vi = tl.load(v_im + b * N + cols, mask=mask, other=0.0).to(tl.float32)
    return vr, vi


@triton.jit
def real_steps(step_mask, b, L, t, HAS_MASK: tl.constexpr):
    """Int1 vector over the time indices `t`: True at real steps (inside [0, L), and not masked out when HAS_MASK;
    `step_mask` is a (Bt, L) uint8 tensor, nonzero at real steps)."""
    inside = (t >= 0) & (t < L)
    if HAS_MASK:
        inside = inside & (tl.load(step_mask + b * L + t, mask=inside, other=0) != 0)
    return inside


@triton.jit
def lam_factors(lr, li, factor_mask):
    """Tile of factors: lam where `factor_mask` (a [CHUNK, BLOCK_N] int1), 1 elsewhere (the state is held)."""
    return tl.where(factor_mask, lr[None, :], 1.0), tl.where(factor_mask, li[None, :], 0.0)


@triton.jit
def tile_offsets(b, t, cols, stride_b, stride_t):
    """Element offsets of the [CHUNK, BLOCK_N] tile (rows `t`, lanes `cols`) of batch element b."""
    return b * stride_b + t[:, None] * stride_t + cols[None, :]


@triton.jit
def scan_tile(src_re, src_im, stride_b, stride_t, b, t, cols, load_mask, ar, ai,
              CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, USE_ASSOC: tl.constexpr):
    """Load the tile of rows `t` (in the order given; 0 where not `load_mask`) and scan it with the factors (ar, ai).

    Returns (Ar, Ai, Sr, Si): row k holds the product of the factors of rows 0..k (A) and the scan of the tile
    from a zero carry (S).
    """
    off = tile_offsets(b, t, cols, stride_b, stride_t)
    xr = tl.load(src_re + off, mask=load_mask, other=0.0).to(tl.float32)
    xi = tl.load(src_im + off, mask=load_mask, other=0.0).to(tl.float32)
    return chunk_scan(ar, ai, xr, xi, CHUNK, LOG2_CHUNK, USE_ASSOC)


@triton.jit
def apply_carry(Ar, Ai, Sr, Si, cr, ci):
    """States of a tile from the carry (cr, ci) entering it: h_k = S_k + A_k * carry (complex)."""
    hr = Sr + Ar * cr[None, :] - Ai * ci[None, :]
    hi = Si + Ar * ci[None, :] + Ai * cr[None, :]
    return hr, hi


@triton.jit
def last_row(vr, vi, rows, CHUNK: tl.constexpr):
    """Row CHUNK - 1 of a [CHUNK, BLOCK_N] pair, as two [BLOCK_N] vectors."""
    sel = (rows == CHUNK - 1)[:, None]
    return tl.sum(tl.where(sel, vr, 0.0), axis=0), tl.sum(tl.where(sel, vi, 0.0), axis=0)


@triton.jit
def store_tile(dst_re, dst_im, stride_b, stride_t, b, t, cols, vr, vi, mask):
    off = tile_offsets(b, t, cols, stride_b, stride_t)
    tl.store(dst_re + off, vr, mask=mask)
    tl.store(dst_im + off, vi, mask=mask)


@triton.jit
def load_chunk_row(s_re, s_im, b, k, n_chunks, N, cols, nmask):
    """Entry k of a (Bt, n_chunks, N) pair of per-chunk values, zeros where k is outside [0, n_chunks)."""
    kvec = tl.zeros(cols.shape, dtype=tl.int32) + k
    mask = nmask & (kvec >= 0) & (kvec < n_chunks)
    off = (b * n_chunks + k) * N + cols
    return tl.load(s_re + off, mask=mask, other=0.0), tl.load(s_im + off, mask=mask, other=0.0)


@triton.jit
def store_chunk_row(s_re, s_im, vr, vi, b, k, n_chunks, N, cols, nmask):
    off = (b * n_chunks + k) * N + cols
    tl.store(s_re + off, vr, mask=nmask)
    tl.store(s_im + off, vi, mask=nmask)


@triton.jit
def load_chunk_start(hs_re, hs_im, h0_re, h0_im, b, c, n_chunks, N, cols, nmask, HAS_H0: tl.constexpr):
    """State entering chunk c: the end state of chunk c - 1 from (Bt, n_chunks, N) chunk states, or h0 (zeros
    without one) for the first chunk. Two fp32 [BLOCK_N] vectors."""
    cr, ci = load_chunk_row(hs_re, hs_im, b, c - 1, n_chunks, N, cols, nmask)
    if HAS_H0:
        first = nmask & ((tl.zeros(cols.shape, dtype=tl.int32) + c) == 0)
        h0r, h0i = load_row(h0_re, h0_im, b, N, cols, first)
        cr += h0r
        ci += h0i
    return cr, ci


@triton.jit
def dlam_tile(Gr, Gi, h_re, h_im, stride_b, stride_t, b, t, cols, rows_mask, h0r, h0i, HAS_H0: tl.constexpr):
    """sum over the tile's rows in `rows_mask` of G_t * conj(h_{t-1}) (h_{-1} = h0), two fp32 [BLOCK_N] vectors."""
    tp = t - 1
    mp = (tp >= 0)[:, None] & rows_mask
    offp = tile_offsets(b, tp, cols, stride_b, stride_t)
    hpr = tl.load(h_re + offp, mask=mp, other=0.0)
    hpi = tl.load(h_im + offp, mask=mp, other=0.0)
    if HAS_H0:
        first = (t == 0)[:, None]
        hpr = tl.where(first, h0r[None, :], hpr)
        hpi = tl.where(first, h0i[None, :], hpi)
    dlr = tl.sum(tl.where(rows_mask, Gr * hpr + Gi * hpi, 0.0), axis=0)
    dli = tl.sum(tl.where(rows_mask, Gi * hpr - Gr * hpi, 0.0), axis=0)
    return dlr, dli


@triton.jit
def load_factors(f_re, f_im, stride_b, stride_t, b, t, cols, factor_mask):
    """Tile of per-step factors from a (Bt, T, N) pair (a stride of 0 broadcasts), 1 where not `factor_mask`."""
    off = tile_offsets(b, t, cols, stride_b, stride_t)
    fr = tl.load(f_re + off, mask=factor_mask, other=1.0).to(tl.float32)
    fi = tl.load(f_im + off, mask=factor_mask, other=0.0).to(tl.float32)
    return fr, fi


@triton.jit
def chunk_power(pow_re, pow_im, count, N, cols, nmask, CONJ: tl.constexpr):
    """lam^count (conj(lam)^count with CONJ) for the lanes `cols`, read from the (CHUNK + 1, N) table of powers
    lam^0 .. lam^CHUNK that the host computes in float64: two fp32 [BLOCK_N] vectors.

    Carries between chunks use these instead of the tile scan's running product: with a constant factor the scan
    multiplies identical rounded values, so its product's rounding error grows ~CHUNK-fold and, applied once per
    chunk, would accumulate over a long sequence (|lam| near 1 never damps it)."""
    pr = tl.load(pow_re + count * N + cols, mask=nmask, other=1.0)
    pi = tl.load(pow_im + count * N + cols, mask=nmask, other=0.0)
    if CONJ:
        pi = -pi
    return pr, pi


@triton.jit
def carry_through(sr, si, pr, pi, cr, ci):
    """The state leaving a chunk: its last local state (sr, si) plus the carry entering it times the chunk's
    factor product (pr, pi). All [BLOCK_N] vectors."""
    return sr + pr * cr - pi * ci, si + pr * ci + pi * cr
