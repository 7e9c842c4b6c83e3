"""Where a run's batches come from: tf.data on the host, or a split held in device memory.

    batches_from, eval_split = make_train_batches(cfg, mesh)
    for batch in batches_from(start): ...   # global batches from batch `start` on

Either stream can start at any batch, so a resumed run sees the batches an uninterrupted one
would have. TensorFlow is imported only for input_pipeline=host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

from jax.sharding import Mesh

from tome_jax import memory_data, sharding
from tome_jax.training.config import Config

DEVICE_INPUT_DATASETS = ("cifar10_jpeg", "image_folder")


def make_input(cfg: Config, train: bool) -> Any:
    """The host pipeline's batches (`tome_jax.data.Batches`) of the train or eval split."""
    from tome_jax import data  # TensorFlow: only for the host pipeline

    return data.make_dataset(
        cfg.dataset, cfg.train_split if train else cfg.eval_split,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        image_size=cfg.image_size, normalization=cfg.normalization, train=train,
        data_dir=cfg.data_dir or None, shuffle_seed=cfg.seed,
        randaugment=(cfg.randaug_ops, cfg.randaug_magnitude) if cfg.randaug_ops else None)


def check_input_settings(cfg: Config) -> None:
    """ValueError for an unknown pipeline or a dataset/augmentation it cannot serve."""
    if cfg.input_pipeline not in ("host", "device"):
        raise ValueError(f"input_pipeline {cfg.input_pipeline!r} is not 'host' or 'device'")
    if cfg.input_pipeline == "device":
        if cfg.dataset not in DEVICE_INPUT_DATASETS:
            raise ValueError(f"input_pipeline=device reads image folders "
                             f"{DEVICE_INPUT_DATASETS}, not {cfg.dataset!r}")
        if cfg.randaug_ops:
            raise ValueError("input_pipeline=device augments with pad-crop-flip only; "
                             "RandAugment (randaug_ops) needs input_pipeline=host")


def read_split(cfg: Config, train: bool) -> memory_data.ImageArrays:
    """The split decoded into memory, for input_pipeline=device; its class count checked."""
    source = cfg.data_dir
    if not source:
        from tome_jax import sources

        source = sources.default_data_dir(cfg.dataset)
    split = cfg.train_split if train else cfg.eval_split
    arrays = memory_data.read_image_folder(source, split, cfg.image_size)
    if arrays.num_classes != cfg.num_classes:
        raise ValueError(f"{source} split {split!r} has {arrays.num_classes} classes, the config "
                         f"num_classes={cfg.num_classes}")
    return arrays


def make_train_batches(cfg: Config, mesh: Mesh
                       ) -> tuple[Callable[[int], Iterator[dict]], memory_data.ImageArrays | None]:
    """(start -> the global training batches from batch `start` on, the eval split's arrays).

    Each batch is {"image" [B, H, W, 3], "label" [B]} sharded over `mesh`, B = cfg.batch_size.
    The eval arrays are None except for input_pipeline=device, which reads and checks both
    splits here, before the run writes anything.
    """
    if cfg.input_pipeline == "device":
        stream = memory_data.DeviceStream(read_split(cfg, train=True),
                                          batch_size=cfg.batch_size, mesh=mesh, seed=cfg.seed,
                                          normalization=cfg.normalization)
        eval_split = read_split(cfg, train=False) if cfg.eval_every else None
        return functools.partial(memory_data.iterate, stream), eval_split
    host = make_input(cfg, train=True)

    def from_batch(start: int) -> Iterator[dict]:
        for b in host.iterate_from(start):
            yield sharding.global_batch({"image": b["image"], "label": b["label"]}, mesh)

    return from_batch, None


def eval_batches(cfg: Config, eval_split: memory_data.ImageArrays | None = None) -> Any:
    """The eval split's batches: from its decoded arrays when given, else the host pipeline."""
    if eval_split is None:
        return make_input(cfg, train=False)
    return memory_data.eval_batches(eval_split, cfg.eval_batch_size, cfg.normalization)
