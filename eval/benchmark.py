"""Throughput of ToMe schedules against the FLOPs limit, on whatever device JAX sees.

    python -m eval.benchmark --variant B/16 --batch 8 --resolution 224 --r 0 8 13 16 16,-1

Prints one row per schedule: tokens left, GFLOPs (2 x MACs), the FLOPs-limit speed-up, measured
images/s (median over --runs timed runs after warm-up, schedules interleaved so machine noise
hits them alike), compile time apart, the measured speed-up over r = 0, and the time spent in
matching and merging (each block's merge step timed on its own shapes) as a share of the
forward. Random weights: speed does not depend on their values, and it runs offline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from tome_jax import merge as tome
from tome_jax.schedule import Schedule
from tome_jax.vit import ViT


def parse_schedule(text: str) -> Schedule:
    """ "16" -> 16, "16,-1" -> (16, -1) ramp, "[8,8,4]" -> per-layer list."""
    text = text.strip()
    if text.startswith("["):
        return [int(v) for v in text.strip("[]").split(",") if v.strip()]
    if "," in text:
        r, inflect = text.split(",")
        return (int(r), float(inflect))
    return int(text)


def compile_and_time(fn: Callable, args: Sequence) -> tuple[Callable, float]:
    """Compiles fn for args; returns (compiled, seconds spent compiling)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_once(compiled: Callable, args: Sequence) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def merge_step_seconds(model: ViT, batch: int, resolution: int, runs: int,
                       method: str) -> float:
    """Median seconds of all blocks' matching + size-weighted merges, each on its own shapes."""
    rs, tokens = model.token_schedule(resolution)
    size = model.size
    head_dim = size.width // size.num_heads
    total = 0.0
    for r, t in zip(rs, tokens, strict=False):
        if not r:
            continue
        key = jax.random.key(t)
        x = jax.random.normal(key, (batch, t, size.width), model.dtype)
        metric = jax.random.normal(jax.random.fold_in(key, 1), (batch, t, head_dim), model.dtype)
        token_size = jnp.ones((batch, t, 1), jnp.float32)

        def step(x, metric, token_size, r=r):
            merge, _ = tome.bipartite_soft_matching(metric, r, method=method)
            return tome.merge_wavg(merge, x, token_size)

        compiled, _ = compile_and_time(step, (x, metric, token_size))
        time_once(compiled, (x, metric, token_size))
        total += statistics.median(time_once(compiled, (x, metric, token_size))
                                   for _ in range(runs))
    return total


def benchmark(variant: str, batch: int, resolution: int, schedules: Sequence[Schedule],
              runs: int, warmup: int, dtype, merge_methods: Sequence[str]) -> list[dict]:
    """Measures every (schedule, merge method); returns the printed table's rows.

    The first schedule is the baseline of the speed-ups. Schedules that merge nothing are
    measured once, whatever the method.
    """
    base = ViT(variant=variant, num_classes=1000, dtype=dtype)
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3), dtype)
    params = jax.jit(base.init)(jax.random.key(1), images)["params"]

    rows, compiled = [], []
    for r in schedules:
        merges = any(base.clone(r=r).token_schedule(resolution)[0])
        for method in merge_methods if merges else merge_methods[:1]:
            rows.append(dict(r=r, method=method if merges else "-"))
    for row in rows:
        model = base.clone(r=row["r"], merge_method=row["method"] if row["method"] != "-"
                           else merge_methods[0])
        fn, compile_s = compile_and_time(lambda p, x, m=model: m.apply({"params": p}, x)[0],
                                         (params, images))
        for _ in range(warmup):
            time_once(fn, (params, images))
        compiled.append(fn)
        row.update(tokens=model.token_schedule(resolution)[1][-1],
                   gflops=model.flops(resolution) / 1e9, compile_s=compile_s, times=[])
    for _ in range(runs):  # interleaved, so drift in machine load hits every schedule alike
        for row, fn in zip(rows, compiled, strict=True):
            row["times"].append(time_once(fn, (params, images)))

    base_row = rows[0]
    for row in rows:
        row["seconds"] = statistics.median(row["times"])
        row["im_s"] = batch / row["seconds"]
        row["flops_speedup"] = base_row["gflops"] / row["gflops"]
        row["speedup"] = base_row["seconds"] / row["seconds"]
        row["efficiency"] = row["speedup"] / row["flops_speedup"]
        model = base.clone(r=row["r"])
        row["merge_s"] = (merge_step_seconds(model, batch, resolution, runs, row["method"])
                          if row["method"] != "-" else 0.0)
        row["merge_share"] = row["merge_s"] / row["seconds"]
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("| r | merge method | tokens left | GFLOPs | FLOPs-limit speed-up | im/s | "
              "measured speed-up | measured / limit | compile s | merge ms | merge % of forward |")
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        lines.append(
            f"| {row['r']} | {row['method']} | {row['tokens']} | {row['gflops']:.2f} | "
            f"{row['flops_speedup']:.2f}x | {row['im_s']:.1f} | {row['speedup']:.2f}x | "
            f"{row['efficiency']:.2f} | {row['compile_s']:.1f} | {1e3 * row['merge_s']:.2f} | "
            f"{100 * row['merge_share']:.1f}% |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--r", nargs="+", default=["0", "8", "13", "16", "16,-1"],
                        help="schedules: 16, 16,-1 (r, inflect) or [8,8,4] per layer; "
                             "the first is the baseline")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per schedule")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--merge-method", nargs="+", choices=tome.MERGE_METHODS,
                        default=["segment"], help="several to compare them side by side")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.batch < 1:
        parser.error("--runs and --batch must be positive")
    schedules = [parse_schedule(s) for s in args.r]
    device = jax.devices()[0]
    print(f"ViT-{args.variant} @ {args.resolution}px, batch {args.batch}, {args.dtype}, "
          f"{device.platform} ({device.device_kind}), "
          f"median of {args.runs} runs after {args.warmup} warm-up")
    rows = benchmark(args.variant, args.batch, args.resolution, schedules, args.runs,
                     args.warmup, jnp.dtype(args.dtype), args.merge_method)
    print(format_table(rows))


if __name__ == "__main__":
    main()
