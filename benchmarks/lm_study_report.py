"""The report half of the language-modelling study (benchmarks/lm_study.py runs the training; this builds the
results files from its run log): per comparison, each arm's eval loss and bits per byte over seeds (mean ± std, per
seed), state-time, tokens/s, the advantage of CompreSSM over small-from-scratch with the issue-14 targets, the loss
at each reduction event and its recovery, the ablation tables and the HSV-stability probes.

    python benchmarks/lm_study.py report      # -> benchmarks/results/lm_study_<device>_<date>.{md,json}
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
from pathlib import Path

import torch
import lm_study
from lm_study import BASE, OPTIMIZER_KNOBS, RECIPES, VARIANTS, device_tag, stdlib_files


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 4) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _metric(row: dict) -> tuple[str, float]:
    return ("bpb", row["bpb"]) if "bpb" in row else ("accuracy", row["accuracy"])


def _same_optimizer(a: dict, b: dict) -> bool:
    ka, kb = a.get("knobs", {}), b.get("knobs", {})
    return all(ka.get(k) == kb.get(k) for k in OPTIMIZER_KNOBS)


def _scratch_curve(rows: list[dict], like: dict) -> list[tuple[float, float]]:
    """(total state size, metric) of every from-scratch run (no events) with `like`'s task, seed, length and
    optimizer knobs, sorted by size; duplicates of one size are averaged."""
    sizes: dict[int, list[float]] = {}
    for r in rows:
        if (r["task"] == like["task"] and r["seed"] == like["seed"] and r["max_steps"] == like["max_steps"]
                and not r["events"] and r.get("arm") not in ("posthoc-truncation", "posthoc-finetune")
                and _same_optimizer(r, like) and r.get("eval_blocks", 256) == like.get("eval_blocks", 256)):
            sizes.setdefault(sum(r["dims_after"]), []).append(_metric(r)[1])
    return sorted((size, statistics.mean(values)) for size, values in sizes.items())


def _interpolate_log2(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation in log2(total state) between measured from-scratch sizes (None outside their range)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            w = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + w * (y1 - y0)
    return None


def _optimizer_label(row: dict) -> str:
    """Short description of a run's optimizer knobs, e.g. "lr 0.01, wd 0.1 on all" or "lr 0.01, wd 0.1, SSM no wd x0.5"."""
    knobs = row.get("knobs", {})
    label = f"lr {knobs.get('learning_rate', BASE['learning_rate']):g}, wd {knobs.get('weight_decay', BASE['weight_decay']):g}"
    ssm_decay, factor = knobs.get("ssm_weight_decay"), knobs.get("ssm_lr_factor", 1.0)
    if ssm_decay is None and factor == 1.0:
        return label + " on all"
    return label + f", SSM wd {ssm_decay if ssm_decay is not None else knobs.get('weight_decay'):g} lr x{factor:g}"


def _knob_key(row: dict) -> str:
    knobs = row.get("knobs", {})
    base = {**BASE, **VARIANTS.get(row.get("variant"), {})}
    shown = {k: v for k, v in knobs.items() if k not in ("state_dims", "max_steps", "keep_model", "probe_every")
             and (k not in base or base[k] != v) and k not in VARIANTS.get(row.get("variant"), {})}
    return json.dumps(shown, sort_keys=True)


def _recovery(row: dict, baseline: dict | None) -> dict:
    """Event-level loss changes and the train-loss gap to the same-seed baseline (same batches) after the events."""
    out = {"eval_jump": [round(e["eval_loss_after"] - e["eval_loss_before"], 4) for e in row["events"]
                         if e.get("eval_loss_after") is not None]}
    if baseline and row["events"] and len(baseline["train_loss"]) == len(row["train_loss"]):
        last = max(e["step"] for e in row["events"])
        gaps = [a - b for a, b in zip(row["train_loss"], baseline["train_loss"])]
        for offset in (10, 50, 200):
            window = gaps[last: last + offset]
            out[f"gap_next_{offset}"] = round(statistics.mean(window), 4) if window else None
        out["gap_last_100"] = round(statistics.mean(gaps[-100:]), 4)
    return out


def build_report(rows: list[dict]) -> tuple[list[str], dict]:
    """Markdown lines and a JSON summary computed from the logged runs (no hand-written numbers)."""
    lines, summary = [], {"compare": [], "ablation": [], "probes": []}
    devices = sorted({(r.get("device"), r.get("threads")) for r in rows})
    lines += [f"- runs: {len(rows)}; device / torch threads: "
              + ", ".join(f"{d} / {t}" for d, t in devices)]
    # ---------------------------------------------------------------- the 4-arm comparison
    compare = [r for r in rows if r["study"] == "compare"]
    overview_count = 0
    overview = ["", "### Overview: CompreSSM vs small-from-scratch at the same per-layer sizes (every comparison)", "",
                "| task | recipe (tag) | steps | optimizer | seeds | CompreSSM | small from scratch | full baseline "
                "| advantage over small (wins) | > 1 std? | CompreSSM - baseline | state-time |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += overview
    overview_at = len(lines)  # rows are inserted here, in the order of the sections below
    for key in sorted({(r["task"], r["recipe"], r.get("tag", "")) for r in compare}):
        task, recipe, tag = key
        group = [r for r in compare if (r["task"], r["recipe"], r.get("tag", "")) == key]
        name = _metric(group[0])[0]
        lines += ["", f"### {task}: recipe `{recipe}`" + (f" (tag `{tag}`)" if tag else "")
                  + f" — {group[0]['max_steps']} steps, optimizer {_optimizer_label(group[0])}", "",
                  f"| arm | {name} (mean ± std) | eval loss (nats/token) | per seed | final dims per seed "
                  "| state-time vs baseline | train s (mean) | tokens/s (mean) | train loss, last 25% of steps |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        arms = []
        for arm in ("baseline", f"compressm[{recipe}]", "small-scratch", "posthoc-truncation", "posthoc-finetune"):
            members = sorted((r for r in group if r["arm"] == arm), key=lambda r: r["seed"])
            if not members:
                continue
            values = [_metric(r)[1] for r in members]
            cost = [r["state_time"] / r["state_time_full"] for r in members]
            full_steps = {r["max_steps"] for r in group if r["arm"] == "baseline"}
            tail_comparable = all("train_loss_tail" in r and r["max_steps"] in full_steps for r in members)
            lines.append(
                f"| {arm} | {_fmt(values)} | {_fmt([r['eval_loss'] for r in members])} "
                f"| {', '.join(f'{v:.4f}' for v in values)} | {'; '.join(str(r['dims_after']) for r in members)} "
                f"| {_fmt(cost, 3)} | {statistics.mean(r['train_seconds'] for r in members):.0f} "
                f"| {statistics.mean(r['tokens_per_second'] for r in members):.0f} "
                f"| {_fmt([r['train_loss_tail'] for r in members]) if tail_comparable else '-'} |")
            arms.append({"arm": arm, "seeds": [r["seed"] for r in members], name: values,
                         "eval_loss": [r["eval_loss"] for r in members], "dims": [r["dims_after"] for r in members],
                         "state_time_fraction": cost, "train_seconds": [r["train_seconds"] for r in members],
                         "tokens_per_second": [r["tokens_per_second"] for r in members]})
        by_arm = {a["arm"]: a for a in arms}
        comp, small, base = by_arm.get(f"compressm[{recipe}]"), by_arm.get("small-scratch"), by_arm.get("baseline")
        verdict = {}
        if comp and small and base:
            sign = -1.0 if name == "bpb" else 1.0  # positive = CompreSSM better
            small_of = dict(zip(small["seeds"], small[name]))
            base_of = dict(zip(base["seeds"], base[name]))
            paired = [sign * (c - small_of[s]) for s, c in zip(comp["seeds"], comp[name]) if s in small_of]
            to_base = [sign * (c - base_of[s]) for s, c in zip(comp["seeds"], comp[name]) if s in base_of]
            gap = sign * (_mean_std(comp[name])[0] - _mean_std(small[name])[0])
            largest_std = max(_mean_std(comp[name])[1], _mean_std(small[name])[1])
            base_gap = _mean_std(comp[name])[0] - _mean_std(base[name])[0]
            cost = _mean_std(comp["state_time_fraction"])[0]
            verdict = {"seeds": len(comp["seeds"]), "advantage_over_small": gap, "largest_std": largest_std,
                       "paired_advantage": paired, "wins": sum(p > 0 for p in paired),
                       "gap_to_baseline": base_gap, "paired_gap_to_baseline": to_base, "state_time_fraction": cost,
                       "beats_small_by_more_than_one_std": gap > largest_std,
                       "within_0.03_bpb_of_baseline": (base_gap <= 0.03) if name == "bpb" else None,
                       "state_time_at_most_60pct": cost <= 0.6}
            unit = "bpb" if name == "bpb" else "accuracy"
            lines += ["", f"- CompreSSM vs small-from-scratch: advantage {gap:+.4f} {unit} (positive = CompreSSM "
                      f"better; paired per seed {', '.join(f'{p:+.4f}' for p in paired)}; better on "
                      f"{verdict['wins']} of {len(paired)} seeds); largest seed std of the two arms {largest_std:.4f} "
                      f"-> {'more' if gap > largest_std else 'NOT more'} than one std.",
                      f"- CompreSSM vs full baseline: {base_gap:+.4f} {unit} (mean difference); state-time "
                      f"{cost:.3f} of the baseline's."]
            if name == "bpb":
                met = verdict["beats_small_by_more_than_one_std"] and verdict["within_0.03_bpb_of_baseline"] \
                    and verdict["state_time_at_most_60pct"] and len(comp["seeds"]) >= 3
                lines.append(f"- issue 14 targets (beat small by > 1 std, within 0.03 bpb of baseline, <= 60% "
                             f"state-time, >= 3 seeds): {'MET' if met else 'NOT met'}.")
                verdict["targets_met"] = met
            else:
                verdict["targets_met"] = verdict["beats_small_by_more_than_one_std"] and len(comp["seeds"]) >= 3
                lines.append(f"- digits check (beats small by more than one std, >= 3 seeds): "
                             f"{'MET' if verdict['targets_met'] else 'NOT met'}.")
            rec = [_recovery(r, next((b for b in group if b["arm"] == "baseline" and b["seed"] == r["seed"]), None))
                   for r in group if r["arm"] == f"compressm[{recipe}]"]
            if rec and "gap_last_100" in rec[0]:
                lines.append("- loss at the events (eval loss after minus before the event on 16 held-out blocks, digits: the test set, per event, seed "
                             "order) and train-loss gap to the same-seed baseline (same batches) after the last "
                             "event (next 10 / 50 / 200 steps, last 100 steps): " + "; ".join(
                                 f"{x['eval_jump']} / {x['gap_next_10']:+.3f} {x['gap_next_50']:+.3f} "
                                 f"{x['gap_next_200']:+.3f} {x['gap_last_100']:+.3f}" for x in rec))
            verdict["recovery"] = rec
        summary["compare"].append({"task": task, "recipe": recipe, "tag": tag, "recipe_knobs": RECIPES.get(recipe),
                                   "max_steps": group[0]["max_steps"], "optimizer": _optimizer_label(group[0]),
                                   "arms": arms, "verdict": verdict})
        if verdict:
            unit = "bpb" if name == "bpb" else "acc"
            overview_row = (
                f"| {task} | `{recipe}` ({tag}) | {group[0]['max_steps']} | {_optimizer_label(group[0])} "
                f"| {verdict['seeds']} | {_fmt(comp[name])} | {_fmt(small[name])} | {_fmt(base[name])} "
                f"| {verdict['advantage_over_small']:+.4f} {unit} ({verdict['wins']}/{len(verdict['paired_advantage'])}) "
                f"| {'yes' if verdict['beats_small_by_more_than_one_std'] else 'no'} "
                f"| {verdict['gap_to_baseline']:+.4f} | {verdict['state_time_fraction']:.3f} |")
            lines.insert(overview_at + overview_count, overview_row)
            overview_count += 1
    # ---------------------------------------------------------------- ablations
    ablation = [r for r in rows if r["study"] == "ablation"]
    for tag in sorted({r.get("tag", "") for r in ablation}):
        group = [r for r in ablation if r.get("tag", "") == tag]
        name = _metric(group[0])[0]
        blocks = sorted({r.get("eval_blocks", 256) for r in group})
        rates = sorted({r.get("knobs", {}).get("learning_rate") for r in group})
        lines += ["", f"### ablation `{tag}` ({group[0]['task']}, {group[0]['max_steps']} steps, learning rate "
                  f"{', '.join(f'{x:g}' for x in rates)}, eval on {', '.join(map(str, blocks))} held-out blocks)", "",
                  f"| variant | changed knobs | seeds | {name} (mean ± std) | per seed | final dims | state-time "
                  "| vs from-scratch curve at the same total size (per seed) | train-loss gap after last event "
                  "(next 50 / last 100 steps) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        keys = []
        for r in group:
            key = (r["variant"], _knob_key(r), tuple(r["dims_before"]))
            if key not in keys:
                keys.append(key)
        for variant, knobs, dims_before in keys:
            members = sorted((r for r in group if (r["variant"], _knob_key(r), tuple(r["dims_before"]))
                              == (variant, knobs, dims_before)), key=lambda r: r["seed"])
            values = [_metric(r)[1] for r in members]
            vs_curve = []
            for r in members:
                points = _scratch_curve(rows, r)
                ref = _interpolate_log2(points, sum(r["dims_after"])) if r["events"] else None
                vs_curve.append(None if ref is None else round(_metric(r)[1] - ref, 4))
            recovery = []
            for r in members:
                base = next((b for b in rows if b["study"] in ("ablation", "probe") and b["task"] == r["task"]
                             and b["seed"] == r["seed"] and not b["events"] and b["max_steps"] == r["max_steps"]
                             and b["dims_before"] == r["dims_before"] and _same_optimizer(b, r)), None)
                x = _recovery(r, base)
                recovery.append(f"{x['gap_next_50']:+.3f} / {x['gap_last_100']:+.3f}" if "gap_next_50" in x else "")
            cost = [r["state_time"] / r["state_time_full"] for r in members]
            lines.append(
                f"| {variant} | `{knobs}` | {len(members)} | {_fmt(values)} | {', '.join(f'{v:.4f}' for v in values)} "
                f"| {'; '.join(str(r['dims_after']) for r in members)} | {_fmt(cost, 3)} "
                f"| {', '.join('-' if v is None else f'{v:+.4f}' for v in vs_curve)} | {'; '.join(recovery)} |")
            summary["ablation"].append({"tag": tag, "variant": variant, "knobs": json.loads(knobs),
                                        "seeds": [r["seed"] for r in members], name: values,
                                        "dims": [r["dims_after"] for r in members], "state_time_fraction": cost,
                                        "vs_scratch_curve": vs_curve})
    # ---------------------------------------------------------------- HSV stability probes
    probes = [r for r in rows if r["study"] == "probe" and r.get("probes") and "overlap_0.25" in
              r["probes"][0]["vs_final"][0]]
    if probes:
        lines += ["", "### HSV stability (full-size runs without reduction; per layer)", "",
                  "| seed | step (fraction) | rank at tau=0.05 / 0.2 | Spearman of per-state importance vs final "
                  "| overlap of the rank-N/4 balanced subspace with the final one (random = 0.25) | rank-N/2 "
                  "overlap (random = 0.5) | Spearman(importance, abs(lambda)) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in probes:
            for entry in r["probes"]:
                fraction = entry["step"] / r["max_steps"]
                if not any(abs(fraction - f) < 1e-9 for f in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)):
                    continue
                vf = entry["vs_final"]
                lines.append(
                    f"| {r['seed']} | {entry['step']} ({fraction:.2f}) "
                    f"| {[x['0.05'] for x in entry['ranks']]} / {[x['0.2'] for x in entry['ranks']]} "
                    f"| {[round(x['importance_spearman'], 2) for x in vf]} | {[round(x['overlap_0.25'], 2) for x in vf]} "
                    f"| {[round(x['overlap_0.5'], 2) for x in vf]} "
                    f"| {[round(x['importance_vs_modulus_spearman'], 2) for x in vf]} |")
            summary["probes"].append({"seed": r["seed"], "task": r["task"], "probes": r["probes"]})
    return lines, summary


def cmd_report(args) -> None:
    rows = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    lines, summary = build_report(rows)
    train_files, eval_files, corpus = stdlib_files()
    date = args.date or datetime.date.today().isoformat()
    device = rows[0].get("device", device_tag()) if rows else device_tag()
    stem = lm_study.RESULTS_DIR / f"lm_study_{device}_{date}"  # read at call time: tests point it elsewhere
    header = [f"# CompreSSM language-modelling study (issue 14) — {device}, {date}", ""]
    header += Path(args.notes).read_text().splitlines() + [""] if args.notes else []
    header += ["## Setup", "",
               f"- corpus: {corpus['source']} ({len(train_files)} train files, {corpus['train_bytes']} bytes; "
               f"{len(eval_files)} held-out files, {corpus['eval_bytes']} bytes); SHA-256 of the file list and "
               f"contents `{corpus['sha256']}`; the file list with per-file hashes is in the JSON.",
               "- CPU timings: one process, OMP_NUM_THREADS=1 (torch threads 1), on a 2-core machine shared with "
               "other jobs: wall-clock and tokens/s are noisy; state-time (sum over steps of the summed per-layer "
               "state sizes) is the deterministic cost measure.", "", "## Results (generated from the run log)", ""]
    stem.with_suffix(".md").write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    payload = {"date": date, "device": device, "python": platform.python_version(), "torch": torch.__version__,
               "corpus": corpus, "base_recipe": BASE, "variants": VARIANTS, "recipes": RECIPES, **summary,
               "run_log": str(Path(args.log).name)}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {stem}.md and .json")


