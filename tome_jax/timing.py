"""Wall-clock timing of compiled functions, interleaved so that a shared machine's drift in load
hits every variant alike; and the process's peak memory.

    timings = time_interleaved([forward(m) for m in models], (params, images), runs=5)
    [t.median for t in timings], [t.compile_s for t in timings]
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax


class Timing(NamedTuple):
    """Seconds to compile one function and the seconds of each timed run."""

    compile_s: float
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def compile_and_time(fn: Callable, args: Sequence) -> tuple[Callable, float]:
    """Compiles fn for args; returns (compiled, seconds spent compiling)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_once(compiled: Callable, args: Sequence) -> float:
    """Seconds of one call, waiting for the result."""
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def _no_progress(items: Iterable, desc: str) -> Iterable:
    del desc
    return items


def time_interleaved(fns: Sequence[Callable], args: Sequence, runs: int, warmup: int = 1,
                     progress: Callable[[Iterable, str], Iterable] = _no_progress
                     ) -> list[Timing]:
    """Compiles every fn for the same args, warms each up, then times them in turn `runs` times.

    Round robin rather than one fn after another: slow drift in the machine's load is then
    shared by all of them instead of biasing the last ones. progress(items, desc) may wrap the
    compile and timing loops (a progress bar).
    """
    compiled, compile_s = [], []
    for fn in progress(fns, "compile"):
        c, seconds = compile_and_time(fn, args)
        for _ in range(warmup):
            time_once(c, args)
        compiled.append(c)
        compile_s.append(seconds)
    times: list[list[float]] = [[] for _ in compiled]
    for _ in progress(range(runs), "timing"):
        for i, c in enumerate(compiled):
            times[i].append(time_once(c, args))
    return [Timing(s, t) for s, t in zip(compile_s, times, strict=True)]


def forward(model: Any) -> Callable:
    """(params, images) -> logits of a linen model returning (logits, aux)."""
    return lambda params, images: model.apply({"params": params}, images)[0]


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def num_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
