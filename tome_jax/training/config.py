"""A training run's settings: one frozen dataclass, read from JSON plus `key=value` overrides.

    cfg = load_config("train/configs/cifar10_vit.json", ["r=4", "steps=2000"])
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
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
    # Token layout and block details of pretrained backbones (DINOv2: layerscale_init=1.0,
    # registers; DeiT distilled: distill_token). They must match an init_from directory's.
    class_token: bool = True
    distill_token: bool = False
    num_registers: int = 0
    layerscale_init: float = 0.0  # 0 = no LayerScale
    representation_size: int = 0  # 0 = no pre-logits layer
    approximate_gelu: bool = False
    prop_attn: bool = True  # ToMe's proportional attention (+ log s)
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
    # How DTEM's soft path re-splits tokens after each block: "size" (the authors' order: by
    # size, largest first) or "tome" (ToMe's order, no re-sort). Evaluation is hard either way.
    dtem_order: str = "size"
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
    """Config from a JSON file plus "key=value" overrides (later ones win).

    ValueError, in one line naming the file or the override, for an unreadable file, one that
    is not a UTF-8 JSON object, an unknown key or a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path:
        for key, value in read_config_file(path).items():
            values[key], origin[key] = value, f"{path}: {key}"
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item}: an override is key=value")
        key, value = item.split("=", 1)
        values[key], origin[key] = value, f"--set {item}: {key}"
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
    typed = {key: typed_value(value, type(fields[key].default), origin[key])
             for key, value in values.items()}
    return Config(**typed)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of a config file (a local path or an object-store URL, gs://...);
    ValueError naming the file for anything else."""
    from tome_jax.storage import as_path

    try:
        data = as_path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} not found") from None
    except OSError as err:
        raise ValueError(f"config file {path} cannot be read: {err.strerror}") from None
    try:
        values = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start}); it "
                         "should be a JSON object of Config fields") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err.msg} at line "
                         f"{err.lineno} column {err.colno}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} holds a JSON {type(values).__name__}, not an "
                         "object of Config fields")
    return values


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def typed_value(value: Any, kind: type, origin: str) -> Any:
    """`value` (text from --set, or a JSON value) as a field of type `kind`; ValueError
    starting with `origin` ("--set steps=abc: steps") when it is not one."""
    text = value.strip() if isinstance(value, str) else value
    if kind is str:
        return str(value)
    if kind is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{origin} must be true or false, not {value!r}")
    if isinstance(text, bool):  # JSON true is no number
        raise ValueError(f"{origin} must be {_article(kind)}, not {value!r}")
    try:
        if kind is int:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(text) if not isinstance(text, str) else int(text, 10)
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{origin} must be {_article(kind)}, not {value!r}") from None


def _article(kind: type) -> str:
    return {int: "an int", float: "a number"}.get(kind, kind.__name__)


def frozen_backbone_warnings(cfg: Config, param_names: Iterable[str]) -> list[str]:
    """One line per reason a run's frozen backbone would train differently from how it runs.

    param_names: the model's "a/b/c" parameter paths. With `freeze` matching parameters outside
    DTEM's embeddings, drop_path or dropout > 0 would still drop residual branches or units of
    those frozen blocks in every training step: what trains (the embeddings, a head) then learns
    on features the model never produces at evaluation. DTEM's authors train with neither.
    """
    from tome_jax.dtem import EMBED_NAME  # lazily: load_config alone imports no JAX

    noise = [f"{name}={getattr(cfg, name)}" for name in ("drop_path", "dropout")
             if getattr(cfg, name) > 0]
    if not cfg.freeze or not noise:
        return []
    frozen = re.compile(cfg.freeze)
    backbone = [n for n in param_names if EMBED_NAME not in n.split("/")]
    count = sum(1 for n in backbone if frozen.search(n))
    if not count:
        return []
    return [f"{' and '.join(noise)} with freeze={cfg.freeze!r} (freezing {count} of "
            f"{len(backbone)} backbone tensors): the frozen blocks still run stochastic "
            "depth/dropout in every training step, so what trains learns on features the "
            "evaluated model never produces; set drop_path=0 dropout=0 (as "
            "train/configs/dtem_modular.json does)"]


def warn_frozen_backbone(cfg: Config, params: Any) -> None:
    """Shows `frozen_backbone_warnings` for a parameter tree (arrays or shapes) as warnings
    (one "warning: ..." line each from the train command)."""
    import warnings

    from tome_jax.params import flatten

    for line in frozen_backbone_warnings(cfg, flatten(params)):
        warnings.warn(line, UserWarning, stacklevel=2)


MODEL_FIELDS = ("variant", "width", "depth", "mlp_dim", "num_heads", "num_classes",
                "image_size", "pool", "dtem_dim")


def model_fingerprint(cfg: Config) -> dict[str, Any]:
    """The fields that fix parameter shapes: a checkpoint from another model is refused."""
    return {k: getattr(cfg, k) for k in MODEL_FIELDS}
