"""Shared test setup: deterministic seeds and small random LTI systems."""

import os

# Triton kernels run on CPU tensors only in interpreter mode, which must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_stable_system(n: int, h: int, max_modulus: float = 0.95, seed: int = 0, dtype=torch.complex128):
    """A random diagonal system: lam complex (n,) with |lam| <= max_modulus, B complex (n, h), C complex (h, n)."""
    generator = torch.Generator().manual_seed(seed)
    modulus = 0.3 + (max_modulus - 0.3) * torch.rand(n, generator=generator, dtype=torch.float64)
    phase = 2 * torch.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    lam = torch.polar(modulus, phase).to(dtype)
    B = torch.complex(torch.randn(n, h, generator=generator, dtype=torch.float64),
                      torch.randn(n, h, generator=generator, dtype=torch.float64)).to(dtype)
    C = torch.complex(torch.randn(h, n, generator=generator, dtype=torch.float64),
                      torch.randn(h, n, generator=generator, dtype=torch.float64)).to(dtype)
    return lam, B, C
