"""One training step: mixup/cutmix, label smoothing, loss, gradients, the optimizer update.

    step = jax.jit(make_train_step(model, tx, cfg))
    state, metrics = step(state, {"image": [B, H, W, 3], "label": [B]})

The random key of step s is fold_in(seed + 1, s): a resumed run draws what an uninterrupted one
would have.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from tome_jax.training.config import Config
from tome_jax.training.optim import frozen_mask
from tome_jax.training.state import State
from tome_jax.vit import ViT


def mix_batch(images: jax.Array, labels: jax.Array, key: jax.Array,
              cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Mixup or cutmix with the batch reversed as partner.

    images [B, H, W, C], labels one-hot [B, K] -> the mixed (images, soft labels), same shapes.
    """
    use_mixup, use_cutmix = cfg.mixup > 0, cfg.cutmix > 0
    if not (use_mixup or use_cutmix):
        return images, labels
    k_lam, k_choice, k_box = jax.random.split(key, 3)
    alpha = cfg.mixup if use_mixup else cfg.cutmix
    cut = (jax.random.bernoulli(k_choice) if use_mixup and use_cutmix
           else jnp.asarray(use_cutmix))
    alpha = jnp.where(cut, cfg.cutmix or alpha, alpha)
    lam = jax.random.beta(k_lam, alpha, alpha)
    partner_images, partner_labels = images[::-1], labels[::-1]
    h, w = images.shape[1:3]
    # Cutmix: a box of area (1 - lam), lam then corrected to the exact pasted area.
    cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([h, w])
    bh, bw = h * jnp.sqrt(1 - lam), w * jnp.sqrt(1 - lam)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((ys >= cy - bh / 2) & (ys < cy + bh / 2) & (xs >= cx - bw / 2) & (xs < cx + bw / 2))
    box_lam = 1 - box.mean()
    mixed_cut = jnp.where(box[None, :, :, None], partner_images, images)
    mixed_up = lam * images + (1 - lam) * partner_images
    images = jnp.where(cut, mixed_cut, mixed_up)
    lam = jnp.where(cut, box_lam, lam)
    return images, lam * labels + (1 - lam) * partner_labels


def stop_frozen_gradients(params: dict, freeze: str) -> dict:
    """The same tree with every parameter whose "a/b/c" path matches `freeze` behind
    `stop_gradient`.

    The optimizer discards frozen gradients anyway; stopping them here means the backward pass
    never computes them: for modular DTEM that drops every weight-gradient matmul of the
    backbone, leaving only the activation gradients the embeddings need.
    """
    if not freeze:
        return params
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p,
                        params, frozen_mask(params, freeze))


def make_train_step(model: ViT, tx: optax.GradientTransformation,
                    cfg: Config) -> Callable[[State, dict], tuple[State, dict]]:
    """(state, batch) -> (next state, {"loss", "accuracy", "grad_norm"} scalars).

    grad_norm is the norm of the trained parameters' gradients (frozen ones are zero).
    """
    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        key = jax.random.fold_in(jax.random.key(cfg.seed + 1), state["step"])
        k_mix, k_dropout = jax.random.split(key)
        labels = jax.nn.one_hot(batch["label"], cfg.num_classes)
        images, targets = mix_batch(batch["image"], labels, k_mix, cfg)
        targets = optax.smooth_labels(targets, cfg.label_smoothing)

        def loss_fn(params):
            params = stop_frozen_gradients(params, cfg.freeze)
            logits, _ = model.apply({"params": params}, images, train=True,
                                    rngs={"dropout": k_dropout})
            return optax.softmax_cross_entropy(logits, targets).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
                   "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step
