"""The README's main job: ToMe off the shelf on the shipped CIFAR-10 ViT, fully offline.

    python -m eval.quickstart            # any eval.sweep option overrides, e.g. --r 0 4 8

Evaluates `models/cifar10_vit` (trained with train/train.py, see its MODEL_CARD.md) on the
1,000 CIFAR-10 test images shipped in `data/cifar10-test-1000`, for r = 0, 2, 4, 6, 8, and
prints the accuracy / GFLOPs / speed table (also written to runs/quickstart/).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from eval import sweep

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "models" / "cifar10_vit"
SHIPPED_IMAGES = ROOT / "data" / "cifar10-test-1000"


def main(argv: Sequence[str] | None = None) -> None:
    defaults = ["--checkpoint", str(SHIPPED_MODEL), "--data", "image_folder",
                "--data-dir", str(SHIPPED_IMAGES), "--split", "test", "--normalization",
                "augreg", "--r", "0", "2", "4", "6", "8", "--batch-size", "250",
                "--out", "runs/quickstart/cifar10_vit"]
    # argparse keeps the last value of a repeated option, so the user's options win.
    sweep.main(defaults + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
