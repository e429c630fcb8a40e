"""Shared test setup: deterministic seeds and small random LTI systems."""

import logging
import os

import torch  # importing torch does not import triton

# Without a GPU the Triton kernels run on CPU tensors in triton's interpreter, which must be chosen before triton is
# imported; with CUDA the kernel tests run the compiled kernels (TRITON_INTERPRET stays as the caller set it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Buffers the kernels write start as NaN, so an element a kernel fails to write fails the comparisons.
os.environ.setdefault("COMPRESSM_KERNELS_POISON", "1")

import pytest
from transformers.utils import logging as hf_logging


# Markers of transformers' own test modules, which tests/test_modeling_common.py runs on our models.
TRANSFORMERS_TEST_MARKERS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                             "torch_compile_test", "is_pipeline_test", "is_training_test", "order", "slow")


def pytest_configure(config):
    for marker in TRANSFORMERS_TEST_MARKERS:
        config.addinivalue_line("markers", f"{marker}: marker of transformers' test suite")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_mixed_precision_left_for_later_tests():
    """transformers 4.56.2 (not 5.24) leaves a bf16 Trainer's `ACCELERATE_MIXED_PRECISION=bf16` in os.environ, so
    every later Trainer in the process (and every process it starts) runs under bf16 autocast: the loss-contract tests
    in test_faults.py then differed by bf16 rounding after test_callback.py's bf16 run in `.ci/run`'s oldest-release
    step. Each test leaves the variable as it found it."""
    variable = "ACCELERATE_MIXED_PRECISION"
    before = os.environ.get(variable)
    yield
    if before is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = before


class _CapturedWarnings(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Messages of warnings logged by the `transformers` library loggers (loading reports go there)."""
    hf_logging.set_verbosity_warning()
    handler = _CapturedWarnings()
    root = hf_logging.get_logger()  # the library root logger "transformers"
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


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
