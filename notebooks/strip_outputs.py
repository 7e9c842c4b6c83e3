"""Strips outputs and execution counts from notebooks, so they are committed clean.

    python notebooks/strip_outputs.py                 # every notebooks/*.ipynb
    python notebooks/strip_outputs.py A.ipynb B.ipynb # these files
    python notebooks/strip_outputs.py --check         # exit 1 if any notebook has outputs

Only the standard library: the notebook JSON is rewritten the way nbformat writes it (one-space
indent, sorted keys), so stripping a clean notebook changes nothing.
`tests/test_notebooks.py` checks that the committed notebooks are stripped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Cell metadata that only records a run (nbclient / JupyterLab timings, collapsed state).
RUN_METADATA = ("execution", "collapsed", "scrolled")


def strip(nb: dict) -> dict:
    """The notebook without outputs, execution counts or run metadata (modified in place)."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in RUN_METADATA:
            cell.get("metadata", {}).pop(key, None)
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="*", type=Path,
                   help="default: every .ipynb in this folder")
    p.add_argument("--check", action="store_true", help="report, do not rewrite")
    args = p.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    dirty = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        clean = dumps(strip(json.loads(text)))
        if clean != text:
            dirty.append(path)
            if not args.check:
                path.write_text(clean, encoding="utf-8")
    verb = "not stripped" if args.check else "stripped"
    for path in dirty:
        print(f"{verb}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
