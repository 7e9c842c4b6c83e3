"""A checkpoint's checksum manifest: the sha256 of every file in its step folder.

    write_manifest(step_dir)              # once orbax has finalised the folder
    problem = check_manifest(step_dir)    # None: intact; MISSING; or what differs, in words

The manifest (MANIFEST_FILE inside the step folder, written atomically) lists every other file
by its path relative to the folder, so moving or renaming the folder keeps it valid. On an
object store (a gs:// workdir) the manifest is written directly: an object appears whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tome_jax.storage import AnyPath, as_path, is_remote, list_files

MANIFEST_FILE = "checksums.json"
MISSING = "no checksum manifest"
_CHUNK = 1 << 20


def sha256(path: AnyPath) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: AnyPath) -> list[str]:
    """Relative paths of the folder's files, the manifest (and its temporary) left out."""
    return [name for name in list_files(step_dir)
            if not name.rsplit("/", 1)[-1].startswith(MANIFEST_FILE)]


def write_manifest(step_dir: str | Path) -> None:
    """Writes step_dir/MANIFEST_FILE: {"files": {relative path: sha256}}."""
    step_dir = as_path(step_dir)
    files = {name: sha256(step_dir / name) for name in _files(step_dir)}
    if is_remote(step_dir):
        (step_dir / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=0))
        return
    tmp = step_dir / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST_FILE)


def has_manifest(step_dir: str | Path) -> bool:
    return (as_path(step_dir) / MANIFEST_FILE).is_file()


def check_manifest(step_dir: str | Path) -> str | None:
    """None if every file matches the manifest; MISSING without one; else the first
    difference in words ("state/d/ab12 differs from its checksum", "... is missing")."""
    step_dir = as_path(step_dir)
    try:
        listed = json.loads((step_dir / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return MISSING
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST_FILE} is unreadable ({type(err).__name__})"
    if not isinstance(listed, dict):
        return f"its {MANIFEST_FILE} is unreadable (no file list)"
    for name, want in listed.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256(path) != want:
            return f"{name} differs from its checksum"
    extra = sorted(set(_files(step_dir)) - set(listed))
    if extra:
        return f"{extra[0]} is not in its {MANIFEST_FILE}"
    return None
