"""Paint ToMe's merged patch groups over an image.

    python -m tome_jax.vis photo.jpg --checkpoint DIR --r 8 16 --out merges.png

The image size and the input normalization are the model directory's (config.json) unless
--image-size / --normalization say otherwise. `--r` takes every value up to the next flag: give
the images before it. Bad input: one `PROG: error:` line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tome_jax import vis
from tome_jax.checkpoint import load_model
from tome_jax.cli.args import R_HELP, add_flag, add_r, make_parser, run
from tome_jax.normalization import NORMALIZATIONS
from tome_jax.storage import AnyPath


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m tome_jax.vis", __doc__)
    p.add_argument("image", nargs="+", help="one or more images: one row (per r) each")
    p.add_argument("--checkpoint", required=True,
                   help="model directory (from tome_jax.convert or train.ship)")
    add_r(p, many=True, required=True, help=R_HELP + "; several for one panel each")
    p.add_argument("--out", default="merges.png",
                   help="the figure (.png, .pdf, .svg); may be an object-store URL, "
                        "gs://BUCKET/PATH")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the model directory's")
    p.add_argument("--normalization", choices=tuple(NORMALIZATIONS), default=None,
                   help="default: the model directory's")
    p.add_argument("--strategy", help="override the model's token reduction: tome, or the "
                                      "baselines random / prune (dropped patches in black)")
    add_flag(p, "--layers", type=int, nargs="+",
             help="also show the groups after these blocks (1-based), one row per r")
    p.add_argument("--display-scale", type=int, default=1,
                   help="paint on the image enlarged this many times (thin borders on small "
                        "images, e.g. 8 for CIFAR's 32 px)")
    return p


def _figure(args: argparse.Namespace) -> AnyPath:
    """Loads the model and the images, paints every panel, writes the PNG; returns its path."""
    overrides = {"strategy": args.strategy} if args.strategy else {}
    model, params, info = load_model(args.checkpoint, **overrides)
    vis.check_traceable(model)
    image_size = args.image_size or info.image_size[0]
    normalization = args.normalization or info.normalization
    rows = []
    for path in args.image:
        image, note = vis.load_image(path, image_size)
        if note:
            print(note, file=sys.stderr)
        rows += vis.visualise(model, params, image, args.r, normalization, args.layers,
                              args.display_scale)
    return vis.render_grid(rows, args.out)


def _vis_command(args: argparse.Namespace) -> int:
    print(_figure(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0, or 2 after one `PROG: error:` line for bad input (VisError,
    CheckpointError, the model's shape / config checks)."""
    return run(build_parser(), _vis_command, argv, status=True)
