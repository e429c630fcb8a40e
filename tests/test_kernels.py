"""Triton scan kernels vs the naive sequential torch reference (values and gradients), settings, registration.

On CPU the kernels run in triton's interpreter, with CUDA compiled (see kernel_cases.py); buffers the kernels write
are NaN-poisoned. If the kernels were decorated without the interpreter and there is no GPU, the numeric tests
skip and one test reruns this file in an interpreter-mode subprocess. Shapes are deliberately not powers of two and
kept small (2-core CI budget); the step-mask contract is in test_kernels_mask.py.
"""

import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import (  # noqa: F401  (strategy is a fixture)
    DEVICE,
    LAYER_ARGS,
    SMALL_TILES,
    assert_close,
    check_layer,
    check_scan,
    layer_params,
    needs_runtime,
    random_linear_grads,
    scan_inputs,
    strategy,
)

import compressm_kernels as K
from compressm_kernels import config

# (Bt, L, N, H): L = 1 (single partial chunk), 63 (one chunk minus one), 200 (several chunks, partial last; the
# hard-mode test runs 3000 steps); N = 37 spans two state blocks, N = 5 and H = 7 are below every block size
SHAPES = [(3, 1, 37, 7), (3, 63, 37, 7), (2, 200, 5, 7)]


# ------------------------------------------------------------------------------------------------------------
# plain diagonal scan
# ------------------------------------------------------------------------------------------------------------
@needs_runtime
@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Bt{}-L{}-N{}".format(*s[:3]))
def test_diagonal_scan_values_and_grads(shape, h0, strategy):
    Bt, L, N, _ = shape
    check_scan(scan_inputs(Bt, L, N, h0=h0))


@needs_runtime
def test_diagonal_scan_strided_and_bf16_inputs():
    """Views with different strides for re / im (slices, transposes), and bf16 x."""
    gen = torch.Generator().manual_seed(4)
    lr, li = (0.9 * torch.rand(6, generator=gen) for _ in range(2))
    big = torch.randn(3, 20, 13, generator=gen)
    x_re = big[:, 2:19, 1:7]  # non-contiguous slice
    x_im = torch.randn(17, 3, 6, generator=gen).transpose(0, 1)  # different strides
    h0 = torch.randn(3, 6, generator=gen).to(DEVICE)
    leaves = [x_re.to(DEVICE).requires_grad_(), x_im.to(DEVICE).requires_grad_(), lr.to(DEVICE), li.to(DEVICE)]
    out_k = K.diagonal_scan(*leaves, h0, h0)
    out_n = K.naive_diagonal_scan(*leaves, h0, h0)
    for a, e in zip(out_k, out_n):
        assert_close(a, e, name="h")
    for a, e in zip(random_linear_grads(out_k, leaves[:2]), random_linear_grads(out_n, leaves[:2])):
        assert_close(a, e, name="dx")
    xb = x_re.to(DEVICE, torch.bfloat16)
    for a, e in zip(K.diagonal_scan(xb, xb, leaves[2], leaves[3]), K.naive_diagonal_scan(xb, xb, leaves[2], leaves[3])):
        assert_close(a, e, name="h(bf16 x)")


# ------------------------------------------------------------------------------------------------------------
# fused LRU layer
# ------------------------------------------------------------------------------------------------------------
@needs_runtime
@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Bt{}-L{}-N{}-H{}".format(*s))
def test_fused_lru_values_and_grads(shape, h0, strategy):
    check_layer(layer_params(*shape, h0=h0))


@needs_runtime
def test_fused_lru_wide_and_small_chunks(strategy):
    """H > BLOCK_H and N > BLOCK_N (several blocks each), and a small chunk so L=45 spans 3 chunks, the last partial."""
    with K.kernel_settings(**SMALL_TILES):
        check_layer(layer_params(2, 45, 37, 19, seed=5, h0=True))


@needs_runtime
def test_associative_scan_path(strategy):
    """The compiled-GPU chunk scan (tl.associative_scan) on a tiny problem; the interpreter defaults to the
    doubling scan because its associative_scan is elementwise-slow."""
    with K.kernel_settings(use_associative_scan=True, **SMALL_TILES):
        check_layer(layer_params(1, 21, 3, 5, seed=7, h0=True))


@needs_runtime
@pytest.mark.parametrize("op, strategy", [("diagonal_scan", "sequential"), ("diagonal_scan", "chunked"),
                                          ("fused_lru_forward", "sequential")], indirect=["strategy"])
def test_near_unit_circle_over_long_sequences(op, strategy):
    """Hard mode: |lam| up to 0.9999 (the model initialises up to 0.999) over 3000 steps with an initial state (and
    for the layer a step mask with left padding and a long hole). Both the kernel and the fp32 naive loop are
    measured against the same naive loop in float64; the kernel must stay within a small factor of the fp32 loop's
    own error, in values and in gradients (rounding that compounds from chunk to chunk would not). The fused
    forward is chunk-parallel whatever the strategy, so one strategy covers it."""
    Bt, L, N, H = 1, 3000, 8, 3
    modulus = torch.tensor([0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.9999, 0.99])
    phase = torch.tensor([0.0, 0.1, 3.0, 1.0, 2.0, 1e-3, 2.5, -1.2])
    p = layer_params(Bt, L, N, H, seed=19, h0=True)
    p["lam_re"] = (modulus * torch.cos(phase)).to(DEVICE).requires_grad_()
    p["lam_im"] = (modulus * torch.sin(phase)).to(DEVICE).requires_grad_()
    mask = None
    if op == "diagonal_scan":
        gen = torch.Generator().manual_seed(23)
        x = [torch.randn(Bt, L, N, generator=gen).to(DEVICE).requires_grad_() for _ in range(2)]
        leaves = [*x, p["lam_re"], p["lam_im"], p["h0_re"], p["h0_im"]]
        kernel, naive = K.diagonal_scan, K.naive_diagonal_scan
    else:
        leaves = [p[k] for k in LAYER_ARGS]
        kernel, naive = K.fused_lru_forward, K.naive_lru_forward
        mask = torch.ones(Bt, L, dtype=torch.bool, device=DEVICE)
        mask[:, :37] = False
        mask[:, 1500:1800] = False
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    results = {}
    for name, fn, args in (("kernel", kernel, leaves), ("fp32 loop", naive, leaves), ("fp64", naive, exact_leaves)):
        outs = fn(*args, step_mask=mask)
        results[name] = [o.detach().double().cpu() for o in outs] + [
            g.double().cpu() for g in random_linear_grads(outs, args)]
    for i, exact in enumerate(results["fp64"]):
        scale = exact.abs().max().item()
        kernel_error = (results["kernel"][i] - exact).abs().max().item() / scale
        loop_error = (results["fp32 loop"][i] - exact).abs().max().item() / scale
        assert kernel_error <= 4 * loop_error + 2e-7, (i, kernel_error, loop_error)


@needs_runtime
def test_fused_forward_beyond_several_chunk_end_tiles():
    """8192 steps at |lam| up to 0.9999: the fused forward's chunk-end pass carries fp32 factor products between
    tiles of 2048 steps (kernels/README.md); its error against float64 must stay that of an fp32 sequential loop."""
    p = layer_params(1, 8192, 5, 7, seed=3, modulus=(0.999, 0.9999))
    args = [p[k] for k in LAYER_ARGS]
    with torch.no_grad():
        kernel = K.fused_lru_forward(*args)
        loop = K.naive_lru_forward(*args)
        exact = K.naive_lru_forward(*[a.double() if a is not None else None for a in args])
    for name, k, n, e in zip(("y", "hT_re", "hT_im"), kernel, loop, exact):
        scale = e.abs().max().item()
        kernel_error = (k.double().cpu() - e.cpu()).abs().max().item() / scale
        loop_error = (n.double().cpu() - e.cpu()).abs().max().item() / scale
        assert kernel_error <= 4 * loop_error + 2e-7, (name, kernel_error, loop_error)


@needs_runtime
def test_autocast_does_not_lower_the_ops_precision():
    """Under torch.autocast (a Trainer with bf16=True) the fused op still computes in fp32: autocast reaches into a
    custom op's implementation, where it would run the state projection B u as a bf16 matmul (an error of about 1e-2
    here instead of 1e-6), and the backward, which runs outside autocast, would differentiate another forward."""
    p = layer_params(2, 40, 37, 7, seed=12, h0=True)
    args = [p[k] for k in LAYER_ARGS]
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
        outs = K.fused_lru_forward(*args)
    expected = K.naive_lru_forward(*args)
    assert outs[0].dtype == torch.float32
    for a, e, name in zip(outs, expected, ("y", "hT_re", "hT_im")):
        assert_close(a, e, 1e-5, name)
    names = [k for k in LAYER_ARGS if p[k] is not None]
    for a, e, name in zip(random_linear_grads(outs, args), random_linear_grads(expected, args), names):
        assert_close(a, e, 1e-4, f"d{name}")


@needs_runtime
def test_bf16_input():
    p = layer_params(3, 63, 37, 7, seed=11, h0=True, u_dtype=torch.bfloat16)
    args = [p[k] for k in LAYER_ARGS]
    y, hT_re, hT_im = K.fused_lru_forward(*args)
    y_n, hT_re_n, hT_im_n = K.naive_lru_forward(*args)  # fp32 math on the same bf16 input
    assert y.dtype == torch.bfloat16
    assert_close(y, y_n, 1e-2, "y")  # bf16 output rounding only
    assert_close(hT_re, hT_re_n, 1e-5, "hT_re")  # state is fp32 throughout
    assert_close(hT_im, hT_im_n, 1e-5, "hT_im")
    (gu,) = torch.autograd.grad(y.float().sum() + hT_re.sum(), [p["u"]])
    (gu_n,) = torch.autograd.grad(y_n.float().sum() + hT_re_n.sum(), [p["u"]])
    assert gu.dtype == torch.bfloat16
    assert_close(gu, gu_n, 1e-2, "du")


# ------------------------------------------------------------------------------------------------------------
# settings: strategy rule, NaN poisoning
# ------------------------------------------------------------------------------------------------------------
def test_automatic_strategy_is_sequential_and_chunked_only_on_request():
    """On an H100 the sequential scan was faster at every measured shape (Bt 1 to 128), so the automatic choice is
    sequential whatever the grid; `strategy="chunked"` forces the other."""
    assert config.scan_strategy(K.KernelSettings()) == "sequential"
    forced = K.KernelSettings(strategy="chunked")
    assert config.scan_strategy(forced) == "chunked"
    with pytest.raises(ValueError, match="strategy must be one of"):
        K.KernelSettings(strategy="parallel")


def test_kernel_settings_nest_and_restore():
    outer = K.current_settings()
    with K.kernel_settings(strategy="chunked") as chunked:
        assert K.current_settings() is chunked and chunked.strategy == "chunked"
        with K.kernel_settings(use_associative_scan=True):
            assert K.current_settings().strategy == "chunked" and K.current_settings().use_associative_scan
        assert K.current_settings() is chunked
    assert K.current_settings() == outer


@needs_runtime
def test_poisoned_outputs_expose_an_element_no_kernel_wrote():
    """The test suite runs with NaN-poisoned kernel buffers (conftest). Skipping the launch of the fused output
    kernel leaves y all NaN with poisoning on, so any comparison of it fails; with every launch run, y is finite."""
    assert K.current_settings().poison_outputs, "conftest.py must set COMPRESSM_KERNELS_POISON=1"
    p = layer_params(2, 20, 5, 3, seed=29)
    args = [p[k].detach() if p[k] is not None else None for k in LAYER_ARGS]

    def skip_output_kernel(kernel, grid, kwargs):
        if kernel.fn.__name__ != "lru_out_kernel":
            kernel[grid](**kwargs)

    with K.kernel_settings(launcher=skip_output_kernel):
        y, hT_re, _ = K.fused_lru_forward(*args)
    assert torch.isnan(y).all() and torch.isfinite(hT_re).all()
    assert torch.isfinite(K.fused_lru_forward(*args)[0]).all()


@needs_runtime
def test_backward_runs_with_the_settings_of_its_forward():
    """Settings in force at the forward (here a launcher that counts launches) also apply to its backward, even
    when backward() runs outside the block."""
    launched = []

    def counting(kernel, grid, kwargs):
        launched.append(kernel.fn.__name__)
        kernel[grid](**kwargs)

    p = layer_params(2, 9, 3, 4, seed=31)
    with K.kernel_settings(launcher=counting, strategy="sequential"):
        y, _, _ = K.fused_lru_forward(*[p[k] for k in LAYER_ARGS])
    forward_launches = len(launched)
    y.sum().backward()
    assert "scan_bwd_kernel" in launched[forward_launches:]


# ------------------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------------------
@needs_runtime
def test_opcheck_registration():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration of the fused op."""
    p = layer_params(2, 5, 3, 4, seed=13, h0=True)
    mask = torch.tensor([[True, False, True, True, True], [False, False, True, True, False]], device=DEVICE)
    for step_mask in (None, mask):
        args = (*[p[k] for k in LAYER_ARGS], step_mask)
        torch.library.opcheck(
            torch.ops.compressm_kernels.lru_fwd.default, args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@needs_runtime
def test_torch_compile_fullgraph():
    """The custom ops trace into one graph (forward and backward) and give the eager results."""
    p = layer_params(2, 10, 3, 4, seed=17, h0=True)
    args = [p[k] for k in LAYER_ARGS]
    mask = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False

    def f(*a):
        y, hT_re, hT_im = K.fused_lru_forward(*a, step_mask=mask)
        h_re, _ = K.diagonal_scan(y[..., :1].expand(-1, -1, 3), hT_re[:, None].expand(-1, 10, -1), a[1], a[2])
        return y.sin().sum() + hT_re.sum() - hT_im.sum() + h_re.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss_c = compiled(*args)
    g_c = torch.autograd.grad(loss_c, [a for a in args if a is not None])
    loss_e = f(*args)
    g_e = torch.autograd.grad(loss_e, [a for a in args if a is not None])
    assert_close(loss_c, loss_e, 1e-6, "loss")
    for a, e in zip(g_c, g_e):
        assert_close(a, e, 1e-6, "grad")


@pytest.mark.skipif(DEVICE is not None, reason="kernels run in this process")
def test_kernels_in_interpreter_subprocess():
    """compressm_kernels was imported (by another test module) before TRITON_INTERPRET=1 was set, and there is no
    GPU: the numeric tests above skipped here, so run the kernel test files again in an interpreter-mode process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, name) for name in ("test_kernels.py", "test_kernels_mask.py")]
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", False)
    p = {k: v.detach().cpu() if v is not None else None for k, v in layer_params(2, 4, 3, 5).items()}
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        K.fused_lru_forward(*[p[k] for k in LAYER_ARGS])
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="use the torch path for CPU"):
        K.diagonal_scan(x, x, p["lam_re"], p["lam_im"])


def test_without_triton_raises(monkeypatch):
    monkeypatch.setattr(config, "TRITON_AVAILABLE", False)
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
        (lambda p: p.update(step_mask=torch.ones(2, 5, dtype=torch.bool)), r"step_mask must have shape \(2, 4\)"),
        (lambda p: p.update(step_mask=torch.ones(2, 4)), "step_mask must be a bool"),
    ],
)
def test_validation_errors(mutate, match):
    p = {k: v.detach().cpu() if v is not None else None for k, v in layer_params(2, 4, 3, 5).items()}
    p["step_mask"] = None
    mutate(p)
    with pytest.raises(ValueError, match=match):
        K.fused_lru_forward(*[p[k] for k in LAYER_ARGS], step_mask=p["step_mask"])


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
    with pytest.raises(ValueError, match=r"step_mask must have shape \(2, 4\)"):
        K.diagonal_scan(x, x, torch.rand(3), torch.rand(3), step_mask=torch.ones(4, 2, dtype=torch.bool))
