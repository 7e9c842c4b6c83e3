"""The optimizer of a run: AdamW with clipping, a warm-up + decay schedule, optional freezing.

    tx = make_optimizer(cfg, abstract_params)   # shapes suffice: only the tree is read
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tome_jax.params import path_names
from tome_jax.training.config import Config

# 1-D parameters (biases, norms) and these tokens get no weight decay.
NO_DECAY = re.compile(r"(^|/)(cls|dist|registers|pos_embedding)$")


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Warm-up then decay, counted in optimizer updates (micro-steps / accum_steps).

    "cosine" decays over the whole run, so its length must be known from the start. "wsd"
    (warm-up, stable, decay) holds the peak until the last `decay_steps`: a run of unknown
    length trains at a constant lr with a large `steps`, and a copy of its workdir resumed with
    `steps=<now + D> decay_steps=D` is a finished model at any point (Hagele et al. 2024, "Scaling
    laws and compute-optimal training beyond fixed training durations", whose 1 - sqrt cooldown
    this is), while the original goes on.
    """
    total = max(cfg.steps // cfg.accum_steps, cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, total,
                                                  cfg.min_lr)
    if cfg.schedule != "wsd":
        raise ValueError(f"schedule {cfg.schedule!r} is not 'cosine' or 'wsd'")
    decay = cfg.decay_steps // cfg.accum_steps
    if not 0 < decay <= total - cfg.warmup_steps:
        raise ValueError(f"wsd needs 0 < decay_steps <= steps - warmup_steps (in updates: "
                         f"{decay} of {total - cfg.warmup_steps})")
    start = total - decay

    def wsd(count):
        warm = cfg.lr * count / max(cfg.warmup_steps, 1)
        frac = jnp.clip((count - start) / decay, 0.0, 1.0)
        return jnp.where(count < cfg.warmup_steps, warm,
                         cfg.lr - (cfg.lr - cfg.min_lr) * jnp.sqrt(frac))

    return wsd


def frozen_mask(params: Any, freeze: str) -> Any:
    """The params tree with True where the "a/b/c" path matches the regex `freeze` (nothing
    matches ""): the one definition of frozen that the optimizer and the train step share."""
    frozen = re.compile(freeze) if freeze else None
    return jax.tree.map(lambda n: bool(frozen and frozen.search(n)), path_names(params))


def make_optimizer(cfg: Config, params: Any) -> optax.GradientTransformation:
    """AdamW, warm-up + decay, clipping, decay off 1-D params and tokens, optional freezing.

    params: the parameter tree (arrays or ShapeDtypeStructs); fixes the masks' structure.
    """
    schedule = lr_schedule(cfg)
    names = path_names(params)
    decay_mask = jax.tree.map(lambda x, n: len(x.shape) > 1 and not NO_DECAY.search(n),
                              params, names)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask))
    if cfg.freeze:
        labels = jax.tree.map(lambda f: "frozen" if f else "trained",
                              frozen_mask(params, cfg.freeze))
        if not any(v == "trained" for v in jax.tree.leaves(labels)):
            raise ValueError(f"freeze={cfg.freeze!r} freezes every parameter")
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx
