"""Wall-clock timing of compiled functions, interleaved so that a shared machine's drift in load
hits every variant alike; the memory XLA plans for them; and the process's peak memory.

    timings = time_interleaved([forward(m) for m in models], (params, images), runs=5)
    [t.median for t in timings], [t.compile_s for t in timings], [t.memory for t in timings]
    times = time_calls([lambda: jax_fn(x), lambda: torch_fn(y)], runs=5)   # any callables
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax


class Memory(NamedTuple):
    """What XLA's buffer assignment allocates for one compiled function, bytes.

    argument: the inputs (parameters, images, ...), which exist before the call; output: the
    results; temp: the one block that holds every intermediate buffer, reused where lifetimes
    allow; alias: outputs written into donated inputs. `working` is what a call allocates on
    top of its inputs; `total` all of it at once.
    """

    argument: int
    output: int
    temp: int
    alias: int = 0

    @property
    def working(self) -> int:
        return self.output + self.temp - self.alias

    @property
    def total(self) -> int:
        return self.argument + self.working


class Timing(NamedTuple):
    """Seconds to compile one function, the seconds of each timed run, and XLA's memory plan
    (None where the backend does not report one)."""

    compile_s: float
    times: list[float]
    memory: Memory | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def xla_memory(compiled: Any) -> Memory | None:
    """`Memory` of a compiled function (`jax.stages.Compiled`), None if XLA gives none."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError):
        return None
    if stats is None:
        return None
    return Memory(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                  int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes))


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


def time_calls(calls: Sequence[Callable[[], Any]], runs: int, warmup: int = 0,
               progress: Callable[[Iterable, str], Iterable] = _no_progress
               ) -> list[list[float]]:
    """Seconds of each call (each returns once its work is done), `runs` times in turn.

    Round robin rather than one call after another: slow drift in the machine's load is then
    shared by all of them instead of biasing the last ones. warmup: untimed rounds first.
    """
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in progress(range(runs), "timing"):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
    return times


def time_interleaved(fns: Sequence[Callable], args: Sequence, runs: int, warmup: int = 1,
                     progress: Callable[[Iterable, str], Iterable] = _no_progress
                     ) -> list[Timing]:
    """Compiles every fn for the same args, warms each up, then times them in turn `runs` times
    (`time_calls`). progress(items, desc) may wrap the compile and timing loops (a progress
    bar)."""
    compiled, compile_s = [], []
    for fn in progress(fns, "compile"):
        c, seconds = compile_and_time(fn, args)
        for _ in range(warmup):
            time_once(c, args)
        compiled.append(c)
        compile_s.append(seconds)
    calls = [_blocking(c, args) for c in compiled]
    times = time_calls(calls, runs, progress=progress)
    return [Timing(s, t, xla_memory(c)) for s, t, c in zip(compile_s, times, compiled, strict=True)]


def _blocking(compiled: Callable, args: Sequence) -> Callable[[], Any]:
    return lambda: jax.block_until_ready(compiled(*args))


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
