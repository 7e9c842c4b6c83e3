"""A training run's settings: one frozen dataclass, read from JSON plus `key=value` overrides.

    cfg = load_config("train/configs/cifar10_vit.json", ["r=4", "steps=2000"])
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a run. A JSON file sets some; `--set key=value` overrides any."""

    # Model.
    variant: str = "S/4"
    width: int = 0  # 0: the variant's
    depth: int = 0
    mlp_dim: int = 0
    num_heads: int = 0
    num_classes: int = 10
    image_size: int = 32
    pool: str = "tok"
    r: str = "0"  # ToMe schedule: "8", "16,-1" or "[8,8,4]"
    dropout: float = 0.0
    drop_path: float = 0.1
    dtype: str = "float32"  # compute dtype; parameters stay float32
    init_from: str = ""  # a model directory (tome_jax.checkpoint) to fine-tune
    dtem_dim: int = 0  # DTEM merge-embedding width; 0 = ToMe on the keys
    soft_merge: bool = False  # DTEM's relaxed merging while training (eval stays hard)
    dtem_tau1: float = 0.1
    dtem_tau2: float = 0.1
    dtem_k: int = 3  # candidates per token in DTEM's soft top-r
    # Data.
    dataset: str = "cifar10_jpeg"
    data_dir: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    normalization: str = "augreg"
    batch_size: int = 128  # global, over all devices and processes
    # "host": tf.data on the host CPUs, any dataset and augmentation. "device": the whole split
    # decoded once (no TensorFlow) into accelerator memory and augmented there, CIFAR style
    # (pad-crop-flip); for small image-folder datasets, whose JPEGs the host cannot feed fast
    # enough to an accelerator (tome_jax.memory_data).
    input_pipeline: str = "host"
    randaug_ops: int = 0  # RandAugment ops per training image; 0 = off
    randaug_magnitude: float = 9.0  # 0..10
    # Optimisation.
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine", or "wsd": warm-up, constant, then decay_steps of decay
    decay_steps: int = 0  # wsd only: the last decay_steps fall from lr to min_lr (1 - sqrt)
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(a, a) mixup; 0 = off
    cutmix: float = 0.0  # Beta(a, a) cutmix; 0 = off (with both on, each step picks one)
    accum_steps: int = 1  # gradient accumulation (optax.MultiSteps)
    freeze: str = ""  # regex over "a/b/c" parameter paths; matches get no updates
    # Sharding.
    fsdp: bool = False  # shard parameters and optimizer state over the devices
    # Checkpoints, eval, logs.
    save_every: int = 500
    keep: int = 3
    eval_every: int = 1000
    eval_batch_size: int = 500
    log_every: int = 50
    seed: int = 0


def load_config(path: str | Path | None, overrides: Sequence[str]) -> Config:
    """Config from a JSON file plus "key=value" overrides; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    if path:
        values.update(json.loads(Path(path).read_text()))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        values[key] = value
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
    typed = {}
    for key, value in values.items():
        kind = type(fields[key].default)
        if isinstance(value, str) and kind is not str:
            value = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        typed[key] = str(value) if kind is str else kind(value)
    return Config(**typed)


MODEL_FIELDS = ("variant", "width", "depth", "mlp_dim", "num_heads", "num_classes",
                "image_size", "pool", "dtem_dim")


def model_fingerprint(cfg: Config) -> dict[str, Any]:
    """The fields that fix parameter shapes: a checkpoint from another model is refused."""
    return {k: getattr(cfg, k) for k in MODEL_FIELDS}
