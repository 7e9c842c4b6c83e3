r"""Paired comparison of models on the same images: accuracy difference, 95% CI, McNemar's test.

    python -m eval.paired --data cifar10_jpeg --split test --r 11 \
        "ToMe (keys)=models/cifar10_vit" "DTEM modular=runs/dtem_model"

Two models evaluated on the same 10,000 images differ by less than the spread of either
accuracy alone (about +-0.9 points at 95% for 68% top-1): most images are right or wrong for
both. The paired view counts only the images where they disagree, so it tells a real
difference of a few tenths of a point from noise. The first model is the reference; each other
model is compared with it at the same r. Every model must take the same image size and (unless
--normalization says) the same normalization: they see the same batches.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tome_jax.cli.args import add_data, add_r, load_weights, make_parser, run


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m eval.paired", __doc__)
    p.add_argument("models", nargs="+", help="NAME=MODEL_DIR; the first is the reference")
    add_r(p, many=False, default="0", help="the schedule every model runs at")
    add_data(p, split_help="tfds split spec (a slice needs TensorFlow)")
    p.set_defaults(split="test")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=None, help="also write the table to this .md file (may "
                                               "be an object-store URL, gs://BUCKET/PATH)")
    return p


def paired_command(args: argparse.Namespace) -> str:
    """Evaluates every model on the same batches, prints (and writes) the table; returns it."""
    from tome_jax import inputs
    from tome_jax.paired import (
        correct_by_index,
        format_markdown,
        labels_by_index,
        paired_difference,
    )
    from tome_jax.sweep import cache_batches, schedule_text

    named = [spec.rsplit("=", 1) for spec in args.models]  # names may hold "="
    if len(named) < 2 or any(len(pair) != 2 for pair in named):
        raise ValueError("give at least two NAME=MODEL_DIR")

    correct, first, batches, labels = [], None, None, {}
    for _, path in named:
        model, params, size, normalization = load_weights(
            path, image_size=None, normalization=args.normalization, r=args.r)
        if first is None:
            first = (size, normalization)
            batches = cache_batches(
                inputs.eval_input(args.data, args.split, batch_size=args.batch_size,
                                  image_size=size, normalization=normalization,
                                  data_dir=args.data_dir), size, 2 * 2 ** 30)
            labels = labels_by_index(batches)  # once: every model sees the same batches
        elif size != first[0]:
            raise ValueError(f"{path} takes {size} px images, {named[0][1]} {first[0]} px")
        elif normalization != first[1]:
            raise ValueError(f"{path} expects {normalization!r} normalization, {named[0][1]} "
                             f"{first[1]!r}; pass --normalization to use one for both")
        correct.append(correct_by_index(model, params, batches, labels))
    results = [paired_difference(correct[0], c) for c in correct[1:]]
    r = schedule_text(args.r)
    table = format_markdown([name for name, _ in named], results, r)
    header = f"{args.data} {args.split}, {results[0]['n']} images, r = {r}"
    if args.out:
        from tome_jax.storage import as_path

        as_path(args.out).write_text(f"{header}\n\n{table}\n")
    print(header)
    print(table, flush=True)
    return table


def main(argv: Sequence[str] | None = None) -> str:
    return run(build_parser(), paired_command, argv)
