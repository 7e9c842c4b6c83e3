"""A training workdir's newest checkpoint -> a model directory (`tome_jax.checkpoint`).

    out, step = ship("runs/cifar10", "models/cifar10_vit")
    model, params, info = load_model(out)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tome_jax import sharding
from tome_jax.checkpoint import save_model
from tome_jax.params import flatten
from tome_jax.training.checkpoints import make_manager, restore_latest
from tome_jax.training.config import Config, load_config
from tome_jax.training.state import abstract_train_state, make_model


def model_config(cfg: Config) -> dict[str, Any]:
    """The ViT fields of a training config, as a model directory's config.json holds them."""
    model = make_model(cfg, r=0, dropout=0.0, drop_path=0.0)
    fields = dict(variant=model.variant, num_classes=model.num_classes, pool=model.pool)
    for name in ("width", "depth", "mlp_dim", "num_heads", "dtem_dim"):
        if getattr(model, name):
            fields[name] = getattr(model, name)
    return fields


def ship(workdir: str | Path, out: str | Path) -> tuple[Path, int]:
    """Writes `out` from the newest checkpoint of `workdir` that restores; returns (out, step).

    FileNotFoundError without a checkpoint, ValueError when none restores, FileExistsError
    when `out` exists.
    """
    workdir = Path(workdir)
    cfg = load_config(workdir / "config.json", [])
    manager = make_manager(workdir, read_only=True)
    if not manager.all_steps():
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    # Into this process's devices, whatever device count the run was trained on; newest first,
    # a corrupt checkpoint is skipped as in training.
    _, _, abstract, _ = abstract_train_state(cfg, sharding.batch_mesh())
    restored = restore_latest(manager, abstract)
    if restored is None:
        raise ValueError(f"none of the checkpoints {manager.all_steps()} in "
                         f"{manager.directory} could be restored")
    step, state = restored
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(state["params"]).items()}
    source = f"train/train.py, {workdir.name} step {step} of {cfg.steps}"
    out = save_model(out, flat, model_config(cfg), image_size=(cfg.image_size,) * 2,
                     normalization=cfg.normalization, source=source)
    return out, step
