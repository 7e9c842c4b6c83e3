"""A table of training runs from their metrics.jsonl: step time, im/s, final loss, eval.

    python -m train.summary runs/ft_r0 runs/ft_r11 [--baseline runs/ft_r0]

Step time is the median over the logged windows, leaving out the first one (it holds the
compile); the speed-up column is against --baseline (default the first run).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tome_jax.cli.args import make_parser, run
from tome_jax.training.summary import format_table, read_metrics, summarise


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m train.summary", __doc__)
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--baseline", help="workdir the speed-ups are measured against")
    return parser


def _summary(args: argparse.Namespace) -> str:
    if args.baseline and args.baseline not in args.workdirs:
        raise ValueError(f"--baseline {args.baseline} is not one of the workdirs")
    names = [Path(w).name for w in args.workdirs]
    rows = [summarise(read_metrics(w)) for w in args.workdirs]
    baseline = args.workdirs.index(args.baseline) if args.baseline else 0
    text = format_table(names, rows, baseline)
    print(text)
    return text


def main(argv: Sequence[str] | None = None) -> str:
    return run(build_parser(), _summary, argv)


if __name__ == "__main__":
    main()
