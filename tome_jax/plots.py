"""The sweep plot: quality against measured speed and against GFLOPs, one line per strategy.

    plot(tome_jax.sweep.read_csv("docs/dinov2_sweep.csv"), "dinov2_sweep.png", "DINOv2")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def plot(rows: Sequence[Row], path: str | Path, title: str = "") -> None:
    """Quality vs im/s and vs GFLOPs, one line per strategy through the shared r = 0 point.

    rows: `tome_jax.sweep` rows, rows[0] the r = 0 row. Quality is top-1 when measured, else
    the mean cosine fidelity (with the worst image's as a dashed line). An x axis nobody
    measured (im/s with --runs 0) is left out.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps tests headless
    import matplotlib.pyplot as plt

    key = "top1" if rows[0].get("top1") is not None else "fid_mean"
    label = "top-1 accuracy" if key == "top1" else "cosine similarity to r = 0 features"
    xs = [("im_s", "images / s (measured)"), ("gflops", "GFLOPs per image")]
    xs = [x for x in xs if rows[0].get(x[0]) is not None]
    fig, axes = plt.subplots(1, len(xs), figsize=(6 * len(xs), 4.5), squeeze=False)
    base = rows[0]
    strategies = list(dict.fromkeys(row["strategy"] for row in rows[1:])) or ["-"]
    for ax, (x, xlabel) in zip(axes[0], xs, strict=True):
        for strategy in strategies:
            line = [base] + [row for row in rows[1:] if row["strategy"] == strategy]
            (drawn,) = ax.plot([row[x] for row in line], [row[key] for row in line], "o-",
                               label=strategy)
            if key == "fid_mean":  # the worst image too: a mean can hide a few broken ones
                ax.plot([row[x] for row in line], [row["fid_min"] for row in line], "x--",
                        color=drawn.get_color(), alpha=0.5, label=f"{strategy} (min)")
            for row in line:
                ax.annotate(str(row["r"]), (row[x], row[key]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(title="strategy (labels: r)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
