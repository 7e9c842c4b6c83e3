"""Input pipelines: tfds sources -> per-host, padded, prefetched numpy batches.

    batches = make_dataset("cifar10_jpeg", "test", batch_size=256, image_size=32)
    for b in batches:   # b["image"] [B, H, W, 3] float32, b["label"] [B] int32,
        ...             # b["mask"] [B] bool (False on padding), b["index"] [B] int32 (-1 pad)

Here B is this process's share of the global `batch_size` (ceil(batch_size / process_count)).

Evaluation (`train=False`) reads the split once in a fixed order. Each process reads its own
contiguous slice of the split (`jax.process_index()` of `jax.process_count()` slices, sizes
differing by at most one); the last partial batch is padded with masked examples, and every
process yields the same number of batches (`len(batches)`) so collectives line up. `index` is
the example's position in the split, which lets results be compared across device counts.

Training (`train=True`) runs epoch after epoch, each a fresh permutation fixed by
(`shuffle_seed`, epoch), applies random augmentation with per-example stateless seeds (so a
seed fixes the whole stream), and drops the last partial batch; `len(batches)` is then the
number of batches in one epoch of this process. `batches.iterate_from(k)` starts the same stream
at batch k without decoding the k batches before it, which is how training resumes exactly.

Only a bounded number of batches (the `prefetch` queue plus tf.data's in-flight map calls) is
ever in host memory: images are decoded as they are read, never the whole split.

Bad files of an image folder (`image_folder`, `cifar10_jpeg`; see `tome_jax.image_files`): an
image that does not decode stops the stream with one BadImageError line naming the file (the
folder is scanned only then, so a clean folder costs nothing extra). `skip_bad_images=True`
scans the split's files before the pipeline is built (PIL, then the pipeline's own decoder:
under a second for 1,000 CIFAR-sized JPEGs), leaves out the bad ones and lists them in
`batches.skipped`; `index` then counts the kept examples. A folder with a SHA256SUMS manifest
has every file of the split checked against it first, which also catches overwritten bytes
that still decode.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tome_jax import image_files, sources
from tome_jax import normalization as normalization_lib
from tome_jax import randaugment as randaugment_lib
from tome_jax.image_files import BadImage, BadImageError
from tome_jax.normalization import (  # noqa: F401 - re-exported: data.NORMALIZATIONS
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
)
from tome_jax.sharding import host_slice

# The pipeline only runs on the host; keep TF from reserving accelerator memory that JAX needs.
tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Per-dataset preprocessing defaults.

    eval_crop: center crop fraction at eval (resize the short side to size / eval_crop, crop);
      1.0 for the small datasets, whose images already are the object.
    train_aug: "inception" (random resized crop + flip) or "pad_crop_flip" (CIFAR style).
    """

    eval_crop: float
    train_aug: str


RECIPES = {
    "imagenet2012": Recipe(0.875, "inception"),
    "imagenet_sample": Recipe(0.875, "inception"),
    "image_folder": Recipe(1.0, "inception"),
    "cifar10": Recipe(1.0, "pad_crop_flip"),
    "cifar10_jpeg": Recipe(1.0, "pad_crop_flip"),
    "fashion_mnist": Recipe(1.0, "pad_crop_flip"),
    "fashion_mnist_local": Recipe(1.0, "pad_crop_flip"),
}
EVAL_SPLITS = {"imagenet2012": "validation", "imagenet_sample": "validation"}


def normalize(image: tf.Tensor, normalization: str) -> tf.Tensor:
    """[..., 3] float pixels in 0..255 -> normalised float32."""
    mean, std = normalization_lib.mean_std(normalization)
    return (tf.cast(image, tf.float32) - mean) / std


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG bytes -> [h, w, 3] uint8 (grayscale is repeated to RGB)."""
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _tf_message(error: tf.errors.OpError) -> str:
    """TensorFlow's reason without its function-node and op decorations, on one line."""
    text = re.sub(r"\{\{[^}]*\}\}|\[\[[^]]*\]\]|\[Op:[^]]*\]|\bname:\s*\S*\s*$", " ",
                  error.message)
    return " ".join(text.split())


def decode_problem(encoded: bytes) -> str | None:
    """Why these bytes are not an image the pipeline can decode; None when they are.

    PIL looks first (it fails quietly, where libjpeg inside TensorFlow prints to stderr); what
    PIL reads is then tried with `decode` itself, so a file that passes never stops the stream.
    """
    problem = image_files.decode_problem(encoded)
    if problem:
        return problem
    try:
        decode(tf.constant(encoded))
    except tf.errors.OpError as e:
        return f"not a decodable image ({_tf_message(e)})"
    return None


def folder_files(builder: tfds.core.DatasetBuilder, split: str) -> list[tuple[str, int]] | None:
    """[(path, label)] of an image folder's split in the order tfds.ImageFolder reads it;
    None for other sources (their images sit inside prepared records)."""
    if not isinstance(builder, tfds.ImageFolder):
        return None
    label = builder.info.features["label"]
    return [(ex.image_path, label.str2int(ex.label)) for ex in builder._split_examples[split]]


def _scan(files: Iterable[tuple[str, int]], *, decode_all: bool) -> list[BadImage]:
    """The bad files among files: those whose bytes differ from their folder's SHA256SUMS
    (when it has one) and, with decode_all, those that do not decode."""
    files = list(files)
    manifests: dict[Path, dict[str, str] | None] = {}
    bad = []
    for path, _ in files:
        root = Path(path).parents[2]  # <root>/<split>/<class>/<file>
        if root not in manifests:
            manifests[root] = image_files.read_manifest(root)
        expected = (manifests[root] or {}).get(Path(path).relative_to(root).as_posix())
        if expected is None and not decode_all:
            continue
        data = image_files.read_bytes(path)
        problem = image_files.checksum_problem(data, expected)
        if problem is None and decode_all:
            problem = decode_problem(data)
        if problem:
            bad.append(BadImage(path, problem))
    return bad


def _has_manifest(files: list[tuple[str, int]]) -> bool:
    return bool(files) and (Path(files[0][0]).parents[2] / image_files.MANIFEST).is_file()


def _resize(image: tf.Tensor, size: tuple[int, int] | tf.Tensor) -> tf.Tensor:
    return tf.image.resize(image, size, method="bilinear", antialias=True)


def eval_transform(image: tf.Tensor, image_size: int, crop: float) -> tf.Tensor:
    """[h, w, 3] -> [S, S, 3] float32 0..255: short side to S / crop, then center crop S."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (image_size / crop) / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    # Already the right size (CIFAR at 32, Fashion-MNIST at 28): skip the costly resample.
    image = tf.cond(tf.reduce_all(new == tf.shape(image)[:2]),
                    lambda: tf.cast(image, tf.float32), lambda: _resize(image, new))
    top, left = (new[0] - image_size) // 2, (new[1] - image_size) // 2
    return image[top:top + image_size, left:left + image_size]


def train_transform(image: tf.Tensor, image_size: int, aug: str, seed: tf.Tensor,
                    randaugment: tuple[int, float] | None = None) -> tf.Tensor:
    """[h, w, 3] -> [S, S, 3] float32 0..255, randomly cropped and flipped; seed [2] int.

    randaugment: (num_ops, magnitude) of `tome_jax.randaugment`, applied after the flip.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if aug == "inception":
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([1, 0, 4], tf.float32), seed=crop_seed,
            min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        image = _resize(tf.slice(image, begin, size), (image_size, image_size))
    elif aug == "pad_crop_flip":
        pad = max(image_size // 8, 1)  # 4 px at CIFAR's 32
        image = _resize(image, (image_size, image_size))
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(image, (image_size, image_size, 3), crop_seed)
    else:
        raise ValueError(f"unknown train augmentation {aug!r}")
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if randaugment:
        # A seed of its own (folded in, not split off) keeps crop and flip as they were without it.
        ra_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        image = randaugment_lib.randaugment(image, *randaugment, seed=ra_seed)
    return image


def resolve_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[str, int, int]:
    """"test[:40]", "train[10%:]" ... -> (split name, start, stop) in absolute examples."""
    splits = builder.info.splits
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
    except (ValueError, KeyError, AssertionError) as e:
        raise ValueError(f"bad split {split!r} for {builder.name}; splits: "
                         f"{list(splits.keys())} ({e})") from e
    if len(instructions) != 1:
        raise ValueError(f"split {split!r}: only one split (with an optional slice) is supported")
    ins = instructions[0]
    n = splits[ins.splitname].num_examples
    start = 0 if ins.from_ is None else ins.from_
    stop = n if ins.to is None else ins.to
    return ins.splitname, start, stop


def _read_files(files: list[tuple[str, int]]) -> tf.data.Dataset:
    """Image files as {"image": encoded bytes, "label": int64}, as tfds.ImageFolder reads them."""
    paths = tf.constant([p for p, _ in files], tf.string)
    labels = tf.constant([label for _, label in files], tf.int64)
    return tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda path, label: {"image": tf.io.read_file(path), "label": label},
        num_parallel_calls=tf.data.AUTOTUNE)


def _read(builder: tfds.core.DatasetBuilder, name: str, start: int, stop: int,
          shuffle_files: bool, seed: int) -> tf.data.Dataset:
    """Examples [start, stop) of a split as {"image": encoded bytes, "label": int64}."""
    decoders = {"image": tfds.decode.SkipDecoding()}  # decoded later, fused with the resize
    read_config = tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=False)
    return builder.as_dataset(split=f"{name}[{start}:{stop}]", decoders=decoders,
                              shuffle_files=shuffle_files, read_config=read_config)


class Batches:
    """An iterable of numpy batches (see the module doc) with the facts a consumer needs.

    Each `iter()` starts the same stream again. build: makes the tf.data pipeline.
    num_batches: batches per pass of this process (one epoch when training).
    num_examples: examples of the whole split over all processes (padding excluded).
    batch_size: this process's batch; global_batch_size: batch_size * process_count.
    skipped: the files left out as bad (`make_dataset(skip_bad_images=True)`).
    explain: a decode error of the stream -> the error to raise instead (one line naming the
    file); None keeps TensorFlow's.
    """

    def __init__(self, build: Callable[..., tf.data.Dataset], *, num_batches: int,
                 num_examples: int, batch_size: int, process_count: int,
                 num_classes: int | None, name: str, split: str, train: bool,
                 skipped: tuple[BadImage, ...] = (),
                 explain: Callable[[tf.errors.OpError], Exception] | None = None):
        self.build = build
        self.num_batches = num_batches
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.global_batch_size = batch_size * process_count
        self.num_classes = num_classes
        self.name, self.split, self.train = name, split, train
        self.skipped = skipped
        self.explain = explain

    def _explained(self, batches: Iterable[dict[str, np.ndarray]]
                   ) -> Iterator[dict[str, np.ndarray]]:
        """The batches; a decode failure inside tf.data becomes `explain`'s one-line error."""
        try:
            yield from batches
        except tf.errors.InvalidArgumentError as e:
            better = self.explain(e) if self.explain else e
            if better is e:
                raise
            raise better from None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.train:
            return self.iterate_from(0)
        # A fresh pipeline per pass: a reused tf.data shuffle would continue its seed stream,
        # so a second pass would differ from the first.
        return self._explained(tfds.as_numpy(self.build()))

    def iterate_from(self, batch: int) -> Iterator[dict[str, np.ndarray]]:
        """The training stream (endless) starting at its `batch`-th batch."""
        if not self.train:
            raise ValueError("iterate_from is for training streams; evaluation reads in order")
        first_epoch, skip = divmod(batch, self.num_batches)
        for epoch in itertools.count(first_epoch):
            yield from self._explained(
                tfds.as_numpy(self.build(epoch, skip if epoch == first_epoch else 0)))

    def __len__(self) -> int:
        return self.num_batches

    def __repr__(self) -> str:
        return (f"Batches({self.name!r}, {self.split!r}, examples={self.num_examples}, "
                f"batches={self.num_batches}x{self.batch_size}, classes={self.num_classes})")


def make_dataset(name: str, split: str, *, batch_size: int, image_size: int,
                 normalization: str = "augreg", train: bool = False,
                 data_dir: str | os.PathLike | None = None, shuffle_seed: int = 0,
                 eval_crop: float | None = None, prefetch: int = 2,
                 shuffle_buffer: int = 10_000, process_index: int | None = None,
                 process_count: int | None = None,
                 randaugment: tuple[int, float] | None = None,
                 skip_bad_images: bool = False) -> Batches:
    """Batches of a named dataset (`tome_jax.sources.NAMES`) for this process; see module doc.

    batch_size: global batch over all processes. split: a tfds split spec ("test",
      "test[:40]", "train[:90%]"); "validation" of ImageNet is its eval split.
    data_dir: where the source lives (see `tome_jax.sources`); None: its default.
    eval_crop: overrides the dataset's center crop fraction (`RECIPES`).
    randaugment: (num_ops, magnitude) adds RandAugment to training augmentation; None: off.
    process_index / process_count: default to JAX's (set them to test sharding).
    skip_bad_images: image folders only; leave out files that do not decode (or differ from
      the folder's SHA256SUMS) and list them in `skipped`, instead of stopping with a
      BadImageError naming the first (see the module doc).
    """
    if name not in sources.NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {sources.NAMES}")
    normalization_lib.check(normalization)
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, "
                         f"{image_size}")
    if randaugment:
        randaugment_lib.check_settings(*randaugment)  # now, not when the first batch is read
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    recipe = RECIPES[name]
    crop = recipe.eval_crop if eval_crop is None else eval_crop

    builder = sources.get_builder(name, data_dir)
    split_name, start, stop = resolve_split(builder, split)
    if stop - start <= 0:
        raise ValueError(f"split {split!r} of {name} is empty")
    where = f"{name} {split!r}"
    files = folder_files(builder, split_name)
    skipped: list[BadImage] = []
    if files is not None:
        files = files[start:stop]
        # Every process scans the whole slice, so all agree on what is left out.
        if skip_bad_images or _has_manifest(files):
            skipped = _scan(files, decode_all=skip_bad_images)
        if skipped and not skip_bad_images:
            raise image_files.bad_images_error(skipped, where)
        bad_paths = {b.path for b in skipped}
        files = [f for f in files if f[0] not in bad_paths]
        if not files:
            raise BadImageError(f"{skipped[0]}; no usable image left in {where} "
                                f"({len(skipped)} bad)")
    elif skip_bad_images:
        raise ValueError(f"skip_bad_images needs an image folder source (image_folder, "
                         f"cifar10_jpeg); {name} keeps its images in prepared records")
    num_examples = stop - start if files is None else len(files)
    lo, hi = host_slice(num_examples, process_index, process_count)
    host_n = hi - lo
    local_batch = math.ceil(batch_size / process_count)
    label_feature = builder.info.features["label"]
    num_classes = getattr(label_feature, "num_classes", None)

    seed = shuffle_seed * 1_000_003 + process_index  # distinct streams per process
    if train:
        if host_n < local_batch:
            raise ValueError(f"{split!r} gives this process {host_n} examples, fewer than one "
                             f"batch of {local_batch}")
        num_batches = host_n // local_batch
    else:
        # Every process runs the same number of steps, sized by the largest share.
        num_batches = math.ceil(math.ceil(num_examples / process_count) / local_batch)

    def build(epoch: int = 0, skip_batches: int = 0) -> tf.data.Dataset:
        epoch_seed = seed * 7919 + epoch
        if files is not None:
            ds = _read_files(files[lo:hi])
        else:
            ds = _read(builder, split_name, start + lo, start + hi, shuffle_files=train,
                       seed=epoch_seed)
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)

        if train:
            # Small sources (ImageFolder lists files class by class) need the whole split in the
            # buffer to be shuffled at all; raw encoded bytes are cheap to hold.
            buffer = host_n if host_n <= 100_000 else shuffle_buffer
            ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
            ds = ds.take(num_batches * local_batch)
            # Counting examples across epochs gives every example of the stream its own
            # augmentation seed; skipping happens before decoding, so resuming is cheap.
            ds = ds.enumerate(start=epoch * num_batches * local_batch)
            ds = ds.skip(skip_batches * local_batch)

            def train_map(i, ex):
                image = train_transform(decode(ex["image"]), image_size, recipe.train_aug,
                                        tf.stack([tf.constant(seed, tf.int64), i]), randaugment)
                return {"image": normalize(image, normalization),
                        "label": tf.cast(ex["label"], tf.int32),
                        "mask": tf.constant(True), "index": tf.constant(-1, tf.int32)}

            ds = ds.map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(local_batch, drop_remainder=True)
        else:
            def eval_map(i, ex):
                image = eval_transform(decode(ex["image"]), image_size, crop)
                return {"image": normalize(image, normalization),
                        "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(True),
                        "index": tf.cast(i + start + lo, tf.int32)}

            ds = ds.enumerate().map(eval_map, num_parallel_calls=tf.data.AUTOTUNE)
            pad = {"image": tf.zeros((image_size, image_size, 3), tf.float32),
                   "label": tf.constant(0, tf.int32), "mask": tf.constant(False),
                   "index": tf.constant(-1, tf.int32)}
            num_pad = num_batches * local_batch - host_n
            ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(num_pad))
            ds = ds.batch(local_batch, drop_remainder=True)
        if prefetch:
            ds = ds.prefetch(prefetch)
        return ds

    def explain(error: tf.errors.OpError) -> Exception:
        """A decode failure in the stream -> BadImageError naming this process's bad files
        (a source without files: a one-line ValueError); any other error stays as it is."""
        if files is None:
            if "decode" not in error.message.lower():
                return error
            return ValueError(f"{where}: an image does not decode ({_tf_message(error)})")
        bad = _scan(files[lo:hi], decode_all=True)
        return image_files.bad_images_error(bad, where) if bad else error

    return Batches(build, num_batches=num_batches, num_examples=num_examples,
                   batch_size=local_batch, process_count=process_count,
                   num_classes=num_classes, name=name, split=split, train=train,
                   skipped=tuple(skipped), explain=explain)


def class_names(name: str, data_dir: str | os.PathLike | None = None) -> list[str] | None:
    """The label names of a source (None when the source has none, e.g. ImageNet sample)."""
    feature: Any = sources.get_builder(name, data_dir).info.features["label"]
    names = list(feature.names)
    return None if names == [str(i) for i in range(len(names))] else names
