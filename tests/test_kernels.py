"""Triton scan kernels vs the naive sequential torch reference (values and gradients).

Runs on CPU through triton's interpreter: TRITON_INTERPRET=1 must be set before triton is first imported. It is
set here at the very top, and the CI runner exports it for the whole pytest run (another test module could
import triton first). If the kernels were decorated without the interpreter and there is no GPU, the numeric
tests skip with a clear reason. Shapes are deliberately not powers of two and kept small (2-core CI budget).
"""

import os
import subprocess
import sys

import pytest
import torch  # importing torch does not import triton

if not torch.cuda.is_available():  # CPU: use triton's interpreter (must precede the first triton import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the fused kernels are unavailable")

import compressm_kernels as K  # noqa: E402
from compressm_kernels import lru_scan  # noqa: E402

if lru_scan._INTERPRET:
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


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def _lam(N, gen):
    r = 0.4 + 0.55 * torch.rand(N, generator=gen)  # |lam| in [0.4, 0.95)
    th = 2 * torch.pi * torch.rand(N, generator=gen)
    return (r * torch.cos(th)), (r * torch.sin(th))


def _params(Bt, L, N, H, seed=0, h0=False, u_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lr, li = _lam(N, gen)
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


def _assert_close(actual, expected, rtol=1e-5, name=""):
    """max |a - e| <= rtol * max |e| (plus a tiny floor), i.e. relative to the tensor's scale."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= rtol * scale + 1e-7, f"{name}: max abs err {err:.3e} > {rtol:.0e} * scale {scale:.3e}"


def _grads(outs, inputs, seed=1):
    """Gradients of a random linear functional of all outputs (exercises every output's cotangent)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, live)


# (Bt, L, N, H): L = 1 (single partial chunk), 63 (one chunk minus one), 1000 (many chunks, partial last)
SHAPES = [(3, 1, 37, 7), (3, 63, 37, 7), (2, 1000, 5, 7)]


@pytest.fixture(params=lru_scan.STRATEGIES)
def strategy(request, monkeypatch):
    """Run the test once with each scan strategy (sequential in time, chunk-parallel) forced."""
    monkeypatch.setattr(lru_scan, "_FORCE_STRATEGY", request.param)
    return request.param


# ------------------------------------------------------------------------------------------------------------
# plain diagonal scan
# ------------------------------------------------------------------------------------------------------------
@needs_runtime
@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Bt{}-L{}-N{}".format(*s[:3]))
def test_diagonal_scan_values_and_grads(shape, h0, strategy):
    Bt, L, N, _ = shape
    gen = torch.Generator().manual_seed(3)
    lr, li = _lam(N, gen)
    xs = [torch.randn(Bt, L, N, generator=gen) for _ in range(2)]
    h0s = [torch.randn(Bt, N, generator=gen) for _ in range(2)] if h0 else [None, None]
    leaves = [t.to(DEVICE).requires_grad_() if t is not None else None for t in [*xs, lr, li, *h0s]]
    out_k = K.diagonal_scan(*leaves)
    out_n = K.naive_diagonal_scan(*leaves)
    for a, e, nm in zip(out_k, out_n, ["h_re", "h_im"]):
        assert a.dtype == torch.float32
        _assert_close(a, e, name=nm)
    g_k = _grads(out_k, leaves)
    g_n = _grads(out_n, leaves)
    names = [n for n, t in zip(["x_re", "x_im", "lam_re", "lam_im", "h0_re", "h0_im"], leaves) if t is not None]
    for a, e, nm in zip(g_k, g_n, names):
        _assert_close(a, e, name="d" + nm)


@needs_runtime
def test_diagonal_scan_strided_inputs():
    """Views with different strides for re / im (slices, broadcasts, transposes) and bf16 x."""
    gen = torch.Generator().manual_seed(4)
    lr, li = _lam(6, gen)
    big = torch.randn(3, 20, 13, generator=gen)
    x_re = big[:, 2:19, 1:7]  # non-contiguous slice
    x_im = torch.randn(17, 3, 6, generator=gen).transpose(0, 1)  # different strides
    h0 = torch.randn(3, 6, generator=gen)
    leaves = [x_re.to(DEVICE).requires_grad_(), x_im.to(DEVICE).requires_grad_(), lr.to(DEVICE), li.to(DEVICE)]
    out_k = K.diagonal_scan(*leaves, h0.to(DEVICE), h0.to(DEVICE))
    out_n = K.naive_diagonal_scan(*leaves, h0.to(DEVICE), h0.to(DEVICE))
    for a, e in zip(out_k, out_n):
        _assert_close(a, e, name="h")
    for a, e in zip(_grads(out_k, leaves[:2]), _grads(out_n, leaves[:2])):
        _assert_close(a, e, name="dx")
    xb = x_re.to(DEVICE, torch.bfloat16)
    out_k = K.diagonal_scan(xb, xb, lr.to(DEVICE), li.to(DEVICE))
    out_n = K.naive_diagonal_scan(xb, xb, lr.to(DEVICE), li.to(DEVICE))
    for a, e in zip(out_k, out_n):
        _assert_close(a, e, name="h(bf16 x)")


# ------------------------------------------------------------------------------------------------------------
# fused LRU layer
# ------------------------------------------------------------------------------------------------------------
_ARGS = ["u", "lam_re", "lam_im", "B_re", "B_im", "C_re", "C_im", "D", "h0_re", "h0_im"]


def _check_fused(p, rtol=1e-5):
    args = [p[k] for k in _ARGS]
    y, hT_re, hT_im = K.fused_lru_forward(*args)
    y_n, hT_re_n, hT_im_n = K.naive_lru_forward(*args)
    assert y.dtype == p["u"].dtype and hT_re.dtype == torch.float32 and hT_im.dtype == torch.float32
    _assert_close(y, y_n, rtol, "y")
    _assert_close(hT_re, hT_re_n, rtol, "hT_re")
    _assert_close(hT_im, hT_im_n, rtol, "hT_im")
    g_k = _grads((y, hT_re, hT_im), args)
    g_n = _grads((y_n, hT_re_n, hT_im_n), args)
    names = [k for k in _ARGS if p[k] is not None]
    assert len(g_k) == len(names)
    for a, e, nm in zip(g_k, g_n, names):
        _assert_close(a, e, rtol, "d" + nm)


@needs_runtime
@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Bt{}-L{}-N{}-H{}".format(*s))
def test_fused_lru_values_and_grads(shape, h0, strategy):
    _check_fused(_params(*shape, h0=h0))


@needs_runtime
def test_fused_lru_wide_and_small_chunks(monkeypatch, strategy):
    """H > BLOCK_H and N > BLOCK_N (several blocks each), and a small chunk so L=45 spans 3 chunks, the last partial."""
    monkeypatch.setattr(lru_scan, "_scan_config", lambda N: (16, 16, 4))
    monkeypatch.setattr(lru_scan, "_out_config", lambda N, H: (16, 16, 16, 4))
    _check_fused(_params(2, 45, 37, 19, seed=5, h0=True))


@needs_runtime
def test_associative_scan_path(monkeypatch, strategy):
    """The compiled-GPU chunk scan (tl.associative_scan) on a tiny problem; the interpreter defaults to the
    doubling scan because its associative_scan is elementwise-slow."""
    monkeypatch.setattr(lru_scan, "_FORCE_ASSOC_SCAN", True)
    monkeypatch.setattr(lru_scan, "_scan_config", lambda N: (16, 16, 4))
    monkeypatch.setattr(lru_scan, "_out_config", lambda N, H: (16, 16, 16, 4))
    _check_fused(_params(1, 21, 3, 5, seed=7, h0=True))


def test_automatic_strategy_goes_chunked_when_the_sequential_grid_cannot_fill_the_gpu(monkeypatch):
    """Sequential grid = cdiv(N, BLOCK_N) * Bt programs; chunked below two per SM, sequential from there on."""
    monkeypatch.setattr(lru_scan, "_multiprocessor_count", lambda device: 132)
    cuda = torch.device("cuda")
    block_n = lru_scan._scan_config(256)[1]
    assert lru_scan._scan_strategy(16, 50, cuda) == "chunked"  # 50 programs: a truncated layer
    assert lru_scan._scan_strategy(256, 50, cuda) == "sequential"  # 400 programs
    batch_at_threshold = 2 * 132 // (256 // block_n)
    assert lru_scan._scan_strategy(256, batch_at_threshold, cuda) == "sequential"
    assert lru_scan._scan_strategy(256, batch_at_threshold - 1, cuda) == "chunked"
    monkeypatch.setattr(lru_scan, "_FORCE_STRATEGY", "chunked")
    assert lru_scan._scan_strategy(256, 50, cuda) == "chunked"
    monkeypatch.setattr(lru_scan, "_FORCE_STRATEGY", "parallel")
    with pytest.raises(ValueError, match="_FORCE_STRATEGY must be one of"):
        lru_scan._scan_strategy(256, 50, cuda)


@needs_runtime
def test_bf16_input():
    p = _params(3, 63, 37, 7, seed=11, h0=True, u_dtype=torch.bfloat16)
    args = [p[k] for k in _ARGS]
    y, hT_re, hT_im = K.fused_lru_forward(*args)
    y_n, hT_re_n, hT_im_n = K.naive_lru_forward(*args)  # fp32 math on the same bf16 input
    assert y.dtype == torch.bfloat16
    _assert_close(y, y_n, 1e-2, "y")  # bf16 output rounding only
    _assert_close(hT_re, hT_re_n, 1e-5, "hT_re")  # state is fp32 throughout
    _assert_close(hT_im, hT_im_n, 1e-5, "hT_im")
    (gu,) = torch.autograd.grad(y.float().sum() + hT_re.sum(), [p["u"]])
    (gu_n,) = torch.autograd.grad(y_n.float().sum() + hT_re_n.sum(), [p["u"]])
    assert gu.dtype == torch.bfloat16
    _assert_close(gu, gu_n, 1e-2, "du")


@needs_runtime
def test_opcheck_registration():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration of the fused op."""
    p = _params(2, 5, 3, 4, seed=13, h0=True)
    args = tuple(p[k] for k in _ARGS)
    torch.library.opcheck(
        torch.ops.compressm_kernels.lru_fwd.default, args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@needs_runtime
def test_torch_compile_fullgraph():
    """The custom ops trace into one graph (forward and backward) and give the eager results."""
    p = _params(2, 10, 3, 4, seed=17, h0=True)
    args = [p[k] for k in _ARGS]

    def f(*a):
        y, hT_re, hT_im = K.fused_lru_forward(*a)
        h_re, _ = K.diagonal_scan(y[..., :1].expand(-1, -1, 3), hT_re[:, None].expand(-1, 10, -1), a[1], a[2])
        return y.sin().sum() + hT_re.sum() - hT_im.sum() + h_re.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss_c = compiled(*args)
    g_c = torch.autograd.grad(loss_c, [a for a in args if a is not None])
    loss_e = f(*args)
    g_e = torch.autograd.grad(loss_e, [a for a in args if a is not None])
    _assert_close(loss_c, loss_e, 1e-6, "loss")
    for a, e in zip(g_c, g_e):
        _assert_close(a, e, 1e-6, "grad")


@pytest.mark.skipif(DEVICE is not None, reason="kernels run in this process")
def test_kernels_in_interpreter_subprocess():
    """compressm_kernels was imported (by another test module) before TRITON_INTERPRET=1 was set, and there is no
    GPU: the numeric tests above skipped here, so run this file again in a fresh interpreter-mode process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(lru_scan, "_INTERPRET", False)
    p = _params(2, 4, 3, 5)
    p = {k: v.detach().cpu() if v is not None else None for k, v in p.items()}
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        K.fused_lru_forward(*[p[k] for k in _ARGS])
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="use the torch path for CPU"):
        K.diagonal_scan(x, x, p["lam_re"], p["lam_im"])


def test_without_triton_raises(monkeypatch):
    monkeypatch.setattr(lru_scan, "TRITON_AVAILABLE", False)
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="needs triton"):
        K.diagonal_scan(x, x, torch.rand(3), torch.rand(3))


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, compressm_kernels as K\n"
        "assert K.TRITON_AVAILABLE is False\n"
        "x = torch.randn(1, 3, 2); l = torch.full((2,), 0.5)\n"
        "K.naive_diagonal_scan(x, x, l, l)\n"
        "try:\n    K.diagonal_scan(x, x, l, l)\nexcept RuntimeError as e:\n    print('OK', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout and "triton" in res.stdout


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p.update(u=p["u"][0]), "u must be 3-D"),
        (lambda p: p.update(B_re=p["B_re"][:, :-1]), r"B_re must have shape \(3, 5\)"),
        (lambda p: p.update(C_im=p["C_im"].t()), r"C_im must have shape \(5, 3\)"),
        (lambda p: p.update(D=p["D"][:-1]), r"D must have shape \(5,\)"),
        (lambda p: p.update(lam_im=p["lam_im"][:2]), r"lam_im must have shape \(3,\)"),
        (lambda p: p.update(h0_re=torch.zeros(2, 3)), "must be given together"),
        (lambda p: p.update(h0_re=torch.zeros(2, 4), h0_im=torch.zeros(2, 4)), r"h0_re must have shape \(2, 3\)"),
        (lambda p: p.update(u=p["u"].to(torch.int32)), "u must have dtype"),
        (lambda p: p.update(lam_re=p["lam_re"].double()), "lam_re must have dtype"),
    ],
)
def test_validation_errors(mutate, match):
    p = {k: v.detach() if v is not None else None for k, v in _params(2, 4, 3, 5).items()}
    mutate(p)
    with pytest.raises(ValueError, match=match):
        K.fused_lru_forward(*[p[k] for k in _ARGS])


def test_scan_validation_errors():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="x_re must be 3-D"):
        K.diagonal_scan(x[0], x[0], torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match=r"x_im must have shape \(2, 4, 3\)"):
        K.diagonal_scan(x, x[:, :2], torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match=r"lam_re must have shape \(3,\)"):
        K.diagonal_scan(x, x, torch.rand(4), torch.rand(3))
    with pytest.raises(ValueError, match="non-empty"):
        K.diagonal_scan(x[:, :0], x[:, :0], torch.rand(3), torch.rand(3))
