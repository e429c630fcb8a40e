"""Shared setup of the Triton kernel tests (test_kernels.py, test_kernels_mask.py): device, inputs, comparisons.

On CPU the kernels run in triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is imported);
with CUDA they run compiled, on the GPU. Buffers the kernels write are NaN-poisoned (COMPRESSM_KERNELS_POISON=1,
also set by conftest.py), so an element a kernel fails to write fails every comparison below.
"""

import os

import pytest
import torch  # importing torch does not import triton

if not torch.cuda.is_available():  # CPU: use triton's interpreter (must precede the first triton import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the fused kernels are unavailable")

import compressm_kernels as K  # noqa: E402
from compressm_kernels import config  # noqa: E402

if config.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

needs_runtime = pytest.mark.skipif(
    DEVICE is None,
    reason="no CUDA and compressm_kernels was imported before TRITON_INTERPRET=1 was set "
    "(covered by test_kernels_in_interpreter_subprocess; or export TRITON_INTERPRET=1 for the pytest run)",
)

#: Small tiles so that short sequences span several chunks (the last one partial) and N, H several blocks.
SMALL_TILES = dict(scan_blocks=K.ScanBlocks(chunk=16, block_n=16, num_warps=4),
                   output_blocks=K.OutputBlocks(chunk=16, block_n=16, block_h=16, num_warps=4))

LAYER_ARGS = ["u", "lam_re", "lam_im", "B_re", "B_im", "C_re", "C_im", "D", "h0_re", "h0_im"]


@pytest.fixture(params=K.STRATEGIES)
def strategy(request):
    """Run the test once with each scan strategy (sequential in time, chunk-parallel) forced."""
    with K.kernel_settings(strategy=request.param):
        yield request.param


def lam_pair(N, gen, low=0.4, high=0.95):
    """lam = r e^{i theta} as a (re, im) pair of fp32 (N,) tensors, |lam| uniform in [low, high)."""
    r = low + (high - low) * torch.rand(N, generator=gen)
    th = 2 * torch.pi * torch.rand(N, generator=gen)
    return r * torch.cos(th), r * torch.sin(th)


def layer_params(Bt, L, N, H, seed=0, h0=False, u_dtype=torch.float32, modulus=(0.4, 0.95)):
    """Inputs of one LRU layer on DEVICE (leaves that require grad), keyed as LAYER_ARGS."""
    gen = torch.Generator().manual_seed(seed)
    lr, li = lam_pair(N, gen, *modulus)
    p = dict(
        u=torch.randn(Bt, L, H, generator=gen).to(u_dtype),
        lam_re=lr,
        lam_im=li,
        B_re=torch.randn(N, H, generator=gen) / H**0.5,
        B_im=torch.randn(N, H, generator=gen) / H**0.5,
        C_re=torch.randn(H, N, generator=gen) / N**0.5,
        C_im=torch.randn(H, N, generator=gen) / N**0.5,
        D=torch.randn(H, generator=gen),
        h0_re=torch.randn(Bt, N, generator=gen) if h0 else None,
        h0_im=torch.randn(Bt, N, generator=gen) if h0 else None,
    )
    return {k: (v.to(DEVICE or "cpu").requires_grad_(v.is_floating_point()) if v is not None else None)
            for k, v in p.items()}


def assert_close(actual, expected, rtol=1e-5, name=""):
    """max |a - e| <= rtol * max |e| (plus a tiny floor), i.e. relative to the tensor's scale; no NaN/inf."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (an element the kernel did not write?)"
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= rtol * scale + 1e-7, f"{name}: max abs err {err:.3e} > {rtol:.0e} * scale {scale:.3e}"


def random_linear_grads(outs, inputs, seed=1):
    """Gradients of a random linear functional of all outputs (exercises every output's cotangent)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, live)


def check_layer(p, rtol=1e-5, step_mask=None):
    """fused_lru_forward vs naive_lru_forward: values of (y, hT) and gradients of every input."""
    args = [p[k] for k in LAYER_ARGS]
    y, hT_re, hT_im = K.fused_lru_forward(*args, step_mask=step_mask)
    y_n, hT_re_n, hT_im_n = K.naive_lru_forward(*args, step_mask=step_mask)
    assert y.dtype == p["u"].dtype and hT_re.dtype == torch.float32 and hT_im.dtype == torch.float32
    for a, e, name in ((y, y_n, "y"), (hT_re, hT_re_n, "hT_re"), (hT_im, hT_im_n, "hT_im")):
        assert_close(a, e, rtol, name)
    names = [k for k in LAYER_ARGS if p[k] is not None]
    g_k = random_linear_grads((y, hT_re, hT_im), args)
    g_n = random_linear_grads((y_n, hT_re_n, hT_im_n), args)
    assert len(g_k) == len(names)
    for a, e, name in zip(g_k, g_n, names):
        assert_close(a, e, rtol, "d" + name)


def scan_inputs(Bt, L, N, seed=3, h0=False):
    """Leaves (x_re, x_im, lam_re, lam_im, h0_re, h0_im) of a plain scan on DEVICE (h0 entries None without h0)."""
    gen = torch.Generator().manual_seed(seed)
    lr, li = lam_pair(N, gen)
    xs = [torch.randn(Bt, L, N, generator=gen) for _ in range(2)]
    h0s = [torch.randn(Bt, N, generator=gen) for _ in range(2)] if h0 else [None, None]
    return [t.to(DEVICE).requires_grad_() if t is not None else None for t in [*xs, lr, li, *h0s]]


def check_scan(leaves, rtol=1e-5, step_mask=None):
    """diagonal_scan vs naive_diagonal_scan: values of every state and gradients of every input."""
    out_k = K.diagonal_scan(*leaves, step_mask=step_mask)
    out_n = K.naive_diagonal_scan(*leaves, step_mask=step_mask)
    for a, e, name in zip(out_k, out_n, ["h_re", "h_im"]):
        assert a.dtype == torch.float32
        assert_close(a, e, rtol, name)
    names = [n for n, t in zip(["x_re", "x_im", "lam_re", "lam_im", "h0_re", "h0_im"], leaves) if t is not None]
    for a, e, name in zip(random_linear_grads(out_k, leaves), random_linear_grads(out_n, leaves), names):
        assert_close(a, e, rtol, "d" + name)
