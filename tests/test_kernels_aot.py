"""The Triton kernels compile for real GPU targets (sm_90 H100, sm_80 A100) on this CPU-only machine.

The interpreter tests (test_kernels.py) check the math but never run Triton's GPU compiler, so a kernel that only
fails in lowering (layouts, ``tl.associative_scan``, TF32 ``tl.dot``, register allocation) would pass them. These
tests compile, ahead of time and without a GPU, every kernel launch of a training step of both ops -- with both
scan strategies, with and without an initial state and a step mask, at a shape that is not a multiple of any
block size --
exactly as the launch helpers would on the GPU (``compressm_kernels.aot.compile_only``). The compiler must run in a process without
``TRITON_INTERPRET``, so the work happens in a subprocess.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed: the fused kernels are unavailable")

_COMPILE_SCRIPT = r"""
import json, sys
import torch
import compressm_kernels as K
from compressm_kernels.aot import compile_only

arch, cases, with_scan_op = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
Bt, L, N, H = 3, 145, 37, 19
gen = torch.Generator().manual_seed(0)
leaf = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()
found = []
for strategy in K.STRATEGIES:
    for with_h0, with_mask in cases:
            h0 = (leaf(Bt, N), leaf(Bt, N)) if with_h0 else (None, None)
            mask = torch.rand(Bt, L, generator=gen) > 0.3 if with_mask else None
            lam = (0.5 * torch.rand(N, generator=gen)).requires_grad_(), (0.5 * torch.rand(N, generator=gen)).requires_grad_()
            with K.kernel_settings(strategy=strategy), compile_only(arch) as reports:
                y, hT_re, hT_im = K.fused_lru_forward(
                    leaf(Bt, L, H), *lam, leaf(N, H), leaf(N, H), leaf(H, N), leaf(H, N), leaf(H), *h0, step_mask=mask)
                (y.sum() + hT_re.sum() + hT_im.sum()).backward()
                if with_scan_op:
                    h_re, h_im = K.diagonal_scan(leaf(Bt, L, N), leaf(Bt, L, N), *lam, *h0, step_mask=mask)
                    (h_re.sum() + h_im.sum()).backward()
            found += [r.as_dict() for r in reports]
print("REPORTS" + json.dumps(found))
"""


def _compile(arch, cases, with_scan_op, tmp_path):
    """Compile reports of a training step of the fused op (and of the plain scan op) for both strategies and each
    (with_h0, with_mask) case."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier cache
    args = [str(arch), json.dumps(cases), "1" if with_scan_op else "0"]
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("REPORTS"))
    return json.loads(line[len("REPORTS"):])


def _modes(reports, kernel, *flags):
    return {tuple(r["constexprs"][f] for f in flags) for r in reports if r["kernel"] == kernel}


def test_every_kernel_launch_compiles_for_sm_90(tmp_path):
    """Both ops, both strategies, without (h0, mask) and with both: every flag of every kernel takes both values."""
    reports = _compile(90, [(False, False), (True, True)], True, tmp_path)
    kernels = ("scan_fwd_kernel", "scan_bwd_kernel", "chunk_fwd_kernel", "chunk_bwd_kernel", "lru_out_kernel")
    for kernel in kernels:  # (the short scan over chunk ends also runs with h0 but without the mask)
        assert _modes(reports, kernel, "HAS_H0", "HAS_MASK") >= {(False, False), (True, True)}, kernel
    for r in reports:
        assert r["arch"] == 90
        assert r["constexprs"]["USE_ASSOC"] is True, "the GPU build must use tl.associative_scan"
        if r["kernel"] == "lru_out_kernel":
            assert r["constexprs"]["PRECISION"] == "tf32x3"  # torch's default fp32 matmul policy: no plain TF32
        if r["registers"] is not None:  # cuobjdump ships with triton; None only if it could not run
            assert 0 < r["registers"] <= 255
    # chunked passes: local ends (pass 1; with a mask also the chunk products) and states from the carries (pass 3)
    assert _modes(reports, "chunk_fwd_kernel", "HAS_START", "STORE_STATES", "STORE_END", "STORE_PRODUCT") == {
        (False, False, True, False), (False, False, True, True), (True, True, False, False)}
    assert _modes(reports, "chunk_bwd_kernel", "HAS_CARRY", "STORE_PRODUCT") == {(False, False), (False, True),
                                                                               (True, False)}
    # the short scan over chunk ends runs with per-step factors, the sequential strategy with lam
    assert _modes(reports, "scan_fwd_kernel", "HAS_FACTORS") == {(False,), (True,)}


def test_the_masked_training_step_compiles_for_sm_80(tmp_path):
    """An older target (A100): the fused op's training step with h0 and a mask, both strategies."""
    reports = _compile(80, [(True, True)], False, tmp_path)
    assert {r["kernel"] for r in reports} == {"scan_fwd_kernel", "scan_bwd_kernel", "chunk_fwd_kernel",
                                              "chunk_bwd_kernel", "lru_out_kernel"}
    assert all(r["arch"] == 80 for r in reports)
    assert _modes(reports, "lru_out_kernel", "PRECISION") == {("tf32x3",)}


def test_compile_only_refuses_the_interpreter():
    """In interpreter mode there is no compiler to call: a clear error, not a confusing Triton failure."""
    code = (
        "from compressm_kernels import config\n"
        "from compressm_kernels.aot import compile_only\n"
        "assert config.INTERPRET\n"
        "try:\n"
        "    with compile_only(90):\n"
        "        pass\n"
        "except RuntimeError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "TRITON_INTERPRET" in result.stdout
