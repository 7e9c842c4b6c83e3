"""ToMe: bipartite soft matching and token merging as small pure functions on static shapes.

Shapes: B batch, T tokens, C channels, Ta = ceil(T / 2) tokens in set A (even positions),
Tb = floor(T / 2) in set B (odd positions), r the (static, Python int) number merged away.

    merge, unmerge = bipartite_soft_matching(keys_mean, r, class_token=True)
    x, size = merge_wavg(merge, x, size)          # [B, T, C] -> [B, T - r, C]
    source = merge_source(merge, x, source)       # which input patches each token holds

The matching is a sort (no Python loop over tokens) and carries no gradient; merging is a
gather plus a segment reduction, so everything jits, vmaps and differentiates through x.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tome_jax.schedule import max_r

MERGE_MODES = ("sum", "mean", "max")
MERGE_METHODS = ("segment", "onehot")

MergeFn = Callable[..., jax.Array]


class Matching(NamedTuple):
    """Which tokens of set A stay, and which merge into which token of set B.

    unm_idx: [B, Ta - r] int32, positions in A that stay (sorted when there is a class token).
    src_idx: [B, r] int32, positions in A merged away, best edge first.
    dst_idx: [B, r] int32, the B position each src token merges into.
    """

    unm_idx: jax.Array
    src_idx: jax.Array
    dst_idx: jax.Array


def clamp_r(r: int, num_tokens: int, class_token: bool = True,
            distill_token: bool = False) -> int:
    """Clamps r to the number of tokens one bipartite step can merge."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative Python int (static), got {r!r}")
    return min(r, max_r(num_tokens, int(class_token) + int(distill_token)))


def match(metric: jax.Array, r: int, class_token: bool = True,
          distill_token: bool = False) -> Matching:
    """Bipartite soft matching of [B, T, C] metric vectors; r must already be clamped.

    Splits tokens alternately (A even, B odd), scores A->B by cosine similarity, gives each A
    token its most similar B token and keeps the r best of those edges. The class token (index
    0, in A) is never a source; the distill token (index 1, in B) is never a destination.
    """
    metric = jax.lax.stop_gradient(metric).astype(jnp.float32)
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = jnp.einsum("bic,bjc->bij", a, b, precision=jax.lax.Precision.HIGHEST)
    if class_token:
        scores = scores.at[:, 0, :].set(-jnp.inf)
    if distill_token:
        scores = scores.at[:, :, 0].set(-jnp.inf)
    node_max = scores.max(axis=-1)
    node_idx = scores.argmax(axis=-1)
    edge_idx = jnp.argsort(-node_max, axis=-1, stable=True)  # best edge first
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=-1)
    if class_token:
        unm_idx = jnp.sort(unm_idx, axis=-1)  # keeps the class token at index 0
    return Matching(unm_idx.astype(jnp.int32), src_idx.astype(jnp.int32),
                    dst_idx.astype(jnp.int32))


def random_match(key: jax.Array, shape: tuple[int, int, int], r: int, class_token: bool = True,
                 distill_token: bool = False) -> Matching:
    """`match` on random Gaussian metric vectors of shape [B, T, C]: random pairs.

    The baseline ToMe is compared against: the same split, protected tokens and token counts,
    but partners that ignore the content. A fixed key gives the same pairs on every call.
    """
    return match(jax.random.normal(key, shape, jnp.float32), r, class_token, distill_token)


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, T, C], idx [B, K] -> [B, K, C]."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def _reduce_into(dst: jax.Array, dst_idx: jax.Array, src: jax.Array, mode: str,
                 method: str) -> jax.Array:
    """Reduces src [B, r, C] into dst [B, Tb, C] at dst_idx [B, r]; the dst token counts too."""
    num_dst = dst.shape[1]
    if mode == "max":
        seg_max = jax.vmap(partial(jax.ops.segment_max, num_segments=num_dst))
        return jnp.maximum(dst, seg_max(src, dst_idx).astype(dst.dtype))
    if method == "onehot":
        onehot = jax.nn.one_hot(dst_idx, num_dst, dtype=src.dtype)  # [B, r, Tb]
        # HIGHEST: a one-hot matmul must copy values exactly, also where f32 matmuls default
        # to bf16 passes (TPU).
        summed = jnp.einsum("brt,brc->btc", onehot, src, precision=jax.lax.Precision.HIGHEST)
    else:
        summed = jax.vmap(partial(jax.ops.segment_sum, num_segments=num_dst))(src, dst_idx)
    out = dst + summed.astype(dst.dtype)
    if mode == "mean":
        counts = jax.vmap(partial(jnp.bincount, length=num_dst))(dst_idx)
        out = out / (1 + counts)[..., None].astype(out.dtype)
    return out


def merge_tokens(x: jax.Array, matching: Matching, mode: str = "mean",
                 method: str = "segment") -> jax.Array:
    """Applies a matching: [B, T, C] -> [B, T - r, C], unmerged A tokens then all B tokens.

    mode: "sum", "mean" (over the destination and everything merged into it) or "max"
    ("amax" is accepted as in PyTorch). method: "segment" (segment-sum) or "onehot" (matmul);
    both give the same values.
    """
    mode = "max" if mode == "amax" else mode
    if mode not in MERGE_MODES:
        raise ValueError(f"unknown merge mode {mode!r}; expected one of {MERGE_MODES}")
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {MERGE_METHODS}")
    a, b = x[:, ::2], x[:, 1::2]
    unm = gather(a, matching.unm_idx)
    src = gather(a, matching.src_idx)
    dst = _reduce_into(b, matching.dst_idx, src, mode, method)
    return jnp.concatenate([unm, dst], axis=1)


def unmerge_tokens(x: jax.Array, matching: Matching) -> jax.Array:
    """Inverse of `merge_tokens` in shape: [B, T - r, C] -> [B, T, C].

    Every token gets the value of the token it ended up in, so merged tokens share the value of
    their destination (for dense prediction on merged sequences).
    """
    batch, _, channels = x.shape
    num_unm = matching.unm_idx.shape[1]
    unm, dst = x[:, :num_unm], x[:, num_unm:]
    src = gather(dst, matching.dst_idx)
    num_a = num_unm + matching.src_idx.shape[1]
    out = jnp.zeros((batch, num_a + dst.shape[1], channels), x.dtype)
    rows = jnp.arange(batch)[:, None]
    out = out.at[:, 1::2].set(dst)
    out = out.at[rows, 2 * matching.unm_idx].set(unm)
    out = out.at[rows, 2 * matching.src_idx].set(src)
    return out


def _identity(x: jax.Array, mode: str = "mean") -> jax.Array:
    del mode
    return x


def bipartite_soft_matching(metric: jax.Array, r: int, class_token: bool = True,
                            distill_token: bool = False,
                            method: str = "segment") -> tuple[MergeFn, MergeFn]:
    """Matches [B, T, C] metric tokens and returns (merge, unmerge) functions.

    r is clamped to (T - protected) // 2; r = 0 returns identities (no reordering).
    merge(x, mode="mean"): [B, T, C'] -> [B, T - r, C']; unmerge: the reverse in shape.
    """
    if metric.ndim != 3:
        raise ValueError(f"metric must be [batch, tokens, channels], got shape {metric.shape}")
    r = clamp_r(r, metric.shape[1], class_token, distill_token)
    if r == 0:
        return _identity, _identity
    matching = match(metric, r, class_token, distill_token)
    merge = partial(merge_tokens, matching=matching, method=method)
    unmerge = partial(unmerge_tokens, matching=matching)
    return merge, unmerge


def merge_wavg(merge: MergeFn, x: jax.Array,
               size: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Size-weighted average merge. x [B, T, C], size [B, T, 1] (ones if None).

    Returns x [B, T - r, C] in x's dtype and size [B, T - r, 1] in float32; the average is
    taken in float32 so bfloat16 activations do not lose the weights.
    """
    if size is None:
        size = jnp.ones(x.shape[:2] + (1,), jnp.float32)
    size = size.astype(jnp.float32)
    summed = merge(x.astype(jnp.float32) * size, mode="sum")
    size = merge(size, mode="sum")
    return (summed / size).astype(x.dtype), size


def merge_source(merge: MergeFn, x: jax.Array, source: jax.Array | None = None) -> jax.Array:
    """Tracks which input tokens each token holds: source [B, T, N] 0/1 (identity if None)."""
    if source is None:
        batch, tokens = x.shape[:2]
        source = jnp.broadcast_to(jnp.eye(tokens, dtype=jnp.float32), (batch, tokens, tokens))
    return merge(source, mode="max")
