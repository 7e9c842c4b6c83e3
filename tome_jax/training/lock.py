"""One trainer per workdir: WORKDIR/train.lock, held for the whole run.

    with WorkdirLock(workdir):      # WorkdirLocked if another trainer holds it
        ...

The file holds its holder as JSON ({"host", "pid", "since"}) and is flock-ed while held, so the
kernel frees it when the holder dies however it dies. A lock file left behind whose holder no
longer runs on this host is stale: it is taken over with one warning. A holder on another host
cannot be checked from here; such a lock is refused, with the file to delete if that run is
gone.

On an object store (a gs:// workdir) there is neither flock nor an exclusive create: the lock
is an object holding the record and a random token, written and then read back, and the run
holds it when it reads back its own token. That is best-effort: two trainers starting within
the same moment can both read back their own record. A lock object whose holder died without
releasing it stays until a trainer on the same host finds its pid gone, or until it is deleted
by hand (the refusal names it).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any

from tome_jax.storage import as_path, is_remote

LOCK_FILE = "train.lock"


class WorkdirLocked(FileExistsError):
    """Another trainer holds the workdir (the message names it)."""


def describe(holder: dict[str, Any] | None) -> str:
    """"pid 123 on host h since 2025-01-01T12:00:00+00:00" (or that the file is unreadable)."""
    if not holder:
        return "an unknown holder (the lock file is empty or unreadable)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('since')}")


def holder_is_gone(holder: dict[str, Any] | None) -> bool:
    """True if `holder` certainly runs no more: an unreadable record, or a pid on this host
    that no process has. A holder on another host is assumed alive."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return True  # no pid to check, or this process's own lock left unreleased
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    except OverflowError:
        return True
    return False


class WorkdirLock:
    """The lock of one workdir; `acquire()` / `release()` or a `with` block."""

    def __init__(self, workdir: str | Path):
        self.path = as_path(workdir) / LOCK_FILE
        self._fd: int | None = None
        self._token: str | None = None  # the record held on an object store

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLocked naming the holder."""
        if is_remote(self.path):
            self._acquire_object()
            return
        for _ in range(10):  # retried only when a releasing holder removed the file meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd)
                if self._still_linked(fd):
                    self._take(fd)
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise WorkdirLocked(f"{self.path} keeps changing; is another trainer starting?")

    def _flock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLocked(self._refusal(_read(fd))) from None
        except OSError as err:  # a filesystem without flock: the holder record decides alone
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int) -> None:
        holder = _read(fd)
        if holder is not None or os.fstat(fd).st_size:
            if not holder_is_gone(holder):
                raise WorkdirLocked(self._refusal(holder) + f"; if that run is gone, delete "
                                    f"{self.path}")
            warnings.warn(f"{self.path}: the previous holder, {describe(holder)}, no longer "
                          "runs; taking the lock over", stacklevel=4)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
        os.fsync(fd)

    def _acquire_object(self) -> None:
        """The object-store lock: write the record, read it back (see the module doc)."""
        holder = self._read_object()
        if holder is not None or self.path.exists():
            if not holder_is_gone(holder):
                raise WorkdirLocked(self._refusal(holder) + f"; if that run is gone, delete "
                                    f"{self.path}")
            warnings.warn(f"{self.path}: the previous holder, {describe(holder)}, no longer "
                          "runs; taking the lock over", stacklevel=3)
        token = uuid.uuid4().hex
        self.path.write_text(json.dumps({**_me(), "token": token}) + "\n")
        holder = self._read_object()
        if holder is None or holder.get("token") != token:  # another trainer wrote after us
            raise WorkdirLocked(self._refusal(holder))
        self._token = token

    def _read_object(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_bytes().decode())
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _refusal(self, holder: dict[str, Any] | None) -> str:
        return (f"workdir {self.path.parent} is in use by another trainer: "
                f"{describe(holder)} (lock file {self.path})")

    def release(self) -> None:
        """Removes the lock file and frees the lock (a no-op when not held)."""
        if self._token is not None:
            try:  # removed only while it still holds this run's record
                if (self._read_object() or {}).get("token") == self._token:
                    self.path.unlink(missing_ok=True)
            finally:
                self._token = None
        if self._fd is None:
            return
        try:
            if self._still_linked(self._fd):
                self.path.unlink()
        finally:
            os.close(self._fd)  # closing frees the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _me() -> dict[str, Any]:
    """This process's holder record."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _read(fd: int) -> dict[str, Any] | None:
    """The holder record of an open lock file; None if empty or not a JSON object."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        holder = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None
