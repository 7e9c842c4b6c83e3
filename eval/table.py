"""One Markdown table from several `eval.sweep` CSVs: models side by side at the same r.

    python -m eval.table "ToMe (keys)=docs/a.csv" "DTEM modular=runs/b.csv" --r 0 7 11 \
        --out docs/dtem_cifar10.md

Each CSV is one sweep of one model; its rows at the requested r (the `tome` method, or the
r = 0 row) are taken as they are. im/s come from each model's own sweep, so compare the
measured speed-ups (each against the r = 0 row of the same run, timed side by side) rather
than im/s across models.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from eval.sweep import Row, format_markdown, read_csv


def pick(rows: list[Row], r: str, method: str = "tome") -> Row:
    """The row of schedule text r (the r = 0 row whatever its method); KeyError if absent."""
    for row in rows:
        if row["r"] == r and (r == "0" or row["method"] == method):
            return row
    have = sorted({row["r"] for row in rows})
    raise KeyError(f"no {method} row at r = {r} (the sweep has r in {have})")


def combine(named: Sequence[tuple[str, list[Row]]], rs: Sequence[str],
            method: str = "tome") -> list[Row]:
    """Rows ordered by r, then by model, each with "method" set to the model's name."""
    return [{**pick(rows, r, method), "method": name} for r in rs for name, rows in named]


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m eval.table", description=__doc__.split("\n")[0])
    p.add_argument("sweeps", nargs="+", help="NAME=PATH.csv, one per model")
    p.add_argument("--r", nargs="+", required=True, help="schedules as the sweeps wrote them")
    p.add_argument("--method", default="tome")
    p.add_argument("--out", help="also write the table to this .md file")
    a = p.parse_args(argv)
    named = []
    for item in a.sweeps:
        if "=" not in item:
            p.error(f"{item!r} is not NAME=PATH.csv")
        name, path = item.rsplit("=", 1)  # names may hold "=", paths rarely do
        named.append((name, read_csv(path)))
    text = format_markdown(combine(named, a.r, a.method)).replace("| method |", "| model |", 1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
