#!/usr/bin/env python
"""Measure the kernels' launch settings at the training shapes, to choose the defaults in
kernels/compressm_kernels/config.py.

GPU time is short (one call of benchmarks/gpu_check.sh), so this script tunes in the same call that benchmarks:
for each shape it times every candidate tile of the scan kernels (``ScanBlocks``: chunk, block_n, num_warps) under
each scan strategy (sequential / chunked), then every candidate tile of the fused output kernel (``OutputBlocks``)
with the best scan tile, and records which choice was fastest next to the current default. Nothing is changed in
the package: the defaults are set by hand from the results file.

What is timed (CUDA events, median of --repeats after --warmup calls):

    scan      compressm_kernels.diagonal_scan forward + backward on x of (Bt, L, N) complex, with the bandwidth of
              its least traffic (40 bytes per complex element: x, h, dh read/written; see bench_scan.byte_model)
    layer     compressm_kernels.fused_lru_forward forward + backward on u of (Bt, L, H), the op a model layer runs

Every candidate's outputs (and the scan's input gradients) are compared with the default tile's: a candidate whose
results differ by more than float32 round-off is reported as wrong and never chosen.

Results: ``<out-dir>/tune_<device>_<date>.{json,md}``, rewritten after every measurement, so a run stopped by a
time cap still leaves what it measured. ``--budget`` (seconds) stops starting new candidates once spent.

    python benchmarks/tune_kernels.py                    # on a GPU
    python benchmarks/tune_kernels.py --dry-run          # CPU, triton interpreter, tiny shapes: checks the code
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

import compressm_kernels as K  # noqa: E402
from bench_scan import _time as median_seconds  # noqa: E402  (benchmarks/ is on sys.path above)
from bench_scan import hbm_peak_gbps  # noqa: E402
from compressm_kernels import config as kernel_config  # noqa: E402

NO_BUDGET = float("inf")  # bench_scan's timer stops after a time budget; here every repeat runs

#: (Bt, L, N, H): the end-to-end benchmark's layer (hidden 768, sequence 2048, batch 128: the largest that fits an
#: H100 in bench_train.py) at full size and at reduced sizes, and a batch-1 long scan (the sequential grid's worst case).
TRAINING_SHAPES = [(128, 2048, 256, 768), (128, 2048, 64, 768), (128, 2048, 16, 768), (1, 8192, 64, 768)]
DRY_SHAPES = [(2, 40, 12, 16)]

#: Candidate scan tiles (chunk, block_n, num_warps), the current default first.
SCAN_CANDIDATES = [(64, 32, 4), (32, 32, 4), (128, 32, 4), (64, 16, 4), (64, 64, 4), (64, 32, 2), (64, 32, 8),
                   (32, 16, 2), (128, 64, 8)]
DRY_SCAN_CANDIDATES = [(16, 16, 4), (32, 16, 4)]

#: Candidate output tiles (chunk, block_n, block_h, num_warps); None = the current default for the shape.
OUTPUT_CANDIDATES = [None, (64, 32, 64, 4), (32, 32, 128, 4), (32, 32, 128, 8), (64, 32, 128, 8), (32, 16, 64, 4),
                     (64, 16, 128, 4)]
DRY_OUTPUT_CANDIDATES = [None, (16, 16, 16, 4)]

SCAN_BYTES_PER_ELEMENT = 40  # fwd: x read 8 + h written 8; bwd: dh read 8 + h read 8 + dx written 8


def _scan_inputs(Bt, L, N, device, seed=0):
    """x pair (Bt, L, N) fp32 with grad, lam pair (N,) fp32 with |lam| in [0.5, 0.999], cotangent pair."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    radius = 0.5 + 0.499 * torch.rand(N, generator=g)
    angle = 2 * math.pi * torch.rand(N, generator=g)
    x = [torch.randn(Bt, L, N, generator=g).to(device).requires_grad_() for _ in range(2)]
    lam = [(radius * torch.cos(angle)).to(device), (radius * torch.sin(angle)).to(device)]
    dh = [torch.randn(Bt, L, N, generator=g).to(device) for _ in range(2)]
    return x, lam, dh


def _layer_inputs(Bt, L, N, H, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    radius = 0.5 + 0.499 * torch.rand(N, generator=g)
    angle = 2 * math.pi * torch.rand(N, generator=g)
    tensors = [
        torch.randn(Bt, L, H, generator=g),
        radius * torch.cos(angle), radius * torch.sin(angle),
        torch.randn(N, H, generator=g) / math.sqrt(H), torch.randn(N, H, generator=g) / math.sqrt(H),
        torch.randn(H, N, generator=g) / math.sqrt(N), torch.randn(H, N, generator=g) / math.sqrt(N),
        torch.randn(H, generator=g),
    ]
    leaves = [t.to(device).requires_grad_() for t in tensors]
    dy = torch.randn(Bt, L, H, generator=g).to(device)
    return leaves, dy


def _relative_error(a, b):
    scale = max(float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def _run_scan(x, lam):
    return K.diagonal_scan(x[0], x[1], lam[0], lam[1])


def _scan_results(x, lam, dh):
    for t in x:
        t.grad = None
    h = _run_scan(x, lam)
    torch.autograd.backward(list(h), dh)
    return [h[0].detach().clone(), h[1].detach().clone(), x[0].grad.clone(), x[1].grad.clone()]


def _layer_results(leaves, dy):
    for t in leaves:
        t.grad = None
    y = K.fused_lru_forward(*leaves)[0]
    y.backward(dy)
    return [y.detach().clone()] + [t.grad.clone() for t in leaves]


class Recorder:
    """Collects the rows and rewrites the results files after each one."""

    def __init__(self, meta, out_dir: Path):
        self.meta, self.rows = meta, []
        slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device_name"]).strip("-").lower()
        suffix = "_dry-run" if meta["dry_run"] else ""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.stem = out_dir / f"tune_{slug}_{meta['date']}{suffix}"

    def add(self, row):
        self.rows.append(row)
        ms = "-" if row.get("ms") is None else f"{row['ms']:.3f} ms"
        extra = f"  {row['gbps']:.0f} GB/s ({row['pct_peak']:.0f}% of peak)" if row.get("pct_peak") else ""
        flag = "" if row.get("ok", True) else f"  WRONG (rel. error {row['rel_error']:.2e})"
        if row.get("error"):
            flag = f"  FAILED: {row['error']}"
        print(f"  {row['kind']:<6} {row['shape']} {row['strategy']:<10} {row['tile']}: {ms}{extra}{flag}", flush=True)
        self.write()

    def best(self, kind, shape, strategy=None):
        rows = [r for r in self.rows if r["kind"] == kind and r["shape"] == shape and r.get("ok") and r.get("ms")
                and (strategy is None or r["strategy"] == strategy)]
        return min(rows, key=lambda r: r["ms"]) if rows else None

    def default(self, kind, shape, strategy):
        return next((r for r in self.rows if r["kind"] == kind and r["shape"] == shape and r["strategy"] == strategy
                     and r.get("is_default") and r.get("ms")), None)

    def summary(self):
        lines = []
        for shape in [list(s) for s in dict.fromkeys(tuple(r["shape"]) for r in self.rows)]:
            for kind in ("scan", "layer"):
                best = self.best(kind, shape)
                if best is None:
                    continue
                auto = next((r["auto_strategy"] for r in self.rows if r["shape"] == shape and "auto_strategy" in r),
                            None)
                default = self.default(kind, shape, auto) if auto else None
                vs = (f"; default ({auto}, {default['tile']}) {default['ms']:.3f} ms -> {default['ms'] / best['ms']:.2f}x"
                      if default else "")
                lines.append(dict(shape=shape, kind=kind, best_strategy=best["strategy"], best_tile=best["tile"],
                                  best_ms=best["ms"], best_pct_peak=best.get("pct_peak"),
                                  default_strategy=auto, default_ms=default["ms"] if default else None,
                                  text=f"{kind} {shape}: best {best['strategy']} {best['tile']} {best['ms']:.3f} ms{vs}"))
        return lines

    def write(self):
        summary = self.summary()
        payload = dict(meta=self.meta, rows=self.rows, summary=summary)
        self.stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
        m = self.meta
        md = [f"# Kernel launch settings: {m['device_name']} ({m['date']})", "",
              f"torch {m['torch']}, triton {m['triton']}, median of {m['repeats']} after {m['warmup']} warm-up calls; "
              f"scan GB/s counts {SCAN_BYTES_PER_ELEMENT} bytes per complex element (forward + backward); peak "
              f"{m['peak_gbps']} GB/s. Tiles: scan (chunk, block_n, num_warps); output (chunk, block_n, block_h, "
              "num_warps). Generated by benchmarks/tune_kernels.py.", "", "## Best per shape", ""]
        md += [f"- {s['text']}" for s in summary] or ["- (nothing measured)"]
        md += ["", "## Every measurement", "", "| kind | shape (Bt, L, N, H) | strategy | tile | ms | GB/s | % peak | "
               "rel. error vs reference | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            md.append(f"| {r['kind']} | {r['shape']} | {r['strategy']} | {r['tile']} | "
                      f"{'-' if r.get('ms') is None else format(r['ms'], '.3f')} | "
                      f"{'-' if r.get('gbps') is None else format(r['gbps'], '.0f')} | "
                      f"{'-' if r.get('pct_peak') is None else format(r['pct_peak'], '.1f')} | "
                      f"{'-' if r.get('rel_error') is None else format(r['rel_error'], '.1e')} | "
                      f"{r.get('error') or ('default' if r.get('is_default') else '')} |")
        self.stem.with_suffix(".md").write_text("\n".join(md) + "\n")


def tune_shape(shape, args, device, rec: Recorder, deadline):
    Bt, L, N, H = shape
    shape_key = list(shape)
    auto = kernel_config.scan_strategy(K.current_settings())
    default_scan = kernel_config.default_scan_blocks(N)
    print(f"shape Bt={Bt} L={L} N={N} H={H}: automatic strategy {auto}, default scan tile {default_scan}", flush=True)

    x, lam, dh = _scan_inputs(Bt, L, N, device)
    with K.kernel_settings(strategy="sequential"):
        reference = _scan_results(x, lam, dh)
    for strategy in K.STRATEGIES:
        for tile in args.scan_candidates:
            if time.monotonic() > deadline:
                print("  budget spent: no more candidates", flush=True)
                return
            blocks = K.ScanBlocks(chunk=tile[0], block_n=tile[1], num_warps=tile[2])
            row = dict(kind="scan", shape=shape_key, strategy=strategy, tile=list(tile), auto_strategy=auto,
                       is_default=blocks == default_scan)
            try:
                with K.kernel_settings(strategy=strategy, scan_blocks=blocks):
                    got = _scan_results(x, lam, dh)
                    row["rel_error"] = max(_relative_error(a, b) for a, b in zip(got, reference))
                    row["ok"] = row["rel_error"] < args.tolerance

                    def step():
                        h = _run_scan(x, lam)
                        torch.autograd.backward(list(h), dh)

                    seconds = median_seconds(step, device, args.warmup, args.repeats, NO_BUDGET)
            except Exception as exc:  # a tile the compiler refuses (e.g. out of resources) is reported, not fatal
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                rec.add(row)
                continue
            row["ms"] = seconds * 1e3
            row["gbps"] = SCAN_BYTES_PER_ELEMENT * Bt * L * N / seconds / 1e9
            row["pct_peak"] = 100 * row["gbps"] / args.peak_gbps if args.peak_gbps else None
            rec.add(row)
    x = dh = None  # free the scan inputs before the layer inputs are made

    best_scan = rec.best("scan", shape_key)
    if best_scan is None:
        return
    leaves, dy = _layer_inputs(Bt, L, N, H, device)
    scan_blocks = K.ScanBlocks(*best_scan["tile"])
    with K.kernel_settings(strategy="sequential"):
        reference = _layer_results(leaves, dy)
    for tile in args.output_candidates:
        if time.monotonic() > deadline:
            print("  budget spent: no more candidates", flush=True)
            return
        blocks = kernel_config.default_output_blocks(N, H) if tile is None else K.OutputBlocks(*tile)
        row = dict(kind="layer", shape=shape_key, strategy=best_scan["strategy"],
                   tile=[blocks.chunk, blocks.block_n, blocks.block_h, blocks.num_warps],
                   scan_tile=best_scan["tile"], is_default=False)
        try:
            with K.kernel_settings(strategy=best_scan["strategy"], scan_blocks=scan_blocks, output_blocks=blocks):
                got = _layer_results(leaves, dy)
                row["rel_error"] = max(_relative_error(a, b) for a, b in zip(got, reference))
                row["ok"] = row["rel_error"] < args.tolerance

                def step():
                    K.fused_lru_forward(*leaves)[0].backward(dy)

                row["ms"] = median_seconds(step, device, args.warmup, args.repeats, NO_BUDGET) * 1e3
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        rec.add(row)
    # the package's defaults end to end (automatic strategy, default tiles), for comparison
    row = dict(kind="layer", shape=shape_key, strategy=auto, tile="defaults", is_default=True)
    got = _layer_results(leaves, dy)
    row["rel_error"] = max(_relative_error(a, b) for a, b in zip(got, reference))
    row["ok"] = row["rel_error"] < args.tolerance
    row["ms"] = 1e3 * median_seconds(lambda: K.fused_lru_forward(*leaves)[0].backward(dy), device, args.warmup,
                                     args.repeats, NO_BUDGET)
    rec.add(row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, triton interpreter, tiny shapes, two candidates")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=80.0, help="seconds after which no new candidate starts")
    ap.add_argument("--tolerance", type=float, default=5e-4, help="largest relative error vs the reference (sequential strategy, default tile)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
        if not kernel_config.INTERPRET:
            ap.error("--dry-run runs the kernels in triton's interpreter: set TRITON_INTERPRET=1")
        shapes, args.scan_candidates, args.output_candidates = DRY_SHAPES, DRY_SCAN_CANDIDATES, DRY_OUTPUT_CANDIDATES
        args.warmup, args.repeats = 0, 1
        device_name = "cpu-dry-run"
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on a GPU, or use --dry-run with TRITON_INTERPRET=1")
        device = torch.device("cuda")
        shapes, args.scan_candidates, args.output_candidates = TRAINING_SHAPES, SCAN_CANDIDATES, OUTPUT_CANDIDATES
        device_name = torch.cuda.get_device_name(device)
    args.peak_gbps = None if args.dry_run else hbm_peak_gbps(device_name)
    import triton

    meta = dict(device_name=device_name, date=str(_dt.date.today()), torch=torch.__version__,
                triton=triton.__version__, warmup=args.warmup, repeats=args.repeats, peak_gbps=args.peak_gbps,
                dry_run=args.dry_run, tolerance=args.tolerance,
                defaults=dict(scan={str(s): dataclasses.astuple(kernel_config.default_scan_blocks(s[2]))
                                    for s in shapes}))
    rec = Recorder(meta, Path(args.out_dir))
    deadline = time.monotonic() + args.budget
    for shape in shapes:
        tune_shape(shape, args, device, rec, deadline)
    rec.write()
    print("\nsummary:")
    for line in rec.summary():
        print(" ", line["text"])
    print(f"wrote {rec.stem.with_suffix('.json')} and {rec.stem.with_suffix('.md')}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
