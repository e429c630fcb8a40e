#!/usr/bin/env python
"""Compile the scan kernels for a GPU target without a GPU and report their resources and occupancy.

For every benchmark shape of ``bench_scan.py`` this runs the training path of both ops -- the fused layer
(``fused_lru_forward`` forward + backward) and the plain scan (``diagonal_scan`` forward + backward) -- on CPU
tensors inside ``compressm_kernels.aot.compile_only``: each kernel launch is compiled by Triton for ``sm_<arch>``
(PTX, then a cubin by the ptxas bundled with triton) with exactly the constexprs, block sizes and argument
specialisation the launch helpers choose for that shape, and nothing runs. For each launch it prints:

    registers / thread and spilled bytes (cuobjdump -res-usage), shared memory per program,
    programs resident per SM and what limits them (registers, shared memory, warps), warps per SM,
    grid size and waves = programs / (SMs * resident programs per SM).

This is no substitute for timing on the GPU (``bench_scan.py``), but it shows before a GPU is available whether
the kernels compile for the target at all, whether they spill, and whether a launch can fill the machine
(a bandwidth-bound kernel needs many warps in flight per SM and at least one full wave).

Usage (TRITON_INTERPRET must not be set: the interpreter replaces the compiler)::

    python benchmarks/compile_report.py               # sm_90 (H100): benchmarks/results/compile_sm90_<host>_<date>.*
    python benchmarks/compile_report.py --arch 80     # A100
    python benchmarks/compile_report.py --quick       # one small shape (smoke test)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_report.py needs the Triton compiler: unset TRITON_INTERPRET (the interpreter replaces it)")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import compressm_kernels as K  # noqa: E402
from bench_scan import PAPER_SHAPES, QUICK_SHAPES, SWEEP_N  # noqa: E402
from compressm_kernels.aot import compile_only  # noqa: E402

#: Per-SM limits used for the occupancy estimate (CUDA occupancy rules; 1 KiB of shared memory is reserved per
#: resident block on sm_80+, registers are allocated per warp in units of 256).
GPU_LIMITS = {
    80: dict(name="A100", sms=108, regs=65536, shared=164 * 1024, max_warps=64, max_blocks=32),
    90: dict(name="H100 SXM", sms=132, regs=65536, shared=228 * 1024, max_warps=64, max_blocks=32),
    100: dict(name="B200", sms=148, regs=65536, shared=228 * 1024, max_warps=64, max_blocks=32),
}
_REG_UNIT = 256
_RESERVED_SHARED = 1024


def occupancy(registers, num_warps, shared_bytes, limits):
    """Resident programs per SM and the limiting resource, for one kernel on one GPU.

    Args:
        registers: registers per thread (int) or None (unknown: registers are then not a limit).
        num_warps: warps per program. shared_bytes: shared memory per program (dynamic + static).
        limits: a GPU_LIMITS entry.
    Returns:
        (programs per SM, limiter name): limiter is one of "registers", "shared", "warps", "blocks".
    """
    candidates = {"warps": limits["max_warps"] // num_warps, "blocks": limits["max_blocks"]}
    if registers:
        per_warp = math.ceil(registers * 32 / _REG_UNIT) * _REG_UNIT
        candidates["registers"] = (limits["regs"] // per_warp) // num_warps
    candidates["shared"] = limits["shared"] // (shared_bytes + _RESERVED_SHARED)
    limiter = min(candidates, key=candidates.get)
    return candidates[limiter], limiter


def _inputs(Bt, L, N, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = 0.5 + 0.49 * torch.rand(N, generator=g)
    th = 2 * math.pi * torch.rand(N, generator=g)
    leaves = [
        torch.randn(Bt, L, H, generator=g),  # u
        r * torch.cos(th), r * torch.sin(th),  # lam
        torch.randn(N, H, generator=g), torch.randn(N, H, generator=g),  # B
        torch.randn(H, N, generator=g), torch.randn(H, N, generator=g),  # C
        torch.randn(H, generator=g),  # D
    ]
    return [t.requires_grad_() for t in leaves]


def compile_shape(Bt, L, N, H, arch, step_mask=False):
    """Compile every kernel launch of one training step (fwd + bwd) of both ops at one shape for sm_<arch>, with the
    automatic scan strategy (with a left-padding step mask when `step_mask`). Returns rows."""
    rows = []
    u, lam_re, lam_im, B_re, B_im, C_re, C_im, D = _inputs(Bt, L, N, H)
    mask = None
    if step_mask:
        mask = torch.arange(L)[None, :] >= torch.arange(Bt)[:, None] % max(1, L // 4)
    with compile_only(arch) as reports:
        done = 0
        for op in ("fused_lru", "diagonal_scan"):
            if op == "fused_lru":
                y, _, _ = K.fused_lru_forward(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, step_mask=mask)
                phases = {"fwd": len(reports)}
                y.sum().backward()
            else:
                x_re = torch.randn(Bt, L, N).requires_grad_()
                x_im = torch.randn(Bt, L, N).requires_grad_()
                h_re, h_im = K.diagonal_scan(x_re, x_im, lam_re, lam_im, step_mask=mask)
                phases = {"fwd": len(reports)}
                (h_re.sum() + h_im.sum()).backward()
            for i, rep in enumerate(reports[done:], start=done):
                phase = "fwd" if i < phases["fwd"] else "bwd"
                rows.append(dict(shape=dict(Bt=Bt, L=L, N=N, H=H), op=op, phase=phase, **rep.as_dict()))
            done = len(reports)
    return rows


def _annotate(rows, limits):
    for r in rows:
        shared = r["dynamic_shared_bytes"] + (r["static_shared_bytes"] or 0)
        per_sm, limiter = occupancy(r["registers"], r["num_warps"], shared, limits)
        r["shared_bytes"] = shared
        r["programs_per_sm"] = per_sm
        r["limiter"] = limiter
        r["warps_per_sm"] = per_sm * r["num_warps"]
        r["waves"] = r["programs"] / (limits["sms"] * per_sm) if per_sm else float("inf")
    return rows


def _config(r):
    c = r["constexprs"]
    parts = [f"CHUNK={c['CHUNK']}", f"BLOCK_N={c['BLOCK_N']}"]
    if "BLOCK_H" in c:
        parts.append(f"BLOCK_H={c['BLOCK_H']}")
    if c.get("HAS_MASK"):
        parts.append("mask")
    if c.get("HAS_FACTORS"):
        parts.append("per-step factors")
    if c.get("STORE_STATES"):
        parts.append("store h")
    if c.get("STORE_END"):
        parts.append("chunk ends")
    if c.get("STORE_PRODUCT"):
        parts.append("chunk products")
    if c.get("HAS_START") or c.get("HAS_CARRY"):
        parts.append("from carries")
    if c.get("HAS_CARRY") is False:
        parts.append("chunk firsts")
    return " ".join(parts) + f" w={r['num_warps']}"


_COLUMNS = ["shape (Bt,L,N,H)", "op", "phase", "kernel", "config", "grid", "regs", "spill B", "smem KiB",
            "per SM (limit)", "warps/SM", "waves"]


def _cells(r):
    s = r["shape"]
    return [
        f"{s['Bt']},{s['L']},{s['N']},{s['H']}", r["op"], r["phase"], r["kernel"].strip("_"), _config(r),
        "x".join(str(g) for g in r["grid"]), "-" if r["registers"] is None else str(r["registers"]),
        "-" if r["local_bytes"] is None else str(r["local_bytes"]), f"{r['shared_bytes'] / 1024:.1f}",
        f"{r['programs_per_sm']} ({r['limiter']})", str(r["warps_per_sm"]), f"{r['waves']:.2f}",
    ]


def _markdown(meta, rows):
    lines = [
        f"# Kernel compile report: sm_{meta['arch']} ({meta['gpu']}), {meta['date']}",
        "",
        f"Compiled ahead of time on {meta['host']} (no GPU) with triton {meta['triton']}, torch {meta['torch']}: "
        "nothing here was run or timed. Every row is one kernel launch of a training step (forward + backward) at "
        "the benchmark shapes, with the block sizes and specialisation the launch helpers pick. Occupancy uses "
        f"{meta['sms']} SMs, 64K registers and {meta['shared_kib']} KiB shared memory per SM.",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(GPU_LIMITS), help="compute capability x10")
    ap.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    ap.add_argument("--step-mask", action="store_true", help="compile the masked variants (left padding)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    limits = GPU_LIMITS[args.arch]

    if args.quick:
        shapes = list(QUICK_SHAPES)
    else:
        sweep_bt, sweep_l, _, sweep_h = PAPER_SHAPES[1]
        shapes = list(PAPER_SHAPES) + [(sweep_bt, sweep_l, n, sweep_h) for n in SWEEP_N if n != PAPER_SHAPES[1][2]]
    import triton

    meta = dict(
        arch=args.arch, gpu=limits["name"], sms=limits["sms"], shared_kib=limits["shared"] // 1024,
        date=str(_dt.date.today()), host=f"cpu-{platform.machine()}", triton=triton.__version__,
        torch=torch.__version__, quick=args.quick, step_mask=args.step_mask,
    )
    print(f"compiling for sm_{args.arch} ({limits['name']}) on {meta['host']}; nothing runs")
    print("  ".join(_COLUMNS))
    rows = []
    for Bt, L, N, H in shapes:
        shape_rows = _annotate(compile_shape(Bt, L, N, H, args.arch, args.step_mask), limits)
        for r in shape_rows:
            print("  ".join(_cells(r)), flush=True)
        rows += shape_rows

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("_mask" if args.step_mask else "") + ("_quick" if args.quick else "")
    stem = out_dir / f"compile_sm{args.arch}_{meta['host']}_{meta['date']}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, launches=rows), indent=2))
    stem.with_suffix(".md").write_text(_markdown(meta, rows))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
