"""Throughput of ToMe schedules against the FLOPs limit, on whatever device JAX sees.

    python -m eval.benchmark --variant B/16 --batch-size 8 --image-size 224 --r 0 8 13 16 16,-1
    python -m eval.benchmark --batch-size 1 8 64 --dtype float32 bfloat16 --vs-torch --report-rss

Prints one row per schedule: tokens left, GFLOPs (2 x MACs), the FLOPs-limit speed-up, measured
images/s (median over --runs timed runs after warm-up, schedules interleaved so machine noise
hits them alike), compile time apart, the measured speed-up over r = 0, and the time spent in
matching and merging (each block's merge step timed on its own shapes) as a share of the
forward. Random weights: speed does not depend on their values, and it runs offline.

Several `--batch-size`s and `--dtype`s give one table each. `--vs-torch` adds a row timing
timm's PyTorch ViT of the same variant at r = 0 (eager, `torch.inference_mode`, as many
threads as this process may use cores) in the same run, for reference. `--report-rss` prints
the process's peak resident memory after each table (a high-water mark over the whole run:
rows are measured interleaved, so it cannot be split per row).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tome_jax import benchmark as bench
from tome_jax.cli.args import R_HELP, add_flag, add_r, make_parser, run
from tome_jax.merge import MERGE_METHODS
from tome_jax.timing import peak_rss_mib


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m eval.benchmark", __doc__)
    p.add_argument("--variant", default="B/16")
    add_flag(p, "--batch-size", formerly=["--batch"], type=int, nargs="+", default=[8],
             help="batch sizes; one table each")
    add_flag(p, "--image-size", formerly=["--resolution"], type=int, default=224,
             help="input height and width in pixels")
    add_r(p, many=True, default=["0", "8", "13", "16", "16,-1"],
          help=R_HELP + "; several, the first is the baseline")
    p.add_argument("--runs", type=int, default=7, help="timed runs per schedule")
    p.add_argument("--warmup", type=int, default=2)
    add_flag(p, "--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
             help="compute dtypes; one table each")
    add_flag(p, "--merge-method", nargs="+", choices=MERGE_METHODS, default=["segment"],
             help="several to compare them side by side")
    add_flag(p, "--metric", nargs="+", choices=bench.METRICS, default=["keys"],
             help="match on the keys (ToMe) or a DTEM embedding, separate or fused into the "
                  "q/k/v matmul; several to compare them side by side")
    p.add_argument("--dtem-dim", type=int, default=None,
                   help="DTEM embedding width (default: the paper's, head_dim)")
    p.add_argument("--vs-torch", action="store_true",
                   help="add a row timing timm's PyTorch ViT (r = 0) on the CPU")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for --vs-torch (default: the cores)")
    p.add_argument("--report-rss", action="store_true",
                   help="print the peak resident memory after each table")
    return p


def _tables(args: argparse.Namespace) -> None:
    """One table per (dtype, batch), printed as soon as it is measured."""
    if args.runs < 1 or min(args.batch_size) < 1:
        raise ValueError("--runs and --batch-size must be positive")
    device = jax.devices()[0]
    for dtype in args.dtype:
        for batch in args.batch_size:
            print(f"ViT-{args.variant} @ {args.image_size}px, batch {batch}, {dtype}, "
                  f"{device.platform} ({device.device_kind}), "
                  f"median of {args.runs} runs after {args.warmup} warm-up")
            rows = bench.benchmark(args.variant, batch, args.image_size, args.r, args.runs,
                                   args.warmup, jnp.dtype(dtype), args.merge_method,
                                   args.metric, args.dtem_dim)
            if args.vs_torch:
                torch_row = bench.benchmark_torch(args.variant, batch, args.image_size,
                                                  args.runs, args.warmup, dtype,
                                                  args.torch_threads)
                rows = bench.add_torch_row(rows, torch_row)
            print(bench.format_table(rows))
            if args.vs_torch:
                print(f"{bench.TORCH_LABEL}: {torch_row['version']}, eager, "
                      f"{torch_row['threads']} threads, CPU; speed-ups against the first row")
            if args.report_rss:
                print(f"peak RSS so far: {peak_rss_mib():.0f} MiB")


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _tables, argv)
