"""Kill a training run with SIGKILL at random moments and check that the newest checkpoint resumes.

Each trial starts a tiny CompreSSM training run (checkpoint at every step, reductions at steps 10, 20, 30), kills it
with SIGKILL at a moment drawn uniformly between its first and its last checkpoint (the span measured by a calibration
run, counted from the first checkpoint of each run, since start-up time varies with load), then
  * finds the newest folder named `checkpoint-<step>` (`transformers.trainer_utils.get_last_checkpoint`, what
    `resume_from_checkpoint=True` uses) and checks that it holds every file of a checkpoint,
  * resumes from it in a new process with `resume_from_checkpoint=True` and checks that the run completes with the
    sizes of an uninterrupted run.
It also records whether the kill landed inside a save (the staging folder or an incomplete checkpoint existed).

    OMP_NUM_THREADS=1 python benchmarks/kill_resume.py --kills 20 [--trainer compressm|plain] [--seed 0]

`--trainer plain` runs the same with `transformers.Trainer` (+ prepare_model_for_resume), whose saves are not atomic.
Writes benchmarks/results/kill_resume_<trainer>_cpu_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 40
REQUIRED = ("config.json", "model.safetensors", "compressm_history.json", "trainer_state.json", "optimizer.pt",
            "scheduler.pt", "rng_state.pth")


def worker(output_dir: str, trainer_kind: str, resume: bool) -> None:
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    sys.path.insert(0, str(ROOT / "tests"))
    from tasks import SignTask, tiny_classifier

    from modeling_compressm import CompreSSMCallback, CompreSSMTrainer, prepare_model_for_resume

    torch.set_num_threads(1)
    model = tiny_classifier()
    callback = CompreSSMCallback(policy="fixed", fraction=0.25, start_step=10, end_step=30, interval=10)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=16, learning_rate=3e-3,
        logging_steps=1000, report_to="none", disable_tqdm=True, save_strategy="steps", save_steps=1, use_cpu=True,
        seed=0,
    )
    checkpoint = get_last_checkpoint(output_dir) if resume else None
    if trainer_kind == "plain":
        if checkpoint is not None:
            prepare_model_for_resume(model, checkpoint)
        trainer = Trainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback])
    else:
        trainer = CompreSSMTrainer(model=model, args=args, train_dataset=SignTask(256), callbacks=[callback])
    print("TRAINING", flush=True)
    trainer.train(resume_from_checkpoint=checkpoint if resume else None)
    print("RESULT " + json.dumps({"step": trainer.state.global_step, "dims": model.config.state_dims,
                                  "resumed_from": checkpoint}), flush=True)


def start(output_dir, trainer_kind, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, __file__, "--worker", output_dir, "--trainer", trainer_kind]
    if resume:
        command.append("--resume")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def result_of(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[-1][7:]) if lines else None), stderr


def checkpoint_names(folder: Path) -> list[str]:
    return sorted((path.name for path in folder.iterdir() if path.name.startswith("checkpoint-")),
                  key=lambda name: int(name.split("-")[1]) if name.split("-")[1].isdigit() else -1)


def calibrate(trainer_kind):
    folder = tempfile.mkdtemp(prefix="kill-calibrate-")
    began = time.monotonic()
    process = start(folder, trainer_kind)
    first = last = None
    while process.poll() is None:
        names = os.listdir(folder) if os.path.isdir(folder) else []
        if first is None and any(name.startswith("checkpoint-") for name in names):
            first = time.monotonic() - began
        if last is None and f"checkpoint-{MAX_STEPS}" in names:
            last = time.monotonic() - began
        time.sleep(0.005)
    total = last if last is not None else time.monotonic() - began
    result, stderr = result_of(process)
    shutil.rmtree(folder, ignore_errors=True)
    if result is None:
        raise SystemExit(f"calibration run failed:\n{stderr[-3000:]}")
    return first, total, result["dims"]


def trial(index, kill_at, trainer_kind, reference_dims):
    """Kill `kill_at` seconds after this run's first checkpoint appeared (start-up time varies with load)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(tempfile.mkdtemp(prefix=f"kill-{index}-"))
    process = start(str(folder), trainer_kind)
    while process.poll() is None and not any(name.startswith("checkpoint-") for name in os.listdir(folder)):
        time.sleep(0.002)
    began = time.monotonic()
    while process.poll() is None and time.monotonic() - began < kill_at:
        time.sleep(0.002)
    if process.poll() is not None:
        shutil.rmtree(folder, ignore_errors=True)
        return {"trial": index, "kill_after_first_checkpoint_s": kill_at, "killed": False}
    staging_existed = (folder / ".compressm-staging").exists()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    newest = get_last_checkpoint(str(folder))
    record = {"trial": index, "kill_after_first_checkpoint_s": round(kill_at, 3), "killed": True,
              "newest_checkpoint": Path(newest).name if newest else None, "staging_existed": staging_existed}
    missing = [name for name in REQUIRED if newest and not (Path(newest) / name).is_file()]
    record["newest_missing_files"] = missing
    resumed, stderr = result_of(start(str(folder), trainer_kind, resume=True))
    record["resumed"] = bool(resumed and resumed["step"] >= MAX_STEPS)
    record["resumed_dims_match"] = bool(resumed and resumed["dims"] == reference_dims)
    if not record["resumed"]:
        record["resume_error"] = stderr.strip().splitlines()[-1][-300:] if stderr.strip() else "no output"
    shutil.rmtree(folder, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--trainer", choices=("compressm", "plain"), default="compressm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.worker, options.trainer, options.resume)
        return
    first, total, reference_dims = calibrate(options.trainer)
    print(f"calibration: first checkpoint after {first:.2f} s, last after {total:.2f} s, final sizes {reference_dims}")
    rng = random.Random(options.seed)
    records = []
    for index in range(options.kills):
        record = trial(index, rng.uniform(0.0, total - first), options.trainer, reference_dims)
        records.append(record)
        print(json.dumps(record), flush=True)
    killed = [record for record in records if record["killed"]]
    summary = {
        "trainer": options.trainer,
        "kills_requested": options.kills,
        "killed_while_running": len(killed),
        "kills_during_a_save": sum(record["staging_existed"] or bool(record["newest_missing_files"]) for record in killed),
        "newest_checkpoint_complete": sum(not record["newest_missing_files"] for record in killed),
        "resumed_to_the_end": sum(record["resumed"] for record in killed),
        "final_sizes_match_uninterrupted": sum(record["resumed_dims_match"] for record in killed),
        "calibration": {"first_checkpoint_s": first, "last_checkpoint_s": total, "final_sizes": reference_dims},
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "threads": "OMP_NUM_THREADS=1",
        "date": datetime.date.today().isoformat(),
        "trials": records,
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"kill_resume_{options.trainer}_cpu_{summary['date']}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# SIGKILL at random moments, then resume ({options.trainer} trainer)",
        "",
        f"{summary['date']}, {summary['machine']}, {summary['threads']}; run: {MAX_STEPS} steps, checkpoint every step, "
        f"reductions at steps 10/20/30 (`python benchmarks/kill_resume.py --kills {options.kills} --trainer "
        f"{options.trainer} --seed {options.seed}`).",
        "",
        "| kills while running | of them during a save | newest checkpoint complete | resumed to the end | final sizes as uninterrupted |",
        "| --- | --- | --- | --- | --- |",
        f"| {len(killed)} | {summary['kills_during_a_save']} | {summary['newest_checkpoint_complete']} | "
        f"{summary['resumed_to_the_end']} | {summary['final_sizes_match_uninterrupted']} |",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
