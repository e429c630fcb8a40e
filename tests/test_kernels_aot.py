"""The Triton kernels compile for real GPU targets (sm_90 H100, sm_80 A100) on this CPU-only machine.

The interpreter tests (test_kernels.py) check the math but never run Triton's GPU compiler, so a kernel that only
fails in lowering (layouts, ``tl.associative_scan``, TF32 ``tl.dot``, register allocation) would pass them. These
tests compile, ahead of time and without a GPU, every kernel launch of a training step of both ops -- with both
scan strategies, with and without an initial state, at a shape that is not a multiple of any block size --
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
from compressm_kernels import lru_scan
from compressm_kernels.aot import compile_only

arch = int(sys.argv[1])
Bt, L, N, H = 3, 145, 37, 19
gen = torch.Generator().manual_seed(0)
leaf = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()
found = []
for strategy, with_h0 in ((s, h) for s in lru_scan.STRATEGIES for h in (False, True)):
    lru_scan._FORCE_STRATEGY = strategy
    h0 = (leaf(Bt, N), leaf(Bt, N)) if with_h0 else (None, None)
    lam = (0.5 * torch.rand(N, generator=gen)).requires_grad_(), (0.5 * torch.rand(N, generator=gen)).requires_grad_()
    with compile_only(arch) as reports:
        y, hT_re, hT_im = K.fused_lru_forward(
            leaf(Bt, L, H), *lam, leaf(N, H), leaf(N, H), leaf(H, N), leaf(H, N), leaf(H), *h0)
        (y.sum() + hT_re.sum() + hT_im.sum()).backward()
        h_re, h_im = K.diagonal_scan(leaf(Bt, L, N), leaf(Bt, L, N), *lam, *h0)
        (h_re.sum() + h_im.sum()).backward()
    found += [r.as_dict() for r in reports]
print("REPORTS" + json.dumps(found))
"""


def _compile(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier cache
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("REPORTS"))
    return json.loads(line[len("REPORTS"):])


@pytest.mark.parametrize("arch, precision", [(90, "tf32x3"), (80, "tf32x3")], ids=["sm_90", "sm_80"])
def test_every_kernel_launch_compiles_for_the_gpu(arch, precision, tmp_path):
    reports = _compile(arch, tmp_path)
    launched = {(r["kernel"], r["constexprs"].get("HAS_H0")) for r in reports}
    kernels = ("_scan_fwd_kernel", "_scan_bwd_kernel", "_chunk_fwd_kernel", "_chunk_bwd_kernel", "_lru_out_kernel")
    assert launched == {(k, h0) for k in kernels for h0 in (False, True)}
    for r in reports:
        assert r["arch"] == arch
        assert r["constexprs"]["USE_ASSOC"] is True, "the GPU build must use tl.associative_scan"
        if r["kernel"] == "_lru_out_kernel":
            assert r["constexprs"]["PRECISION"] == precision  # torch's default fp32 matmul policy: no plain TF32
        if r["registers"] is not None:  # cuobjdump ships with triton; None only if it could not run
            assert 0 < r["registers"] <= 255
    # chunked passes: local ends (pass 1) and states from the carries (pass 3), forward and reverse
    chunk_fwd_modes = {(r["constexprs"]["HAS_START"], r["constexprs"]["STORE_H"], r["constexprs"]["STORE_END"])
                       for r in reports if r["kernel"] == "_chunk_fwd_kernel"}
    assert chunk_fwd_modes == {(False, False, True), (True, True, False)}
    assert {r["constexprs"]["HAS_CARRY"] for r in reports if r["kernel"] == "_chunk_bwd_kernel"} == {False, True}


def test_compile_only_refuses_the_interpreter():
    """In interpreter mode there is no compiler to call: a clear error, not a confusing Triton failure."""
    code = (
        "import compressm_kernels.lru_scan as ls\n"
        "from compressm_kernels.aot import compile_only\n"
        "assert ls._INTERPRET\n"
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
