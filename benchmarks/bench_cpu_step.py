#!/usr/bin/env python
"""CPU speed of the torch path: one training step at the paper's sMNIST shape, side by side with the reference JAX
implementation, one thread each.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_step.py \\
        --reference-python /path/to/jax-venv/bin/python --reference-checkout /path/to/camail-official-compressm

A training step is forward + backward + AdamW update of the `smnist` preset (1 block, H=8, N=256, continuous
input, 10 classes; dropout 0.1 as in the reference's config) at L=784, batch 50, on CPU with one thread
(`torch.set_num_threads(1)`). With `--reference-python`, `benchmarks/reference_jax_step.py` times the reference's own
jitted `make_step` at the same shape in that interpreter (one thread: `OMP_NUM_THREADS=1` and
`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`). The two run in alternating rounds
so that both see the same load on a shared machine; the medians of all rounds are reported, with every round's
median, and the load average of the (shared) machine around every round. `--baseline-root` also times the same
step with the package of another checkout (e.g. before a change) in every round. Writes
`benchmarks/results/cpu_step_smnist_<host>_<date>.{md,json}`. `--quick` runs a small shape once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def ours(batch, length, hidden, state, warmup, repeats):
    """Per-step seconds (after `warmup` steps) of one training step of our model on CPU, one thread."""
    from modeling_compressm import load_preset
    from modeling_compressm.modeling_compressm import CompreSSMForSequenceClassification

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_preset("smnist", hidden_size=hidden, state_dims=state, dropout=0.1)
    model = CompreSSMForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.0)
    inputs = torch.randn(batch, length, config.input_dim)
    labels = torch.arange(batch) % config.num_labels
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        model(inputs_embeds=inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def baseline(root, batch, length, hidden, state, warmup, repeats):
    """`ours` with the package of another checkout (`root`), in a subprocess."""
    code = (f"import sys, json; sys.path.insert(0, {str(root)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r})\n"
            "import bench_cpu_step as b\n"
            f"print('TIMES' + json.dumps(b.ours({batch}, {length}, {hidden}, {state}, {warmup}, {repeats})))\n"
            "import modeling_compressm; print('ROOT', modeling_compressm.__file__)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if run.returncode != 0 or str(root) not in run.stdout:
        raise RuntimeError(f"baseline step failed or imported another package:\n{run.stdout[-500:]}{run.stderr[-3000:]}")
    return json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("TIMES"))[5:])


def reference(python, checkout, batch, length, hidden, state, warmup, repeats):
    """Per-step seconds of the reference JAX step, run by `python` (a JAX environment) with one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", XLA_FLAGS=XLA_ONE_THREAD, JAX_PLATFORMS="cpu")
    command = [python, str(ROOT / "benchmarks" / "reference_jax_step.py"), "--reference", checkout,
               "--batch", str(batch), "--length", str(length), "--hidden", str(hidden), "--state", str(state),
               "--warmup", str(warmup), "--repeats", str(repeats)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"reference step failed:\n{run.stderr[-3000:]}")
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("{")][-1]
    payload = json.loads(line)
    return [ms / 1e3 for ms in payload["step_ms"]], payload


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--length", type=int, default=784)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--state", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / reference")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per round")
    ap.add_argument("--reference-python", default=None, help="python of an environment with JAX, equinox, optax")
    ap.add_argument("--reference-checkout", default=None, help="checkout of camail-official/compressm")
    ap.add_argument("--baseline-root", default=None,
                    help="also time the step with modeling_compressm from this checkout (e.g. before a change)")
    ap.add_argument("--quick", action="store_true", help="small shape, one round (smoke test)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.state, args.rounds, args.warmup, args.repeats = 4, 64, 16, 1, 1, 2
    if (args.reference_python is None) != (args.reference_checkout is None):
        ap.error("--reference-python and --reference-checkout go together")
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: set OMP_NUM_THREADS=1 (one thread for both implementations)", file=sys.stderr)

    shape = dict(batch=args.batch, length=args.length, hidden=args.hidden, state=args.state)
    rounds = []
    ref_meta = None
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for index in range(args.rounds):
        entry = {"load_average_before": os.getloadavg()[0]}
        entry["ours_ms"] = [1e3 * t for t in ours(**shape, warmup=args.warmup, repeats=args.repeats)]
        if args.baseline_root:
            entry["baseline_ms"] = [1e3 * t for t in baseline(args.baseline_root, **shape, warmup=args.warmup,
                                                                repeats=args.repeats)]
        if args.reference_python:
            times, ref_meta = reference(args.reference_python, args.reference_checkout, **shape,
                                        warmup=args.warmup, repeats=args.repeats)
            entry["reference_ms"] = [1e3 * t for t in times]
        entry["load_average_after"] = os.getloadavg()[0]
        rounds.append(entry)
        print(f"round {index + 1}: " + ", ".join(f"{key[:-3]} {statistics.median(entry[key]):.0f} ms" for key in
                                                 ("ours_ms", "baseline_ms", "reference_ms") if key in entry)
              + f" (load average {entry['load_average_before']:.1f} -> {entry['load_average_after']:.1f})", flush=True)

    def overall(key):
        values = [v for r in rounds for v in r.get(key, [])]
        return statistics.median(values) if values else None

    meta = dict(date=str(_dt.date.today()), host=f"cpu-{platform.machine()}", processor=_cpu_model(),
                cores=os.cpu_count(), threads="1 (torch.set_num_threads(1), OMP_NUM_THREADS=1; reference: "
                "OMP_NUM_THREADS=1, XLA_FLAGS=" + XLA_ONE_THREAD + ")", torch=torch.__version__,
                reference=ref_meta and {k: ref_meta[k] for k in ("implementation", "jax", "equinox")},
                note=args.note, baseline_root=args.baseline_root, **shape, rounds=args.rounds, warmup=args.warmup,
                repeats=args.repeats)
    result = dict(meta=meta, rounds=rounds, ours_median_ms=overall("ours_ms"), baseline_median_ms=overall("baseline_ms"),
                  reference_median_ms=overall("reference_ms"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"cpu_step_smnist_{meta['host']}_{meta['date']}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(_markdown(result))
    print(f"ours {result['ours_median_ms']:.0f} ms"
          + (f", baseline {result['baseline_median_ms']:.0f} ms" if result["baseline_median_ms"] else "")
          + (f", reference {result['reference_median_ms']:.0f} ms" if result["reference_median_ms"] else "")
          + f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _markdown(result) -> str:
    m = result["meta"]
    lines = [f"# CPU training step at the sMNIST shape ({m['date']})", "",
             f"One training step (forward, backward, AdamW) of 1 block, H={m['hidden']}, N={m['state']}, "
             f"L={m['length']}, batch {m['batch']}, on {m['processor']} ({m['cores']} cores, shared with other "
             f"jobs), threads: {m['threads']}. torch {m['torch']}"
             + (f"; reference: {m['reference']['implementation']}, jax {m['reference']['jax']}" if m["reference"]
                else "") + f". {m['rounds']} alternating rounds of {m['repeats']} steps after {m['warmup']} "
             "warm-up steps; medians in ms, with the machine's 1-minute load average before and after each round."
             + (f" Baseline: the package at `{m['baseline_root']}`." if m["baseline_root"] else "")
             + (f" {m['note']}" if m["note"] else ""), "",
             "| round | load avg | ours (torch) | baseline | reference (JAX) |", "|---|---|---|---|---|"]

    def cell(values):
        return f"{statistics.median(values):.0f}" if values else "-"

    for index, r in enumerate(result["rounds"], start=1):
        lines.append(f"| {index} | {r['load_average_before']:.1f} -> {r['load_average_after']:.1f} | "
                     f"{cell(r['ours_ms'])} | {cell(r.get('baseline_ms'))} | {cell(r.get('reference_ms'))} |")
    total = lambda key: f"**{result[key]:.0f}**" if result[key] else "-"  # noqa: E731
    lines.append(f"| all | | {total('ours_median_ms')} | {total('baseline_median_ms')} | "
                 f"{total('reference_median_ms')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
