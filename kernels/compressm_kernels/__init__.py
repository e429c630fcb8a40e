"""CompreSSM kernels: fused Triton scan kernels for the LRU diagonal complex recurrence.

The package lives in the repository folder ``kernels/compressm_kernels/``. ``kernels/`` itself is a plain folder
(no ``__init__.py``): a top-level package named ``kernels`` belongs to Hugging Face's hub-kernels library, which
transformers imports, and a repository root on ``sys.path`` must not shadow it. Importing never fails when triton is
missing: ``TRITON_AVAILABLE`` is then False and the Triton entry points raise a RuntimeError. The naive
sequential torch references are always available. Layout and math: ``kernels/README.md``.

Public API::

    diagonal_scan(x_re, x_im, lam_re, lam_im, h0_re=None, h0_im=None, step_mask=None) -> (h_re, h_im)
    fused_lru_forward(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re=None, h0_im=None, step_mask=None)
        -> (y, hT_re, hT_im)
    naive_diagonal_scan(...), naive_lru_forward(...)   # same signatures, pure torch (the test oracle)
    kernel_settings(**changes)                         # context manager: strategy, block sizes, NaN poisoning, ...

``compressm_kernels.aot.compile_only(arch)`` compiles every kernel launch for a CUDA target without a GPU
(resource report: ``benchmarks/compile_report.py``).
"""

from .config import (
    STRATEGIES,
    TRITON_AVAILABLE,
    KernelSettings,
    OutputBlocks,
    ScanBlocks,
    current_settings,
    kernel_settings,
)
from .naive import naive_diagonal_scan, naive_lru_forward
from .ops import diagonal_scan, fused_lru_forward

__all__ = [
    "STRATEGIES",
    "TRITON_AVAILABLE",
    "KernelSettings",
    "OutputBlocks",
    "ScanBlocks",
    "current_settings",
    "diagonal_scan",
    "fused_lru_forward",
    "kernel_settings",
    "naive_diagonal_scan",
    "naive_lru_forward",
]
