"""Redraws a sweep's plot from its CSV, without measuring again.

    python -m eval.plots docs/dinov2_sweep.csv docs/dinov2_sweep.png --title "..."
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tome_jax.cli.args import make_parser, run


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m eval.plots", __doc__)
    p.add_argument("csv", help="a CSV written by python -m eval.sweep")
    p.add_argument("png", help="where to write the plot (the suffix picks the format); may "
                               "be an object-store URL, gs://BUCKET/PATH")
    p.add_argument("--title", default="")
    return p


def plots_command(args: argparse.Namespace) -> None:
    """Reads the CSV and writes the PNG; ValueError when the CSV holds no rows."""
    from tome_jax.cli.sweep import write_plot
    from tome_jax.sweep import read_csv

    rows = read_csv(args.csv)
    if not rows:
        raise ValueError(f"{args.csv} holds no rows")
    write_plot(rows, args.png, args.title)


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), plots_command, argv)
