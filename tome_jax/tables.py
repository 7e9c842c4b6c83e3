"""Result tables: one Markdown writer and CSV round trips for every command that prints rows.

A CSV path may be an object-store URL (gs://bucket/sweep.csv, through `etils.epath`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tome_jax.storage import as_path, is_remote

Row = dict[str, Any]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are str()-ed, so format numbers before passing them."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells but the header {len(header)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path,
              columns: Sequence[str]) -> None:
    """One line per row, `columns` in order; a missing or None value is an empty cell."""
    if is_remote(path):  # an object is written whole: the text is built first
        buffer = io.StringIO(newline="")
        _write_rows(buffer, rows, columns)
        as_path(path).write_bytes(buffer.getvalue().encode())
        return
    with open(path, "w", newline="") as f:
        _write_rows(f, rows, columns)


def _write_rows(f: Any, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    w = csv.writer(f)
    w.writerow(columns)
    for row in rows:
        w.writerow(["" if row.get(c) is None else row[c] for c in columns])


def read_csv(path: str | Path, *, text: Sequence[str] = (), ints: Sequence[str] = ()
             ) -> list[Row]:
    """Rows back from `write_csv`: `text` columns as str, `ints` as int, the rest float.

    Empty cells become None, so an unmeasured value survives the round trip.
    """
    if is_remote(path):
        data = as_path(path).read_bytes().decode()
        rows = list(csv.DictReader(io.StringIO(data, newline="")))
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key in text:
                continue
            row[key] = None if value == "" else (int(value) if key in ints else float(value))
    return rows
