#!/usr/bin/env python
"""LM study, second protocol (issue 21): which balanced map, and does training to be reducible make in-training
compression win on real text?

Same corpus, model and optimizer as `lm_study.py` (byte-level or BPE causal LM on the installed standard library's
source; 2 layers, hidden 64, 128 states per layer, 800 steps, AdamW with the package's parameter groups). The
compressed arms run the package's `CompreSSMReducer` at its defaults (what `CompreSSMCallback()` does in a plain
Trainer: the "global" policy keeping half the total state over 4 events in the first 10% of the run), with:

    compressm-complex      system="complex" (the paper's complex map)
    compressm-real         system="real"    (the layer's real output map, the package default)
    compressm-real-reg     system="real" + the reducibility regulariser (weight 0.02, every 10 steps, until the last
                           event)
    compressm-complex-reg  system="complex" + the same regulariser (does the real map matter once the model is trained
                           to be reducible?)

Every aid given to a compressed arm is also given to the others (the fairness rule): the full-size and the
small-from-scratch arms run with and without the same regulariser over the same window (steps 1 to the default
schedule's last event). Small-from-scratch arms use the final per-layer sizes of `compressm-real-reg` (and of the
other compressed arms where those differ); a regularised compressed arm also gets `small-reg` at its sizes. Post-hoc arms truncate the trained full models (with and without the
regulariser) by real-map balanced truncation to the same sizes and fine-tune them for `--posthoc-steps`.

    OMP_NUM_THREADS=1 python benchmarks/lm_study_reducible.py run --task bytes --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/lm_study_reducible.py run --task bytes --arms compressm-complex-reg   # add an arm
    OMP_NUM_THREADS=1 python benchmarks/lm_study_reducible.py run --task permuted-digits --steps 1380 --state-dims 64 \
        --set learning_rate=0.003 weight_decay=0.01        # the issue-14 digits protocol; accuracy instead of bpb
    python benchmarks/lm_study_reducible.py report --task bytes

`--arms` runs only the named arms (the small-from-scratch arms at their sizes follow them); a run whose arm, task,
seed, step count and final sizes are already in the log is not repeated, so an arm added later joins the old rows.
Runs append to `benchmarks/results/lm_study_reducible_runs.jsonl` as they finish; `report` writes
`lm_study_reducible_<task>_<device>_<date>.md` from it (mean ± seed std per arm, per-seed wins against the
small-from-scratch arm with the same aid).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_study import BASE, RESULTS_DIR, append_log, device_tag, make_task, parse_overrides, print_row, run_variant  # noqa: E402

DEFAULT_LOG = RESULTS_DIR / "lm_study_reducible_runs.jsonl"
REGULARIZER_WEIGHT = 0.02
COMPRESSED_ARMS = {
    "compressm-complex": {"system": "complex"},
    "compressm-real": {"system": "real"},
    "compressm-real-reg": {"system": "real", "reducibility": REGULARIZER_WEIGHT},
    "compressm-complex-reg": {"system": "complex", "reducibility": REGULARIZER_WEIGHT},
}
FULL_ARMS = {"full": {}, "full-reg": {"reducibility": REGULARIZER_WEIGHT}}
POSTHOC_ARMS = {f"posthoc-real-finetune[{source}]": source for source in FULL_ARMS}
TASKS = ("bytes", "bpe", "permuted-digits")
ARMS = (*FULL_ARMS, *COMPRESSED_ARMS, "small", "small-reg", *POSTHOC_ARMS)


def _record(log: Path, task, arm: str, row: dict, tag: str, full_state_time: int) -> dict:
    row = {k: v for k, v in row.items() if not k.startswith("_")}
    row["state_time_full"] = full_state_time
    row.update(study="reducible", arm=arm, tag=tag, device=device_tag(), threads=torch.get_num_threads(),
               eval_blocks=int(task.eval_ids.shape[0]) if hasattr(task, "eval_ids") else None)
    append_log(log, row)
    print_row(row)
    return row


def _logged(log: Path, task_name: str, seed: int, steps: int) -> set[tuple[str, tuple[int, ...]]]:
    """(arm, final sizes) of the runs of this task, seed and step count already in the log."""
    if not log.is_file():
        return set()
    rows = (json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip())
    return {(r["arm"], tuple(r["dims_after"])) for r in rows if r.get("study") == "reducible"
            and r["task"] == task_name and r["seed"] == seed and r.get("max_steps") == steps}


def small_arms(final_dims: dict[str, tuple[int, ...]]) -> list[tuple[str, dict, list[int]]]:
    """(arm, overrides, sizes) of the small-from-scratch runs for the compressed arms' final sizes: `small` at every
    distinct size (compressm-real-reg's first), `small-reg` at the sizes of each regularised arm."""
    ordered = sorted(final_dims, key=lambda arm: arm != "compressm-real-reg")
    runs = [("small", {}, list(final_dims[arm])) for arm in ordered]
    runs += [("small-reg", {"reducibility": REGULARIZER_WEIGHT}, list(final_dims[arm])) for arm in ordered
             if COMPRESSED_ARMS[arm].get("reducibility")]
    return list({(arm, tuple(dims)): (arm, extra, dims) for arm, extra, dims in runs}.values())


def run_seed(task, seed: int, args) -> None:
    log = Path(args.log)
    arms = set(args.arms)
    common = {"state_dims": args.state_dims, "max_steps": args.steps}
    knobs = parse_overrides(args.set)  # optimizer knobs shared by every arm (e.g. the digits task's lr)
    full_state_time = args.state_dims * task.num_layers * args.steps
    full = {}
    posthoc = {source for arm, source in POSTHOC_ARMS.items() if arm in arms and args.posthoc_steps}
    for arm, extra in FULL_ARMS.items():
        if arm in arms or arm in posthoc:
            row = run_variant(task, "baseline", seed, {**knobs, **extra}, keep_model=True, **common)
            full[arm] = row.pop("_model")
            if arm in arms:
                _record(log, task, arm, row, args.tag, full_state_time)
    final_dims = {}
    for arm, extra in COMPRESSED_ARMS.items():
        if arm not in arms:
            continue
        row = run_variant(task, "package-default", seed, {**knobs, "compress": True, "policy": "package-default", **extra},
                          **common)
        final_dims[arm] = tuple(row["dims_after"])
        _record(log, task, arm, row, args.tag, full_state_time)
    done = _logged(log, task.name, seed, args.steps)
    for arm, extra, dims in small_arms(final_dims):
        if arm not in arms or (arm, tuple(dims)) in done:
            continue
        row = run_variant(task, "small-scratch", seed, {**knobs, **extra}, state_dims=dims, max_steps=args.steps)
        _record(log, task, arm, row, args.tag, full_state_time)
    if not posthoc:
        return
    reference = list(final_dims.get("compressm-real-reg", ()))
    if not reference:
        raise SystemExit("the post-hoc arms truncate to compressm-real-reg's sizes: run that arm with them")
    for source in sorted(posthoc):
        truncated = copy.deepcopy(full[source])
        truncated.reduce([d if d < n else None for d, n in zip(reference, truncated.config.state_dims)],
                         record=False, system="real")
        state = {k: v.clone() for k, v in truncated.state_dict().items()}
        row = run_variant(task, "posthoc-finetune", seed, knobs, init_state=state, state_dims=reference,
                          max_steps=args.posthoc_steps, warmup=0.1,
                          learning_rate=knobs.get("learning_rate", BASE["learning_rate"]) * 0.3,
                          data_seed=10_000 + seed)
        row["state_time"] += full_state_time  # the full run it starts from, then the fine-tune
        _record(log, task, f"posthoc-real-finetune[{source}]", row, args.tag, full_state_time)


def cmd_run(args) -> None:
    task = make_task(args.task, args)
    for seed in args.seeds:
        started = time.perf_counter()
        run_seed(task, seed, args)
        print(f"seed {seed} done in {time.perf_counter() - started:.0f}s", flush=True)


def _rows(log: Path, task: str, tag: str | None) -> list[dict]:
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("study") == "reducible" and r["task"].split("(")[0] == task
            and (tag is None or r.get("tag") == tag)]


#: Report comparisons (arm, other, sizes): `other`'s run of the same seed at the final sizes of arm `sizes` (None: at
#: whatever size it has). Post-hoc arms truncate to compressm-real-reg's sizes and may keep a state fewer (a real pole
#: is one LRU state), so they are compared with the small model at those sizes.
COMPARISONS = (
    ("compressm-complex", "small", "compressm-complex"), ("compressm-real", "small", "compressm-real"),
    ("compressm-real-reg", "small", "compressm-real-reg"), ("compressm-real-reg", "small-reg", "compressm-real-reg"),
    ("compressm-complex-reg", "small", "compressm-complex-reg"),
    ("compressm-complex-reg", "small-reg", "compressm-complex-reg"),
    ("compressm-real-reg", "compressm-complex-reg", None), ("compressm-real", "compressm-complex", None),
    ("compressm-real-reg", "full", None), ("compressm-complex-reg", "full", None), ("compressm-real", "full", None),
    ("posthoc-real-finetune[full]", "small", "compressm-real-reg"),
    ("posthoc-real-finetune[full-reg]", "small", "compressm-real-reg"),
)


def _held_out(row: dict) -> str:
    blocks = row.get("eval_blocks")
    return "the test split" if blocks is None else f"{blocks} held-out blocks"


def report(rows: list[dict], task: str) -> str:
    """Markdown: one row per arm (mean ± sample std over seeds of bits per byte, or of accuracy on a classification
    task, dims, state-time), then per-seed comparisons of each compressed arm with the small-from-scratch arm at its
    sizes with and without the same aid, with the other map and with the full model."""
    metric = "bpb" if "bpb" in rows[0] else "accuracy"
    better = 1.0 if metric == "accuracy" else -1.0  # sign that makes "arm better than other" positive
    order = {arm: index for index, arm in enumerate(ARMS)}
    arms = sorted(dict.fromkeys(r["arm"] for r in rows), key=lambda arm: order.get(arm, len(order)))
    seeds = sorted({r["seed"] for r in rows})
    first = rows[0]
    lines = [f"# LM study, reducibility protocol ({task})", "",
             f"Device {first['device']}, {first['threads']} torch thread(s), {first['max_steps']} steps per run, "
             f"seeds {seeds}, {_held_out(first)}; generated "
             f"{datetime.date.today().isoformat()} by `benchmarks/lm_study_reducible.py report`.", "",
             f"| arm | {metric} mean ± std | per seed | final dims | state-time / full |", "|---|---|---|---|---|"]
    by_arm = {}
    for arm in arms:
        entries = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        by_arm[arm] = entries
        values = [r[metric] for r in entries]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        dims = sorted({str(r["dims_after"]) for r in entries})
        state_time = statistics.mean(r["state_time"] / r["state_time_full"] for r in entries)
        lines.append(f"| {arm} | {statistics.mean(values):.4f} ± {spread:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in values)} | {'; '.join(dims)} | {state_time:.3f} |")
    lines += ["", f"Per seed, arm vs other ({metric}; positive = the first arm is better). \"same sizes\": the other "
              "arm's run at the final sizes of the named arm.", "",
              "| comparison | same sizes | advantage per seed | mean | wins |", "|---|---|---|---|---|"]
    for arm, other, sizes in COMPARISONS:
        advantages = []
        for seed in seeds:
            mine = [r for r in by_arm.get(arm, []) if r["seed"] == seed]
            reference = [r["dims_after"] for r in by_arm.get(sizes, []) if r["seed"] == seed]
            theirs = [r for r in by_arm.get(other, []) if r["seed"] == seed
                      and (sizes is None or (reference and r["dims_after"] == reference[0]))]
            if mine and theirs:
                advantages.append(better * (mine[0][metric] - theirs[0][metric]))
        if advantages:
            wins = sum(a > 0 for a in advantages)
            lines.append(f"| {arm} vs {other} | {sizes or '-'} | {', '.join(f'{a:+.4f}' for a in advantages)} | "
                         f"{statistics.mean(advantages):+.4f} | {wins}/{len(advantages)} |")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> None:
    rows = [row for log in args.log for row in _rows(Path(log), args.task, args.tag)]
    if args.arms:
        rows = [row for row in rows if row["arm"] in args.arms]
    if not rows:
        raise SystemExit(f"no runs of task {args.task!r} in {', '.join(args.log)}")
    text = report(rows, args.task)
    out = RESULTS_DIR / (f"lm_study_reducible_{args.task}{args.suffix}_{rows[0]['device']}_"
                         f"{datetime.date.today().isoformat()}.md")
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {out}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's model, data and step-count options (shared with the scripts that reuse its full models)."""
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--state-dims", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--bpe-vocab", type=int, default=1024)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train every arm for each seed, appending to the log")
    run.add_argument("--task", default="bytes", choices=TASKS)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_model_arguments(run)
    run.add_argument("--posthoc-steps", type=int, default=80)
    run.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                     help="arms to run (default: all); small-from-scratch arms run at the sizes of the compressed "
                          "arms run with them, unless the log has that run already")
    run.add_argument("--set", nargs="*", default=[],
                     help="knob=JSON overrides for every arm, e.g. learning_rate=0.003 weight_decay=0.01 (digits)")
    run.add_argument("--tag", default="")
    run.add_argument("--log", default=str(DEFAULT_LOG))
    rep = commands.add_parser("report", help="markdown report from the log")
    rep.add_argument("--task", default="bytes", choices=TASKS)
    rep.add_argument("--tag", default=None)
    rep.add_argument("--log", nargs="+", default=[str(DEFAULT_LOG)], help="run logs, read in order")
    rep.add_argument("--arms", nargs="+", choices=ARMS, default=None, help="only these arms (default: all)")
    rep.add_argument("--suffix", default="", help="added to the task in the report's file name")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    {"run": cmd_run, "report": cmd_report}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
