"""What a sweep has measured so far, kept as it goes so that an interrupted sweep resumes.

A sweep of a 224 px model over the 10,000 CIFAR-10 test images takes hours on a CPU, one
configuration after another. `OUT.partial.jsonl` holds one JSON line per configuration whose
quality (top-1 / top-5, feature fidelity) is measured, under a key naming everything those
figures depend on: the weights' bytes, the model, the data and the evaluation options. A
rerun with the same `--out` reuses the lines under its own key and measures the rest; the file
is removed once `OUT.csv` is written. Timing is never reused: speed-ups are ratios within one
interleaved timing run, so every configuration is timed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from tome_jax.storage import AnyPath, as_path, write_atomically

QUALITY = ("top1", "top5", "count", "fid_mean", "fid_min")
Measured = dict[tuple[str, str], dict[str, Any]]  # (strategy, r text) -> QUALITY values


def progress_path(out: str | os.PathLike) -> AnyPath:
    """The progress file of the sweep writing OUT.csv: OUT.partial.jsonl."""
    return as_path(f"{out}.partial.jsonl")


def _host_array(leaf: Any) -> np.ndarray:
    """A parameter leaf as numpy; a replicated array spread over processes by its local copy."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf)


def fingerprint(params: Any, identity: Mapping[str, Any]) -> str:
    """A key for (weights, everything else that fixes the figures): 16 hex digits.

    params: any pytree of arrays; its paths, dtypes, shapes and bytes all count.
    identity: JSON-able settings (model, data, split, image size, ...); key order does not count.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(_host_array(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(dict(identity), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def load(path: AnyPath, key: str) -> tuple[Measured, str | None]:
    """The configurations measured under `key` -> (measured, a warning line or None).

    A missing file is an empty start. Lines under another key (another model, data or options
    wrote to this OUT) or lines that do not parse are not used, and the warning says so: the
    sweep then measures those configurations again rather than trust them.
    """
    if not path.exists():
        return {}, None
    measured: Measured = {}
    foreign = broken = 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            strategy, r = str(entry["strategy"]), str(entry["r"])
            quality = {name: entry.get(name) for name in QUALITY}
            owner = entry["key"]
        except (ValueError, KeyError, TypeError):
            broken += 1
            continue
        if owner == key:
            measured[(strategy, r)] = quality
        else:
            foreign += 1
    problems = []
    if foreign:
        problems.append(f"{foreign} configuration(s) of another sweep (different weights, data "
                        "or options)")
    if broken:
        problems.append(f"{broken} line(s) that do not parse")
    warning = (f"warning: {path}: {' and '.join(problems)}; measuring those again"
               if problems else None)
    return measured, warning


def save(path: AnyPath, key: str, measured: Measured) -> None:
    """Writes every measured configuration under `key`, replacing the file whole, so a kill
    mid-write leaves the old file (`storage.write_atomically`)."""
    write_atomically(path, "".join(json.dumps({"key": key, "strategy": s, "r": r, **quality})
                                   + "\n" for (s, r), quality in measured.items()))


def remove(path: AnyPath) -> None:
    """Drops the progress file once the sweep's outputs are written (no error if absent)."""
    if path.exists():
        path.unlink()
