"""Throughput of ToMe schedules against the FLOPs limit, on whatever device JAX sees.

    python -m eval.benchmark --variant B/16 --batch 8 --resolution 224 --r 0 8 13 16 16,-1
    python -m eval.benchmark --batch 1 8 64 --dtype float32 bfloat16 --vs-torch --report-rss

Prints one row per schedule: tokens left, GFLOPs (2 x MACs), the FLOPs-limit speed-up, measured
images/s (median over --runs timed runs after warm-up, schedules interleaved so machine noise
hits them alike), compile time apart, the measured speed-up over r = 0, and the time spent in
matching and merging (each block's merge step timed on its own shapes) as a share of the
forward. Random weights: speed does not depend on their values, and it runs offline.

Several `--batch` sizes and `--dtype`s give one table each. `--vs-torch` adds a row timing
timm's PyTorch ViT of the same variant at r = 0 (eager, `torch.inference_mode`, as many
threads as this process may use cores) in the same run, for reference. `--report-rss` prints
the process's peak resident memory after each table (a high-water mark over the whole run:
rows are measured interleaved, so it cannot be split per row).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from tome_jax import dtem
from tome_jax import merge as tome
from tome_jax.schedule import Schedule, parse_schedule
from tome_jax.variants import decode_variant
from tome_jax.vit import ViT

# big_vision size names -> timm's, for timm.create_model(f"vit_{name}_patch{P}_{res}").
TIMM_NAMES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
TORCH_LABEL = "timm (PyTorch)"


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


METRICS = ("keys", "dtem", "dtem-fused")


def benchmark(variant: str, batch: int, resolution: int, schedules: Sequence[Schedule],
              runs: int, warmup: int, dtype, merge_methods: Sequence[str],
              metrics: Sequence[str] = ("keys",), dtem_dim: int | None = None) -> list[dict]:
    """Measures every (schedule, merge method, metric); returns the printed table's rows.

    The first schedule is the baseline of the speed-ups. Schedules that merge nothing are
    measured once, whatever the method. metrics: what matching runs on: "keys" (ToMe), "dtem"
    (a DTEM embedding of width dtem_dim, its own matmul) or "dtem-fused" (the same embedding
    computed in the q/k/v matmul).
    """
    if any(m != "keys" for m in metrics):
        dtem_dim = dtem_dim or dtem.default_dim(decode_variant(variant).width,
                                                decode_variant(variant).num_heads)
    base = ViT(variant=variant, num_classes=1000, dtype=dtype)
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3), dtype)
    # One parameter set for every row: the keys model ignores the embeddings.
    params = jax.jit(base.clone(dtem_dim=dtem_dim).init)(jax.random.key(1), images)["params"]

    rows, compiled = [], []
    for r in schedules:
        merges = any(base.clone(r=r).token_schedule(resolution)[0])
        for metric in metrics:
            for method in merge_methods if merges else merge_methods[:1]:
                rows.append(dict(r=r, method=method if merges else "-", metric=metric))
    for row in rows:
        model = base.clone(r=row["r"], merge_method=row["method"] if row["method"] != "-"
                           else merge_methods[0],
                           dtem_dim=None if row["metric"] == "keys" else dtem_dim,
                           dtem_fused=row["metric"] == "dtem-fused")
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


def num_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timm_vit(variant: str, resolution: int, num_classes: int = 1000):
    """timm's ViT of `variant` with random weights (r = 0; the weights don't change speed).

    Named timm models (`vit_base_patch16_224`, ...) where timm has the size, else timm's
    `VisionTransformer` built from the variant's sizes (e.g. "mu/4").
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    size = decode_variant(variant)
    name = f"vit_{TIMM_NAMES.get(variant.split('/')[0], '')}_patch{size.patch_size}_224"
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, img_size=resolution,
                                 num_classes=num_classes)
    return VisionTransformer(img_size=resolution, patch_size=size.patch_size,
                             embed_dim=size.width, depth=size.depth, num_heads=size.num_heads,
                             mlp_ratio=size.mlp_dim / size.width, num_classes=num_classes)


def benchmark_torch(variant: str, batch: int, resolution: int, runs: int, warmup: int,
                    dtype: str, threads: int | None = None) -> dict:
    """Median forward seconds of timm's ViT at r = 0 on the CPU; a row for `format_table`.

    images [batch, 3, resolution, resolution] in `dtype` ("float32" or "bfloat16"); threads
    defaults to `num_cores()`. The row's speed-ups are filled in by `add_torch_row`.
    """
    import torch

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


def format_table(rows: list[dict]) -> str:
    header = ("| r | merge method | metric | tokens left | GFLOPs | FLOPs-limit speed-up | im/s |"
              " measured speed-up | measured / limit | compile s | merge ms | merge % of forward |")
    lines = [header, "|" + "---|" * 12]
    for row in rows:
        lines.append(
            f"| {row['r']} | {row['method']} | {row.get('metric', 'keys')} | {row['tokens']} | "
            f"{row['gflops']:.2f} | "
            f"{row['flops_speedup']:.2f}x | {row['im_s']:.1f} | {row['speedup']:.2f}x | "
            f"{row['efficiency']:.2f} | {_opt(row['compile_s'], 1, '.1f')} | "
            f"{_opt(row['merge_s'], 1e3, '.2f')} | {_opt(row['merge_share'], 100, '.1f', '%')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--batch", type=int, nargs="+", default=[8],
                        help="batch sizes; one table each")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--r", nargs="+", default=["0", "8", "13", "16", "16,-1"],
                        help="schedules: 16, 16,-1 (r, inflect) or [8,8,4] per layer; "
                             "the first is the baseline")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per schedule")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"],
                        default=["float32"], help="compute dtypes; one table each")
    parser.add_argument("--merge-method", nargs="+", choices=tome.MERGE_METHODS,
                        default=["segment"], help="several to compare them side by side")
    parser.add_argument("--metric", nargs="+", choices=METRICS, default=["keys"],
                        help="match on the keys (ToMe) or a DTEM embedding, separate or fused "
                             "into the q/k/v matmul; several to compare them side by side")
    parser.add_argument("--dtem-dim", type=int, default=None,
                        help="DTEM embedding width (default: the paper's, head_dim)")
    parser.add_argument("--vs-torch", action="store_true",
                        help="add a row timing timm's PyTorch ViT (r = 0) on the CPU")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads for --vs-torch (default: the cores)")
    parser.add_argument("--report-rss", action="store_true",
                        help="print the peak resident memory after each table")
    args = parser.parse_args(argv)
    if args.runs < 1 or min(args.batch) < 1:
        parser.error("--runs and --batch must be positive")
    schedules = [parse_schedule(s) for s in args.r]
    device = jax.devices()[0]
    for dtype in args.dtype:
        for batch in args.batch:
            print(f"ViT-{args.variant} @ {args.resolution}px, batch {batch}, {dtype}, "
                  f"{device.platform} ({device.device_kind}), "
                  f"median of {args.runs} runs after {args.warmup} warm-up")
            rows = benchmark(args.variant, batch, args.resolution, schedules, args.runs,
                             args.warmup, jnp.dtype(dtype), args.merge_method, args.metric,
                             args.dtem_dim)
            if args.vs_torch:
                torch_row = benchmark_torch(args.variant, batch, args.resolution, args.runs,
                                            args.warmup, dtype, args.torch_threads)
                rows = add_torch_row(rows, torch_row)
            print(format_table(rows))
            if args.vs_torch:
                print(f"{TORCH_LABEL}: {torch_row['version']}, eager, "
                      f"{torch_row['threads']} threads, CPU; speed-ups against the first row")
            if args.report_rss:
                print(f"peak RSS so far: {peak_rss_mib():.0f} MiB")

if __name__ == "__main__":
    main()
