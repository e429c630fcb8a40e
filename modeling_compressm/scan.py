"""The LRU recurrence in torch, and the one dispatch between the fused Triton kernel (CUDA) and the torch path.

    x_t = B u_t,   h_t = lam * h_{t-1} + x_t  (h_{-1} = initial_state or 0),   y_t = Re(C h_t) + D * u_t

Paths:
    sequential_diagonal_scan   python loop over time; the reference the other paths are tested against.
    parallel_diagonal_scan     log-depth doubling (Hillis-Steele) scan: ceil(log2 L) vectorised steps, every factor
                               a power of lam with |lam| < 1, so it is stable for any length (no lam^{-t} terms).
    lru_sequence               the whole layer map; CUDA tensors go to `compressm_kernels.fused_lru_forward` (Triton)
                               when it is installed, everything else to the torch path.

This file is copied next to the modeling file for `trust_remote_code` loading, so it only imports torch and, inside
try/except, the optional kernel package.
"""

from __future__ import annotations

import logging
import os

import torch

try:  # Optional: the Triton kernels ship with the pip package, not with remote-code checkpoints.
    from compressm_kernels import TRITON_AVAILABLE as _TRITON_AVAILABLE
    from compressm_kernels import fused_lru_forward as _fused_lru_forward
except ImportError:  # pragma: no cover - depends on the installation
    _TRITON_AVAILABLE = False
    _fused_lru_forward = None

logger = logging.getLogger(__name__)
_warned_torch_path_on_cuda = False

__all__ = [
    "sequential_diagonal_scan",
    "parallel_diagonal_scan",
    "lru_sequence",
    "triton_available",
    "host_reads_are_free",
]


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


def _doubling_scan_(states: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """In place: turn inputs x (batch, L, N) into states of h_t = lam * h_{t-1} + x_t (zero initial state).

    Step k adds lam^d * h_{t-d} to h_t for d = 2^k; the product on the right is materialised before the in-place add,
    so overlapping reads and writes are safe. ceil(log2 L) passes, every factor |lam^d| <= 1.
    """
    power = lam
    offset = 1
    length = states.shape[1]
    while offset < length:
        states[:, offset:].add_(states[:, :-offset] * power)
        power = power * power
        offset *= 2
    return states


def _powers(lam: torch.Tensor, length: int) -> torch.Tensor:
    """lam^(t+1) for t = 0..length-1: complex (length, N)."""
    exponents = torch.arange(1, length + 1, device=lam.device, dtype=lam.real.dtype)
    return torch.exp(exponents[:, None] * torch.log(lam)[None, :])


class _ConstantDecayScan(torch.autograd.Function):
    """h_t = lam * h_{t-1} + x_t with a hand-written backward (a reverse scan with conj(lam)), saving only the states.

    PyTorch's complex gradient convention (grad of a product a*b w.r.t. a is grad * conj(b)) gives
        g_t = dL/dh_t + conj(lam) g_{t+1},   dL/dx_t = g_t,   dL/dlam = sum_t g_t conj(h_{t-1}),   dL/dh0 = conj(lam) g_0.
    """

    @staticmethod
    def forward(ctx, x, lam, initial_state):
        with torch.no_grad():
            states = _doubling_scan_(x.clone(), lam)
            if initial_state is not None:
                states.add_(_powers(lam, x.shape[1])[None] * initial_state[:, None, :])
        ctx.save_for_backward(states, lam, initial_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        states, lam, initial_state = ctx.saved_tensors
        lam_conj = lam.conj()
        grad_x = _doubling_scan_(grad_states.flip(1).contiguous(), lam_conj).flip(1)
        grad_lam = grad_initial = None
        if ctx.needs_input_grad[1]:
            previous = torch.cat(
                [
                    (initial_state if initial_state is not None else torch.zeros_like(states[:, 0]))[:, None],
                    states[:, :-1],
                ],
                dim=1,
            )
            grad_lam = (grad_x * previous.conj()).sum(dim=(0, 1))
        if initial_state is not None and ctx.needs_input_grad[2]:
            grad_initial = lam_conj * grad_x[:, 0]
        return grad_x, grad_lam, grad_initial


def parallel_diagonal_scan(
    x: torch.Tensor, lam: torch.Tensor, initial_state: torch.Tensor | None = None, decay: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-depth scan h_t = a_t * h_{t-1} + x_t (Hillis-Steele doubling), differentiable.

    With a constant a_t = lam (the training path) step k combines h_t with h_{t-d}, d = 2^k, by the factor lam^d, and
    the backward pass is the same scan run in reverse with conj(lam). With per-step factors (`decay`, used for
    masked/padded steps where a_t = 1 and x_t = 0) the factors are composed alongside and autograd differentiates.

    Args:
        x: complex (batch, L, N).
        lam: complex (N,).
        initial_state: complex (batch, N) or None (zeros).
        decay: complex (batch, L, N) per-step factors, or None for a_t = lam.
    Returns:
        complex (batch, L, N): all states, same dtype as x.
    """
    if decay is None:
        return _ConstantDecayScan.apply(x, lam, initial_state)
    length = x.shape[1]
    states = x
    factors = decay
    if initial_state is not None:
        # Fold h_{-1} into the first input: h_0 = a_0 h_{-1} + x_0.
        states = torch.cat([states[:, :1] + factors[:, :1] * initial_state[:, None, :], states[:, 1:]], dim=1)
    offset = 1
    while offset < length:
        shifted = factors[:, offset:] * states[:, :-offset]
        states = torch.cat([states[:, :offset], states[:, offset:] + shifted], dim=1)
        factors = torch.cat([factors[:, :offset], factors[:, offset:] * factors[:, :-offset]], dim=1)
        offset *= 2
    return states


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
    x = torch.complex(u32 @ B.real.float().T, u32 @ B.imag.float().T)  # (batch, L, N)
    lam = lam.to(torch.complex64)
    decay = None
    if hold_state is None:
        hold_state = _must_hold_state(step_mask, initial_state)
    if hold_state:
        # Masked steps must leave the state untouched: a_t = 1 there (a fixed lam would still decay it).
        decay = torch.where(keep, lam[None, None, :], torch.ones((), dtype=lam.dtype, device=lam.device))
    init = initial_state.to(torch.complex64) if initial_state is not None else None
    states = scan(x, lam, init, decay)
    y = states.real @ C.real.float().T - states.imag @ C.imag.float().T + u32 * D.float()
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
