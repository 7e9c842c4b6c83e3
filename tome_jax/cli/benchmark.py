"""Throughput of ToMe schedules against the FLOPs limit, on whatever device JAX sees.

    python -m eval.benchmark --variant B/16 --batch-size 8 --image-size 224 --r 0 8 13 16 16,-1
    python -m eval.benchmark --case B/16:8 S/16:32 --r 0 8 16 --vs-torch
    python -m eval.benchmark --variant B/16 --batch-size 8 --r 0 16 --train

Prints one row per schedule: tokens left, GFLOPs (2 x MACs), the FLOPs-limit speed-up, measured
images/s (median over --runs timed runs after warm-up, schedules interleaved so machine noise
hits them alike), compile time apart, the measured speed-up over r = 0, and the time spent in
matching and merging (each block's merge step timed on its own shapes) as a share of the
forward. Random weights: speed does not depend on their values, and it runs offline.

Several `--batch-size`s and `--dtype`s give one table each; `--case VARIANT:BATCH ...`
replaces --variant and --batch-size by the pairs it names.

`--vs-torch` times a PyTorch ToMe (timm's blocks, this repository's merge in torch ops,
proportional attention as the attention bias; eager, `torch.inference_mode`, as many threads
as this process may use cores; on the GPU when JAX runs on one) at every r in the same round
robin, and prints a table of both speeds, their ratio, each side's speed-up, ours against the
FLOPs limit, our compile time and both sides' memory: for JAX what XLA's buffer plan allocates
on top of the inputs (outputs and the block of temporaries), for torch the peak bytes of
tensors alive during one forward (the CUDA allocator's peak on a GPU); weights and images are
counted on neither side. The per-block merge timing is skipped there.

`--train` times the project's training step (AdamW, drop path 0.1, label smoothing) per r
instead, with XLA's memory plan of the step (MiB: what a step allocates on top of its inputs;
MiB with inputs: the parameters, optimizer state and batch too). `--report-rss` prints the
process's peak resident memory after each table (a high-water mark over the whole run).
`--attention` forces one attention implementation (`tome_jax.attention`) instead of the
backend's choice.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tome_jax import attention
from tome_jax import benchmark as bench
from tome_jax.cli.args import R_HELP, add_flag, add_r, make_parser, run
from tome_jax.merge import MERGE_METHODS
from tome_jax.timing import peak_rss_mib


def _case(text: str) -> tuple[str, int]:
    """argparse type of --case: "B/16:8" -> ("B/16", 8)."""
    variant, sep, batch = text.rpartition(":")
    if not sep or not variant or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"expected VARIANT:BATCH such as B/16:8, got {text!r}")
    return variant, int(batch)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m eval.benchmark", __doc__)
    p.add_argument("--variant", default="B/16")
    add_flag(p, "--batch-size", formerly=["--batch"], type=int, nargs="+", default=[8],
             help="batch sizes; one table each")
    add_flag(p, "--case", type=_case, nargs="+", default=None, metavar="VARIANT:BATCH",
             help="(variant, batch) pairs to measure; replaces --variant and --batch-size")
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
                   help="time a PyTorch ToMe at every r alongside and print the comparison")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for --vs-torch (default: the cores)")
    p.add_argument("--train", action="store_true",
                   help="time the training step per r instead of the forward")
    p.add_argument("--dtem-modular", action="store_true",
                   help="with --train: time DTEM's modular step (soft merging, only the "
                        "embeddings train) at every r > 0, against fine-tuning at r = 0")
    p.add_argument("--merge-time", action=argparse.BooleanOptionalAction, default=True,
                   help="time each block's merge step on its own (not with --vs-torch)")
    p.add_argument("--attention", choices=attention.IMPLEMENTATIONS, default="auto",
                   help="attention implementation; auto: the backend's best")
    p.add_argument("--report-rss", action="store_true",
                   help="print the peak resident memory after each table")
    return p


def _cases(args: argparse.Namespace) -> list[tuple[str, int]]:
    return args.case or [(args.variant, batch) for batch in args.batch_size]


def _load() -> str:
    """", load average 1.2" (the 1-minute one, where the OS gives it): a busy machine slows
    both sides, torch's OpenMP threads most."""
    try:
        return f", load average {os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return ""


def _table(args: argparse.Namespace, variant: str, batch: int, dtype: str) -> None:
    """Measures and prints one table."""
    device = jax.devices()[0]
    kind = "training step" if args.train else "forward"
    print(f"ViT-{variant} @ {args.image_size}px, batch {batch}, {dtype}, "
          f"{device.platform} ({device.device_kind}), {kind}, "
          f"median of {args.runs} runs after {args.warmup} warm-up{_load()}", flush=True)
    if args.train:
        rows = bench.benchmark_train(variant, batch, args.image_size, args.r, args.runs,
                                     args.warmup, jnp.dtype(dtype),
                                     dtem_modular=args.dtem_modular, dtem_dim=args.dtem_dim)
        print(bench.format_train(rows))
        return
    rows = bench.benchmark(variant, batch, args.image_size, args.r, args.runs, args.warmup,
                           jnp.dtype(dtype), args.merge_method, args.metric, args.dtem_dim,
                           vs_torch=args.vs_torch, torch_threads=args.torch_threads,
                           merge_time=args.merge_time and not args.vs_torch)
    if not args.vs_torch:
        print(bench.format_table(rows))
        return
    print(bench.format_vs_torch(rows))
    twin = next((row for row in rows if "torch_im_s" in row), None)
    if twin is not None:
        print(f"{bench.TORCH_LABEL}: {twin['torch_version']}, eager, {twin['torch_device']}, "
              f"{twin['torch_threads']} threads; speed-ups against the first row of each side")


def _tables(args: argparse.Namespace) -> None:
    """One table per (dtype, case), printed as soon as it is measured."""
    if args.runs < 1 or min(args.batch_size) < 1:
        raise ValueError("--runs and --batch-size must be positive")
    if args.train and args.vs_torch:
        raise ValueError("--train and --vs-torch do not go together")
    if args.dtem_modular and not args.train:
        raise ValueError("--dtem-modular times training steps: add --train")
    with attention.use(args.attention):
        for dtype in args.dtype:
            for variant, batch in _cases(args):
                _table(args, variant, batch, dtype)
                if args.report_rss:
                    print(f"peak RSS so far: {peak_rss_mib():.0f} MiB")


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _tables, argv)
