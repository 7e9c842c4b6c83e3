"""Where a run's messages go: the libraries' to a log file, the run's own to the console.

    with library_logs_to(workdir / "train.log"):   # orbax/absl/asyncio logs, stray tracebacks
        ...
    route_library_logs(workdir / "train.log")      # the same, for the rest of the process
    with one_line_warnings():                      # a command line: "warning: ..." per warning

Orbax reports a failed background write (a full disk) from several threads and asyncio tasks,
thousands of traceback lines in all; the run reports it in one line of its own, and the
details are kept in the log file.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# absl carries orbax's and jax's Python logs; asyncio reports orbax's failed tasks.
LIBRARY_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore")


class _QuietFileHandler(logging.FileHandler):
    """A file handler that never prints its own failure (a full disk must not flood the
    console with "--- Logging error ---" tracebacks)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def _open_handler(path: Path) -> logging.Handler:
    # Opened at the first record (a clean run leaves no file); if it cannot be, the records
    # are dropped and the console stays clean.
    handler = _QuietFileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def route_library_logs(path: str | Path) -> Callable[[], None]:
    """Sends LIBRARY_LOGGERS' records and unraisable exceptions (tensorstore callbacks into a
    closed event loop) to `path` instead of the console; returns the function that undoes it.

    A no-op (undone by a no-op) where they already go to `path`: a command line routes them
    for the whole process, since orbax's threads may still report after the run returned.
    """
    path = Path(path).resolve()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    if any(getattr(h, "baseFilename", None) == str(path) for h in loggers[0].handlers):
        return lambda: None
    handler = _open_handler(path)
    saved = [(logger, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    previous_hook = sys.unraisablehook

    def to_file(unraisable: Any) -> None:
        text = "".join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value,
                                                  unraisable.exc_traceback))
        handler.handle(logging.makeLogRecord({"name": "unraisable", "levelno": logging.ERROR,
                                              "levelname": "ERROR", "msg": text.rstrip()}))

    sys.unraisablehook = to_file

    def undo() -> None:
        sys.unraisablehook = previous_hook
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
        try:
            handler.close()
        except OSError:  # its last lines did not fit on a full disk
            pass

    return undo


@contextlib.contextmanager
def library_logs_to(path: str | Path) -> Iterator[None]:
    """`route_library_logs(path)` until the block ends."""
    undo = route_library_logs(path)
    try:
        yield
    finally:
        undo()


@contextlib.contextmanager
def library_logs(path: str | Path, whole_process: bool) -> Iterator[None]:
    """`library_logs_to(path)`, or (whole_process) routed for good: a command line's choice."""
    if whole_process:
        route_library_logs(path)
        # Printed at exit for orbax's writes abandoned after a failed save (a full disk).
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
        yield
    else:
        with library_logs_to(path):
            yield


_LINE = {"open": False}  # the console line a progress bar left without its newline


def line_left_open(is_open: bool) -> None:
    """Told by a progress bar (`\r...` without a newline) whether it left its line open."""
    _LINE["open"] = is_open


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
          file: Any = None, line: str | None = None) -> None:
    start = "\n" if _LINE["open"] else ""
    _LINE["open"] = False
    print(f"{start}warning: {message}", file=file or sys.stderr, flush=True)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Shows each warning as one "warning: ..." line (no file, line or source)."""
    with warnings.catch_warnings():
        warnings.showwarning = _show
        yield
