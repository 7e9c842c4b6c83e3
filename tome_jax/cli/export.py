"""Export a merged ViT to a jax.export artefact (StableHLO, parameters baked in).

    python -m tome_jax.export --checkpoint DIR --r 16 --out model.jaxexport [--batch-size 8]

Writes OUT and its sidecar OUT.json (with the sha256 that `tome_jax.export.load_exported`
checks); an existing OUT is refused unless --overwrite. Prints the output path, input shape,
r per block and the byte count as one JSON line. Bad input, an existing OUT or a disk that
cannot take it: one `PROG: error:` line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from tome_jax import export
from tome_jax.checkpoint import load_model
from tome_jax.cli.args import add_flag, add_r, make_parser, run
from tome_jax.storage import as_path


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m tome_jax.export", __doc__)
    p.add_argument("--checkpoint", required=True,
                   help="model directory (from tome_jax.convert or train.ship)")
    add_r(p, many=False, default="0")
    p.add_argument("--out", required=True, help="artefact path (sidecar: OUT.json); may be "
                                                "an object-store URL, gs://BUCKET/PATH")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    g = p.add_mutually_exclusive_group()
    add_flag(g, "--batch-size", formerly=["--batch"], type=int, default=None,
             help="fixed batch size")
    g.add_argument("--symbolic-batch", action="store_true",
                   help="symbolic batch dimension 'b' (the default)")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the model directory's")
    p.add_argument("--platforms", help="comma-separated lowering targets, e.g. cpu,cuda "
                                       "(default: this machine's)")
    return p


def _export(args: argparse.Namespace) -> dict:
    """Loads the model at args.r, exports and saves it; returns the sidecar."""
    if as_path(args.out).exists() and not args.overwrite:  # before the slow part
        raise export.ExportError(f"{args.out} exists; refusing to overwrite it (--overwrite "
                                 "replaces it)")
    model, params, info = load_model(args.checkpoint, r=args.r)
    hw = (args.image_size, args.image_size) if args.image_size else info.image_size
    if args.batch_size is not None and args.batch_size < 1:
        raise export.ExportError(f"--batch-size must be >= 1, got {args.batch_size}")
    exported = export.export_model(model, params, (args.batch_size, *hw, model.channels),
                                   args.platforms.split(",") if args.platforms else None)
    return export.save_exported(args.out, exported,
                                lambda data: export.describe(exported, model, hw, data),
                                overwrite=args.overwrite)


def _export_command(args: argparse.Namespace) -> int:
    meta = _export(args)
    print(json.dumps({"out": str(args.out), "input": meta["input"],
                      "r_per_block": meta["r_per_block"], "bytes": meta["bytes"]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0, or 2 after one `PROG: error:` line for bad input (ExportError,
    CheckpointError, the model's shape checks)."""
    return run(build_parser(), _export_command, argv, status=True)
