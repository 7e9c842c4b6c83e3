"""Training and fine-tuning a ViT with ToMe merging: sharded, preemption-safe, resumable.

    cfg = load_config("train/configs/cifar10_vit.json", ["r=4", "steps=2000"])
    state = train(cfg, "runs/cifar10_r4")
    out, step = ship("runs/cifar10_r4", "models/cifar10_vit_r4")

config (Config, load_config), optim (schedule, AdamW), state (model, init, shardings),
step (one train step), inputs (batches), checkpoints (orbax), metrics (logs, eval),
loop (train), ship (workdir -> model directory), summary (a table of runs); lock (one trainer
per workdir), manifest (checkpoint checksums), messages (library logs to a file), agree
(decisions all processes share).
"""

from tome_jax.training.checkpoints import CheckpointsUnusable, SaveError
from tome_jax.training.config import Config, load_config
from tome_jax.training.lock import WorkdirLocked
from tome_jax.training.loop import train
from tome_jax.training.ship import ship

__all__ = ["CheckpointsUnusable", "Config", "SaveError", "WorkdirLocked", "load_config", "ship",
           "train"]
