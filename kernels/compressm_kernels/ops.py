"""The public ops: ``diagonal_scan`` and ``fused_lru_forward``, their torch.library registration and autograd.

Each op is a ``torch.library.custom_op`` (namespace ``compressm_kernels``) with a fake (meta) implementation and
``register_autograd``, so ``torch.compile`` traces it as one opaque node without graph breaks; its backward is a
second custom op. ``torch.library.triton_op`` would let Inductor see the kernels, but our launches go through
launch helpers with host-side decisions (strategy, chunk-end passes, cuBLAS GEMMs) that it would have to trace.

Implementations (eager):

* ``diagonal_scan``: forward writes all states by the strategy ``config.scan_strategy`` picks (``sequential.py`` or
  ``chunked.py``); backward is the reverse scan of dL/dh with conj(lam) (same strategy choice).
* ``fused_lru_forward``: x = B u by one cuBLAS GEMM ((Bt L) x H) @ (H x 2N) (B_re and B_im concatenated; fusing
  it into the scan would make every (batch, N block) program stream a (BLOCK_N x H) slice of B per chunk), the
  chunk ends by ``chunked.chunk_end_states`` (chunk-parallel whatever the shape), then ``fused.lru_out_kernel``
  (states never reach HBM). Backward, checkpoint style: x and the states are recomputed, dL/dh = C^H dy is a
  GEMM, the reverse scan gives dL/dx, dlam, dh0, and dB, dC, du, dD are GEMMs/reductions. Only the inputs are
  saved between forward and backward.

With a step mask, masked steps ignore their input (and the ``D u`` term) and hold the state; their gradient with
respect to x and u is zero, and they add nothing to dlam. The settings in force (``config.kernel_settings``) are
read once per call; a backward runs with the settings of its forward (in eager mode; inside a compiled graph the
settings in force when the graph runs apply).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import config

if config.TRITON_AVAILABLE:
    from . import chunked, fused, sequential

Tensor = torch.Tensor
Pair = Tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------
def _f32c(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


@functools.lru_cache(maxsize=None)
def _fp32_out_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` with `dtype` operands runs on this device type (CUDA
    with torch >= 2.8; not the CPU). Probed once per (device type, dtype)."""
    if device_type != "cuda":
        return False
    probe = torch.zeros(1, 1, device=device_type, dtype=dtype)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def project(a: Tensor, b: Tensor, settings) -> Tensor:
    """``a @ b`` as an fp32 tensor, with operands in ``settings.gemm_dtype`` (None: fp32 operands).

    Args:
        a: (..., K) any float dtype. b: (K, M) any float dtype.
    Returns:
        (..., M) float32. With a low-precision ``gemm_dtype`` the product is accumulated in fp32 on tensor cores;
        where torch has no fp32-output GEMM for the device, the product is rounded to ``gemm_dtype`` first.
    """
    dtype = settings.gemm_dtype
    if dtype is None:
        return a.to(torch.float32) @ b.to(torch.float32)
    a_low, b_low = a.to(dtype), b.to(dtype)
    if _fp32_out_mm_supported(a.device.type, dtype):
        rows = a_low.reshape(-1, a_low.shape[-1])
        return torch.mm(rows, b_low, out_dtype=torch.float32).reshape(*a.shape[:-1], b.shape[-1])
    return (a_low @ b_low).to(torch.float32)


def _opt_pair(re: Optional[Tensor], im: Optional[Tensor]) -> Optional[Pair]:
    return None if re is None else (_f32c(re), _f32c(im))


def _rows_ok(t: Tensor) -> Tensor:
    """(Bt, L, K) tensor with unit stride along K (a copy only if needed), fp32."""
    t = t.to(torch.float32)
    return t if t.stride(-1) == 1 else t.contiguous()


def _pair(a: Tensor, b: Tensor) -> Pair:
    """A (re, im) pair of (Bt, L, K) fp32 tensors with unit stride along K and identical strides (the kernels
    take one set of strides per pair)."""
    a, b = _rows_ok(a), _rows_ok(b)
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _without_autocast(impl):
    """Run an op implementation with autocast off. Autocast stays active inside a custom op's implementation, so under
    ``torch.autocast`` (a Trainer with ``bf16=True``) the fp32 matmuls here would silently run in bf16; the ops'
    precision is their own (fp32 state math, outputs in u's dtype), whatever the caller's autocast says."""

    @functools.wraps(impl)
    def run(*args):
        device = next(a.device for a in args if isinstance(a, Tensor))
        with torch.autocast(device_type=device.type, enabled=False):
            return impl(*args)

    return run


def _mask_bytes(step_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A bool (Bt, L) mask as the contiguous uint8 tensor the kernels read (no copy when already contiguous)."""
    return None if step_mask is None else step_mask.contiguous().view(torch.uint8)


def forward_states(x: Pair, lam: Pair, settings, *, states_out: Pair, h0=None, step_mask=None) -> None:
    """Every state of the scan of the (Bt, L, N) pair x into `states_out`, by the settings' scan strategy."""
    if config.scan_strategy(settings) == "sequential":
        sequential.scan_forward(x, lam, settings, h0=h0, step_mask=step_mask, states_out=states_out)
    else:
        chunked.scan_forward(x, lam, settings, h0=h0, step_mask=step_mask, states_out=states_out)


def reverse_scan(dh: Pair, h: Pair, lam: Pair, settings, *, dx_out: Pair, h0=None, step_mask=None):
    """Backward of the scan into `dx_out`; returns ((dlam_re, dlam_im), (g0_re, g0_im)) (see sequential.py)."""
    module = sequential if config.scan_strategy(settings) == "sequential" else chunked
    return module.scan_backward(dh, h, lam, settings, dx_out=dx_out, h0=h0, step_mask=step_mask)


def initial_state_grad(g0: Pair, lam: Pair, step_mask: Optional[Tensor]) -> Pair:
    """dL/dh0 = conj(a_0) G_0 as an fp32 (Bt, N) pair, a_0 = lam (1 where the first step is masked)."""
    (gr, gi), (lr, li) = g0, lam
    dr, di = lr * gr + li * gi, lr * gi - li * gr
    if step_mask is not None:
        first_real = step_mask[:, :1] != 0
        dr, di = torch.where(first_real, dr, gr), torch.where(first_real, di, gi)
    return dr, di


def _no_grad_pair(reference: Tensor) -> Pair:
    empty = reference.new_empty(0, dtype=torch.float32)
    return empty, empty.clone()


# ----------------------------------------------------------------------------------------------------------------
# op implementations (eager)
# ----------------------------------------------------------------------------------------------------------------
@_without_autocast
def _scan_fwd_impl(x_re, x_im, lam_re, lam_im, h0_re, h0_im, step_mask):
    settings = config.current_settings()
    config.check_runtime(x_re.device, settings)
    Bt, L, N = x_re.shape
    states = config.new_pair((Bt, L, N), x_re.device, settings)
    forward_states(_pair(x_re, x_im), (_f32c(lam_re), _f32c(lam_im)), settings, states_out=states,
                   h0=_opt_pair(h0_re, h0_im), step_mask=_mask_bytes(step_mask))
    return states


@_without_autocast
def _scan_bwd_impl(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im, step_mask):
    settings = config.current_settings()
    config.check_runtime(h_re.device, settings)
    Bt, L, N = h_re.shape
    lam = (_f32c(lam_re), _f32c(lam_im))
    mask = _mask_bytes(step_mask)
    dx = config.new_pair((Bt, L, N), h_re.device, settings)
    dlam, g0 = reverse_scan(_pair(dh_re, dh_im), _pair(h_re, h_im), lam, settings, dx_out=dx,
                            h0=_opt_pair(h0_re, h0_im), step_mask=mask)
    dh0 = _no_grad_pair(h_re) if h0_re is None else initial_state_grad(g0, lam, mask)
    return (*dx, *dlam, *dh0)


@_without_autocast
def _lru_fwd_impl(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im, step_mask):
    settings = config.current_settings()
    config.check_runtime(u.device, settings)
    Bt, L, H = u.shape
    N = lam_re.shape[0]
    lam = (_f32c(lam_re), _f32c(lam_im))
    h0 = _opt_pair(h0_re, h0_im)
    mask = _mask_bytes(step_mask)
    x = project(u, torch.cat([B_re, B_im], 0).t(), settings)  # (Bt, L, 2N) fp32, cuBLAS
    x_pair = (x[..., :N], x[..., N:])  # masked steps' inputs are ignored by the kernels
    blocks = config.output_blocks(N, H, settings)
    chunk_states = chunked.chunk_end_states(x_pair, lam, blocks.chunk, settings, h0=h0, step_mask=mask)
    hT_re, hT_im = (s[:, -1].contiguous() for s in chunk_states)
    ct_re = C_re.to(torch.float32).t().contiguous()  # (N, H)
    ct_imn = (-C_im.to(torch.float32)).t().contiguous()
    u_rows = u if u.stride(-1) == 1 else u.contiguous()
    y = fused.output_projection(x_pair, lam, chunk_states, ct_re, ct_imn, _f32c(D), u_rows, settings,
                                blocks=blocks, h0=h0, step_mask=mask)
    return y, hT_re, hT_im


@_without_autocast
def _lru_bwd_impl(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im, step_mask):
    settings = config.current_settings()
    config.check_runtime(u.device, settings)
    Bt, L, H = u.shape
    N = lam_re.shape[0]
    dev = u.device
    uf, dyf = u.to(torch.float32), dy.to(torch.float32)
    if step_mask is not None:  # whatever padded steps hold (even inf/NaN) must not reach dB or dD
        uf = uf.masked_fill(~step_mask[:, :, None], 0)
    lam = (_f32c(lam_re), _f32c(lam_im))
    h0 = _opt_pair(h0_re, h0_im)
    mask = _mask_bytes(step_mask)
    Bcat = torch.cat([B_re, B_im], 0).to(torch.float32)  # (2N, H)
    # recompute the states (checkpoint style), with the forward's projection precision
    x = project(uf, Bcat.t(), settings)  # (Bt, L, 2N)
    hbuf = config.new_buffer((Bt, L, 2 * N), dev, settings)
    forward_states((x[..., :N], x[..., N:]), lam, settings, states_out=(hbuf[..., :N], hbuf[..., N:]), h0=h0,
                   step_mask=mask)
    del x
    # dL/dh_t: h_re gets C_re^T dy, h_im gets -C_im^T dy; the final state is h_{L-1}
    dh = project(dyf, torch.cat([C_re, -C_im], 1), settings)  # (Bt, L, 2N)
    if dhT_re is not None:
        dh[:, -1, :N] += dhT_re.to(torch.float32)
    if dhT_im is not None:
        dh[:, -1, N:] += dhT_im.to(torch.float32)
    gbuf = config.new_buffer((Bt, L, 2 * N), dev, settings)
    dlam, g0 = reverse_scan((dh[..., :N], dh[..., N:]), (hbuf[..., :N], hbuf[..., N:]), lam, settings,
                            dx_out=(gbuf[..., :N], gbuf[..., N:]), h0=h0, step_mask=mask)
    del dh
    dCcat = project(dyf.reshape(-1, H).t(), hbuf.reshape(-1, 2 * N), settings)  # (H, 2N)
    dBcat = project(gbuf.reshape(-1, 2 * N).t(), uf.reshape(-1, H), settings)  # (2N, H); dL/dx is 0 at masked steps
    dy_real = dyf if step_mask is None else dyf * step_mask[:, :, None]  # masked steps have no D u term
    du = project(gbuf, Bcat, settings) + dy_real * D.to(torch.float32)
    dD = (dy_real * uf).sum(dim=(0, 1))
    dh0 = _no_grad_pair(u) if h0_re is None else initial_state_grad(g0, lam, mask)
    return (
        du.to(u.dtype), *dlam,
        dBcat[:N].clone(), dBcat[N:].clone(),
        dCcat[:, :N].contiguous(), (-dCcat[:, N:]).contiguous(),
        dD, *dh0,
    )


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ----------------------------------------------------------------------------------------------------------------
_OPS = {}


def _register_ops():
    from torch.library import custom_op

    @custom_op("compressm_kernels::diagonal_scan_fwd", mutates_args=())
    def diagonal_scan_fwd(
        x_re: Tensor, x_im: Tensor, lam_re: Tensor, lam_im: Tensor, h0_re: Optional[Tensor],
        h0_im: Optional[Tensor], step_mask: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor]:
        return _scan_fwd_impl(x_re, x_im, lam_re, lam_im, h0_re, h0_im, step_mask)

    @diagonal_scan_fwd.register_fake
    def _(x_re, x_im, lam_re, lam_im, h0_re, h0_im, step_mask):
        return x_re.new_empty(x_re.shape, dtype=torch.float32), x_re.new_empty(x_re.shape, dtype=torch.float32)

    @custom_op("compressm_kernels::diagonal_scan_bwd", mutates_args=())
    def diagonal_scan_bwd(
        dh_re: Tensor, dh_im: Tensor, h_re: Tensor, h_im: Tensor, lam_re: Tensor, lam_im: Tensor,
        h0_re: Optional[Tensor], h0_im: Optional[Tensor], step_mask: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _scan_bwd_impl(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im, step_mask)

    @diagonal_scan_bwd.register_fake
    def _(dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im, step_mask):
        Bt, L, N = h_re.shape
        f = lambda *s: h_re.new_empty(s, dtype=torch.float32)  # noqa: E731
        h0s = (Bt, N) if h0_re is not None else (0,)
        return f(Bt, L, N), f(Bt, L, N), f(N), f(N), f(*h0s), f(*h0s)

    def _scan_setup(ctx, inputs, output):
        x_re, x_im, lam_re, lam_im, h0_re, h0_im, step_mask = inputs
        ctx.settings = config.current_settings()
        ctx.dtypes = (x_re.dtype, x_im.dtype, lam_re.dtype, lam_im.dtype)
        ctx.h0_dtypes = (h0_re.dtype, h0_im.dtype) if h0_re is not None else None
        ctx.save_for_backward(*output, lam_re, lam_im, h0_re, h0_im, step_mask)

    def _scan_backward(ctx, dh_re, dh_im):
        h_re, h_im, lam_re, lam_im, h0_re, h0_im, step_mask = ctx.saved_tensors
        dh_re = torch.zeros_like(h_re) if dh_re is None else dh_re
        dh_im = torch.zeros_like(h_im) if dh_im is None else dh_im
        with config.use_settings(ctx.settings):
            dx_re, dx_im, dlr, dli, dh0r, dh0i = diagonal_scan_bwd(
                dh_re, dh_im, h_re, h_im, lam_re, lam_im, h0_re, h0_im, step_mask
            )
        grads = [g.to(dt) for g, dt in zip((dx_re, dx_im, dlr, dli), ctx.dtypes)]
        if ctx.h0_dtypes is None:
            return (*grads, None, None, None)
        return (*grads, dh0r.to(ctx.h0_dtypes[0]), dh0i.to(ctx.h0_dtypes[1]), None)

    diagonal_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)

    @custom_op("compressm_kernels::lru_fwd", mutates_args=())
    def lru_fwd(
        u: Tensor, lam_re: Tensor, lam_im: Tensor, B_re: Tensor, B_im: Tensor, C_re: Tensor, C_im: Tensor,
        D: Tensor, h0_re: Optional[Tensor], h0_im: Optional[Tensor], step_mask: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return _lru_fwd_impl(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im, step_mask)

    @lru_fwd.register_fake
    def _(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im, step_mask):
        Bt, N = u.shape[0], lam_re.shape[0]
        state = lambda: u.new_empty((Bt, N), dtype=torch.float32)  # noqa: E731
        return u.new_empty(u.shape), state(), state()

    @custom_op("compressm_kernels::lru_bwd", mutates_args=())
    def lru_bwd(
        dy: Tensor, dhT_re: Optional[Tensor], dhT_im: Optional[Tensor], u: Tensor, lam_re: Tensor,
        lam_im: Tensor, B_re: Tensor, B_im: Tensor, C_re: Tensor, C_im: Tensor, D: Tensor,
        h0_re: Optional[Tensor], h0_im: Optional[Tensor], step_mask: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _lru_bwd_impl(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im,
                             step_mask)

    @lru_bwd.register_fake
    def _(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im, step_mask):
        Bt, N, H = u.shape[0], lam_re.shape[0], u.shape[2]
        f = lambda *s: u.new_empty(s, dtype=torch.float32)  # noqa: E731
        h0s = (Bt, N) if h0_re is not None else (0,)
        return (u.new_empty(u.shape), f(N), f(N), f(N, H), f(N, H), f(H, N), f(H, N), f(H), f(*h0s), f(*h0s))

    def _lru_setup(ctx, inputs, output):
        ctx.settings = config.current_settings()
        ctx.has_h0 = inputs[8] is not None
        ctx.dtypes = [t.dtype if t is not None else None for t in inputs[:10]]
        ctx.save_for_backward(*inputs)

    def _lru_backward(ctx, dy, dhT_re, dhT_im):
        u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im, step_mask = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy
        with config.use_settings(ctx.settings):
            grads = lru_bwd(dy, dhT_re, dhT_im, u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im,
                            step_mask)
        out = [g.to(dt) for g, dt in zip(grads[:8], ctx.dtypes[:8])]
        if ctx.has_h0:
            out += [grads[8].to(ctx.dtypes[8]), grads[9].to(ctx.dtypes[9])]
        else:
            out += [None, None]
        return (*out, None)

    lru_fwd.register_autograd(_lru_backward, setup_context=_lru_setup)

    _OPS.update(diagonal_scan_fwd=diagonal_scan_fwd, diagonal_scan_bwd=diagonal_scan_bwd, lru_fwd=lru_fwd,
                lru_bwd=lru_bwd)


if config.TRITON_AVAILABLE:
    _register_ops()


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_float(name: str, t, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {_dtype_name(t.dtype)}")


def _check_sequence(name: str, t, last: str) -> Tuple[int, int, int]:
    """A float (batch, length, `last`) tensor with every dimension >= 1; returns its shape."""
    _check_float(name, t)
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D (Bt, L, {last}), got shape {tuple(t.shape)}")
    if min(t.shape) < 1:
        raise ValueError(f"{name} must have non-empty (Bt, L, {last}), got {tuple(t.shape)}")
    return tuple(t.shape)


def _check_shape(name: str, t: Tensor, shape: Tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_h0(h0_re, h0_im, Bt: int, N: int) -> None:
    if (h0_re is None) != (h0_im is None):
        raise ValueError("h0_re and h0_im must be given together (or both omitted)")
    if h0_re is not None:
        for name, t in (("h0_re", h0_re), ("h0_im", h0_im)):
            _check_float(name, t)
            _check_shape(name, t, (Bt, N))


def _check_step_mask(step_mask, Bt: int, L: int) -> Optional[Tensor]:
    """The mask as a bool (Bt, L) tensor (integer masks: nonzero = real step), or None."""
    if step_mask is None:
        return None
    if not isinstance(step_mask, torch.Tensor):
        raise ValueError(f"step_mask must be a torch.Tensor or None, got {type(step_mask).__name__}")
    if step_mask.dtype not in _MASK_DTYPES:
        raise ValueError(f"step_mask must be a bool (or 0/1 integer) tensor, got {_dtype_name(step_mask.dtype)}")
    _check_shape("step_mask", step_mask, (Bt, L))
    return step_mask if step_mask.dtype == torch.bool else step_mask != 0


def _check_same_device(named) -> torch.device:
    first_name, first = named[0]
    for name, t in named:
        if t is not None and t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must share a device")
    return first.device


def diagonal_scan(
    x_re: Tensor,
    x_im: Tensor,
    lam_re: Tensor,
    lam_im: Tensor,
    h0_re: Optional[Tensor] = None,
    h0_im: Optional[Tensor] = None,
    step_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Diagonal complex scan ``h_t = lam * h_{t-1} + x_t`` (Triton), differentiable.

    Args:
        x_re, x_im: real (Bt, L, N) fp32/bf16/fp16 tensors, the input sequence (real / imaginary part).
        lam_re, lam_im: real (N,) tensors, the diagonal state matrix (|lam| < 1 for stability).
        h0_re, h0_im: optional real (Bt, N) initial state ``h_{-1}``; zeros when omitted.
        step_mask: optional bool (Bt, L) (or 0/1 integers); at a masked step (False) x_t is ignored and the state
            is held (``h_t = h_{t-1}``).

    Returns:
        (h_re, h_im): real (Bt, L, N) fp32 tensors, all states. The final state is ``h[:, -1]``.
    Gradients flow to x, lam and h0 (zero for x at masked steps).
    """
    if not config.TRITON_AVAILABLE:
        raise RuntimeError(config.NO_TRITON_MESSAGE)
    Bt, L, N = _check_sequence("x_re", x_re, "N")
    _check_float("x_im", x_im)
    _check_shape("x_im", x_im, (Bt, L, N))
    for name, t in (("lam_re", lam_re), ("lam_im", lam_im)):
        _check_float(name, t)
        _check_shape(name, t, (N,))
    _check_h0(h0_re, h0_im, Bt, N)
    step_mask = _check_step_mask(step_mask, Bt, L)
    _check_same_device([("x_re", x_re), ("x_im", x_im), ("lam_re", lam_re), ("lam_im", lam_im), ("h0_re", h0_re),
                        ("h0_im", h0_im), ("step_mask", step_mask)])
    return _OPS["diagonal_scan_fwd"](x_re, x_im, lam_re, lam_im, h0_re, h0_im, step_mask)


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
    step_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LRU layer ``y_t = Re(C h_t) + D u_t``, ``h_t = lam h_{t-1} + B u_t`` (Triton, fused), differentiable.

    Args:
        u: real (Bt, L, H) input, fp32 / bf16 / fp16 (accumulation is fp32).
        lam_re, lam_im: real (N,) diagonal state matrix (|lam| < 1).
        B_re, B_im: real (N, H) input matrix.
        C_re, C_im: real (H, N) output matrix.
        D: real (H,) feed-through.
        h0_re, h0_im: optional real (Bt, N) initial state; zeros when omitted.
        step_mask: optional bool (Bt, L) (or 0/1 integers). At a masked step (False) the input is zero and the
            state is held (a_t = 1 instead of lam), so the output there is ``Re(C h_held)``; unmasked steps are
            the plain recurrence. Left padding, right padding and holes all work, with or without h0.

    Returns:
        y: real (Bt, L, H) in ``u.dtype``; hT_re, hT_im: real (Bt, N) fp32 final state ``h_{L-1}``.
    Gradients flow to u, lam, B, C, D and h0 (states are recomputed in the backward pass).
    """
    if not config.TRITON_AVAILABLE:
        raise RuntimeError(config.NO_TRITON_MESSAGE)
    Bt, L, H = _check_sequence("u", u, "H")
    params = (("lam_re", lam_re), ("lam_im", lam_im), ("B_re", B_re), ("B_im", B_im), ("C_re", C_re),
              ("C_im", C_im), ("D", D))
    for name, t in params:
        _check_float(name, t)
    if lam_re.dim() != 1 or lam_re.shape[0] < 1:
        raise ValueError(f"lam_re must be 1-D (N,) with N >= 1, got shape {tuple(lam_re.shape)}")
    N = lam_re.shape[0]
    for name, t, shape in (("lam_im", lam_im, (N,)), ("B_re", B_re, (N, H)), ("B_im", B_im, (N, H)),
                           ("C_re", C_re, (H, N)), ("C_im", C_im, (H, N)), ("D", D, (H,))):
        _check_shape(name, t, shape)
    _check_h0(h0_re, h0_im, Bt, N)
    step_mask = _check_step_mask(step_mask, Bt, L)
    _check_same_device([("u", u), *params, ("h0_re", h0_re), ("h0_im", h0_im), ("step_mask", step_mask)])
    return _OPS["lru_fwd"](u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im, step_mask)
