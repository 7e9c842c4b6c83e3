"""What a run reports: training-window means, eval accuracy, and where they go.

    log = MetricLog(workdir)                  # WORKDIR/metrics.jsonl (+ TensorBoard in WORKDIR/tb)
    log.write(step, summarise_window(window, started, schedule, update, batch))
    log.write(step, run_eval(cfg, model, params, mesh))
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tome_jax.evaluation import evaluate
from tome_jax.storage import AnyPath, is_remote
from tome_jax.training.config import Config
from tome_jax.training.inputs import eval_batches
from tome_jax.training.messages import line_left_open
from tome_jax.vit import ViT


class MetricLog:
    """JSONL (always) and TensorBoard event files (process 0).

    Opened at a resumed run's `start` step, it first drops the rows of steps after `start`
    (logged by the interrupted run after its last checkpoint, and about to be logged again), so
    every step has one row. A row cut short by a kill goes too.

    On an object store (a gs:// workdir), which cannot append, process 0 keeps the rows and
    rewrites the whole object at each write, as tf.io.gfile's append does there: a reader
    always sees a complete file. TensorBoard's writer reaches gs:// itself (tensorboardX,
    through google-cloud-storage).
    """

    def __init__(self, workdir: AnyPath, start: int = 0):
        path = workdir / "metrics.jsonl"
        self.path = path
        self.rows: list[str] | None = None  # object store: the whole file, rewritten per row
        self.jsonl = None
        if is_remote(path):
            if jax.process_index() == 0:
                self.rows = _read_rows(path, start)
        else:
            if jax.process_index() == 0 and path.exists():
                drop_rows_after(path, start)
            self.jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
        self.write_failed = False
        self.tb = None
        if jax.process_index() == 0:
            try:
                import tensorboardX
            except ImportError:  # metrics.jsonl holds the same rows
                print("tensorboardX is not installed: no TensorBoard events, metrics.jsonl "
                      "only", flush=True)
            else:
                self.tb = tensorboardX.SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Appends a row; a failed write (a full disk) is reported once and training goes on."""
        if jax.process_index() != 0:
            return
        row = json.dumps({"step": step, **metrics}) + "\n"
        try:
            if self.rows is not None:
                self.rows.append(row)
                self.path.write_text("".join(self.rows))
            else:
                self.jsonl.write(row)
                self.jsonl.flush()
        except OSError as err:
            if not self.write_failed:
                warnings.warn(f"{self.path} could not be written ({err.strerror or err}) at "
                              f"step {step}; training goes on", stacklevel=2)
            self.write_failed = True
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        try:
            if self.jsonl is not None:
                self.jsonl.close()
        except OSError:  # its last row did not fit; already reported by write()
            pass
        if self.tb is not None:
            self.tb.close()


def rows_up_to(lines: Sequence[str], step: int) -> list[str]:
    """The metrics.jsonl lines of steps up to `step`; unreadable ones left out."""
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    return kept


def _read_rows(path: AnyPath, step: int) -> list[str]:
    """An object-store metrics.jsonl's rows up to `step` (each with its newline), rewritten
    there at once when some were dropped; [] when there is none yet."""
    try:
        lines = path.read_bytes().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    kept = rows_up_to(lines, step)
    rows = [line + "\n" for line in kept]
    if len(kept) != len(lines):
        try:
            path.write_text("".join(rows))
        except OSError as err:
            warnings.warn(f"{path}: the rows after step {step} could not be dropped now "
                          f"({err.strerror or err}); the next row written rewrites it without "
                          "them", stacklevel=3)
    return rows


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrites a metrics.jsonl (atomically) without rows after `step` or unreadable ones."""
    lines = path.read_text(errors="replace").splitlines()
    kept = rows_up_to(lines, step)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    except OSError as err:  # a full disk: the rows stay, the run goes on
        tmp.unlink(missing_ok=True)
        warnings.warn(f"{path}: the rows after step {step} could not be dropped "
                      f"({err.strerror}); they will appear twice", stacklevel=3)


def summarise_window(window: Sequence[dict[str, jax.Array]], started: float,
                     schedule: Callable[[int], Any], update: int,
                     batch_size: int) -> dict[str, float]:
    """The mean of each step metric over a window of steps, then lr, step time and im/s.

    window: the per-step metric dicts (scalars); started: `time.perf_counter()` at the window's
    start. The clock is read after the means, which wait for the window's last step.
    """
    metrics = {k: float(np.mean([jax.device_get(m[k]) for m in window])) for k in window[0]}
    seconds = time.perf_counter() - started
    metrics.update(lr=float(schedule(update)), step_time=seconds / len(window),
                   images_per_s=len(window) * batch_size / seconds)
    return metrics


def run_eval(cfg: Config, model: ViT, params: Any, mesh: Mesh,
             eval_split: Any = None) -> dict[str, float]:
    """Top-1/top-5 on cfg.eval_split; eval_split: its decoded arrays (input_pipeline=device)."""
    # DTEM's soft merging is for training; evaluation uses the hard matching, as at inference.
    result = evaluate(model.clone(soft_merge=False), params, eval_batches(cfg, eval_split),
                      mesh=mesh, num_classes=cfg.num_classes)
    return {"eval_top1": result["top1"], "eval_top5": result["top5"],
            "eval_count": result["count"]}


def progress_bar(start: int, end: int) -> Callable[[int, dict[str, float]], None]:
    """A one-line console progress bar with ETA (process 0 only): show(step, metrics)."""
    t0 = time.perf_counter()

    def show(step: int, metrics: dict[str, float]) -> None:
        if jax.process_index() != 0:
            return
        frac = (step - start) / max(end - start, 1)
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(frac, 1e-9) * (1 - frac)
        bar = "#" * int(30 * frac)
        print(f"\r[{bar:<30}] {step}/{end} loss {metrics['loss']:.3f} "
              f"acc {metrics['accuracy']:.3f} {metrics['images_per_s']:.0f} im/s "
              f"eta {eta / 60:.1f} min", end="", file=sys.stderr, flush=True)
        line_left_open(True)

    return show
