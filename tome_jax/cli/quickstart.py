"""ToMe off the shelf on the shipped CIFAR-10 ViT, fully offline, from any folder.

    tome-jax quickstart                  # any sweep option overrides, e.g. --r 0 4 8
    python -m eval.quickstart            # the same from a checkout

Evaluates the model packaged in `tome_jax.assets` (a ViT-S/4 trained on CIFAR-10, see its
MODEL_CARD.md) on the 1,000 CIFAR-10 test images packaged beside it, for r = 0, 2, 4, 6, 8, and
prints the accuracy / GFLOPs / speed table (also written to runs/quickstart/ under the current
folder; --out elsewhere, an object-store URL gs://BUCKET/PATH too). Needs no TensorFlow:
without it the images are decoded with PIL (`tome_jax.inputs`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tome_jax.assets import shipped_images_dir, shipped_model_dir
from tome_jax.cli import sweep
from tome_jax.cli.args import run


def defaults() -> dict[str, object]:
    """The sweep's options that the quick start sets; the command line overrides any of them."""
    return dict(checkpoint=str(shipped_model_dir()), data="image_folder",
                data_dir=str(shipped_images_dir()), split="test", r=[0, 2, 4, 6, 8],
                batch_size=250, out="runs/quickstart/cifar10_vit")


def build_parser() -> argparse.ArgumentParser:
    """The sweep's parser under the quick start's name, with its defaults."""
    return sweep.build_parser("python -m eval.quickstart", __doc__, **defaults())


def main(argv: Sequence[str] | None = None) -> list[sweep.Row]:
    """Runs the quick start; returns the sweep's rows."""
    return run(build_parser(), sweep.sweep_command, argv)
