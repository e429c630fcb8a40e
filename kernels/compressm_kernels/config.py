"""Launch settings of the compressm kernels, and the heuristics that turn them into block sizes and strategies.

Every choice the launch code makes that is not fixed by the math lives here, in one frozen ``KernelSettings``
value: block sizes, the scan strategy, the chunk-scan algorithm, the target GPU (for compiling without one),
NaN-poisoned outputs (for tests) and how a kernel is launched. The value in force is read once per op call
(``current_settings()``) and passed to the launch helpers as an argument; ``kernel_settings(**changes)`` replaces
fields inside a ``with`` block::

    import compressm_kernels as K
    with K.kernel_settings(strategy="chunked", poison_outputs=True):
        y, hT_re, hT_im = K.fused_lru_forward(...)

The backward pass of an op runs with the settings its forward ran with (they are saved with the autograd context,
so a backward on autograd's device thread sees them too). ``compressm_kernels.aot.compile_only`` is a
``kernel_settings`` block with a target GPU and a launcher that compiles instead of running.

Settings default to the environment: ``COMPRESSM_KERNELS_POISON=1`` turns NaN-poisoning on (the test suite sets it).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

try:  # pragma: no cover - exercised implicitly
    import triton

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    TRITON_AVAILABLE = False

#: The two ways to run a scan over all L steps (``scan_strategy`` picks one per call):
#:   "sequential": grid (N blocks, Bt); each program walks all of time carrying the state in registers. Least
#:                 traffic (x read once, h written once) but only cdiv(N, BLOCK_N) * Bt programs, fewer than the
#:                 GPU has SMs at the small state sizes that truncation produces.
#:   "chunked":    three launches -- local scans of every chunk from a zero carry (grid (N blocks, chunks, Bt)), a
#:                 short sequential scan over the chunk ends, and the local scans again with their carry in.
#:                 L / CHUNK times more programs, for one more read of the input.
STRATEGIES = ("sequential", "chunked")

CPU_MESSAGE = (
    "compressm_kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); "
    "use the torch path for CPU"
)
NO_TRITON_MESSAGE = "compressm_kernels needs triton (pip install triton); use the torch path instead"

#: Environment switch for the default of ``KernelSettings.poison_outputs``.
POISON_ENV = "COMPRESSM_KERNELS_POISON"


@dataclasses.dataclass(frozen=True)
class ScanBlocks:
    """Tile of the scan kernels: ``chunk`` time steps x ``block_n`` state lanes per program, ``num_warps`` warps."""

    chunk: int
    block_n: int
    num_warps: int


@dataclasses.dataclass(frozen=True)
class OutputBlocks:
    """Tile of the fused output kernel: ``chunk`` steps x ``block_h`` outputs per program, looping over N in
    ``block_n`` lanes (``tl.dot`` needs every dimension >= 16)."""

    chunk: int
    block_n: int
    block_h: int
    num_warps: int


#: A launcher: ``launcher(kernel, grid, kwargs)`` runs (or compiles, or records) one launch of a Triton kernel.
Launcher = Callable[[Any, Tuple[int, ...], Dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """How the ops launch their kernels. Every field's default is the automatic choice.

    Attributes:
        strategy: "sequential" or "chunked" forces the scan strategy of every scan (forward and backward; the
            fused forward's chunk-end pass is always chunk-parallel); None = the automatic choice (``scan_strategy``:
            sequential).
        use_associative_scan: chunk-scan algorithm inside a tile: True = ``tl.associative_scan`` (what compiled
            kernels use), False = a Hillis-Steele doubling scan of exact 0/1 ``tl.dot`` row shifts (what the CPU
            interpreter uses, because its associative_scan runs the combine one element at a time); None = by mode.
        scan_blocks: fixed tile of the scan kernels; None = ``default_scan_blocks(N)``.
        output_blocks: fixed tile of the fused output kernel; None = ``default_output_blocks(N, H)``.
        poison_outputs: fill every buffer the kernels write with NaN before launching, so that an element a kernel
            fails to write shows up as NaN (tests turn this on; default from ``COMPRESSM_KERNELS_POISON``).
        capability: (major, minor) compute capability of the target GPU; None = the tensors' device.
        check_device: refuse CPU tensors outside the interpreter (off only when nothing runs, as in ``aot``).
        launcher: runs one kernel launch; None = ``kernel[grid](**kwargs)``.
        gemm_dtype: operand dtype of the fused op's projections (``x = B u`` and the backward's ``C^H dy``, ``dB``,
            ``dC``, ``du`` GEMMs): None = fp32 (today's default; tensor cores only where TF32 is allowed),
            ``torch.bfloat16`` / ``torch.float16`` = that dtype on tensor cores with fp32 accumulation and fp32
            results where the device offers it (CUDA: ``torch.mm(..., out_dtype=torch.float32)``), else the product
            rounded to that dtype and widened to fp32. The recurrence, its states and its carries stay fp32 either
            way, and the output kernel's ``C h`` contraction then uses single-pass TF32 instead of 3xTF32. The model
            sets this from the autocast dtype (``modeling_compressm.scan``).
    """

    strategy: Optional[str] = None
    use_associative_scan: Optional[bool] = None
    scan_blocks: Optional[ScanBlocks] = None
    output_blocks: Optional[OutputBlocks] = None
    poison_outputs: bool = dataclasses.field(default_factory=lambda: os.environ.get(POISON_ENV, "0") == "1")
    capability: Optional[Tuple[int, int]] = None
    check_device: bool = True
    launcher: Optional[Launcher] = None
    gemm_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {self.strategy!r}")
        if self.gemm_dtype not in GEMM_DTYPES:
            raise ValueError(f"gemm_dtype must be one of {GEMM_DTYPES}, got {self.gemm_dtype!r}")


GEMM_DTYPES = (None, torch.bfloat16, torch.float16)

_SETTINGS: contextvars.ContextVar[KernelSettings] = contextvars.ContextVar("compressm_kernel_settings")


def current_settings() -> KernelSettings:
    """The settings in force in this context (defaults outside any ``kernel_settings`` block)."""
    settings = _SETTINGS.get(None)
    return settings if settings is not None else KernelSettings()


@contextlib.contextmanager
def use_settings(settings: KernelSettings) -> Iterator[KernelSettings]:
    """Put `settings` in force inside the block (the backward passes use this to rerun with the forward's)."""
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)


@contextlib.contextmanager
def kernel_settings(**changes) -> Iterator[KernelSettings]:
    """Inside the block the kernels use the current settings with `changes` applied (fields of KernelSettings)."""
    with use_settings(dataclasses.replace(current_settings(), **changes)) as settings:
        yield settings


# ----------------------------------------------------------------------------------------------------------------
# heuristics
# ----------------------------------------------------------------------------------------------------------------
def _interpreter_in_use() -> bool:
    if not TRITON_AVAILABLE:
        return False
    try:  # the decision triton itself made when the kernels were decorated
        from triton.runtime.interpreter import InterpretedFunction

        from .tile import lin_combine

        return isinstance(lin_combine, InterpretedFunction)
    except Exception:  # pragma: no cover - triton internals moved
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: True when the kernels run in triton's CPU interpreter (TRITON_INTERPRET=1 before triton was imported).
INTERPRET = _interpreter_in_use()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_scan_blocks(N: int) -> ScanBlocks:
    """Tile of the scan kernels for state size N. Measured on an H100 at the training shapes (Bt 128, L 2048;
    benchmarks/results/tune_nvidia-h100-80gb-hbm3_2026-11-26.md): best of 9 tiles at N = 64 and 16; at N = 256
    (32, 32, 4) was 1.16x faster, which one shape does not justify changing the rule for."""
    return ScanBlocks(chunk=64, block_n=min(32, max(16, next_power_of_2(N))), num_warps=4)


def default_output_blocks(N: int, H: int) -> OutputBlocks:
    """Tile of the fused output kernel for state size N and width H. BLOCK_H 128 from N >= 32: measured on an H100
    (tune_nvidia-h100-80gb-hbm3_2026-11-26.md, layer fwd+bwd at Bt 128, L 2048, H 768) the fastest of 7 tiles at
    N = 256 and 64 (1.06x and 1.02x over BLOCK_H 64); at N = 16 BLOCK_H 64 was fastest."""
    block_n = min(32, max(16, next_power_of_2(N)))
    block_h = min(128 if block_n >= 32 else 64, max(16, next_power_of_2(H)))
    return OutputBlocks(chunk=32, block_n=block_n, block_h=block_h, num_warps=4)


def scan_blocks(N: int, settings: KernelSettings) -> ScanBlocks:
    return settings.scan_blocks if settings.scan_blocks is not None else default_scan_blocks(N)


def output_blocks(N: int, H: int, settings: KernelSettings) -> OutputBlocks:
    return settings.output_blocks if settings.output_blocks is not None else default_output_blocks(N, H)


def use_associative_scan(settings: KernelSettings) -> bool:
    if settings.use_associative_scan is None:
        return not INTERPRET
    return bool(settings.use_associative_scan)


def scan_strategy(settings: KernelSettings) -> str:
    """"sequential" or "chunked" for the scans run under `settings` (see STRATEGIES).

    Automatic choice: sequential. Measured on an H100 (benchmarks/results/tune_nvidia-h100-80gb-hbm3_2026-11-26*.md,
    profile_...md): the sequential scan was faster forward+backward at every measured shape, from Bt 128 down to a
    batch-1 scan of 8192 steps with 2 programs (1.87 vs 2.72 ms; Bt=8, N=16: 1.11 vs 1.70 ms). With few programs
    the scan's wall time is host launch overhead (kernels 0.12 ms of 2.6 ms at batch 1), and the chunked strategy
    launches more kernels; with many programs it reads its input twice. ``strategy="chunked"`` remains available.
    """
    if settings.strategy is not None:
        return settings.strategy
    return "sequential"


def precision_for_capability(major: int) -> str:
    """tl.dot input precision for fp32 operands on a GPU of compute capability ``major``.x: TF32 needs sm_80+;
    follow torch's fp32 matmul policy there (TF32 only when the user allowed it, else 3xTF32, ~fp32 accuracy)."""
    if major < 8:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def dot_precision(device: torch.device, settings: KernelSettings) -> str:
    """tl.dot input precision of the output kernel's ``C h`` contraction. With low-precision projections
    (``settings.gemm_dtype``) the layer's accuracy is already that of bf16/fp16 GEMMs, so single-pass TF32 is used
    on sm_80+ instead of 3xTF32."""
    if settings.capability is not None:
        major = settings.capability[0]
    elif INTERPRET or device.type != "cuda":
        return "ieee"
    else:
        major = torch.cuda.get_device_capability(device)[0]
    if settings.gemm_dtype is not None and major >= 8:
        return "tf32"
    return precision_for_capability(major)


def check_runtime(device: torch.device, settings: KernelSettings) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(NO_TRITON_MESSAGE)
    if settings.check_device and device.type != "cuda" and not INTERPRET:
        raise RuntimeError(CPU_MESSAGE)


# ----------------------------------------------------------------------------------------------------------------
# buffers and launches
# ----------------------------------------------------------------------------------------------------------------
def new_buffer(shape, device, settings: KernelSettings, dtype=torch.float32) -> torch.Tensor:
    """A buffer for a kernel to write: uninitialised, or all NaN when ``settings.poison_outputs``."""
    if settings.poison_outputs:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def new_pair(shape, device, settings: KernelSettings):
    """(re, im) buffers of fp32 `shape` for a kernel to write (see ``new_buffer``)."""
    return new_buffer(shape, device, settings), new_buffer(shape, device, settings)


def given(**flags: str) -> Dict[str, Callable[[Dict[str, Any]], bool]]:
    """``triton.heuristics`` rules that set each constexpr flag to whether the named argument is given (not None),
    e.g. ``given(HAS_H0="h0_re")``: optional inputs and outputs are passed as None instead of dummy pointers."""
    return {flag: (lambda args, name=name: args[name] is not None) for flag, name in flags.items()}


def launch(kernel, grid, settings: KernelSettings, **kwargs) -> None:
    """Launch `kernel` on `grid` with keyword arguments, through ``settings.launcher`` when one is set."""
    if settings.launcher is not None:
        settings.launcher(kernel, tuple(grid), kwargs)
    else:
        kernel[tuple(grid)](**kwargs)
