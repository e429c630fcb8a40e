#!/usr/bin/env python
"""CPU training-step time of a small Mamba-2 LM at N = 128 and at reduced state sizes (torch path, one thread).

Arms, each a forward + backward of a causal-LM loss on random byte ids (model in train mode, no cache):

    stock      transformers' `Mamba2ForCausalLM` with `state_size = r` (its torch path: no mamba_ssm on CPU)
    select     `CompreSSMMamba2ForCausalLM.from_mamba2(stock N)` reduced by selection to r: a stock layer of size r
    balanced   the same model reduced by balanced projection to r: in_proj/conv1d keep N B/C channels, the scan and
               the recurrent state run at r (plus the (N -> r) projection of B and C)

Gramians for the reductions come from one calibration batch; the step time does not depend on the weights.
Each arm runs `--warmup` steps, then `--repeats` timed steps, in alternating rounds over all arms (so load drift on
a shared machine hits every arm alike); the table reports the median.

    OMP_NUM_THREADS=1 python benchmarks/mamba2_step_time.py --ranks 64 32 16 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2 import modeling_mamba2 as _mamba2

from modeling_compressm import CompreSSMMamba2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_time import cpu_model  # noqa: E402 - benchmarks/ sibling

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def stock_model(args, state_size: int, seed: int = 0) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=256, hidden_size=args.hidden, num_heads=args.heads, head_dim=2 * args.hidden // args.heads,
        state_size=state_size, n_groups=1, num_hidden_layers=args.layers, chunk_size=args.chunk, expand=2,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )
    return Mamba2ForCausalLM(config)


def build_arms(args) -> dict[str, torch.nn.Module]:
    """{arm name: model in train mode}: stock at N and every r, select and balanced reductions of stock N to r."""
    full = stock_model(args, args.state)
    calibration = [torch.randint(0, 256, (2, args.chunk), generator=torch.Generator().manual_seed(1))]
    arms = {f"stock r={args.state}": full}
    for rank in args.ranks:
        arms[f"stock r={rank}"] = stock_model(args, rank)
        for method in ("select", "balanced"):
            model = CompreSSMMamba2ForCausalLM.from_mamba2(full)
            model.reduce(rank, calibration=calibration, method=method)
            arms[f"{method} r={rank}"] = model
    for model in arms.values():
        model.train()
    return arms


def step(model, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, use_cache=False).loss.backward()


def scan_step(model, batch: int, length: int) -> float:
    """ms of one forward + backward of layer 0's selective scan alone (`mamba2_scan_forward` at the layer's r) on
    random inputs of the shapes it sees in `step`."""
    mixer = model.backbone.layers[0].mixer
    generator = torch.Generator().manual_seed(3)
    width = mixer.n_groups * mixer.ssm_state_size
    inputs = [torch.randn(batch, length, size, generator=generator, requires_grad=True)
              for size in (mixer.intermediate_size, width, width, mixer.num_heads)]
    started = time.perf_counter()
    _mamba2.mamba2_scan_forward(mixer, *inputs, None).sum().backward()
    return 1000 * (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=int, default=128)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 32, 16, 8])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tag", default="")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    arms = build_arms(args)
    ids = torch.randint(0, 256, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(2))
    for model in arms.values():
        for _ in range(args.warmup):
            step(model, ids)
        scan_step(model, args.batch, args.seq_len)
    times = {name: [] for name in arms}
    scan_times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, model in arms.items():
            started = time.perf_counter()
            step(model, ids)
            times[name].append(1000 * (time.perf_counter() - started))
            scan_times[name].append(scan_step(model, args.batch, args.seq_len))
    medians = {name: statistics.median(values) for name, values in times.items()}
    scan_medians = {name: statistics.median(values) for name, values in scan_times.items()}

    date = datetime.date.today().isoformat()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {
        "date": date, "device": f"CPU {cpu_model()}",
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_1min_at_end": load,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "python": platform.python_version(), "args": {**vars(args), "results_dir": str(args.results_dir)},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"mamba2_step_time_N{args.state}{args.tag}_cpu-x86-64_{date}"
    (args.results_dir / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "times_ms": times, "median_ms": medians, "scan_times_ms": scan_times,
                    "scan_median_ms": scan_medians}, indent=1)
    )
    lines = [
        f"# Mamba-2 training-step time on CPU, torch path (N={args.state}, {date})", "",
        f"Forward + backward of a causal-LM loss, {args.layers} layers, hidden {args.hidden}, {args.heads} heads x "
        f"{2 * args.hidden // args.heads}, 1 group, chunk {args.chunk}, batch {args.batch} x {args.seq_len} tokens; "
        f"{meta['device']} ({meta['cpu_count']} cores, shared), {meta['threads']} thread(s) "
        f"(OMP_NUM_THREADS={meta['OMP_NUM_THREADS']}), torch {meta['torch']}, transformers {meta['transformers']}; "
        f"median of {args.repeats} steps in alternating rounds after {args.warmup} warm-up steps; 1-min load average "
        f"at the end {load if load is None else round(load, 2)}.", "",
        "Step: the whole training step. Scan: forward + backward of layer 0's `mamba2_scan_forward` alone on random "
        "inputs of the same shapes (the scan runs at r in all three arms).", "",
        "| r | step: stock Mamba2 (state_size=r), ms | step: select, ms | step: balanced (N B/C channels, scan at r), "
        "ms | select / stock | balanced / stock | scan: stock, ms | scan: select, ms | scan: balanced, ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    full = medians[f"stock r={args.state}"]
    lines.append(f"| {args.state} (full) | {full:.1f} | | | | | {scan_medians[f'stock r={args.state}']:.1f} | | |")
    for rank in args.ranks:
        stock, select, balanced = (medians[f"{arm} r={rank}"] for arm in ("stock", "select", "balanced"))
        scans = " | ".join(f"{scan_medians[f'{arm} r={rank}']:.1f}" for arm in ("stock", "select", "balanced"))
        lines.append(
            f"| {rank} | {stock:.1f} | {select:.1f} | {balanced:.1f} | {select / stock:.2f} | {balanced / stock:.2f} | "
            f"{scans} |"
        )
    (args.results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return medians


if __name__ == "__main__":
    main()
