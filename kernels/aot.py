"""Compile the scan kernels for a CUDA GPU on a machine without one (ahead of time), and report their resources.

The interpreter tests (``TRITON_INTERPRET=1``) check the kernels' math, but they never run Triton's GPU compiler:
layouts, ``tl.associative_scan`` lowering, TF32 ``tl.dot`` and register allocation are only exercised when the
kernels are compiled for a real target. :func:`compile_only` does exactly that without a GPU: inside the ``with``
block every kernel launch made by ``compressm_kernels`` (through the public ops, their backward passes, or the
launch helpers) is compiled by Triton for ``sm_<arch>`` -- through PTX to a cubin with the ``ptxas`` that ships
with triton -- and recorded instead of run. Outputs of the ops inside the block are uninitialised memory.

Usage::

    # in a process where TRITON_INTERPRET is NOT set (the interpreter replaces the compiler)
    import torch, compressm_kernels as K
    from compressm_kernels.aot import compile_only

    with compile_only(arch=90) as reports:                 # H100 = sm_90
        y, hT_re, hT_im = K.fused_lru_forward(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D)   # CPU tensors
        y.float().sum().backward()
    for r in reports:
        print(r.kernel, r.constexprs, r.registers, r.local_bytes, r.shared_bytes)

The tensors may live on the CPU: only their dtypes, alignment and integer arguments reach the compiler (Triton
specialises on them exactly as it would at a GPU launch). ``benchmarks/compile_report.py`` uses this to print
per-kernel registers, spills, shared memory and occupancy for the benchmark shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import lru_scan

#: The Triton kernels that the launch helpers in ``lru_scan`` call (module globals, looked up at launch time).
KERNEL_NAMES = ("_scan_fwd_kernel", "_scan_bwd_kernel", "_chunk_fwd_kernel", "_chunk_bwd_kernel", "_lru_out_kernel")

#: Streaming multiprocessors of common GPUs per compute capability (the automatic scan strategy depends on it).
DEFAULT_MULTIPROCESSORS = {80: 108, 90: 132, 100: 148}

_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass
class KernelCompileReport:
    """One kernel launch compiled for ``sm_<arch>``.

    Attributes:
        kernel: the Triton function's name, e.g. ``"_scan_fwd_kernel"``.
        arch: compute capability as an int (90 = sm_90).
        grid: the launch grid the helper asked for (programs along x, y, z).
        constexprs: the compile-time arguments (CHUNK, BLOCK_N, HAS_H0, ...).
        num_warps: warps per program.
        dynamic_shared_bytes: shared memory Triton allocates per program (layout conversions, scans).
        registers: registers per thread from ``cuobjdump -res-usage`` (None when cuobjdump is unavailable).
        static_shared_bytes, stack_bytes, local_bytes: the same tool's figures; ``local_bytes`` > 0 means
            register spills to local memory.
        compile_seconds: wall time of this compilation (near 0 for a cache hit).
    """

    kernel: str
    arch: int
    grid: Tuple[int, ...]
    constexprs: Dict[str, Any]
    num_warps: int
    dynamic_shared_bytes: int
    registers: Optional[int]
    static_shared_bytes: Optional[int]
    stack_bytes: Optional[int]
    local_bytes: Optional[int]
    compile_seconds: float

    @property
    def programs(self) -> int:
        """Number of programs (thread blocks) in the launch grid."""
        total = 1
        for g in self.grid:
            total *= int(g)
        return total

    def as_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), grid=list(self.grid), programs=self.programs)


class _CompileOnlyDriver:
    """The part of Triton's driver interface that ``JITFunction.run(..., warmup=True)`` uses: a fixed target."""

    def __init__(self, target):
        self._target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self):
        return self._target

    def is_active(self) -> bool:
        return True


def _resource_usage(cubin: bytes) -> Tuple[Optional[int], ...]:
    """(registers, static shared, stack, local) bytes of a cubin via triton's bundled cuobjdump, or Nones."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # pragma: no cover - triton internals moved
        return None, None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None, None, None
    match = _RESOURCE_LINE.search(out)
    if match is None:
        return None, None, None, None
    registers, stack, static_shared, local = (int(v) for v in match.groups())
    return registers, static_shared, stack, local


class _RecordingKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` compiles (warmup) and records."""

    def __init__(self, jit_fn, arch: int, reports: List[KernelCompileReport]):
        self._fn = jit_fn
        self._arch = arch
        self._reports = reports

    def __getitem__(self, grid):
        def launch(*args, **meta):
            start = time.perf_counter()
            compiled = self._fn.warmup(*args, grid=grid, **meta)
            seconds = time.perf_counter() - start
            registers, static_shared, stack, local = _resource_usage(compiled.asm["cubin"])
            constexprs = {k: v for k, v in meta.items() if k != "num_warps" and k != "num_stages"}
            self._reports.append(
                KernelCompileReport(
                    kernel=self._fn.__name__,
                    arch=self._arch,
                    grid=tuple(int(g) for g in grid),
                    constexprs=constexprs,
                    num_warps=int(compiled.metadata.num_warps),
                    dynamic_shared_bytes=int(compiled.metadata.shared),
                    registers=registers,
                    static_shared_bytes=static_shared,
                    stack_bytes=stack,
                    local_bytes=local,
                    compile_seconds=seconds,
                )
            )

        return launch


@contextlib.contextmanager
def compile_only(
    arch: int = 90, multiprocessor_count: Optional[int] = None, warp_size: int = 32
) -> Iterator[List[KernelCompileReport]]:
    """Inside the block, kernel launches compile for ``sm_<arch>`` and are recorded instead of run.

    Args:
        arch: CUDA compute capability as an int (80 = A100, 90 = H100/H200, 100 = B200).
        multiprocessor_count: SMs of the target GPU, which the automatic scan strategy looks at; defaults to
            ``DEFAULT_MULTIPROCESSORS[arch]`` (required for other archs).
        warp_size: threads per warp of the target (32 on every NVIDIA GPU).
    Yields:
        the list that receives one :class:`KernelCompileReport` per launch, in launch order.
    Raises:
        RuntimeError: triton is missing, or the kernels were decorated under ``TRITON_INTERPRET=1`` (the
            interpreter replaces the compiler; run this in a process without that variable).
    """
    if not lru_scan.TRITON_AVAILABLE:
        raise RuntimeError("compile_only needs triton (pip install triton)")
    if lru_scan._INTERPRET:
        raise RuntimeError(
            "compile_only needs the Triton compiler, but the kernels were loaded in interpreter mode "
            "(TRITON_INTERPRET=1 was set before triton was imported); run it in a process without TRITON_INTERPRET"
        )
    if multiprocessor_count is None:
        if int(arch) not in DEFAULT_MULTIPROCESSORS:
            raise ValueError(f"no default SM count for sm_{arch}: pass multiprocessor_count")
        multiprocessor_count = DEFAULT_MULTIPROCESSORS[int(arch)]
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    reports: List[KernelCompileReport] = []
    saved_kernels = {name: getattr(lru_scan, name) for name in KERNEL_NAMES}
    saved_precision = lru_scan._dot_precision
    saved_check = lru_scan._check_runtime
    saved_sm_count = lru_scan._multiprocessor_count
    saved_driver = driver._active  # private: `driver.active` would try to create a CUDA driver
    try:
        driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", int(arch), int(warp_size))))
        for name, fn in saved_kernels.items():
            setattr(lru_scan, name, _RecordingKernel(fn, int(arch), reports))
        # what the launch helpers would choose on that GPU (torch's default fp32 matmul policy)
        lru_scan._dot_precision = lambda device: lru_scan._precision_for_capability(int(arch) // 10)
        lru_scan._check_runtime = lambda device: None  # nothing runs, so CPU tensors are fine
        lru_scan._multiprocessor_count = lambda device: int(multiprocessor_count)
        yield reports
    finally:
        for name, fn in saved_kernels.items():
            setattr(lru_scan, name, fn)
        lru_scan._dot_precision = saved_precision
        lru_scan._check_runtime = saved_check
        lru_scan._multiprocessor_count = saved_sm_count
        driver._active = saved_driver
