"""Turns a training workdir's last checkpoint into a shippable model directory.

    python -m train.ship --workdir runs/cifar10 --out models/cifar10_vit

Writes the same layout as `python -m tome_jax.convert` (params.msgpack + config.json), so
`tome_jax.convert.load_pretrained(out)` and every eval/vis/export command read it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from tome_jax import sharding
from tome_jax.convert import flatten, save_converted
from train.train import (
    CHECKPOINT_ITEMS,
    CheckpointError,
    Config,
    abstract_train_state,
    load_config,
    make_model,
    restore_latest,
)


def model_config(cfg: Config) -> dict:
    """The ViT fields of a training config, as `load_pretrained` expects them."""
    model = make_model(cfg, r=0, dropout=0.0, drop_path=0.0)
    fields = dict(variant=model.variant, num_classes=model.num_classes, pool=model.pool)
    for name in ("width", "depth", "mlp_dim", "num_heads", "dtem_dim"):
        if getattr(model, name):
            fields[name] = getattr(model, name)
    return fields


def ship(workdir: str | Path, out: str | Path) -> tuple[Path, int]:
    """Writes `out` from the newest checkpoint of `workdir`; returns (out, step)."""
    workdir = Path(workdir)
    cfg = load_config(str(workdir / "config.json"), [])
    checkpoints = (workdir / "checkpoints").resolve()
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(checkpoints, item_names=CHECKPOINT_ITEMS,
                                   options=options)
    if not manager.all_steps():
        raise FileNotFoundError(f"no checkpoint in {checkpoints}")
    # Into this process's devices, whatever device count the run was trained on; newest first,
    # a corrupt checkpoint is skipped as in training.
    _, _, abstract, _ = abstract_train_state(cfg, sharding.batch_mesh())
    restored = restore_latest(manager, abstract)
    if restored is None:
        raise CheckpointError(f"none of the checkpoints {manager.all_steps()} in {checkpoints} "
                              "could be restored")
    step, state = restored
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(state["params"]).items()}
    source = f"train/train.py, {workdir.name} step {step} of {cfg.steps}"
    return save_converted(out, flat, model_config(cfg), (cfg.image_size,) * 2, source), step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="new directory (must not exist)")
    args = parser.parse_args(argv)
    out, step = ship(args.workdir, args.out)
    print(json.dumps({"out": str(out), "step": step}))


if __name__ == "__main__":
    main()
