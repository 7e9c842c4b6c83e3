"""The README's main job: ToMe off the shelf on the shipped CIFAR-10 ViT, fully offline.

    python -m eval.quickstart            # any eval.sweep option overrides, e.g. --r 0 4 8

Evaluates `models/cifar10_vit` (trained with train/train.py, see its MODEL_CARD.md) on the
1,000 CIFAR-10 test images shipped in `data/cifar10-test-1000`, for r = 0, 2, 4, 6, 8, and
prints the accuracy / GFLOPs / speed table (also written to runs/quickstart/).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tome_jax.cli import sweep
from tome_jax.cli.args import run

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = ROOT / "models" / "cifar10_vit"
SHIPPED_IMAGES = ROOT / "data" / "cifar10-test-1000"
# The sweep's options that the quick start sets; the command line overrides any of them.
DEFAULTS = dict(checkpoint=str(SHIPPED_MODEL), data="image_folder",
                data_dir=str(SHIPPED_IMAGES), split="test", r=[0, 2, 4, 6, 8], batch_size=250,
                out="runs/quickstart/cifar10_vit")


def main(argv: Sequence[str] | None = None) -> list[sweep.Row]:
    """Runs the quick start; returns the sweep's rows."""
    parser = sweep.build_parser("python -m eval.quickstart", __doc__, **DEFAULTS)
    return run(parser, sweep.sweep_command, argv)
