r"""Sharded top-1 / top-5 evaluation at one r (random weights unless a model directory is given).

    python -m eval.evaluate --data cifar10_jpeg --split test --checkpoint models/cifar10_vit --r 4
    python -m eval.evaluate --data cifar10_jpeg --split test --variant mu/4 --r 2 \
        --image-size 32 --batch-size 256 [--report-rss] [--json]

A model directory (`python -m tome_jax.convert`, `python -m train.ship`) fixes the architecture,
the image size and the input normalization; --normalization overrides the latter. Random
weights take --variant and the size flags, 224 px and "augreg" unless told otherwise.

Multi-process: add `--coordinator localhost:PORT --num-processes N --process-id I` to each
process (CPU processes talk through gloo).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from typing import Any

from tome_jax.cli.args import (
    add_data,
    add_distributed,
    add_image_options,
    add_r,
    load_weights,
    make_parser,
    run,
)
from tome_jax.vit import ViT

Params = Any


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m eval.evaluate", __doc__)
    add_data(p)
    add_image_options(p)
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    add_r(p, many=False, default=0)
    p.add_argument("--checkpoint", default=None,
                   help="a model directory (its config fixes the architecture, image size and "
                        "normalization); default random weights")
    p.add_argument("--variant", default="B/16", help="random weights: the architecture")
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--mlp-dim", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--pool", default="tok")
    p.add_argument("--num-classes", type=int, default=None,
                   help="random weights: model classes; default the dataset's")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--report-rss", action="store_true", help="print peak host RSS (MiB)")
    p.add_argument("--dump-logits", default=None,
                   help="save logits/index (.npz, process 0); may be an object-store URL, "
                        "gs://BUCKET/PATH")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    add_distributed(p)
    return p


def evaluate_command(args: argparse.Namespace) -> dict:
    """The CLI's work: loads weights and data, evaluates, prints; returns the result dict."""
    import jax

    from tome_jax import inputs, sharding
    from tome_jax.evaluation import evaluate
    from tome_jax.image_files import skipped_line
    from tome_jax.params import random_params
    from tome_jax.timing import peak_rss_mib

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    split = inputs.eval_split(args.data, args.split)
    model, params, image_size, normalization = load_weights(
        args.checkpoint, image_size=args.image_size, normalization=args.normalization, r=args.r)
    batches = inputs.eval_input(args.data, split, batch_size=args.batch_size,
                                image_size=image_size, normalization=normalization,
                                data_dir=args.data_dir, eval_crop=args.eval_crop,
                                skip_bad_images=args.skip_bad_images)
    if model is None:
        model = ViT(variant=args.variant, num_classes=args.num_classes or batches.num_classes,
                    r=args.r, width=args.width, depth=args.depth, mlp_dim=args.mlp_dim,
                    num_heads=args.num_heads, pool=args.pool)
        params = random_params(model, image_size, args.seed)
    result = evaluate(model, params, batches, return_logits=bool(args.dump_logits))
    result.update(data=args.data, split=split, devices=jax.device_count(),
                  processes=jax.process_count(), batch_size=args.batch_size,
                  gflops_per_image=model.flops(image_size) / 1e9)
    if args.report_rss:
        result["peak_rss_mib"] = peak_rss_mib()
        result["batch_mib"] = batches.batch_size * image_size ** 2 * 3 * 4 / 2 ** 20
    if args.dump_logits and jax.process_index() == 0:
        save_npz(args.dump_logits, logits=result["logits"], index=result["index"])
    result.pop("logits", None)
    result.pop("index", None)
    if args.skip_bad_images:
        result["skipped_images"] = [str(b) for b in batches.skipped]
    if jax.process_index() == 0 and batches.skipped and not args.json:
        print(skipped_line(batches.skipped), flush=True)  # the full list is in --json
    if jax.process_index() == 0:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{args.data} {split}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} "
                  f"over {result['count']} examples ({result['images_per_s']:.0f} img/s, "
                  f"{result['devices']} devices, {result['processes']} processes)", flush=True)
            if args.report_rss:
                print(f"peak RSS {result['peak_rss_mib']:.0f} MiB "
                      f"(one batch of images: {result['batch_mib']:.1f} MiB)", flush=True)
    return result


def save_npz(path: str, **arrays: Any) -> None:
    """`np.savez(path, **arrays)` (".npz" added when missing, as np.savez does), also to an
    object-store URL: the archive is built in memory and written as one object."""
    import numpy as np

    from tome_jax.storage import as_path, is_remote

    if not is_remote(path):
        np.savez(path, **arrays)
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    as_path(path if path.endswith(".npz") else path + ".npz").write_bytes(buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns the result dict. A user error exits 2 with one line."""
    return run(build_parser(), evaluate_command, argv)
