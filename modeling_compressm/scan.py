"""The LRU recurrence in torch, and the one dispatch between the fused Triton kernel (CUDA) and the torch path.

    x_t = B u_t,   h_t = lam * h_{t-1} + x_t  (h_{-1} = initial_state or 0),   y_t = Re(C h_t) + D * u_t

Paths:
    sequential_diagonal_scan   python loop over time; the reference the other paths are tested against.
    parallel_diagonal_scan     chunked scan with O(L) work: vectorised sequential steps inside chunks of ~sqrt(L) steps,
                               a short scan over the chunk ends, one fix-up; hand-written backward (the same scan in
                               reverse). Every factor is a product of lam's (no lam^{-t} terms): stable at any length.
    lru_sequence               the whole layer map; CUDA tensors go to `compressm_kernels.fused_lru_forward` (Triton)
                               when it is installed, everything else to the torch path.

This file is copied next to the modeling file for `trust_remote_code` loading, so it only imports torch and, inside
try/except, the optional kernel package.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

try:  # Optional: the Triton kernels ship with the pip package, not with remote-code checkpoints.
    from compressm_kernels import TRITON_AVAILABLE as _TRITON_AVAILABLE
    from compressm_kernels import KernelSettings as _KernelSettings
    from compressm_kernels import fused_lru_forward as _fused_lru_forward
    from compressm_kernels import kernel_settings as _kernel_settings
except ImportError:  # pragma: no cover - depends on the installation
    _TRITON_AVAILABLE = False
    _KernelSettings = _fused_lru_forward = _kernel_settings = None

logger = logging.getLogger(__name__)
_warned_torch_path_on_cuda = False

__all__ = [
    "sequential_diagonal_scan",
    "parallel_diagonal_scan",
    "lru_sequence",
    "triton_available",
    "host_reads_are_free",
]


def _projection_settings(device: torch.device) -> dict:
    """Kernel settings for one fused-op call: under autocast with bf16/fp16 on `device` the op's projections run
    in that dtype on tensor cores (fp32 accumulation), while the recurrence and its state stay fp32. Empty when
    autocast is off or the installed kernels predate the setting."""
    if _KernelSettings is None or not hasattr(_KernelSettings, "gemm_dtype"):
        return {}
    if not torch.is_autocast_enabled(device.type):
        return {}
    dtype = torch.get_autocast_dtype(device.type)
    return {"gemm_dtype": dtype} if dtype in (torch.bfloat16, torch.float16) else {}


def triton_available() -> bool:
    """True when the fused Triton kernels can be used for CUDA tensors."""
    return bool(_TRITON_AVAILABLE) and _fused_lru_forward is not None


def sequential_diagonal_scan(
    x: torch.Tensor, lam: torch.Tensor, initial_state: torch.Tensor | None = None, decay: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference scan h_t = a_t * h_{t-1} + x_t with a python loop over time.

    Args:
        x: complex (batch, L, N).
        lam: complex (N,), used as a_t when `decay` is None.
        initial_state: complex (batch, N) or None (zeros).
        decay: complex (batch, L, N) per-step factors a_t, or None.
    Returns:
        complex (batch, L, N): all states h_0 .. h_{L-1}.
    """
    state = initial_state if initial_state is not None else x.new_zeros(x.shape[0], x.shape[2])
    states = []
    for t in range(x.shape[1]):
        factor = lam if decay is None else decay[:, t]
        state = factor * state + x[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


def _chunk_length(length: int) -> int:
    """Steps per chunk of the chunked scan: about sqrt(L), so the python loops (one over the steps of a chunk, one
    over the chunks) stay short while every vectorised step still covers batch * N * L / chunk elements."""
    return max(1, math.isqrt(max(1, length)))


def _powers(lam: torch.Tensor, count: int, reverse: bool = False) -> torch.Tensor:
    """lam^(t+1) for t = 0..count-1 (reversed: lam^(count-t)), complex (count, N) in lam's dtype, computed in
    complex128 (exp(k log lam)) so that powers of |lam| close to 1 keep full precision."""
    exponents = torch.arange(1, count + 1, device=lam.device, dtype=torch.float64)
    if reverse:
        exponents = exponents.flip(0)
    log_lam = torch.log(lam.to(torch.complex128))
    return torch.exp(exponents[:, None] * log_lam[None, :]).to(lam.dtype)


def _chunked_scan_(
    states: torch.Tensor, factor: torch.Tensor, carry: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """In place: turn inputs x (batch, L, N) into the states of a first-order linear recurrence.

    Forward: h_t = a_t h_{t-1} + x_t with h_{-1} = carry (zeros if None). Reverse: h_t = a_t h_{t+1} + x_t with
    h_L = carry. a_t = factor when factor is (N,) (a constant, e.g. lam), or factor[:, t] when it is (batch, L, N).

    O(L) work in three steps on a (batch, chunks, T, N) view, T = _chunk_length(L): (1) a sequential scan inside
    every chunk at once (T vectorised steps from a zero carry), (2) a short sequential scan over the chunk ends
    giving the state entering every chunk, (3) one broadcast fix-up h += (product of the factors since the chunk
    start) * (state entering the chunk); the L mod T steps left over after the last full chunk (before the first,
    in reverse) are then run one by one from the true boundary state. `states` must be contiguous.
    """
    batch, length, n = states.shape
    per_step = factor.dim() == 3
    chunk = _chunk_length(length)
    chunks = length // chunk
    rest = length - chunks * chunk
    main = slice(rest, length) if reverse else slice(0, chunks * chunk)
    view = states[:, main].view(batch, chunks, chunk, n)
    factors = factor[:, main].reshape(batch, chunks, chunk, n) if per_step else factor
    # products of the factors from the chunk start to every step (per-step factors: built alongside the scan)
    products = factors.clone() if per_step else _powers(factor, chunk, reverse)
    last, back = (0, 1) if reverse else (chunk - 1, -1)  # a chunk's last step in processing order; neighbour
    steps = range(chunk - 2, -1, -1) if reverse else range(1, chunk)
    for t in steps:  # (1) local scans from a zero carry
        view[:, :, t].addcmul_(view[:, :, t + back], factors[:, :, t] if per_step else factors)
        if per_step:
            products[:, :, t].mul_(products[:, :, t + back])
    # (2) the state entering every chunk, in processing order
    chunk_product = products[:, :, last] if per_step else products[last].expand(batch, chunks, n)
    entering = torch.zeros(batch, chunks, n, dtype=states.dtype, device=states.device)
    order = range(chunks - 1, -1, -1) if reverse else range(chunks)
    previous = None
    for c in order:
        if previous is None:
            if carry is not None:
                entering[:, c] = carry
        else:
            entering[:, c] = chunk_product[:, previous] * entering[:, previous] + view[:, previous, last]
        previous = c
    # (3) fix-up: h = local state + (factor product since the chunk start) * (state entering the chunk)
    if carry is None:  # the first chunk (in processing order) starts from zero: nothing to add there
        fix = slice(0, chunks - 1) if reverse else slice(1, chunks)
    else:
        fix = slice(0, chunks)
    view[:, fix].addcmul_(products[:, fix] if per_step else products, entering[:, fix, None, :])
    # the leftover steps, one by one
    tail = range(rest - 1, -1, -1) if reverse else range(chunks * chunk, length)
    for t in tail:
        source = t + 1 if reverse else t - 1
        states[:, t].addcmul_(states[:, source], factor[:, t] if per_step else factor)
    return states


def _time_blocks(states: torch.Tensor, start: int = 0):
    """(t0, t1) ranges covering steps start..L-1 of a (batch, L, N) tensor in blocks of about 2^18 elements, so that
    elementwise temporaries stay in cache (one temporary of the full size costs several times more on a CPU)."""
    batch, length, n = states.shape
    steps = max(1, (1 << 18) // max(1, batch * n))
    return [(t0, min(t0 + steps, length)) for t0 in range(start, length, steps)]


def _sum_times_previous_conj(grads: torch.Tensor, states: torch.Tensor, initial_state: torch.Tensor | None):
    """sum over batch and time of g_t * conj(h_{t-1}) (h_{-1} = initial_state or 0): complex (N,)."""
    total = torch.zeros(states.shape[2], dtype=states.dtype, device=states.device)
    for t0, t1 in _time_blocks(states, start=1):
        total += (grads[:, t0:t1] * states[:, t0 - 1:t1 - 1].conj()).sum((0, 1))
    if initial_state is not None:
        total += (grads[:, 0] * initial_state.conj()).sum(0)
    return total


def _times_previous_conj(grads: torch.Tensor, states: torch.Tensor, initial_state: torch.Tensor | None):
    """g_t * conj(h_{t-1}) for every step (h_{-1} = initial_state or 0): complex (batch, L, N)."""
    out = torch.empty_like(states)
    for t0, t1 in _time_blocks(states, start=1):
        torch.mul(grads[:, t0:t1], states[:, t0 - 1:t1 - 1].conj(), out=out[:, t0:t1])
    if initial_state is None:
        out[:, 0] = 0
    else:
        torch.mul(grads[:, 0], initial_state.conj(), out=out[:, 0])
    return out


class _ConstantDecayScan(torch.autograd.Function):
    """h_t = lam * h_{t-1} + x_t (chunked scan) with a hand-written backward, saving only the states.

    PyTorch's complex gradient convention (grad of a product a*b w.r.t. a is grad * conj(b)) gives
        g_t = dL/dh_t + conj(lam) g_{t+1},   dL/dx_t = g_t,   dL/dlam = sum_t g_t conj(h_{t-1}),   dL/dh0 = conj(lam) g_0,
    the first being the same chunked scan run in reverse with conj(lam).
    """

    @staticmethod
    def forward(ctx, x, lam, initial_state):
        with torch.no_grad():
            states = _chunked_scan_(x.clone(memory_format=torch.contiguous_format), lam, initial_state)
        ctx.save_for_backward(states, lam, initial_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        states, lam, initial_state = ctx.saved_tensors
        lam_conj = lam.conj().resolve_conj()
        grad_x = _chunked_scan_(grad_states.clone(memory_format=torch.contiguous_format), lam_conj, reverse=True)
        grad_lam = grad_initial = None
        if ctx.needs_input_grad[1]:
            grad_lam = _sum_times_previous_conj(grad_x, states, initial_state)
        if initial_state is not None and ctx.needs_input_grad[2]:
            grad_initial = lam_conj * grad_x[:, 0]
        return grad_x, grad_lam, grad_initial


class _PerStepDecayScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + x_t with per-step factors a (batch, L, N) (chunked scan), hand-written backward:
        g_t = dL/dh_t + conj(a_{t+1}) g_{t+1},   dL/dx_t = g_t,   dL/da_t = g_t conj(h_{t-1}),   dL/dh0 = conj(a_0) g_0.
    """

    @staticmethod
    def forward(ctx, x, decay, initial_state):
        with torch.no_grad():
            states = _chunked_scan_(
                x.clone(memory_format=torch.contiguous_format), decay.contiguous(), initial_state
            )
        ctx.save_for_backward(states, decay, initial_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        states, decay, initial_state = ctx.saved_tensors
        # the factor that carries g_{t+1} back to step t is conj(a_{t+1}); nothing follows the last step
        following = torch.empty_like(states)
        following[:, :-1] = decay[:, 1:].conj()
        following[:, -1] = 0
        grad_x = _chunked_scan_(grad_states.clone(memory_format=torch.contiguous_format), following, reverse=True)
        del following
        grad_decay = grad_initial = None
        if ctx.needs_input_grad[1]:
            grad_decay = _times_previous_conj(grad_x, states, initial_state)
        if initial_state is not None and ctx.needs_input_grad[2]:
            grad_initial = decay[:, 0].conj() * grad_x[:, 0]
        return grad_x, grad_decay, grad_initial


def parallel_diagonal_scan(
    x: torch.Tensor, lam: torch.Tensor, initial_state: torch.Tensor | None = None, decay: torch.Tensor | None = None
) -> torch.Tensor:
    """Chunked scan h_t = a_t * h_{t-1} + x_t with O(L) work and a hand-written backward, differentiable.

    Inside chunks of about sqrt(L) steps the recurrence runs as vectorised sequential steps over all chunks at
    once; a short scan over the chunk ends and one broadcast fix-up complete it (see `_chunked_scan_`). Every
    factor is a product of a_t's, so the scan is stable for |a_t| <= 1 at any length. The backward pass is the
    same scan run in reverse with the conjugate factors.

    Args:
        x: complex (batch, L, N).
        lam: complex (N,), the factor a_t when `decay` is None.
        initial_state: complex (batch, N) or None (zeros).
        decay: complex (batch, L, N) per-step factors (masked/padded steps use a_t = 1), or None for a_t = lam.
            With `decay`, `lam` is not used (its gradient flows through `decay`).
    Returns:
        complex (batch, L, N): all states, same dtype as x.
    """
    if decay is None:
        return _ConstantDecayScan.apply(x, lam, initial_state)
    return _PerStepDecayScan.apply(x, decay, initial_state)


def complex_input_projection(u: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x = u @ B^T as complex64 (batch, L, N) from real fp32 u (batch, L, H) and complex B (N, H), by one real GEMM
    whose (H, 2N) weight interleaves Re/Im, so the result is viewed as complex without a copy."""
    weight = torch.view_as_real(B.to(torch.complex64)).permute(1, 0, 2).reshape(B.shape[1], 2 * B.shape[0])
    return torch.view_as_complex((u @ weight).unflatten(-1, (B.shape[0], 2)))


def real_output_projection(states: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Re(C h) as fp32 (batch, L, H) from complex64 states (batch, L, N) and complex C (H, N): one real GEMM on the
    interleaved (Re, Im) view of the states (no copy of them) with the weight (Re C, -Im C) interleaved (2N, H)."""
    weight = torch.view_as_real(C.to(torch.complex64).conj().resolve_conj()).flatten(1)  # (H, 2N)
    return torch.view_as_real(states).flatten(-2) @ weight.T


def host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading values of `tensor` on the host costs nothing: a CPU tensor in eager mode. On accelerators such a
    read is a host-device synchronisation, and under torch.compile / torch.export / jit tracing it would bake a
    data-dependent branch into the graph, so value-dependent shortcuts and input checks are skipped there."""
    if tensor.device.type != "cpu":
        return False
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing() or (is_exporting is not None and is_exporting())
    return not tracing


def _must_hold_state(step_mask: torch.Tensor | None, initial_state: torch.Tensor | None) -> bool:
    """Whether padded steps need a_t = 1 (state held) rather than only a zero input.

    Zero input suffices only where the state is still zero at every padded step: left padding of a fresh sequence
    (rows 0...0 1...1, no initial state). Recognising that reads the mask, so it is done only where the read is free
    (`host_reads_are_free`); on accelerators and while tracing every mask takes the exact time-varying scan, so the
    decision never synchronises with the device and never branches on data inside a traced graph.
    """
    if step_mask is None:
        return False
    if initial_state is not None or not host_reads_are_free(step_mask):
        return True
    as_int = step_mask.to(torch.int8)
    return not bool((as_int[:, 1:] >= as_int[:, :-1]).all())


def lru_sequence_torch(
    u: torch.Tensor,
    lam: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    scan=parallel_diagonal_scan,
    hold_state: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LRU map in plain torch (fp32 / complex64 inside). See `lru_sequence` for the arguments; `hold_state`
    is `_must_hold_state(step_mask, initial_state)` when the caller already knows it (None: computed here)."""
    u32 = u.float()
    if step_mask is not None:
        keep = step_mask.to(torch.bool)[:, :, None]
        u32 = u32.masked_fill(~keep, 0)
    x = complex_input_projection(u32, B)  # (batch, L, N)
    lam = lam.to(torch.complex64)
    decay = None
    if hold_state is None:
        hold_state = _must_hold_state(step_mask, initial_state)
    elif hold_state and step_mask is None:
        raise ValueError("hold_state=True holds the state at masked steps and needs a step_mask; none was given")
    if hold_state:
        # Masked steps must leave the state untouched: a_t = 1 there (a fixed lam would still decay it).
        decay = torch.where(keep, lam[None, None, :], torch.ones((), dtype=lam.dtype, device=lam.device))
    init = initial_state.to(torch.complex64) if initial_state is not None else None
    states = scan(x, lam, init, decay)
    y = real_output_projection(states, C) + u32 * D.float()
    return y.to(u.dtype), states[:, -1]


def lru_sequence(
    u: torch.Tensor,
    lam: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one LRU over a sequence: the single dispatch point between the Triton kernel and the torch path.

    Dispatch (no data-dependent branch): CUDA tensors with the kernels installed -> `fused_lru_forward`, with the step
    mask when one is given; everything else -> the torch path.

    Args:
        u: real (batch, L, H), fp32/bf16/fp16.
        lam: complex (N,), |lam| < 1.
        B: complex (N, H), input gain included.  C: complex (H, N).  D: real (H,).
        initial_state: complex (batch, N) state before the first step, or None (zeros).
        step_mask: bool (batch, L) (or 0/1 ints; nonzero = real step), False/0 for padding. A padded step has zero
            input and leaves the state unchanged, so its output is Re(C h) of the held state.
        use_kernel: force (True) or forbid (False) the Triton kernel; None picks it for CUDA tensors when installed.
            CPU tensors can be forced through the kernel only in Triton's interpreter mode (TRITON_INTERPRET=1).
    Returns:
        y: real (batch, L, H) in u's dtype; final_state: complex64 (batch, N), the state after the last step.
    """
    global _warned_torch_path_on_cuda
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, length, hidden), got shape {tuple(u.shape)}")
    if u.shape[1] == 0:
        raise ValueError("cannot run the recurrence over an empty sequence (length 0)")
    if use_kernel is None:
        use_kernel = u.is_cuda and triton_available()
        if u.is_cuda and not use_kernel and not _warned_torch_path_on_cuda and not torch.compiler.is_compiling():
            _warned_torch_path_on_cuda = True
            logger.warning(
                "CompreSSM: CUDA tensors run through the torch scan because the Triton kernels (compressm_kernels with "
                "triton) are not available; install triton for the fused kernel"
            )
    if use_kernel:
        if not triton_available():
            raise RuntimeError("use_kernel=True but the Triton kernels (compressm_kernels) are not available")
        if not u.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton kernels need CUDA tensors; use the torch path (use_kernel=False) on CPU")
        h0_re = h0_im = None
        if initial_state is not None:
            h0_re, h0_im = initial_state.real.float().contiguous(), initial_state.imag.float().contiguous()
        # The mask is passed only when given, so unmasked calls also run on kernel builds older than the step mask.
        mask_argument = {} if step_mask is None else {"step_mask": step_mask.to(device=u.device, dtype=torch.bool)}
        projection = _projection_settings(u.device)  # a settings block only when it changes something
        with _kernel_settings(**projection) if projection else contextlib.nullcontext():
            y, final_re, final_im = _fused_lru_forward(
                u.contiguous(),
                lam.real.float().contiguous(),
                lam.imag.float().contiguous(),
                B.real.float().contiguous(),
                B.imag.float().contiguous(),
                C.real.float().contiguous(),
                C.imag.float().contiguous(),
                D.float().contiguous(),
                h0_re,
                h0_im,
                **mask_argument,
            )
        return y, torch.complex(final_re, final_im)
    with torch.autocast(device_type=u.device.type, enabled=False):
        return lru_sequence_torch(u, lam, B, C, D, initial_state, step_mask)
