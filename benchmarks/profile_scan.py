#!/usr/bin/env python
"""Where the time of one LRU layer goes on a GPU: kernel time versus host (launch) time, per kernel.

For each shape, torch.profiler records --iters forward+backward calls of compressm_kernels.diagonal_scan and of
compressm_kernels.fused_lru_forward after warm-up. Reported per call: wall-clock (synchronised), the summed GPU
time of all kernels, the number of kernel launches, and the kernels with the most GPU time. When wall-clock is
well above the summed kernel time, the GPU waits on the host (launch overhead, small torch ops), and a faster
kernel cannot help; when they are close, the kernels are the cost.

    python benchmarks/profile_scan.py                 # GPU; writes <out-dir>/profile_<device>_<date>.{md,json}
    TRITON_INTERPRET=1 python benchmarks/profile_scan.py --dry-run    # CPU: checks the code path only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
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
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import compressm_kernels as K  # noqa: E402
from tune_kernels import _layer_inputs, _scan_inputs  # noqa: E402

SHAPES = [(128, 2048, 256, 768), (128, 2048, 16, 768), (8, 2048, 256, 768), (1, 8192, 64, 768)]
DRY_SHAPES = [(2, 40, 12, 16)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_call(fn, device, iters):
    """Per call: wall ms, summed device-kernel ms, kernel launches, and the top kernels by device time."""
    for _ in range(2):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        _sync(device)
    kernels = {}
    for event in prof.events():
        if device.type == "cuda" and getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us() / 1e3  # a kernel event spans its GPU execution; us -> ms
    total_ms = sum(v[1] for v in kernels.values()) / iters
    launches = sum(v[0] for v in kernels.values()) / iters
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:8]
    return dict(wall_ms=wall_ms, kernel_ms=total_ms, launches_per_call=launches,
                top=[dict(name=name[:90], calls_per_iter=c / iters, ms_per_iter=ms / iters) for name, (c, ms) in top])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (and the output kernel's dots)")
    ap.add_argument("--shapes", default=None, help="Bt,L,N,H;... (default: the training shapes)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.dry_run:
        device, shapes, args.iters, name = torch.device("cpu"), DRY_SHAPES, 1, "cpu-dry-run"
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on a GPU, or use --dry-run with TRITON_INTERPRET=1")
        device, shapes, name = torch.device("cuda"), SHAPES, torch.cuda.get_device_name()
    if args.shapes:
        shapes = [tuple(int(v) for v in item.split(",")) for item in args.shapes.split(";")]
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for Bt, L, N, H in shapes:
        x, lam, dh = _scan_inputs(Bt, L, N, device)

        def scan():
            h = K.diagonal_scan(x[0], x[1], lam[0], lam[1])
            torch.autograd.backward(list(h), dh)

        leaves, dy = _layer_inputs(Bt, L, N, H, device)

        def layer():
            K.fused_lru_forward(*leaves)[0].backward(dy)

        for op, fn in (("scan fwd+bwd", scan), ("layer fwd+bwd", layer)):
            row = dict(op=op, shape=[Bt, L, N, H], **profile_call(fn, device, args.iters))
            rows.append(row)
            print(f"{op:<14} Bt={Bt:<4} L={L:<5} N={N:<4} H={H}: wall {row['wall_ms']:.3f} ms, kernels "
                  f"{row['kernel_ms']:.3f} ms in {row['launches_per_call']:.0f} launches", flush=True)
            for k in row["top"][:5]:
                print(f"    {k['ms_per_iter']:8.3f} ms  x{k['calls_per_iter']:.0f}  {k['name']}", flush=True)
        x = dh = leaves = dy = None  # free this shape's inputs
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    stem = out_dir / f"profile_{slug}_{_dt.date.today()}{'_tf32' if args.tf32 else ''}{'_dry-run' if args.dry_run else ''}"
    meta = dict(device_name=name, date=str(_dt.date.today()), torch=torch.__version__, iters=args.iters,
                tf32=args.tf32)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    md = [f"# Where a layer's time goes: {name} ({meta['date']})", "",
          f"torch {meta['torch']}, TF32 matmuls {'allowed' if args.tf32 else 'off (torch default)'}; mean of {args.iters} calls after 2 warm-up calls; kernel ms = summed GPU time of "
          "all kernels per call (torch.profiler). Generated by benchmarks/profile_scan.py.", "",
          "| op | Bt | L | N | H | wall ms | kernel ms | launches | top kernel (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = f"{r['top'][0]['name'][:50]} ({r['top'][0]['ms_per_iter']:.3f})" if r["top"] else "-"
        md.append(f"| {r['op']} | {' | '.join(str(v) for v in r['shape'])} | {r['wall_ms']:.3f} | {r['kernel_ms']:.3f} "
                  f"| {r['launches_per_call']:.0f} | {top} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
