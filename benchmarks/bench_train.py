#!/usr/bin/env python
"""End-to-end training benchmark: tokens per second of a causal LM at full and reduced state sizes, the cost of a
reduction event, and torch.compile of the model.

Usage (GPU; part of ``benchmarks/gpu_check.sh``)::

    python benchmarks/bench_train.py                       # lm-base: hidden 768, 12 layers, 256 states, L 2048
    python benchmarks/bench_train.py --tau-dims 96,80,...   # also time the per-layer sizes a tau=0.05 run reached
    python benchmarks/bench_train.py --dry-run             # CPU, tiny model, one step each: checks the script

What it measures (bf16 autocast on CUDA, AdamW, a training step = forward + backward + optimizer step):

1. batch: the largest power of two (up to ``--max-batch``) whose training step fits in GPU memory at full size;
2. tokens/s at full size (``--full-dim`` states per layer) and at every size of ``--dims`` (uniform per layer),
   plus ``--tau-dims`` when given: the speed-up that in-training reduction buys per step. A tau=0.05 run's sizes
   are not known before one is trained (at initialisation tau=0.05 keeps ~90% of the states); the sweep brackets
   them (the package's digits reproduction reached 37% of the states at tau=0.05, the paper's sMNIST 5-11%);
3. the reduction event: Hankel singular values of every layer, balanced truncation 256 -> 128 per layer and the
   optimizer-state reset, timed on the GPU, and its share of a run of ``--run-steps`` steps with ``--events``
   events at the full-size step time;
4. torch.compile of the model (compile time and compiled tokens/s at full size).

Results go to ``benchmarks/results/train_<device>_<date>.{json,md}``, rewritten after every part, so a run cut
short by a time limit still leaves what it measured. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_compressm import load_preset, reduce_with_optimizer  # noqa: E402
from modeling_compressm.modeling_compressm import CompreSSMForCausalLM  # noqa: E402


def _int_list(text: str):
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="lm-base", help="model preset (hidden 768, 12 layers, 256 states)")
    ap.add_argument("--full-dim", type=int, default=256, help="states per layer at full size")
    ap.add_argument("--dims", type=_int_list, default=[128, 64, 32, 16], help="reduced sizes (uniform per layer)")
    ap.add_argument("--tau-dims", type=_int_list, default=None,
                    help="per-layer sizes reached by a tau=0.05 run (comma-separated, one per layer)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch the memory search tries")
    ap.add_argument("--batch", type=int, default=None, help="skip the search and use this batch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per size (median reported)")
    ap.add_argument("--run-steps", type=int, default=20000, help="run length for the reduction event's share")
    ap.add_argument("--events", type=int, default=10, help="reduction events in such a run")
    ap.add_argument("--compile", default="inductor", help="torch.compile backend ('off' to skip)")
    ap.add_argument("--compile-timeout", type=int, default=150,
                    help="seconds allowed for the torch.compile part (it runs last; 0 = no limit)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32, what TrainingArguments("
                         "tf32=True) sets): the LRU op's fp32 state projections then run on tensor cores")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny model, one step per size, aot_eager compile: checks every code path quickly")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.preset, args.full_dim, args.dims = "cpu", "tiny", 16, [8]
        args.seq_len, args.max_batch, args.warmup, args.steps = 32, 4, 1, 1
        args.run_steps, args.events = 100, 2
        args.compile = "off" if args.compile == "off" else "aot_eager"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available: use --dry-run (or --device cpu) on a machine without a GPU")
    return args


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def build_model(args, state_dims, device):
    config = load_preset(args.preset, state_dims=state_dims)
    torch.manual_seed(0)
    return CompreSSMForCausalLM(config).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(model, optimizer, batch, seq_len, device):
    """A closure running one training step on a fixed random batch of token ids."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator).to(device)

    def step():
        with _autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, device, warmup, steps):
    """Median seconds per call of `step` after `warmup` calls (synchronised wall clock)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fits(args, batch, device) -> bool:
    """Whether a full-size training step at `batch` runs without running out of memory."""
    model = build_model(args, args.full_dim, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    try:
        make_step(model, optimizer, batch, args.seq_len, device)()
        _sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(args, device):
    """The largest power of two up to --max-batch whose full-size step fits (1 if even that fails)."""
    best, batch = 1, 1
    while batch <= args.max_batch and fits(args, batch, device):
        best, batch = batch, batch * 2
    return best


def measure_size(args, label, state_dims, batch, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args, state_dims, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = time_steps(make_step(model, optimizer, batch, args.seq_len, device), device, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    dims = model.config.state_dims
    return dict(label=label, state_dims=dims, total_states=sum(dims), step_ms=1e3 * seconds,
                tokens_per_s=batch * args.seq_len / seconds, peak_gib=peak)


def measure_reduction_event(args, batch, device):
    """Wall time of one reduction event at full size: HSVs, balanced truncation to half size, optimizer reset."""
    model = build_model(args, args.full_dim, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    make_step(model, optimizer, batch, args.seq_len, device)()  # optimizer state exists, as in a real run
    _sync(device)
    start = time.perf_counter()
    hsv = model.hankel_singular_values()
    ranks = [max(1, h.numel() // 2) for h in hsv]
    report = reduce_with_optimizer(model, ranks, optimizer, optimizer_state="reset", strict=True, record=False)
    _sync(device)
    seconds = time.perf_counter() - start
    return dict(event_ms=1e3 * seconds, dims_before=[r.old_dim for r in report],
                dims_after=[r.new_dim for r in report])


class _TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise _TimeLimit in the main thread after `seconds` (0: no limit)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise _TimeLimit(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def measure_compile(args, batch, device):
    model = build_model(args, args.full_dim, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model, backend=args.compile)
    step = make_step(compiled, optimizer, batch, args.seq_len, device)
    start = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - start
    seconds = time_steps(step, device, max(1, args.warmup - 1), args.steps)
    return dict(backend=args.compile, first_step_s=first_s, step_ms=1e3 * seconds,
                tokens_per_s=batch * args.seq_len / seconds)


def _markdown(result):
    meta = result["meta"]
    lines = [f"# Training benchmark: {meta['device_name']} ({meta['date']})", "",
             f"Preset `{meta['preset']}` (causal LM, {meta['layers']} layers, hidden {meta['hidden']}), sequence "
             f"{meta['seq_len']}, batch {meta.get('batch')}, {meta['precision']}, TF32 matmuls "
             f"{'allowed' if meta.get('tf32') else 'off (torch default)'}, AdamW; torch {meta['torch']}, "
             f"triton {meta['triton']}. Median of {meta['steps']} steps after {meta['warmup']} warm-up steps.", ""]
    sizes = result.get("sizes", [])
    if sizes:
        full = sizes[0]["step_ms"]
        lines += ["| size | states (total) | step ms | tokens/s | speed-up vs full | peak GiB |", "|---|---|---|---|---|---|"]
        for s in sizes:
            peak = "-" if s["peak_gib"] is None else f"{s['peak_gib']:.1f}"
            lines.append(f"| {s['label']} | {s['total_states']} | {s['step_ms']:.1f} | {s['tokens_per_s']:.0f} | "
                         f"{full / s['step_ms']:.2f}x | {peak} |")
    event = result.get("reduction_event")
    if event:
        lines += ["", f"Reduction event (HSVs + balanced truncation {event['dims_before'][0]} -> "
                      f"{event['dims_after'][0]} per layer + optimizer reset): {event['event_ms']:.1f} ms; "
                      f"{meta['events']} events in a {meta['run_steps']}-step run at the full-size step time: "
                      f"{event['share_of_run_pct']:.3f}% of the run's wall-clock."]
    comp = result.get("compile")
    if comp:
        if "error" in comp:
            lines += ["", f"torch.compile ({comp['backend']}): failed: {comp['error']}"]
        else:
            lines += ["", f"torch.compile ({comp['backend']}): first step {comp['first_step_s']:.1f} s, then "
                          f"{comp['step_ms']:.1f} ms/step, {comp['tokens_per_s']:.0f} tokens/s."]
    for name, error in result.get("errors", {}).items():
        lines += ["", f"{name}: failed: {error}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    probe = load_preset(args.preset)
    name = device_name(device)
    meta = dict(device_name=name, date=str(_dt.date.today()), torch=torch.__version__, triton=triton_version,
                preset=args.preset, layers=probe.num_hidden_layers, hidden=probe.hidden_size, seq_len=args.seq_len,
                precision="bf16 autocast" if device.type == "cuda" else "fp32", warmup=args.warmup,
                steps=args.steps, run_steps=args.run_steps, events=args.events, dry_run=args.dry_run,
                tf32=args.tf32)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = dict(meta=meta, sizes=[], errors={})
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    stem = out_dir / f"train_{slug}_{meta['date']}{'_tf32' if args.tf32 else ''}{'_dry-run' if args.dry_run else ''}"

    def save():
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(_markdown(result))

    print(f"device: {name}   torch {torch.__version__}   triton {triton_version}", flush=True)
    meta["batch"] = args.batch if args.batch is not None else largest_batch(args, device)
    batch = meta["batch"]
    print(f"batch {batch} x {args.seq_len} tokens", flush=True)
    save()
    sizes = [("full", args.full_dim)] + [(f"{d} per layer", d) for d in args.dims]
    if args.tau_dims is not None:
        sizes.append(("tau=0.05 run", list(args.tau_dims)))
    for label, dims in sizes:
        try:
            row = measure_size(args, label, dims, batch, device)
        except Exception as error:  # keep measuring the other sizes
            result["errors"][f"size {label}"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            continue
        result["sizes"].append(row)
        print(f"  {label:>16}: {row['step_ms']:9.1f} ms/step  {row['tokens_per_s']:10.0f} tokens/s", flush=True)
        save()
    try:
        event = measure_reduction_event(args, batch, device)
        full_ms = result["sizes"][0]["step_ms"] if result["sizes"] else math.nan
        event["share_of_run_pct"] = 100 * args.events * event["event_ms"] / (args.run_steps * full_ms)
        result["reduction_event"] = event
        print(f"  reduction event: {event['event_ms']:.1f} ms ({event['share_of_run_pct']:.3f}% of a run)", flush=True)
    except Exception as error:
        result["errors"]["reduction event"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    save()
    if args.compile != "off":
        try:
            with time_limit(args.compile_timeout):
                result["compile"] = measure_compile(args, batch, device)
            c = result["compile"]
            print(f"  torch.compile: first step {c['first_step_s']:.1f} s, {c['step_ms']:.1f} ms/step", flush=True)
        except Exception as error:
            result["compile"] = dict(backend=args.compile, error=f"{type(error).__name__}: {str(error)[:300]}")
            traceback.print_exc()
        save()
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
