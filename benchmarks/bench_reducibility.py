#!/usr/bin/env python
"""Cost of the reducibility regulariser (`reducibility.ReducibilityRegularizer`) against a training step, CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_reducibility.py [--batch 64] [--length 128] [--repeats 3]

Model: the `lm-small` preset (hub_configs/lm-small.json: 4 layers, H=256, N=128, byte vocabulary). A training step
is forward + backward + AdamW update at the CLI's default batch (64) and block size (128), one thread. The
regulariser's cost per step is (one evaluation of the penalty and its gradient, real map) / `every` + (adding the
cached gradient to the parameters' .grad, done at every step of its window). Medians of `repeats` timings after
one warm-up. Writes benchmarks/results/reducibility_cost_<device>_<date>.md. About a minute on one core.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from quickstart_time import cpu_model  # benchmarks/ is sys.path[0]

from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM
from modeling_compressm.training.reducibility import ReducibilityRegularizer

ROOT = Path(__file__).resolve().parents[1]

EVERY = (1, 5, 10, 20)


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(batch: int, length: int, repeats: int) -> dict:
    torch.manual_seed(0)
    values = json.loads((ROOT / "hub_configs" / "lm-small.json").read_text())
    values = {key: value for key, value in values.items() if key not in ("model_type", "architectures")}
    model = CompreSSMForCausalLM(CompreSSMConfig(**values)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, values["vocab_size"], (batch, length))

    def training_step():
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    steps = iter(range(1, 10**6))
    regularizer = ReducibilityRegularizer(weight=0.02, every=1, end_step=10**6)  # evaluated at every call
    step_s = _median_seconds(training_step, repeats)
    evaluate_s = _median_seconds(lambda: regularizer.apply(model, next(steps), "real", None), repeats)
    regularizer.every = 10**6  # from now on only the cached gradient is added
    apply_s = _median_seconds(lambda: regularizer.apply(model, next(steps), "real", None), repeats)
    model.zero_grad()
    return {"step_s": step_s, "evaluate_s": evaluate_s, "apply_s": apply_s,
            "share": {every: (evaluate_s / every + apply_s) / step_s for every in EVERY}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-name", default="cpu-x86-64")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.batch, args.length, args.repeats)
    date = _dt.date.today().isoformat()
    lines = [
        f"# Reducibility regulariser: cost against a training step ({args.device_name}, {date})",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} visible cores (a VM shared with other jobs), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch.set_num_threads(1), "
        f"torch {torch.__version__}. Model: lm-small (4 layers, H=256, N=128), batch {args.batch} x {args.length} "
        f"tokens, AdamW. Medians of {args.repeats} timings after one warm-up "
        f"(`python benchmarks/bench_reducibility.py`).",
        "",
        f"- training step (forward + backward + AdamW): {result['step_s']:.3f} s",
        f"- penalty + gradient evaluation (real map, 4 layers, float64): {result['evaluate_s']:.3f} s",
        f"- adding the cached gradient (every step of the window): {result['apply_s'] * 1e3:.2f} ms",
        "",
        "| every (steps) | cost per step / training step |",
        "|---|---|",
        *[f"| {every} | {share:.1%} |" for every, share in result["share"].items()],
        "",
    ]
    out = ROOT / "benchmarks" / "results" / f"reducibility_cost_{args.device_name}_{date}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
