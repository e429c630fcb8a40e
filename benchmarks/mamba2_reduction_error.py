#!/usr/bin/env python
"""Output error of Mamba-2 state reduction on a tiny trained Mamba-2 LM: balanced projection vs state selection.

A transformers `Mamba2ForCausalLM` (byte vocabulary, 2 layers, hidden 64, 8 heads x 16, one group, N states) is
trained on the standard-library text corpus of `lm_study.py` (bytes; every 10th file held out), converted with
`CompreSSMMamba2ForCausalLM.from_mamba2`, and every layer is reduced to r states by

    balanced     square-root balancing of the data Gramians (the layer keeps N conv channels, the scan runs at r)
    select_qr    selection by column-pivoted QR of Q^1/2 P^1/2 (a stock Mamba-2 layer of state size r)
    select_ghost selection of the r channels with the largest GHOST-style score P_nn * Q_nn
    select_random selection of r random channels (mean over 3 draws)

Gramians come from calibration windows of the training text; the error is measured on held-out windows:
relative logit error ||Δlogits||² / ||logits||² and the change of held-out bits per byte.

    OMP_NUM_THREADS=1 python benchmarks/mamba2_reduction_error.py --state 16 --ranks 12 8 4 --seed 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from modeling_compressm import CompreSSMMamba2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_study import load_corpus  # noqa: E402 - benchmarks/ sibling

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def windows(tokens: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length - 1, (count,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def train_model(corpus, state: int, steps: int, seed: int, seq_len: int, batch: int) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=256, hidden_size=64, num_heads=8, head_dim=16, state_size=state, n_groups=1,
                          num_hidden_layers=2, chunk_size=64, expand=2, pad_token_id=0, bos_token_id=0,
                          eos_token_id=0, tie_word_embeddings=True)
    model = Mamba2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = windows(corpus.train_tokens, batch, seq_len, generator)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def evaluate(model, batches, reference_logits=None):
    """(bits per byte, relative logit error vs reference_logits or None, logits list)."""
    nats, count, logits_all, error, energy = 0.0, 0, [], 0.0, 0.0
    for index, ids in enumerate(batches):
        output = model(ids, labels=ids)
        nats += float(output.loss) * ids.shape[0] * (ids.shape[1] - 1)
        count += ids.shape[0] * (ids.shape[1] - 1)
        logits_all.append(output.logits)
        if reference_logits is not None:
            error += float((output.logits - reference_logits[index]).pow(2).sum())
            energy += float(reference_logits[index].pow(2).sum())
    return nats / count / math.log(2), (error / energy if reference_logits is not None else None), logits_all


def ghost_keep(statistics, rank):
    keep = []
    for layer_statistics in statistics:
        P, Q = layer_statistics.gramians()
        score = P.diagonal(dim1=-2, dim2=-1) * Q.diagonal(dim1=-2, dim2=-1)  # (groups, N)
        keep.append([sorted(torch.argsort(row, descending=True)[:rank].tolist()) for row in score])
    return keep


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[12, 8, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--tag", default="")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    results_dir = args.results_dir

    corpus = load_corpus("bytes")
    started = time.time()
    stock = train_model(corpus, args.state, args.steps, args.seed, args.seq_len, args.batch)
    train_seconds = time.time() - started
    generator = torch.Generator().manual_seed(1000 + args.seed)
    calibration = [windows(corpus.train_tokens, 8, args.seq_len, generator) for _ in range(args.calibration_batches)]
    held_out = [windows(corpus.eval_tokens, 8, args.seq_len, generator) for _ in range(args.eval_batches)]

    full = CompreSSMMamba2ForCausalLM.from_mamba2(stock).eval()
    full_bpb, _, reference = evaluate(full, held_out)
    statistics = full.gramian_statistics(calibration)
    rows = []
    for rank in args.ranks:
        plans = {
            "balanced": dict(method="balanced"),
            "select_qr": dict(method="select"),
            "select_ghost": dict(keep=ghost_keep(statistics, rank)),
        }
        random_generator = torch.Generator().manual_seed(rank)
        for draw in range(3):
            plans[f"select_random_{draw}"] = dict(keep=[
                [sorted(torch.randperm(args.state, generator=random_generator)[:rank].tolist())] for _ in statistics
            ])
        for name, plan in plans.items():
            model = CompreSSMMamba2ForCausalLM.from_mamba2(stock).eval()
            ranks = None if "keep" in plan else rank
            report = model.reduce(ranks, statistics=statistics, **plan)
            bpb, error, _ = evaluate(model, held_out, reference)
            rows.append({
                "rank": rank, "method": name, "relative_logit_error": error, "bpb": bpb, "delta_bpb": bpb - full_bpb,
                "predicted_relative_scan_error": [entry.relative_error for entry in report],
                "state_dims": list(model.config.state_dims),
            })
            print(json.dumps(rows[-1]), flush=True)

    summary = []
    for rank in args.ranks:
        by_method = {row["method"]: row for row in rows if row["rank"] == rank}
        random_rows = [row for name, row in by_method.items() if name.startswith("select_random")]
        best_selection = min(by_method["select_qr"]["relative_logit_error"],
                             by_method["select_ghost"]["relative_logit_error"])
        summary.append({
            "rank": rank,
            "balanced": by_method["balanced"]["relative_logit_error"],
            "select_qr": by_method["select_qr"]["relative_logit_error"],
            "select_ghost": by_method["select_ghost"]["relative_logit_error"],
            "select_random_mean": sum(r["relative_logit_error"] for r in random_rows) / len(random_rows),
            "balanced_over_best_selection": by_method["balanced"]["relative_logit_error"] / best_selection,
            "delta_bpb": {name: by_method[name]["delta_bpb"] for name in ("balanced", "select_qr", "select_ghost")},
        })
    date = datetime.date.today().isoformat()
    meta = {
        "date": date, "device": f"cpu-{platform.machine()}", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "args": {**vars(args), "results_dir": str(results_dir)},
        "train_seconds": round(train_seconds, 1),
        "full_bpb": full_bpb, "corpus": corpus.record["source"], "corpus_sha256": corpus.record["sha256"],
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"mamba2_reduction_error_N{args.state}_seed{args.seed}{args.tag}_cpu-x86-64_{date}"
    (results_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    lines = [
        f"# Mamba-2 reduction: output error on held-out text (N={args.state}, seed {args.seed}, {date})", "",
        f"Tiny Mamba2ForCausalLM (2 layers, hidden 64, 8 heads x 16, 1 group), {args.steps} steps on stdlib bytes, "
        f"full model {full_bpb:.3f} bpb held out; CPU, {meta['threads']} thread(s), torch {meta['torch']}, "
        f"transformers {meta['transformers']}. Relative logit error ||Δlogits||²/||logits||² on "
        f"{args.eval_batches}x8 held-out windows of {args.seq_len} bytes; Gramians from {args.calibration_batches}x8 "
        "training windows. All layers reduced to r.", "",
        "| r | balanced | select (pivoted QR) | select (GHOST score) | select (random, mean of 3) | balanced / best "
        "selection | Δbpb balanced | Δbpb QR | Δbpb GHOST |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for item in summary:
        lines.append(
            f"| {item['rank']} | {item['balanced']:.4f} | {item['select_qr']:.4f} | {item['select_ghost']:.4f} | "
            f"{item['select_random_mean']:.4f} | {item['balanced_over_best_selection']:.2f} | "
            f"{item['delta_bpb']['balanced']:+.4f} | {item['delta_bpb']['select_qr']:+.4f} | "
            f"{item['delta_bpb']['select_ghost']:+.4f} |"
        )
    (results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
