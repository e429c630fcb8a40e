#!/usr/bin/env python
"""Benchmark the LRU scan paths: Triton fused layer, Triton plain scan, and the torch paths.

Usage (GPU)::

    python benchmarks/bench_scan.py                      # paper shapes + N sweep, writes benchmarks/results/
    python benchmarks/bench_scan.py --peak-gbps 4800     # HBM peak when the device name is not in HBM_PEAK_GBPS

CPU smoke test (tiny shapes; the Triton rows run only under the interpreter)::

    python benchmarks/bench_scan.py --device cpu --quick
    TRITON_INTERPRET=1 python benchmarks/bench_scan.py --device cpu --quick

Paths (one LRU layer y = Re(C h) + D u, h_t = lam h_{t-1} + B u_t; complex as real pairs):

    triton_scan[s]      compressm_kernels.diagonal_scan alone (x given): the bandwidth-bound scan, with scan
                        strategy s forced (sequential: one program per (N block, batch) walking all of time;
                        chunked: local chunk scans, a short scan over the chunk ends, local scans again)
    triton_fused[s]     compressm_kernels.fused_lru_forward (cuBLAS x = B u, chunk-end pass, fused output pass);
                        s is the strategy of the scans in its backward (the forward is the same for both)
    triton_scan+proj    torch matmuls for x = B u and y = Re(C h) + D u around the Triton plain scan
    torch_sequential    compressm_kernels.naive_lru_forward (python loop over time; the test oracle)
    torch_parallel      modeling_compressm.scan.lru_sequence_torch with parallel_diagonal_scan (the chunked O(L)
                        torch scan); a local Hillis-Steele doubling scan if that module is not importable
    torch_compile       torch.compile(torch_parallel)

Byte model (fp32 = 4 bytes, complex = 8 bytes, s_u = bytes per element of u/y; E = Bt*L*N complex elements):

    compulsory (all layer paths)  u read Bt*L*H*s_u + y written Bt*L*H*s_u
                                  + params (lam 8N + B 8NH + C 8HN + D 4H) + h0 read / hT written (8*Bt*N each)
    triton_scan   fwd             x read 8E + h written 8E (+ lam, h0)                        = 16E
                  fwd+bwd         fwd + (dh read 8E + h read 8E + dx written 8E)              = 40E
    triton_fused  fwd             compulsory + x written 8E by cuBLAS + x read 8E by each of the two passes = +24E
                                  (the (Bt, L, N) states never reach HBM)
                  fwd+bwd         fwd + recompute (x 8E w + 8E r, h 8E w) + dh 8E (w + r) + G 8E (w + 3 r)
                                  + h read 2x 8E (dlam, dC GEMM) + u/dy reads ~ 4 Bt*L*H*s_u + du written
    triton_scan+proj fwd          compulsory + x (w + r) 16E + h (w + r) 16E                  = +32E
    torch paths   fwd             torch_parallel (chunked scan): compulsory + x written by the GEMM 8E, copied 16E,
                                  the in-chunk steps 24E, the fix-up 16E, h read by the output GEMM 8E = +72E;
                                  backward about the same again plus the dlam reduction (16E)
                                  torch_sequential: compulsory + x and h (w + r) 32E + per step r/w of the state 32E

The Triton rows count the least traffic of the operation whatever the strategy, so their GB/s is an effective
bandwidth: the chunked strategy really moves 8E more in the forward (x is read twice) and 8E more in the backward
(dh is read twice), plus the chunk-end arrays (1/CHUNK of E).

GB/s = modelled bytes / measured time. The scan kernel's "% of peak" (triton_scan row) is the number to hold
against the >= 70 % HBM target; the layer rows also report it for comparison. Every modelled byte count is an
idealisation (L2 hits not subtracted, GEMM re-reads not counted), so treat % of peak as approximate.

Timing: CUDA events around each call, `--warmup` calls, median of `--repeats`; fwd+bwd = forward + backward with
a fixed random cotangent for y. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import compressm_kernels as K  # noqa: E402
from compressm_kernels import config as kernel_config  # noqa: E402

try:  # the lead's torch paths (complex tensors)
    from modeling_compressm.scan import lru_sequence_torch as _lru_sequence_torch
    from modeling_compressm.scan import parallel_diagonal_scan as _parallel_diagonal_scan

    HAVE_MODEL_SCAN = True
except Exception:  # pragma: no cover - depends on the checkout
    _lru_sequence_torch = None
    _parallel_diagonal_scan = None
    HAVE_MODEL_SCAN = False

#: Peak HBM bandwidth (GB/s, vendor figures) by a substring of torch.cuda.get_device_name(), most specific first.
HBM_PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5, HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("B200", 8000.0),
]


def hbm_peak_gbps(device_name: str):
    """Peak HBM bandwidth of a GPU from its name (None when unknown)."""
    for key, gbps in HBM_PEAK_GBPS:
        if key.lower() in device_name.lower():
            return gbps
    return None


PAPER_SHAPES = [  # (Bt, L, N, H)
    (50, 784, 256, 8),
    (50, 1024, 384, 512),
]
SWEEP_N = [16, 32, 64, 128, 256, 384]
QUICK_SHAPES = [(2, 33, 12, 6)]
QUICK_SWEEP_N = [4, 8, 12]


# ------------------------------------------------------------------------------------------------------------
# torch fallbacks
# ------------------------------------------------------------------------------------------------------------
def _local_doubling_scan(x, lam, initial_state=None, decay=None):
    """Hillis-Steele doubling scan h_t = lam h_{t-1} + x_t on complex tensors (autograd differentiates)."""
    states = x
    if initial_state is not None:
        states = torch.cat([states[:, :1] + lam * initial_state[:, None, :], states[:, 1:]], dim=1)
    power, offset, length = lam, 1, x.shape[1]
    while offset < length:
        states = torch.cat([states[:, :offset], states[:, offset:] + power * states[:, :-offset]], dim=1)
        power = power * power
        offset *= 2
    return states


def torch_parallel_layer(u, lam, Bc, Cc, D, h0c):
    if HAVE_MODEL_SCAN:
        return _lru_sequence_torch(u, lam, Bc, Cc, D, h0c, scan=_parallel_diagonal_scan)
    u32 = u.float()
    x = torch.complex(u32 @ Bc.real.T, u32 @ Bc.imag.T)
    states = _local_doubling_scan(x, lam, h0c)
    y = states.real @ Cc.real.T - states.imag @ Cc.imag.T + u32 * D
    return y.to(u.dtype), states[:, -1]


# ------------------------------------------------------------------------------------------------------------
# byte model
# ------------------------------------------------------------------------------------------------------------
def byte_model(path, Bt, L, N, H, s_u, bwd):
    path = path.split("[")[0]  # triton_scan[chunked] -> triton_scan: the same modelled (least) traffic
    E = Bt * L * N
    act = Bt * L * H * s_u
    params = 8 * N + 16 * N * H + 4 * H
    states_io = 2 * 8 * Bt * N
    comp = 2 * act + params + states_io
    if path == "triton_scan":
        return 16 * E + 8 * N + (24 * E if bwd else 0)
    if path == "triton_fused":
        fwd = comp + 24 * E
        return fwd + ((24 + 16 + 32 + 16) * E + 5 * act if bwd else 0)
    if path == "triton_scan+proj":
        fwd = comp + 32 * E
        return fwd + ((16 + 24 + 32) * E + 4 * act if bwd else 0)
    if path in ("torch_parallel", "torch_compile"):
        fwd = comp + 72 * E
        return 2 * fwd + 16 * E if bwd else fwd
    if path == "torch_sequential":
        fwd = comp + 32 * E + 32 * E
        return fwd * (2 if bwd else 1)
    raise KeyError(path)


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
def _time(fn, device, warmup, repeats, budget_s):
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s and len(times) >= 1:
            break
    return statistics.median(times)


def _make_inputs(Bt, L, N, H, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = 0.5 + 0.49 * torch.rand(N, generator=g)
    th = 2 * math.pi * torch.rand(N, generator=g)
    p = dict(
        u=torch.randn(Bt, L, H, generator=g).to(dtype),
        lam_re=r * torch.cos(th),
        lam_im=r * torch.sin(th),
        B_re=torch.randn(N, H, generator=g) / math.sqrt(H),
        B_im=torch.randn(N, H, generator=g) / math.sqrt(H),
        C_re=torch.randn(H, N, generator=g) / math.sqrt(N),
        C_im=torch.randn(H, N, generator=g) / math.sqrt(N),
        D=torch.randn(H, generator=g),
        h0_re=torch.randn(Bt, N, generator=g),
        h0_im=torch.randn(Bt, N, generator=g),
    )
    return {k: v.to(device) for k, v in p.items()}


def _layer_fns(p, compile_ok):
    """name -> callable(params dict) returning y."""
    names = ["u", "lam_re", "lam_im", "B_re", "B_im", "C_re", "C_im", "D", "h0_re", "h0_im"]

    def triton_fused(strategy):
        def run(q):
            with _forced_strategy(strategy):
                return K.fused_lru_forward(*[q[k] for k in names])[0]

        return run

    def triton_scan_proj(q):
        u32 = q["u"].float()
        x_re, x_im = u32 @ q["B_re"].T, u32 @ q["B_im"].T
        h_re, h_im = K.diagonal_scan(x_re, x_im, q["lam_re"], q["lam_im"], q["h0_re"], q["h0_im"])
        return (h_re @ q["C_re"].T - h_im @ q["C_im"].T + u32 * q["D"]).to(q["u"].dtype)

    def torch_sequential(q):
        return K.naive_lru_forward(*[q[k] for k in names])[0]

    def _torch_parallel(u, lam_re, lam_im, B_re, B_im, C_re, C_im, D, h0_re, h0_im):
        lam = torch.complex(lam_re, lam_im)
        return torch_parallel_layer(
            u, lam, torch.complex(B_re, B_im), torch.complex(C_re, C_im), D, torch.complex(h0_re, h0_im)
        )[0]

    def torch_parallel(q):
        return _torch_parallel(*[q[k] for k in names])

    fns = {}
    if K.TRITON_AVAILABLE:
        for strategy in K.STRATEGIES:
            fns[f"triton_fused[{strategy}]"] = triton_fused(strategy)
        fns["triton_scan+proj"] = triton_scan_proj
    fns["torch_sequential"] = torch_sequential
    fns["torch_parallel"] = torch_parallel
    if compile_ok:
        compiled = torch.compile(_torch_parallel)
        fns["torch_compile"] = lambda q: compiled(*[q[k] for k in names])
    return fns


@contextlib.contextmanager
def _forced_strategy(strategy):
    """Force the scan strategy of compressm_kernels (sequential / chunked) inside the block, forward and backward
    (a backward runs with the settings of its forward)."""
    with K.kernel_settings(strategy=strategy):
        yield


def _selected(name, paths):
    return paths is None or name.split("[")[0] in paths


def _triton_ok(device):
    return K.TRITON_AVAILABLE and (device.type == "cuda" or kernel_config.INTERPRET)


def bench_shape(Bt, L, N, H, device, dtype, args, paths=None):
    rows = []
    p = _make_inputs(Bt, L, N, H, device, dtype)
    s_u = p["u"].element_size()
    dy = torch.randn(Bt, L, H, device=device, dtype=dtype)
    triton_ok = _triton_ok(device)
    fns = _layer_fns(p, compile_ok=not args.no_compile)
    if not triton_ok:
        fns = {k: v for k, v in fns.items() if not k.startswith("triton")}
    fns = {k: v for k, v in fns.items() if _selected(k, paths)}
    if "torch_sequential" in fns and args.skip_sequential:
        del fns["torch_sequential"]

    def record(name, fwd_s, fb_s):
        row = dict(path=name, Bt=Bt, L=L, N=N, H=H, dtype=str(dtype).replace("torch.", ""))
        for tag, sec, bwd in (("fwd", fwd_s, False), ("fwd_bwd", fb_s, True)):
            nbytes = byte_model(name, Bt, L, N, H, s_u, bwd)
            row[f"{tag}_ms"] = None if sec is None else sec * 1e3
            row[f"{tag}_bytes"] = nbytes
            row[f"{tag}_gbps"] = None if sec is None else nbytes / sec / 1e9
            row[f"{tag}_pct_peak"] = (None if sec is None or not args.peak_gbps
                                      else 100 * nbytes / sec / 1e9 / args.peak_gbps)
        rows.append(row)
        _print_row(row)

    # plain scan kernel alone (the bandwidth target), with each strategy
    if triton_ok and _selected("triton_scan", paths):
        strategy = kernel_config.scan_strategy(K.current_settings())
        print(f"  (automatic strategy: {strategy})")
        g = torch.Generator(device="cpu").manual_seed(1)
        x_re = torch.randn(Bt, L, N, generator=g).to(device).requires_grad_()
        x_im = torch.randn(Bt, L, N, generator=g).to(device).requires_grad_()
        lr, li = p["lam_re"], p["lam_im"]
        dh = torch.randn(Bt, L, N, device=device)

        def scan_fwd():
            with torch.no_grad():
                K.diagonal_scan(x_re, x_im, lr, li)

        def scan_fb():
            h_re, h_im = K.diagonal_scan(x_re, x_im, lr, li)
            torch.autograd.backward([h_re, h_im], [dh, dh])

        for strategy in K.STRATEGIES:
            with _forced_strategy(strategy):
                record(f"triton_scan[{strategy}]", _time(scan_fwd, device, args.warmup, args.repeats, args.budget),
                       _time(scan_fb, device, args.warmup, args.repeats, args.budget))

    leaf = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    for name, fn in fns.items():
        def fwd():
            with torch.no_grad():
                fn(p)

        def fb():
            y = fn(leaf)
            y.backward(dy)

        try:
            fwd_s = _time(fwd, device, args.warmup, args.repeats, args.budget)
            fb_s = _time(fb, device, args.warmup, args.repeats, args.budget)
        except Exception as exc:  # e.g. torch.compile without a working compiler on this machine
            print(f"  {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        record(name, fwd_s, fb_s)
    return rows


_HEADER = f"{'path':<26}{'Bt':>4}{'L':>6}{'N':>5}{'H':>5} {'fwd ms':>9}{'GB/s':>8}{'%pk':>6} {'f+b ms':>9}{'GB/s':>8}{'%pk':>6}"


def _fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def _print_row(r):
    print(
        f"{r['path']:<26}{r['Bt']:>4}{r['L']:>6}{r['N']:>5}{r['H']:>5} "
        f"{_fmt(r['fwd_ms'], '9.3f'):>9}{_fmt(r['fwd_gbps'], '8.2f'):>8}{_fmt(r['fwd_pct_peak'], '6.1f'):>6} "
        f"{_fmt(r['fwd_bwd_ms'], '9.3f'):>9}{_fmt(r['fwd_bwd_gbps'], '8.2f'):>8}{_fmt(r['fwd_bwd_pct_peak'], '6.1f'):>6}",
        flush=True,
    )


def _markdown(meta, shape_rows, sweep_rows):
    lines = [f"# Scan benchmark: {meta['device_name']} ({meta['date']})", ""]
    peak = f"peak {meta['peak_gbps']} GB/s" if meta.get("peak_gbps") else "no HBM peak (CPU or unknown GPU)"
    lines.append(
        f"torch {meta['torch']}, triton {meta['triton']}, dtype {meta['dtype']}, {peak}, median of {meta['repeats']} "
        f"after {meta['warmup']} warm-up calls. Byte model: see benchmarks/bench_scan.py."
    )
    if meta.get("cpu_threads") is not None:
        lines.append(f"CPU: {meta['cpu_threads']} torch thread(s) (OMP_NUM_THREADS={meta.get('omp_num_threads')}), "
                     f"1-minute load average {meta.get('load_average')} at the start (a shared machine).")
    for title, rows in (("Paper shapes", shape_rows), ("Layer time vs state dim N", sweep_rows)):
        if not rows:
            continue
        lines += ["", f"## {title}", "",
                  "| path | Bt | L | N | H | fwd ms | fwd GB/s | fwd % peak | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['path']} | {r['Bt']} | {r['L']} | {r['N']} | {r['H']} | {_fmt(r['fwd_ms'], '.3f')} | "
                f"{_fmt(r['fwd_gbps'], '.1f')} | {_fmt(r['fwd_pct_peak'], '.1f')} | {_fmt(r['fwd_bwd_ms'], '.3f')} | "
                f"{_fmt(r['fwd_bwd_gbps'], '.1f')} | {_fmt(r['fwd_bwd_pct_peak'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of u / y")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="peak HBM bandwidth in GB/s (default: from the device name, see HBM_PEAK_GBPS)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget", type=float, default=20.0, help="max seconds of timed repeats per measurement")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="torch.compile path: auto = on for CUDA, off on CPU (inductor's CPU build is slow)")
    ap.add_argument("--skip-sequential", action="store_true", help="skip the python-loop reference")
    ap.add_argument("--no-sweep", action="store_true", help="skip the state-dim sweep")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available; use --device cpu --quick")
    if device.type == "cpu" and not args.quick:
        print("note: CPU without --quick runs the paper shapes on CPU, which is very slow", file=sys.stderr)
    args.no_compile = args.compile == "off" or (args.compile == "auto" and device.type != "cuda")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 20)
    dtype = getattr(torch, args.dtype)

    shapes = QUICK_SHAPES if args.quick else PAPER_SHAPES
    sweep = QUICK_SWEEP_N if args.quick else SWEEP_N
    sweep_base = QUICK_SHAPES[0] if args.quick else PAPER_SHAPES[1]

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu-{platform.machine()}"
    if args.peak_gbps is None:
        args.peak_gbps = hbm_peak_gbps(device_name)
        if args.peak_gbps is None and device.type == "cuda":
            print(f"note: peak HBM bandwidth of {device_name!r} unknown; pass --peak-gbps for % of peak",
                  file=sys.stderr)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(
        device_name=device_name, date=str(_dt.date.today()), torch=torch.__version__, triton=triton_version,
        dtype=args.dtype, peak_gbps=args.peak_gbps, warmup=args.warmup, repeats=args.repeats, quick=args.quick,
        interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1", model_scan=HAVE_MODEL_SCAN,
    )
    if device.type == "cpu":
        meta.update(cpu_threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                    load_average=round(os.getloadavg()[0], 1))
    print(f"device: {device_name}   torch {torch.__version__}   triton {triton_version}   "
          f"model torch path: {'modeling_compressm.scan' if HAVE_MODEL_SCAN else 'local doubling scan'}")
    print(_HEADER)
    shape_rows = []
    for Bt, L, N, H in shapes:
        shape_rows += bench_shape(Bt, L, N, H, device, dtype, args)
    sweep_rows = []
    if not args.no_sweep:
        print(f"\nsweep over N (Bt={sweep_base[0]}, L={sweep_base[1]}, H={sweep_base[3]})")
        print(_HEADER)
        for N in sweep:
            sweep_rows += bench_shape(sweep_base[0], sweep_base[1], N, sweep_base[3], device, dtype, args,
                                      paths={"triton_scan", "triton_fused", "torch_parallel", "torch_compile"})

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    stem = out_dir / f"scan_{slug}_{meta['date']}{'_quick' if args.quick else ''}"
    payload = dict(meta=meta, shapes=shape_rows, sweep=sweep_rows)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(_markdown(meta, shape_rows, sweep_rows))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main()
