"""Compile the scan kernels for a CUDA GPU on a machine without one (ahead of time), and report their resources.

The interpreter tests (``TRITON_INTERPRET=1``) check the kernels' math, but they never run Triton's GPU compiler:
layouts, ``tl.associative_scan`` lowering, TF32 ``tl.dot`` and register allocation are only exercised when the
kernels are compiled for a real target. :func:`compile_only` does exactly that without a GPU: inside the ``with``
block every kernel launch made by ``compressm_kernels`` (through the public ops, their backward passes, or the
launch helpers) is compiled by Triton for ``sm_<arch>`` -- through PTX to a cubin with the ``ptxas`` that ships
with triton -- and recorded instead of run. Outputs of the ops inside the block are uninitialised memory (NaN with ``poison_outputs``).

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

from . import config

#: The Triton kernels the ops launch (sequential.py, chunked.py, fused.py).
KERNEL_NAMES = ("scan_fwd_kernel", "scan_bwd_kernel", "chunk_fwd_kernel", "chunk_bwd_kernel", "lru_out_kernel")

_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass
class KernelCompileReport:
    """One kernel launch compiled for ``sm_<arch>``.

    Attributes:
        kernel: the Triton function's name, e.g. ``"scan_fwd_kernel"``.
        arch: compute capability as an int (90 = sm_90).
        grid: the launch grid the helper asked for (programs along x, y, z).
        constexprs: the compile-time arguments (CHUNK, BLOCK_N, ...), including the ``triton.heuristics`` flags
            (HAS_H0, HAS_MASK, ...) they were derived to.
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


def _jit_function(kernel):
    """The JITFunction under any ``triton.heuristics`` wrappers, and the heuristics on the way (outermost first)."""
    from triton.runtime.autotuner import Heuristics

    heuristics = []
    while isinstance(kernel, Heuristics):
        heuristics.append(kernel.values)
        kernel = kernel.fn
    return kernel, heuristics


class _CompileAndRecord:
    """A ``KernelSettings.launcher`` that compiles each launch for ``sm_<arch>`` (warmup) and records it."""

    def __init__(self, arch: int, reports: List[KernelCompileReport]):
        self._arch = arch
        self._reports = reports

    def __call__(self, kernel, grid, kwargs) -> None:
        fn, heuristics = _jit_function(kernel)
        start = time.perf_counter()
        compiled = kernel.warmup(grid=grid, **kwargs)
        seconds = time.perf_counter() - start
        registers, static_shared, stack, local = _resource_usage(compiled.asm["cubin"])
        constexpr_names = {p.name for p in fn.params if p.is_constexpr}
        constexprs = {k: v for k, v in kwargs.items() if k in constexpr_names}
        for values in heuristics:
            constexprs.update({name: rule(kwargs) for name, rule in values.items()})
        self._reports.append(
            KernelCompileReport(
                kernel=fn.__name__,
                arch=self._arch,
                grid=tuple(int(g) for g in grid),
                constexprs=dict(sorted(constexprs.items())),
                num_warps=int(compiled.metadata.num_warps),
                dynamic_shared_bytes=int(compiled.metadata.shared),
                registers=registers,
                static_shared_bytes=static_shared,
                stack_bytes=stack,
                local_bytes=local,
                compile_seconds=seconds,
            )
        )


@contextlib.contextmanager
def compile_only(arch: int = 90, warp_size: int = 32) -> Iterator[List[KernelCompileReport]]:
    """Inside the block, kernel launches compile for ``sm_<arch>`` and are recorded instead of run.

    This is a ``compressm_kernels.kernel_settings`` block whose settings describe the target (compute capability,
    no device check) and whose launcher compiles instead of launching, plus Triton's active driver set
    to a fixed CUDA target for the duration.

    Args:
        arch: CUDA compute capability as an int (80 = A100, 90 = H100/H200, 100 = B200).
        warp_size: threads per warp of the target (32 on every NVIDIA GPU).
    Yields:
        the list that receives one :class:`KernelCompileReport` per launch, in launch order.
    Raises:
        RuntimeError: triton is missing, or the kernels were decorated under ``TRITON_INTERPRET=1`` (the
            interpreter replaces the compiler; run this in a process without that variable).
    """
    if not config.TRITON_AVAILABLE:
        raise RuntimeError("compile_only needs triton (pip install triton)")
    if config.INTERPRET:
        raise RuntimeError(
            "compile_only needs the Triton compiler, but the kernels were loaded in interpreter mode "
            "(TRITON_INTERPRET=1 was set before triton was imported); run it in a process without TRITON_INTERPRET"
        )
    arch = int(arch)
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    reports: List[KernelCompileReport] = []
    saved_driver = driver._active  # private: `driver.active` would try to create a CUDA driver
    try:
        driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, int(warp_size))))
        with config.kernel_settings(
            capability=(arch // 10, arch % 10),
            check_device=False,  # nothing runs, so CPU tensors are fine
            launcher=_CompileAndRecord(arch, reports),
        ):
            yield reports
    finally:
        driver._active = saved_driver
