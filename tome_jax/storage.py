"""Paths that may be object-store URLs (gs://bucket/run), through `etils.epath` as orbax does.

    path = as_path("gs://bucket/run")     # an epath.Path (gs://, s3://, az://, hf://)
    path = as_path("runs/cifar10")        # a pathlib.Path, exactly as before
    if is_remote(path): ...               # what an object store does differently

A local path stays a `pathlib.Path`, so local files keep what only a filesystem gives (atomic
renames of temporary files and folders, fsync, flock, appends). A URL becomes an `epath.Path`,
and the few places that rely on those branch on `is_remote`: on an object store a written
object appears whole when its write completes, so it is written directly, and an object is
replaced, never appended to. epath reaches gs:// through `tf.io.gfile` when TensorFlow is
installed, else through fsspec (`pip install gcsfs`).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from etils import epath

AnyPath = Union[pathlib.Path, "epath.Path"]  # what as_path returns

URL_SCHEMES = ("gs", "s3", "az", "hf")  # the ones etils.epath reaches
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(path: str | os.PathLike) -> str | None:
    """"gs" for "gs://bucket/x", None for a local path."""
    match = _URL.match(os.fspath(path))
    return match.group(1).lower() if match else None


def as_path(path: str | os.PathLike) -> AnyPath:
    """A pathlib.Path for a local path, an epath.Path for a URL; ValueError for a URL scheme
    epath does not reach."""
    if isinstance(path, pathlib.Path):
        return path
    text = os.fspath(path)
    scheme = url_scheme(text)
    if scheme is None:
        return pathlib.Path(text)
    if scheme not in URL_SCHEMES:
        raise ValueError(f"{text}: unsupported URL scheme {scheme}:// (paths may be local or "
                         f"{', '.join(s + '://' for s in URL_SCHEMES)})")
    from etils import epath

    return epath.Path(text)


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store URL (or an epath.Path holding one)."""
    return url_scheme(path) is not None


def list_files(folder: AnyPath) -> list[str]:
    """Paths of every file under `folder`, relative to it, sorted. Locally `rglob`; on an
    object store one listing per folder (epath has no recursive glob there)."""
    if not is_remote(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    found = []
    todo = [(folder, "")]
    while todo:
        here, prefix = todo.pop()
        for child in here.iterdir():
            name = prefix + child.name
            if child.is_dir():
                todo.append((child, name + "/"))
            else:
                found.append(name)
    return sorted(found)


def copy_tree(src: AnyPath, dst: AnyPath) -> None:
    """Copies every file under `src` to the same place under `dst`, streamed (an object store
    has no rename of a folder: moving one is a copy and a delete)."""
    import shutil

    for name in list_files(src):
        target = dst / name
        if not is_remote(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        with (src / name).open("rb") as reader, target.open("wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 24)


def remove_tree(path: AnyPath) -> None:
    """Removes a folder and everything in it; errors ignored (shutil.rmtree's ignore_errors)."""
    if not is_remote(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.rmtree(missing_ok=True)
    except Exception:  # noqa: BLE001 - backends raise their own types; best effort like rmtree
        pass


def local_log_dir(url: AnyPath) -> pathlib.Path:
    """A local folder for the files a `logging.FileHandler` writes on behalf of a URL workdir
    (it cannot write to an object store): TMPDIR/tome_jax/<scheme>/<bucket>/<path>."""
    import tempfile

    text = os.fspath(url)
    scheme = url_scheme(text) or "local"
    rest = [p for p in text.split("://", 1)[-1].split("/") if p not in ("", ".", "..")]
    return pathlib.Path(tempfile.gettempdir(), "tome_jax", scheme, *rest)


def write_atomically(path: AnyPath, text: str) -> None:
    """Replaces `path` by `text` all at once; an OSError names `path` (a full disk)."""
    if is_remote(path):  # an object appears whole once written
        try:
            path.write_text(text)
        except OSError as err:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
