r"""DINOv2-S/14 on CIFAR-10, end to end: fine-tune, ship, and measure merging on it.

    python -m train.dinov2_cifar10 --backbone models/dinov2_s14_224 \
        --data-dir CIFAR10_JPEG --work runs/dinov2_cifar10 --budget-s 3600

Runs the project's own commands in order, each printed before it runs:
  1. `train.train --config train/configs/dinov2_s14_cifar10.json` from the backbone
     (`init_from`), into WORK/ft;
  2. `train.ship --param-dtype float16` into WORK/dinov2_s14_cifar10 (the model directory);
  3. `eval.sweep` on the test split: ToMe, random merging and class-attention pruning at each
     --r, with accuracy, GFLOPs and images/s;
  4. DTEM modular (`train/configs/dtem_dinov2_s14_cifar10.json`: backbone and head frozen, only
     the merge embeddings train) from the model, one run per (--dtem-r, --seed), all side by
     side on the one device, each shipped;
  5. `eval.paired` at each --dtem-r: ToMe on the keys against every DTEM seed on the same images
     (difference with 95% CI, McNemar p).
Meant for one GPU: on an NVIDIA H200 the fine-tune alone took 8.5 minutes (367 images/s, see
docs/benchmark.md), so give the whole chain half an hour or more; on a CPU, --smoke checks the
chain at 28 px in a few minutes. The DTEM runs get the steps that the time left allows
(--dtem-min-steps to --dtem-max-steps), from the fine-tune's measured step time. A step the
budget cannot fit is skipped and says so; the exit status is 1 if any command failed.
Rerunning with the same WORK skips the fine-tune once its model directory exists.
WORK/summary.json records every command, its wall time and exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tome_jax.training.summary import read_metrics, summarise

CONFIGS = Path(__file__).resolve().parent / "configs"
FINETUNE = CONFIGS / "dinov2_s14_cifar10.json"
DTEM = CONFIGS / "dtem_dinov2_s14_cifar10.json"
# A tiny stand-in for a CPU check of the whole chain: 28 px (4 patches), a few steps.
SMOKE = {"finetune": ["image_size=28", "steps=4", "batch_size=16", "save_every=4",
                      "eval_every=4", "eval_batch_size=250", "log_every=1", "warmup_steps=1"],
         "dtem": ["image_size=28", "batch_size=16", "save_every=1000", "log_every=1"]}


class Budget:
    """Seconds left before `deadline` (time.monotonic())."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.dinov2_cifar10", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="the converted DINOv2-S/14 model directory")
    p.add_argument("--data-dir", required=True, help="the cifar10_jpeg folder or .tar")
    p.add_argument("--dataset", default="cifar10_jpeg", choices=("cifar10_jpeg", "image_folder"),
                   help="image_folder: any <split>/<class>/ folder of 10 classes")
    p.add_argument("--work", required=True, help="new or resumable folder for every output")
    p.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock budget, seconds")
    p.add_argument("--r", nargs="+", default=["0", "8", "14", "18", "21"],
                   help="sweep schedules (r = 14 and 21 cut S/14@224's FLOPs by 35%% and 51%%)")
    p.add_argument("--dtem-r", nargs="+", default=["14", "21"])
    p.add_argument("--seed", nargs="+", type=int, default=[0, 1], help="DTEM seeds")
    p.add_argument("--dtem-min-steps", type=int, default=100)
    p.add_argument("--dtem-max-steps", type=int, default=600)
    p.add_argument("--sweep-runs", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the chain on a CPU")
    return p


@dataclasses.dataclass
class Started:
    """A command started by `run`: its process, its record in the log, its timeout (s)."""
    proc: subprocess.Popen
    entry: dict
    timeout: float


def run(cmd: Sequence[str], log: list[dict], timeout: float, env: dict | None = None,
        wait: bool = True) -> Started | int | str:
    """Runs (or with wait=False starts) one command; its record goes into `log`."""
    print("+", shlex.join(cmd), flush=True)
    entry = {"cmd": shlex.join(cmd), "start": time.time()}
    log.append(entry)
    started = Started(subprocess.Popen(list(cmd), env={**os.environ, **(env or {})}), entry,
                      timeout)
    return finish(started) if wait else started


def finish(started: Started) -> int | str:
    """Waits for a started command within its timeout (killed past it); its exit status, or
    "timeout"."""
    entry = started.entry
    try:
        rc = started.proc.wait(timeout=max(1.0, started.timeout - (time.time() - entry["start"])))
    except subprocess.TimeoutExpired:
        started.proc.kill()
        started.proc.wait()
        rc = "timeout"
    entry.update(seconds=round(time.time() - entry["start"], 1), rc=rc)
    print(f"  -> {rc} after {entry['seconds']} s", flush=True)
    return rc


def step_time(workdir: Path) -> float | None:
    """The median logged training step time (seconds) of a train.train workdir."""
    try:
        return summarise(read_metrics(workdir))["step_time"]
    except (FileNotFoundError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = Budget(args.budget_s)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    py = sys.executable
    data = [f"data_dir={args.data_dir}", f"dataset={args.dataset}"]
    smoke_ft = SMOKE["finetune"] if args.smoke else []
    smoke_dtem = SMOKE["dtem"] if args.smoke else []
    model = work / "dinov2_s14_cifar10"
    summary = {"log": log, "skipped": []}

    def save() -> None:
        (work / "summary.json").write_text(json.dumps(summary, indent=1))

    def skip(what: str) -> None:
        print(f"skipped: {what} ({budget.left():.0f} s left)", flush=True)
        summary["skipped"].append(what)
        save()

    try:
        # 1-2. Fine-tune and ship: everything else needs the model.
        if not model.exists():
            rc = run([py, "-m", "train.train", "--config", str(FINETUNE), "--workdir",
                      str(work / "ft"), "--set", f"init_from={args.backbone}", *data, *smoke_ft],
                     log, budget.left() - 20)
            if rc != 0:
                return 1
            if run([py, "-m", "train.ship", "--workdir", str(work / "ft"), "--out", str(model),
                    "--param-dtype", "float16"], log, budget.left()) != 0:
                return 1
        summary["finetune_step_s"] = ft_step = step_time(work / "ft")
        save()

        # 3. The off-the-shelf table on the test split.
        sweep_out = work / "sweep"
        if budget.left() > 120 or args.smoke:
            run([py, "-m", "eval.sweep", "--checkpoint", str(model), "--data", args.dataset,
                 "--data-dir", args.data_dir, "--r", *args.r, "--strategy", "tome", "random",
                 "prune", "--batch-size", "500", "--runs", str(args.sweep_runs), "--out",
                 str(sweep_out), "--no-progress", "--cache-mib", "8192"], log,
                budget.left() - 90)
        else:
            skip("sweep")
        save()

        # 4. DTEM modular, all runs at once: on a large GPU one small-model run leaves most of
        # it idle, and the compiles run on separate CPU cores.
        runs = [(r, s) for r in args.dtem_r for s in args.seed]
        reserve = 75.0  # startup and compile of the DTEM runs, shipping, the paired tables
        left = budget.left() - reserve - 60
        steps = args.dtem_min_steps
        if ft_step and not args.smoke:
            # A DTEM step at half the batch costs about a fine-tune step (float32, the backward
            # pass through the frozen blocks); the runs share one device.
            steps = int(left / (ft_step * len(runs)))
        steps = min(max(steps, args.dtem_min_steps), args.dtem_max_steps)
        if args.smoke:
            steps = 3
        summary["dtem_steps"] = steps
        if left < 30 and not args.smoke:
            skip("dtem")
            return 0
        fraction = f"{0.9 / len(runs):.2f}"
        procs = []
        for r, seed in runs:
            wd = work / f"dtem_r{r}_s{seed}"
            procs.append(run([py, "-m", "train.train", "--config", str(DTEM), "--workdir",
                              str(wd), "--set", f"init_from={model}", *data, f"r={r}",
                              f"seed={seed}", f"steps={steps}", f"save_every={steps}",
                              *smoke_dtem], log, budget.left() - 45,
                             env={"XLA_PYTHON_CLIENT_MEM_FRACTION": fraction}, wait=False))
        codes = [finish(p) for p in procs]
        shipped = {}
        for (r, seed), rc in zip(runs, codes, strict=True):
            out = work / f"dtem_r{r}_s{seed}_model"
            if rc == 0 and (out.exists() or run(
                    [py, "-m", "train.ship", "--workdir", str(work / f"dtem_r{r}_s{seed}"),
                     "--out", str(out)], log, budget.left()) == 0):
                shipped.setdefault(r, []).append((seed, out))
        save()

        # 5. Paired tables, one per r, side by side.
        procs = []
        for r in args.dtem_r:
            if not shipped.get(r):
                skip(f"paired r={r}")
                continue
            specs = [f"ToMe (keys)={model}"] + [f"DTEM modular seed {s}={m}"
                                                 for s, m in shipped[r]]
            procs.append(run([py, "-m", "eval.paired", "--data", args.dataset, "--data-dir",
                              args.data_dir, "--r", r,
                              *specs, "--out", str(work / f"paired_r{r}.md")], log,
                             budget.left() - 5, wait=False,
                             env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.4"}))
        for p in procs:
            finish(p)
        return 0 if all(e.get("rc") == 0 for e in log) else 1
    finally:
        summary["budget_left_s"] = round(budget.left(), 1)
        save()


if __name__ == "__main__":
    sys.exit(main())
