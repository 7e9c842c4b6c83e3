r"""One Markdown table from several `eval.sweep` CSVs: models side by side at the same r.

    python -m eval.table "ToMe (keys)=docs/a.csv" "DTEM modular=runs/b.csv" --r 0 7 11 \
        --out docs/dtem_cifar10.md

Each CSV is one sweep of one model; its rows at the requested r (the `tome` strategy, or the
r = 0 row) are taken as they are. im/s come from each model's own sweep, so compare the
measured speed-ups (each against the r = 0 row of the same run, timed side by side) rather
than im/s across models.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tome_jax.cli.args import add_r, make_parser, run
from tome_jax.storage import as_path
from tome_jax.sweep import Row, format_markdown, read_csv, schedule_text


def pick(rows: list[Row], r: str, strategy: str = "tome") -> Row:
    """The row of schedule text r (the r = 0 row whatever its strategy); KeyError if absent."""
    for row in rows:
        if row["r"] == r and (r == "0" or row["strategy"] == strategy):
            return row
    have = sorted({row["r"] for row in rows})
    raise KeyError(f"no {strategy} row at r = {r} (the sweep has r in {have})")


def combine(named: Sequence[tuple[str, list[Row]]], rs: Sequence[str],
            strategy: str = "tome") -> list[Row]:
    """Rows ordered by r, then by model; each names its model in "model", not its strategy."""
    return [{"model": name, **{k: v for k, v in pick(rows, r, strategy).items()
                               if k != "strategy"}}
            for r in rs for name, rows in named]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m eval.table", __doc__)
    p.add_argument("sweeps", nargs="+", help="NAME=PATH.csv, one per model")
    add_r(p, many=True, required=True, help="schedules to line up, as for eval.sweep")
    p.add_argument("--strategy", default="tome", help="the rows to take at r > 0")
    p.add_argument("--out", help="also write the table to this .md file (may be an "
                                 "object-store URL, gs://BUCKET/PATH; so may the CSVs)")
    return p


def table_command(args: argparse.Namespace) -> str:
    """Reads the sweeps, prints (and with --out writes) the combined table; returns it."""
    named = []
    for item in args.sweeps:
        if "=" not in item:
            raise ValueError(f"{item!r} is not NAME=PATH.csv")
        name, path = item.rsplit("=", 1)  # names may hold "=", paths rarely do
        named.append((name, read_csv(path)))
    try:
        rows = combine(named, [schedule_text(r) for r in args.r], args.strategy)
    except KeyError as e:  # a sweep without that r: the user's choice of --r, not a bug
        raise ValueError(e.args[0]) from None
    text = format_markdown(rows)
    if args.out:
        as_path(args.out).write_text(text + "\n")
    print(text)
    return text


def main(argv: Sequence[str] | None = None) -> str:
    return run(build_parser(), table_command, argv)
