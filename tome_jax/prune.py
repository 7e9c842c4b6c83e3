"""Token pruning by class-token attention (EViT-style), the baseline ToMe is compared against.

Each block drops the r patch tokens the class token attends to least. With the same r as ToMe,
token counts and FLOPs match block for block, so the two are compared at equal cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_indices(cls_attention: jax.Array, r: int) -> jax.Array:
    """Tokens to keep: [B, T] attention from the class token -> [B, T - r] sorted indices.

    Index 0 (the class token) is always kept; the kept tokens stay in their original order.
    """
    scores = jax.lax.stop_gradient(cls_attention).astype(jnp.float32)
    scores = scores.at[:, 0].set(jnp.inf)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.sort(order[:, :scores.shape[1] - r], axis=-1)
