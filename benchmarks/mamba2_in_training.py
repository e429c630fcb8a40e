#!/usr/bin/env python
"""In-training state reduction of a tiny Mamba-2 LM vs the same model trained small from scratch (preliminary).

Arms (same data order, seed and schedule; byte LM on the stdlib corpus of `lm_study.py`, 2 layers, hidden 64,
8 heads x 16, one group):

    full        N states for all steps
    balanced    N states; Gramian statistics from the training batches of steps [reduce_at - window, reduce_at)
                (forward hooks), then every layer reduced to r by balanced projection, optimizer repaired
    select      the same with pivoted-QR selection (Adam moments sliced)
    small       r states from scratch

Held-out bits per byte at the end and training seconds (CPU, torch path). Each finished arm is appended to a JSON-lines
log; `--report` writes the markdown summary.

    OMP_NUM_THREADS=1 python benchmarks/mamba2_in_training.py --seeds 0 1 --state 16 --rank 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from modeling_compressm import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM
from modeling_compressm.training.selective_ssm_training import SelectiveSSMGramianCollector, repair_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_study import load_corpus  # noqa: E402 - benchmarks/ sibling
from mamba2_reduction_error import evaluate, windows  # noqa: E402 - benchmarks/ sibling

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARMS = ("full", "balanced", "select", "small")


def run_arm(arm: str, corpus, args, seed: int) -> dict:
    state = args.rank if arm == "small" else args.state
    torch.manual_seed(seed)
    config = CompreSSMMamba2Config(vocab_size=256, hidden_size=64, num_heads=8, head_dim=16, state_size=state,
                                   n_groups=1, num_hidden_layers=2, chunk_size=64, expand=2, pad_token_id=0,
                                   bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = CompreSSMMamba2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    collector = SelectiveSSMGramianCollector()
    report = None
    started = time.time()
    model.train()
    for step in range(args.steps):
        if arm in ("balanced", "select") and step == args.reduce_at - args.window:
            collector.start(model)
        if arm in ("balanced", "select") and step == args.reduce_at:
            collector.stop()
            before = dict(model.named_parameters())
            report = model.reduce(args.rank, method=arm, statistics=collector.statistics)
            repair_optimizer(optimizer, before, model, report)
        ids = windows(corpus.train_tokens, args.batch, args.seq_len, generator)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    seconds = time.time() - started
    eval_generator = torch.Generator().manual_seed(1000)
    held_out = [windows(corpus.eval_tokens, 8, args.seq_len, eval_generator) for _ in range(args.eval_batches)]
    bpb, _, _ = evaluate(model.eval(), held_out)
    return {
        "arm": arm, "seed": seed, "bpb": bpb, "train_seconds": round(seconds, 1),
        "state_dims": list(model.config.state_dims),
        "predicted_relative_scan_error": [entry.relative_error for entry in report] if report else None,
    }


def write_report(log: Path, out: Path, args) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    seeds = sorted({row["seed"] for row in rows})
    table = {(row["arm"], row["seed"]): row for row in rows}
    lines = [
        f"# Mamba-2 in-training reduction vs small from scratch (preliminary, {datetime.date.today().isoformat()})",
        "",
        f"Byte LM on stdlib text, 2 layers, hidden 64, 8 heads x 16, one group, {args.steps} steps (batch "
        f"{args.batch} x {args.seq_len}), N={args.state} → r={args.rank} at step {args.reduce_at} from the statistics "
        f"of the previous {args.window} training batches; held-out bits per byte ({args.eval_batches}x8 windows). "
        f"CPU, one thread, torch path; train seconds on a shared 2-core VM are indicative only.",
        "",
        "| seed | " + " | ".join(f"{arm} bpb" for arm in ARMS) + " | balanced - small | select - small |",
        "| --- | " + " | ".join("---" for _ in ARMS) + " | --- | --- |",
    ]
    for seed in seeds:
        if not all((arm, seed) in table for arm in ARMS):
            continue
        bpb = {arm: table[(arm, seed)]["bpb"] for arm in ARMS}
        lines.append(f"| {seed} | " + " | ".join(f"{bpb[arm]:.4f}" for arm in ARMS)
                     + f" | {bpb['balanced'] - bpb['small']:+.4f} | {bpb['select'] - bpb['small']:+.4f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reduce-at", type=int, default=100)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not 0 < args.window <= args.reduce_at < args.steps:
        parser.error("need 0 < --window <= --reduce-at < --steps")
    corpus = load_corpus("bytes")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"mamba2_in_training_N{args.state}_r{args.rank}_cpu-x86-64_{datetime.date.today().isoformat()}"
    log = args.results_dir / f"{stem}.jsonl"
    meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
    for seed in args.seeds:
        for arm in args.arms:
            row = {**run_arm(arm, corpus, args, seed), **meta}
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    write_report(log, args.results_dir / f"{stem}.md", args)


if __name__ == "__main__":
    main()
