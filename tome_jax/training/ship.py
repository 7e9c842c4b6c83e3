"""A training workdir's newest checkpoint -> a model directory (`tome_jax.checkpoint`).

    out, step = ship("runs/cifar10", "models/cifar10_vit")
    model, params, info = load_model(out)

Either may be an object-store URL (gs://bucket/run); ship.log is then written locally (see
`log_path`) and copied into the workdir at the end, as training does with train.log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tome_jax import sharding
from tome_jax.checkpoint import save_model
from tome_jax.params import flatten
from tome_jax.storage import AnyPath, as_path, is_remote, local_log_dir
from tome_jax.training.checkpoints import Checkpoints
from tome_jax.training.config import Config, load_config
from tome_jax.training.loop import upload_log
from tome_jax.training.messages import library_logs_to
from tome_jax.training.state import abstract_train_state, make_model
from tome_jax.vit import ViT


def model_config(cfg: Config) -> dict[str, Any]:
    """The ViT fields of a training config, as a model directory's config.json holds them."""
    model = make_model(cfg, r=0, dropout=0.0, drop_path=0.0)
    fields = dict(variant=model.variant, num_classes=model.num_classes, pool=model.pool)
    for name in ("width", "depth", "mlp_dim", "num_heads", "dtem_dim"):
        if getattr(model, name):
            fields[name] = getattr(model, name)
    # The token layout and block details only where they differ from a plain ViT's, so the
    # config.json of the models shipped so far stays as it was.
    plain = ViT()
    for name in ("class_token", "distill_token", "num_registers", "layerscale_init",
                 "representation_size", "approximate_gelu"):
        if getattr(model, name) != getattr(plain, name):
            fields[name] = getattr(model, name)
    return fields


LOG_FILE = "ship.log"  # orbax's logs while reading the checkpoints


def log_path(workdir: str | Path) -> Path:
    """Where shipping sends the libraries' logs: WORKDIR/ship.log, or for an object-store
    workdir (a `logging.FileHandler` writes local files only) the same name in
    `storage.local_log_dir(workdir)`, which this creates."""
    workdir = as_path(workdir)
    if not is_remote(workdir):
        return workdir / LOG_FILE
    logs = local_log_dir(workdir)
    logs.mkdir(parents=True, exist_ok=True)
    return logs / LOG_FILE


def ship(workdir: str | Path, out: str | Path, param_dtype: str = "float32"
         ) -> tuple[AnyPath, int]:
    """Writes `out` from the newest usable checkpoint of `workdir`; returns (out, step).

    param_dtype: "float16" stores the matrices as float16 (`tome_jax.checkpoint.save_model`).
    Checkpoints are checked as training checks them (`Checkpoints.restore`), read-only: an
    unusable one is skipped with one warning, nothing in the workdir is moved. FileNotFoundError
    without a checkpoint, CheckpointsUnusable (a ValueError) when none is usable,
    FileExistsError when `out` exists.
    """
    workdir = as_path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir: it has no config.json")
    cfg = load_config(workdir / "config.json", [])
    log = log_path(workdir)
    try:
        with library_logs_to(log):
            ckpts = Checkpoints(workdir, read_only=True)
            try:
                if not ckpts.steps():
                    raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
                # Into this process's devices, whatever device count the run was trained on.
                _, _, abstract, _ = abstract_train_state(cfg, sharding.batch_mesh())
                step, state = ckpts.restore(abstract)  # never None: CheckpointsUnusable instead
            finally:
                ckpts.close()
    finally:
        if is_remote(workdir):
            upload_log(log, workdir / LOG_FILE)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(state["params"]).items()}
    source = f"train/train.py, {workdir.name} step {step} of {cfg.steps}"
    out = save_model(out, flat, model_config(cfg), image_size=(cfg.image_size,) * 2,
                     normalization=cfg.normalization, source=source,
                     param_dtype=param_dtype)
    return out, step

