"""Training and fine-tuning a ViT with ToMe merging: sharded, preemption-safe, resumable.

    cfg = load_config("train/configs/cifar10_vit.json", ["r=4", "steps=2000"])
    state = train(cfg, "runs/cifar10_r4")
    out, step = ship("runs/cifar10_r4", "models/cifar10_vit_r4")

config (Config, load_config), optim (schedule, AdamW), state (model, init, shardings),
step (one train step), inputs (batches), checkpoints (orbax), metrics (logs, eval),
loop (train), ship (workdir -> model directory), summary (a table of runs).
"""

from tome_jax.training.checkpoints import SaveError
from tome_jax.training.config import Config, load_config
from tome_jax.training.loop import train
from tome_jax.training.ship import ship

__all__ = ["Config", "SaveError", "load_config", "ship", "train"]
