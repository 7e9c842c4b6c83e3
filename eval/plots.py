"""Redraws a sweep's plot from its CSV, without measuring again.

    python -m eval.plots docs/dinov2_sweep.csv docs/dinov2_sweep.png --title "..."
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from eval.sweep import plot, read_csv


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.plots", description=__doc__.split("\n")[1])
    p.add_argument("csv", help="a CSV written by python -m eval.sweep")
    p.add_argument("png", help="where to write the plot")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    rows = read_csv(args.csv)
    if not rows:
        p.error(f"{args.csv} holds no rows")
    plot(rows, args.png, args.title)


if __name__ == "__main__":
    main()
