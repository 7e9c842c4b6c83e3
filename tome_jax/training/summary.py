"""A table of training runs from their metrics.jsonl: step time, im/s, final loss, eval.

Step time is the median over the logged windows, leaving out the first one (it holds the
compile); the speed-up column is against a baseline run.

    rows = [summarise(read_metrics(w)) for w in workdirs]
    print(format_table(names, rows, baseline=0))
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tome_jax.storage import as_path


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl, in order (WORKDIR may be a gs:// URL)."""
    path = as_path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a train.train workdir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{"steps", "step_time" (median s), "images_per_s" (median), "loss", "eval_top1"}."""
    train = [r for r in records if "step_time" in r]
    if not train:
        raise ValueError("no training windows logged")
    timed = train[1:] or train  # the first window includes compilation
    evals = [r for r in records if "eval_top1" in r]
    return {"steps": train[-1]["step"],
            "step_time": statistics.median(r["step_time"] for r in timed),
            "images_per_s": statistics.median(r["images_per_s"] for r in timed),
            "loss": train[-1].get("loss"),
            "eval_top1": evals[-1]["eval_top1"] if evals else None}


def format_table(names: Sequence[str], rows: Sequence[dict[str, Any]], baseline: int = 0) -> str:
    """A Markdown table, one row per run; speed-ups against rows[baseline]."""
    lines = ["| run | steps | median step s | im/s | train step speed-up | last loss | "
             "eval top-1 |", "|---|---|---|---|---|---|---|"]
    base = rows[baseline]["step_time"]
    for name, row in zip(names, rows, strict=True):
        top1 = "-" if row["eval_top1"] is None else f"{row['eval_top1']:.4f}"
        loss = "-" if row["loss"] is None else f"{row['loss']:.3f}"
        lines.append(f"| {name} | {row['steps']} | {row['step_time']:.3f} | "
                     f"{row['images_per_s']:.1f} | {base / row['step_time']:.2f}x | {loss} | "
                     f"{top1} |")
    return "\n".join(lines)
