r"""Accuracy (or feature fidelity) against cost over a list of r schedules and token strategies.

    python -m eval.sweep --checkpoint /tmp/dinov2_s14 --data imagenet_sample \
        --normalization imagenet --image-size 224 --batch-size 25 --fidelity \
        --r 0 2 4 8 16 --strategy tome random prune --out docs/dinov2_sweep

For every (strategy, r) it reports tokens left, GFLOPs (2 x MACs), top-1 / top-5 accuracy
(`tome_jax.evaluation.evaluate`, sharded over all devices) when the model has a head the
data's size, with `--fidelity` the cosine similarity of each image's final features
(`pre_logits`) to the r = 0 features (mean and min over images), and images/s of the jitted
forward on one batch (median of `--runs` timed runs after warm-up, interleaved over all
configurations so machine drift hits them alike), with the speed-up over r = 0. Writes OUT.csv,
OUT.md and OUT.png (quality against im/s and against GFLOPs, one line per strategy); OUT may be
an object-store URL (gs://bucket/sweep).

An interrupted sweep resumes: each configuration's quality is kept in OUT.partial.jsonl as
soon as it is measured, under a key of the weights, model, data and options
(`tome_jax.sweep_resume`), and the same command run again measures only the rest (every
configuration is timed again, as timing is one interleaved run). The file goes once OUT.csv is
written; `--no-resume` ignores it.

Strategies (`tome_jax.vit.ViT.strategy`): "tome" (ToMe), "random" (the same bipartite merge
with random pairs) and "prune" (drop the r tokens the class token attends to least). All three
leave the same token counts at the same r, so same r means same FLOPs; r = 0 is one shared row.

Weights: `--checkpoint DIR` (a model directory from `python -m tome_jax.convert` or
`python -m train.ship`; it fixes the image size and the normalization) or `--variant X/P
--random-init` for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tome_jax.cli.args import (
    add_data,
    add_flag,
    add_image_options,
    add_r,
    load_weights,
    make_parser,
    run,
)
from tome_jax.reduce import STRATEGIES
from tome_jax.storage import as_path, is_remote
from tome_jax.vit import ViT

Row = dict[str, Any]


def build_parser(prog: str = "python -m eval.sweep", description: str | None = __doc__,
                 **defaults: Any) -> argparse.ArgumentParser:
    """The sweep's parser; `defaults` (dest -> value, schedules parsed) replace its defaults.

    A default for "checkpoint" or "data" makes that flag optional (the quick start's case).
    """
    p = make_parser(prog, description)
    weights = p.add_mutually_exclusive_group(required="checkpoint" not in defaults)
    weights.add_argument("--checkpoint", help="a model directory (tome_jax.convert, train.ship)")
    weights.add_argument("--random-init", action="store_true",
                         help="random weights of --variant (smoke tests)")
    p.add_argument("--variant", default="B/16", help="with --random-init")
    p.add_argument("--num-classes", type=int, default=None,
                   help="with --random-init: head size (default the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    add_data(p, required="data" not in defaults)
    add_image_options(p)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    add_r(p, many=True, default=["0", "4", "8", "12", "16"])
    add_flag(p, "--strategy", nargs="+", default=["tome"],
             help=f"any of {' '.join(STRATEGIES)}")
    p.add_argument("--fidelity", action="store_true",
                   help="cosine similarity of final features to r = 0 (unlabelled data)")
    p.add_argument("--no-accuracy", action="store_true",
                   help="skip top-1/top-5 (implied for a model without a head)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--runs", type=int, default=5, help="timed runs per config (0: no timing)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--time-batch", type=int, default=None,
                   help="images per timed forward (default --batch-size)")
    p.add_argument("--cache-mib", type=float, default=2048,
                   help="keep decoded batches in memory up to this size")
    p.add_argument("--out", default="sweep_results/sweep",
                   help="output prefix: writes OUT.csv, OUT.md, OUT.png; may be an "
                        "object-store URL, gs://BUCKET/PATH")
    p.add_argument("--no-resume", action="store_true",
                   help="measure every configuration, ignoring OUT.partial.jsonl (what an "
                        "interrupted run of the same sweep had measured)")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(**defaults)
    return p


def sweep_command(args: argparse.Namespace) -> list[Row]:
    """The CLI's work: loads data and weights, sweeps, writes OUT.{csv,md,png}; returns rows."""
    import jax
    import jax.numpy as jnp

    import tome_jax
    from tome_jax import inputs
    from tome_jax import sweep_resume as resume
    from tome_jax.params import random_params
    from tome_jax.sweep import check_strategies, format_markdown, summary, sweep, write_csv

    if args.batch_size < 1 or args.runs < 0 or args.warmup < 0:
        raise ValueError("--batch-size must be positive, --runs and --warmup non-negative")
    strategies = check_strategies(args.strategy)  # before any slow loading
    split = inputs.eval_split(args.data, args.split)
    checkpoint = None if args.random_init else args.checkpoint
    model, params, image_size, normalization = load_weights(
        checkpoint, image_size=args.image_size, normalization=args.normalization)
    batches = inputs.eval_input(args.data, split, batch_size=args.batch_size,
                                image_size=image_size, normalization=normalization,
                                data_dir=args.data_dir, eval_crop=args.eval_crop,
                                skip_bad_images=args.skip_bad_images)
    if model is None:
        classes = args.num_classes if args.num_classes is not None else (batches.num_classes
                                                                         or 0)
        model = ViT(variant=args.variant, num_classes=classes)
        params = random_params(model, image_size, args.seed)
    model = model.clone(dtype=jnp.dtype(args.dtype))
    accuracy = not args.no_accuracy and bool(model.num_classes)
    if not accuracy and not args.fidelity:
        raise ValueError("the model has no classification head (num_classes=0): pass "
                         "--fidelity to compare features")
    out = as_path(args.out)
    if not is_remote(out):  # an object store has no folders to make
        out.parent.mkdir(parents=True, exist_ok=True)
    key = resume.fingerprint(params, dict(
        model=repr(model.clone(r=0, strategy="tome")), data=args.data, split=split,
        data_dir=str(args.data_dir), image_size=image_size, normalization=normalization,
        eval_crop=args.eval_crop, skip_bad_images=args.skip_bad_images,
        batch_size=args.batch_size, accuracy=accuracy, fidelity=args.fidelity,
        version=tome_jax.__version__))
    partial = resume.progress_path(out)
    measured, warning = ({}, None) if args.no_resume else resume.load(partial, key)
    lead = jax.process_index() == 0
    if lead and warning:
        print(warning, file=sys.stderr, flush=True)
    if lead and measured:
        print(f"resuming: {len(measured)} configuration(s) already measured, from {partial}",
              file=sys.stderr, flush=True)
    done = dict(measured)

    def keep(row: Row) -> None:
        done[(row["strategy"], row["r"])] = {k: row.get(k) for k in resume.QUALITY}
        if lead:
            resume.save(partial, key, done)

    start = time.perf_counter()
    rows = sweep(model, params, batches, image_size=image_size, schedules=args.r,
                 strategies=strategies, accuracy=accuracy, fidelity=args.fidelity,
                 num_classes=batches.num_classes, runs=args.runs, warmup=args.warmup,
                 time_batch=args.time_batch, cache_bytes=args.cache_mib * 2 ** 20,
                 show=not args.no_progress, measured=measured, on_measured=keep)
    seconds = time.perf_counter() - start
    device = jax.devices()[0]
    name = checkpoint or f"random {args.variant}"
    title = args.title or (f"{name}, {args.data} {split} ({rows[0].get('count', '?')} images), "
                           f"{image_size}px, {args.dtype}, {device.platform}")
    write_csv(rows, f"{out}.csv")
    header = (f"{title}; timed batch {args.time_batch or batches.batch_size}, median of "
              f"{args.runs} runs on {jax.device_count()} {device.platform} device(s) "
              f"({device.device_kind})")
    if batches.skipped:
        from tome_jax.image_files import skipped_line

        header += f"; {skipped_line(batches.skipped)}"
    as_path(f"{out}.md").write_text(f"{header}\n\n{format_markdown(rows)}\n")
    write_plot(rows, f"{out}.png", title)
    if lead:
        resume.remove(partial)
        print(header)
        print(format_markdown(rows))
        if args.json:
            print(json.dumps([{k: v for k, v in row.items() if k != "schedule"}
                              for row in rows]))
        print(summary(rows, seconds) + f"; wrote {out}.csv, {out}.md, {out}.png", flush=True)
    return rows


def write_plot(rows: list[Row], path: str, title: str = "") -> None:
    """`tome_jax.plots.plot` to a local path or an object-store URL (drawn into a local file
    of the same name, whose suffix picks the format, then written as one object)."""
    from tome_jax.plots import plot

    if not is_remote(path):
        plot(rows, path, title)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, as_path(path).name)
        plot(rows, local, title)
        as_path(path).write_bytes(local.read_bytes())


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Runs the CLI; returns the rows. A user error exits 2 with one line."""
    return run(build_parser(), sweep_command, argv)
