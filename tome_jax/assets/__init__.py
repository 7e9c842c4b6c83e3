"""The embedded default that ships inside the package: a CIFAR-10 ViT and 1,000 test images.

    from tome_jax.assets import shipped_images_dir, shipped_model_dir
    model, params, info = tome_jax.checkpoint.load_model(shipped_model_dir())
    split = tome_jax.memory_data.read_image_folder(shipped_images_dir(), "test", 32)

`cifar10_vit/` is a model directory (`tome_jax.checkpoint`; its MODEL_CARD.md gives the training
recipe and results); `cifar10-test-1000/` is an image folder `test/<class>/NNNN.jpg` (the first
100 test images of each class). Both are package data, so they are found the same way in a
checkout and in an installed wheel, with no network.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

MODEL = "cifar10_vit"
IMAGES = "cifar10-test-1000"


def _asset(name: str) -> Path:
    """The folder `name` of this package on the file system."""
    folder = importlib.resources.files(__name__) / name
    try:
        path = Path(os.fspath(folder))  # type: ignore[arg-type]
    except TypeError:
        raise FileNotFoundError(f"tome_jax.assets is not installed as plain files, so {name} "
                                "cannot be read as a folder; install the wheel unzipped (pip "
                                "does)") from None
    if not path.is_dir():
        raise FileNotFoundError(f"the packaged {name} is missing from {path.parent}; reinstall "
                                "tome-jax")
    return path


def shipped_model_dir() -> Path:
    """The shipped CIFAR-10 ViT (S/4 at 32 px), a directory for `checkpoint.load_model`."""
    return _asset(MODEL)


def shipped_images_dir() -> Path:
    """The 1,000 shipped CIFAR-10 test JPEGs, `<dir>/test/<class>/NNNN.jpg` (an image folder)."""
    return _asset(IMAGES)
