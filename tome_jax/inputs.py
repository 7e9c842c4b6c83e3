"""The evaluation input of a named source: tf.data where TensorFlow is installed, else PIL.

    batches = eval_input("image_folder", "test", batch_size=250, image_size=32,
                         data_dir=shipped_images_dir())
    for b in batches:   # b["image"] [B, S, S, 3] float32, "label" [B], "mask" [B], "index" [B]
        ...

With TensorFlow (`pip install "tome-jax[tfds]"`) every source of `tome_jax.sources` is read by
`tome_jax.data.make_dataset`, as before. Without it, image folders and archives
(`image_folder`, `cifar10_jpeg`) are decoded whole with PIL (`tome_jax.memory_data`), which is
meant for small folders; every other source, a split slice ("test[:40]") and a center crop
other than 1.0 need TensorFlow and say so. The two readers give the same batches up to the
JPEG decoder (PIL's accurate IDCT against TensorFlow's fast one: about one grey level per
pixel) and the resize of images that are not already square at the model's size (PIL
stretches them, tf.data center-crops the short side).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np

TFDS_INSTALL = 'pip install "tome-jax[tfds]"'
# The sources that the PIL reader covers: `<split>/<class>/<image>` folders or tars.
FOLDER_SOURCES = ("image_folder", "cifar10_jpeg")
READERS = ("auto", "tf", "pil")


class EvalBatches(Protocol):
    """What `eval_input` returns: re-iterable numpy batch dicts and their sizes."""

    num_classes: int | None
    batch_size: int  # rows per batch on this process
    skipped: tuple  # the image files left out as bad (skip_bad_images=True)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __len__(self) -> int: ...


class NeedsTensorFlow(ValueError):
    """A feature that only the TensorFlow input pipeline has; the message names the extra."""


def has_tensorflow() -> bool:
    """Whether TensorFlow and tensorflow-datasets are installed (nothing is imported)."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("tensorflow", "tensorflow_datasets"))


def require_tensorflow(what: str) -> None:
    """Raises NeedsTensorFlow("<what> needs TensorFlow: pip install ...") without it."""
    if not has_tensorflow():
        raise NeedsTensorFlow(f"{what} needs TensorFlow: {TFDS_INSTALL}")


def eval_split(name: str, split: str | None) -> str:
    """The split to evaluate: `split` if given, else the source's evaluation split."""
    if split:
        return split
    if has_tensorflow():
        from tome_jax import data

        return data.EVAL_SPLITS.get(name, "test")
    return "test"  # the folder sources' evaluation split


@dataclasses.dataclass(frozen=True)
class FolderBatches:
    """Evaluation batches decoded in memory, shaped as `tome_jax.data.make_dataset` gives them.

    batches: this process's numpy dicts; batch_size: rows per batch on this process;
    skipped: the files left out as bad (`tome_jax.image_files.BadImage`).
    """

    batches: list[dict[str, np.ndarray]]
    num_examples: int
    num_classes: int
    batch_size: int
    skipped: tuple = ()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _folder_batches(name: str, split: str, *, batch_size: int, image_size: int,
                    normalization: str, data_dir: str | os.PathLike | None,
                    eval_crop: float | None, skip_bad_images: bool) -> FolderBatches:
    from tome_jax import memory_data

    if "[" in split:
        raise NeedsTensorFlow(f"the split slice {split!r} needs TensorFlow: {TFDS_INSTALL}")
    if eval_crop not in (None, 1.0):
        raise NeedsTensorFlow(f"--eval-crop {eval_crop} needs TensorFlow: {TFDS_INSTALL}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, "
                         f"{image_size}")
    if data_dir is None:
        if name == "image_folder":
            raise ValueError("image_folder needs data_dir=<root>/<split>/<class>/<image>")
        from tome_jax import sources

        data_dir = sources.default_data_dir(name)
        if data_dir is None:
            raise ValueError(f"{name} has no default location here; pass --data-dir")
    images = memory_data.read_image_folder(data_dir, split, image_size,
                                           skip_bad_images=skip_bad_images)
    batches = memory_data.eval_batches(images, batch_size, normalization)
    return FolderBatches(batches, num_examples=len(images.labels),
                         num_classes=images.num_classes, batch_size=len(batches[0]["label"]),
                         skipped=tuple(images.skipped))


def eval_input(name: str, split: str, *, batch_size: int, image_size: int,
               normalization: str = "augreg", data_dir: str | os.PathLike | None = None,
               eval_crop: float | None = None, skip_bad_images: bool = False,
               reader: str = "auto") -> EvalBatches:
    """Evaluation batches of source `name` for this process (see the module doc).

    batch_size: the global batch. skip_bad_images: leave out image files that do not decode
    (listed in `.skipped`) instead of stopping at the first. reader: "tf"
    (`tome_jax.data.make_dataset`), "pil" (folder sources only, decoded whole in memory) or
    "auto": "tf" where TensorFlow is installed.
    """
    from tome_jax import normalization as norm

    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; known: {READERS}")
    norm.check(normalization)
    if reader == "auto":
        reader = "tf" if has_tensorflow() else "pil"
    if reader == "pil":
        if name not in FOLDER_SOURCES:
            raise NeedsTensorFlow(f"--data {name} needs TensorFlow: {TFDS_INSTALL}")
        return _folder_batches(name, split, batch_size=batch_size, image_size=image_size,
                               normalization=normalization, data_dir=data_dir,
                               eval_crop=eval_crop, skip_bad_images=skip_bad_images)
    require_tensorflow(f"--data {name}")
    import tensorflow_datasets as tfds

    from tome_jax import data

    tfds.display_progress_bar(False)
    return data.make_dataset(name, split, batch_size=batch_size, image_size=image_size,
                             normalization=normalization, data_dir=data_dir,
                             eval_crop=eval_crop, skip_bad_images=skip_bad_images)
