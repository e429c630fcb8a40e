"""CompreSSM kernels: fused Triton scan kernels for the LRU diagonal complex recurrence.

Installed as ``compressm_kernels`` (the repository folder is ``kernels/``). Importing never fails when triton is
missing: ``TRITON_AVAILABLE`` is then False and the Triton entry points raise a RuntimeError. The naive
sequential torch references are always available. Layout and math: README.md in this folder.

Import it as ``compressm_kernels`` only (see the note at the end of this file).

Public API::

    diagonal_scan(x_re, x_im, lam_re, lam_im, h0_re=None, h0_im=None, step_mask=None) -> (h_re, h_im)
    fused_lru_forward(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re=None, h0_im=None, step_mask=None)
        -> (y, hT_re, hT_im)
    naive_diagonal_scan(...), naive_lru_forward(...)   # same signatures, pure torch (the test oracle)
    kernel_settings(**changes)                         # context manager: strategy, block sizes, NaN poisoning, ...

``compressm_kernels.aot.compile_only(arch)`` compiles every kernel launch for a CUDA target without a GPU
(resource report: ``benchmarks/compile_report.py``).
"""

if __name__ == "compressm_kernels":
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
else:
    # Imported under another name: in a source checkout with the repository root on sys.path (`python -m pytest`,
    # `python -c` run there) this folder is importable as a top-level `kernels`, and transformers imports that name
    # when it probes for Hugging Face's hub-kernels library. Loading the kernel modules a second time would
    # re-register the `compressm_kernels::*` torch ops with this copy's functions (so settings in force through
    # `compressm_kernels.kernel_settings` would silently stop reaching them) and re-import triton. Stay an empty
    # module: transformers then finds no version and reports the hub-kernels library as unavailable, as it is.
    __all__ = []
