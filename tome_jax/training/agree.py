"""Decisions every process of a run must take alike (one process's view is not enough).

    if any_process(stop_requested): ...      # SIGTERM reached one host: all stop
    if not all_processes(restored_ok): ...   # one host failed to read: all treat it as failed
    verdict = from_process_0(verdict)        # process 0 checked the files: all follow it

Each is one tiny collective in multi-process runs and free in a single process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def any_process(flag: bool) -> bool:
    """True on every process if `flag` holds on any of them."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def all_processes(flag: bool) -> bool:
    """True on every process if `flag` holds on all of them."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def from_process_0(value: int) -> int:
    """Process 0's `value` on every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
