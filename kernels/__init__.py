"""CompreSSM kernels: fused Triton scan kernels for the LRU diagonal complex recurrence.

Installed as ``compressm_kernels`` (the repository folder is ``kernels/``). Importing never fails when triton is
missing: ``TRITON_AVAILABLE`` is then False and the Triton entry points raise a RuntimeError. The naive
sequential torch references are always available.

Public API::

    diagonal_scan(x_re, x_im, lam_re, lam_im, h0_re=None, h0_im=None) -> (h_re, h_im)
    fused_lru_forward(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re=None, h0_im=None) -> (y, hT_re, hT_im)
    naive_diagonal_scan(...), naive_lru_forward(...)   # same signatures, pure torch (test oracle)
"""

from .lru_scan import TRITON_AVAILABLE, diagonal_scan, fused_lru_forward
from .naive import naive_diagonal_scan, naive_lru_forward

__all__ = [
    "TRITON_AVAILABLE",
    "diagonal_scan",
    "fused_lru_forward",
    "naive_diagonal_scan",
    "naive_lru_forward",
]
