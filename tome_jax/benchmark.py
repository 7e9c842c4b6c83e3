"""Throughput of ToMe schedules against the FLOPs limit, on whatever device JAX sees.

    rows = benchmark("B/16", batch=8, resolution=224, schedules=[0, 8, 16], runs=7, warmup=2,
                     dtype=jnp.float32, merge_methods=["segment"])
    print(format_table(rows))

One row per (schedule, merge method, metric): tokens left, GFLOPs (2 x MACs), the FLOPs-limit
speed-up, measured images/s (median of the timed runs, rows interleaved so machine noise hits
them alike), compile time apart, the measured speed-up over the first row, and the time spent
in matching and merging (each block's merge step timed on its own shapes). Random weights:
speed does not depend on their values. `benchmark_torch` times timm's PyTorch ViT of the same
variant for a reference row.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tome_jax import dtem
from tome_jax import merge as tome
from tome_jax.schedule import Schedule
from tome_jax.tables import markdown_table
from tome_jax.timing import forward, num_cores, time_interleaved
from tome_jax.variants import decode_variant
from tome_jax.vit import ViT

METRICS = ("keys", "dtem", "dtem-fused")
TORCH_LABEL = "timm (PyTorch)"
HEADER = ("r", "merge method", "metric", "tokens left", "GFLOPs", "FLOPs-limit speed-up", "im/s",
          "measured speed-up", "measured / limit", "compile s", "merge ms", "merge % of forward")


def merge_step_seconds(model: ViT, batch: int, resolution: int, runs: int,
                       method: str) -> float:
    """Median seconds of all blocks' matching + size-weighted merges, each on its own shapes."""
    rs, tokens = model.token_schedule(resolution)
    dims = model.dims
    head_dim = dims.width // dims.num_heads
    total = 0.0
    for r, t in zip(rs, tokens, strict=False):
        if not r:
            continue
        key = jax.random.key(t)
        x = jax.random.normal(key, (batch, t, dims.width), model.dtype)
        metric = jax.random.normal(jax.random.fold_in(key, 1), (batch, t, head_dim), model.dtype)
        token_size = jnp.ones((batch, t, 1), jnp.float32)

        def step(x, metric, token_size, r=r):
            merge, _ = tome.bipartite_soft_matching(metric, r, method=method)
            return tome.merge_wavg(merge, x, token_size)

        (timing,) = time_interleaved([step], (x, metric, token_size), runs, warmup=1)
        total += timing.median
    return total


def _plan_rows(base: ViT, resolution: int, schedules: Sequence[Schedule],
               merge_methods: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """One row per (schedule, metric, method); a schedule that merges nothing gets one method,
    "-", since the method cannot change its speed."""
    rows = []
    for r in schedules:
        merges = any(base.clone(r=r).token_schedule(resolution)[0])
        for metric in metrics:
            for method in merge_methods if merges else merge_methods[:1]:
                rows.append(dict(r=r, method=method if merges else "-", metric=metric))
    return rows


def _row_model(base: ViT, row: dict, merge_methods: Sequence[str],
               dtem_dim: int | None) -> ViT:
    method = row["method"] if row["method"] != "-" else merge_methods[0]
    return base.clone(r=row["r"], merge_method=method,
                      dtem_dim=None if row["metric"] == "keys" else dtem_dim,
                      dtem_fused=row["metric"] == "dtem-fused")


def _add_speedups(rows: list[dict], batch: int) -> None:
    """Fills seconds, im/s and the speed-ups against rows[0] from each row's times and GFLOPs."""
    base = rows[0]
    for row in rows:
        row["seconds"] = statistics.median(row["times"])
        row["im_s"] = batch / row["seconds"]
        row["flops_speedup"] = base["gflops"] / row["gflops"]
        row["speedup"] = base["seconds"] / row["seconds"]
        row["efficiency"] = row["speedup"] / row["flops_speedup"]


def benchmark(variant: str, batch: int, resolution: int, schedules: Sequence[Schedule],
              runs: int, warmup: int, dtype: Any, merge_methods: Sequence[str],
              metrics: Sequence[str] = ("keys",), dtem_dim: int | None = None) -> list[dict]:
    """Measures every (schedule, merge method, metric); returns the table's rows.

    Images [batch, resolution, resolution, 3] in dtype. The first schedule is the baseline of
    the speed-ups. Schedules that merge nothing are measured once, whatever the method.
    metrics: what matching runs on: "keys" (ToMe), "dtem" (a DTEM embedding of width dtem_dim,
    its own matmul) or "dtem-fused" (the same embedding computed in the q/k/v matmul).
    """
    if any(m != "keys" for m in metrics):
        dims = decode_variant(variant)
        dtem_dim = dtem_dim or dtem.default_dim(dims.width, dims.num_heads)
    base = ViT(variant=variant, num_classes=1000, dtype=dtype)
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3), dtype)
    # One parameter set for every row: the keys model ignores the embeddings.
    params = jax.jit(base.clone(dtem_dim=dtem_dim).init)(jax.random.key(1), images)["params"]

    rows = _plan_rows(base, resolution, schedules, merge_methods, metrics)
    models = [_row_model(base, row, merge_methods, dtem_dim) for row in rows]
    timings = time_interleaved([forward(m) for m in models], (params, images), runs, warmup)
    for row, model, timing in zip(rows, models, timings, strict=True):
        row.update(tokens=model.token_schedule(resolution)[1][-1],
                   gflops=model.flops(resolution) / 1e9, compile_s=timing.compile_s,
                   times=timing.times)
    _add_speedups(rows, batch)
    for row in rows:
        model = base.clone(r=row["r"])
        row["merge_s"] = (merge_step_seconds(model, batch, resolution, runs, row["method"])
                          if row["method"] != "-" else 0.0)
        row["merge_share"] = row["merge_s"] / row["seconds"]
    return rows


def benchmark_torch(variant: str, batch: int, resolution: int, runs: int, warmup: int,
                    dtype: str, threads: int | None = None) -> dict:
    """Median forward seconds of timm's ViT at r = 0 on the CPU; a row for `format_table`.

    images [batch, 3, resolution, resolution] in `dtype` ("float32" or "bfloat16"); threads
    defaults to `num_cores()`. The row's speed-ups are filled in by `add_torch_row`.
    """
    import torch

    from tome_jax.torch_reference import timm_vit

    torch.set_num_threads(threads or num_cores())
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(dtype)]
    model = timm_vit(variant, resolution).eval().to(torch_dtype)
    images = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator()
                         .manual_seed(0)).to(torch_dtype)

    def once() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(images)
        return time.perf_counter() - start

    # Warm up for at least `warmup` calls and a second: right after JAX has run in this
    # process, torch's first few calls are 10-100x slower (thread pools, oneDNN kernels).
    start, calls = time.perf_counter(), 0
    while calls < warmup or (time.perf_counter() - start < 1.0 and calls < 100):
        once()
        calls += 1
    seconds = statistics.median(once() for _ in range(runs))
    base = ViT(variant=variant, num_classes=1000)
    return dict(r=0, method=TORCH_LABEL, metric="-", tokens=base.token_schedule(resolution)[1][-1],
                gflops=base.flops(resolution) / 1e9, compile_s=None, seconds=seconds,
                im_s=batch / seconds, merge_s=None, merge_share=None,
                threads=torch.get_num_threads(), version=f"torch {torch.__version__}")


def add_torch_row(rows: list[dict], torch_row: dict) -> list[dict]:
    """rows + the timm row, its speed-ups against rows[0] (the JAX baseline)."""
    base = rows[0]
    torch_row = dict(torch_row, flops_speedup=base["gflops"] / torch_row["gflops"],
                     speedup=base["seconds"] / torch_row["seconds"])
    torch_row["efficiency"] = torch_row["speedup"] / torch_row["flops_speedup"]
    return rows + [torch_row]


def _opt(value: float | None, scale: float, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{scale * value:{spec}}{suffix}"


def _cells(row: dict) -> list[str]:
    """One row of `benchmark` / `benchmark_torch` -> the table's cells, under HEADER."""
    return [str(row["r"]), row["method"], row.get("metric", "keys"), str(row["tokens"]),
            f"{row['gflops']:.2f}", f"{row['flops_speedup']:.2f}x", f"{row['im_s']:.1f}",
            f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}",
            _opt(row["compile_s"], 1, ".1f"), _opt(row["merge_s"], 1e3, ".2f"),
            _opt(row["merge_share"], 100, ".1f", "%")]


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, one line per row."""
    return markdown_table(HEADER, [_cells(row) for row in rows])
