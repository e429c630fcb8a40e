"""Wall-clock of the README quick start (`compressm train`, the digits default) at given torch thread counts.

    python benchmarks/quickstart_time.py --threads 1 2          # writes benchmarks/results/quickstart_cpu-<date>.md

Each run is a fresh `compressm train --threads N --no-progress` process in a temporary folder (OMP_NUM_THREADS unset,
so `--threads` decides). The report gives, per run, the training time and total time the command prints, the process
wall-clock, the test accuracy and state sizes, and the machine's load average before and after: on shared machines the
load changes the figures a lot, so read them together.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_once(threads: int, extra: list[str]) -> dict:
    script = Path(sys.executable).with_name("compressm")
    command = [str(script) if script.exists() else "compressm", "train", "--threads", str(threads), "--no-progress",
               *extra]
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="compressm-quickstart-") as folder:
        load_before = os.getloadavg()
        started = time.perf_counter()
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    out = result.stdout
    times = re.search(r"train time\s+: ([\d.]+) s \(total ([\d.]+) s", out)
    total_dims = re.search(r"^ total\s+\| (\d+)\s+\| (\d+)", out, re.M)
    return {
        "threads": threads,
        "train_s": float(times.group(1)),
        "command_total_s": float(times.group(2)),
        "process_wall_s": wall,
        "accuracy": float(re.search(r"test accuracy : ([\d.]+)", out).group(1)),
        "dims": f"{total_dims.group(1)} -> {total_dims.group(2)}",
        "load_before": load_before[0],
        "load_after": load_after[0],
        "command": " ".join(["compressm", *command[1:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `compressm train` arguments")
    parser.add_argument("--output", default=None,
                        help="report path (default benchmarks/results/quickstart_cpu-<date>.md)")
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        row = run_once(threads, args.extra)
        print(f"threads {threads}: train {row['train_s']:.1f} s, process {row['process_wall_s']:.1f} s, "
              f"accuracy {row['accuracy']:.4f}, state {row['dims']}, load {row['load_before']:.1f}"
              f" -> {row['load_after']:.1f}", flush=True)
        rows.append(row)
    date = datetime.date.today().isoformat()
    output = Path(args.output) if args.output else RESULTS / f"quickstart_cpu-{date}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# README quick start (`compressm train`) on CPU, {date}",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs visible, {platform.platform()}",
        f"- python {platform.python_version()}; command run once per thread count, OMP_NUM_THREADS unset",
        "",
        "| torch threads | training (s) | command total (s) | process wall (s) | test accuracy | total state | "
        "load avg before -> after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['threads']} | {r['train_s']:.1f} | {r['command_total_s']:.1f} | {r['process_wall_s']:.1f} | "
              f"{r['accuracy']:.4f} | {r['dims']} | {r['load_before']:.1f} -> {r['load_after']:.1f} |" for r in rows]
    lines += ["", f"Command: `{rows[0]['command']}` (with the thread count of each row).", ""]
    output.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
