"""Token reduction behind one interface: every strategy is a pure function

    reduce(tokens: Tokens, metrics: Metrics, r: int, cfg: MergeConfig, layer: int) -> Tokens

that a block calls between attention and MLP. `reducer_for` picks the function once per model:

    "tome"       `merge_by_keys`: ToMe, bipartite matching on the keys averaged over heads.
    "random"     `merge_random`: the same merge with random partners.
    "prune"      `prune_least_attended`: drop the tokens the class token attends to least.
    DTEM         `merge_by_embedding`: ToMe's matching on the learned embedding (inference), or
                 `soft_merge_by_embedding`: the differentiable merge for training (`tome_jax.dtem`).

The hard reducers remove r tokens (r static, already clamped by the schedule) from the class
token and the patches; distill and register tokens are set aside meanwhile and put back in
place, so they are never merged and keep their index. The soft reducer removes nothing: it moves
size between tokens and narrows `Tokens.active`, the tokens still open to matching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tome_jax import dtem, merge, prune

# tome: ToMe. random: the same bipartite merge with random scores (random pairs). prune: drop the
# r tokens with the least class-token attention (EViT-style). Same r gives the same token counts.
STRATEGIES = ("tome", "random", "prune")


class Tokens(NamedTuple):
    """The token state every block takes and returns; fields not in use are None.

    x: [B, T, D] the tokens.
    size: [B, T, 1] float32, how many input tokens each holds; None until the first merge (the
      plain ViT never builds it), fractional on the soft path.
    source: [B, T, N] 0/1, which of the N input tokens each holds (with trace_source).
    active: [B, n] int32, positions still open to matching (DTEM's soft path only).
    """

    x: jax.Array
    size: jax.Array | None = None
    source: jax.Array | None = None
    active: jax.Array | None = None


class Metrics(NamedTuple):
    """What a block's attention offers a reducer to rank tokens by.

    keys: [B, T, C] the keys averaged over heads (ToMe's metric).
    cls_attention: [B, T] float32, the class token's attention averaged over heads, or None
      (computed only where `MergeConfig.cls_attention` asks for it).
    embedding: [B, T, F] DTEM's merge embedding, or None.
    """

    keys: jax.Array
    cls_attention: jax.Array | None = None
    embedding: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Static per-model reduction settings a block needs."""

    class_token: bool
    num_extra: int  # distill + register tokens, set aside from matching
    prop_attn: bool
    trace_source: bool
    method: str
    strategy: str = "tome"
    # DTEM training path (`dtem.dtem_soft_step`): soft merges, no token removed.
    dtem_soft: bool = False
    dtem_tau1: float = 0.1
    dtem_tau2: float = 0.1
    dtem_k: int = 3
    dtem_order: str = "size"  # how tokens are re-split between blocks: `dtem.ORDERS`
    dtem_fused: bool = False  # inference: the embedding rides in the q/k/v matmul

    @property
    def cls_attention(self) -> bool:
        """Whether reducing needs the class token's attention row (pruning ranks by it); the
        fused attention kernel does not return probabilities, so it costs extra work."""
        return self.strategy == "prune"


Reducer = Callable[[Tokens, Metrics, int, MergeConfig, int], Tokens]


def initial_tokens(x: jax.Array, cfg: MergeConfig) -> Tokens:
    """The state entering the first block: x [B, T, D] with an identity source (trace_source)
    and, on the soft path, unit sizes and every non-prefix token active."""
    batch, num = x.shape[:2]
    source = None
    if cfg.trace_source:
        source = jnp.broadcast_to(jnp.eye(num, dtype=jnp.float32), (batch, num, num))
    if not cfg.dtem_soft:
        return Tokens(x, None, source)
    active = dtem.init_active(batch, num, int(cfg.class_token) + cfg.num_extra)
    return Tokens(x, jnp.ones((batch, num, 1), jnp.float32), source, active)


def attention_size(tokens: Tokens, cfg: MergeConfig) -> jax.Array | None:
    """Sizes [B, T, 1] for attention's `+ log size` bias, or None for plain attention."""
    if tokens.active is not None:
        # Soft sizes reach 0: floor them so log(size) stays finite (and its gradient too).
        return jnp.maximum(tokens.size, dtem.MIN_SIZE)
    return tokens.size if cfg.prop_attn else None


def _set_aside(t: jax.Array | None, start: int, count: int):
    """Removes tokens [start, start + count) of t [B, T, ...]: returns (rest, removed)."""
    if t is None or count == 0:
        return t, None
    return jnp.concatenate([t[:, :start], t[:, start + count:]], axis=1), t[:, start:start + count]


def _put_back(t: jax.Array | None, removed: jax.Array | None, start: int):
    """Inverse of `_set_aside`."""
    if t is None or removed is None:
        return t
    return jnp.concatenate([t[:, :start], removed, t[:, start:]], axis=1)


def _remove_apart(tokens: Tokens, metric: jax.Array, r: int, cfg: MergeConfig,
                  remove: Callable[[Tokens, jax.Array], Tokens]) -> Tokens:
    """Runs remove(tokens, metric) -> r fewer tokens on the tokens that take part in matching
    (metric [B, T, ...] is cut alike), with distill and register tokens set aside."""
    if r == 0:
        return tokens
    if tokens.size is None:
        tokens = tokens._replace(size=jnp.ones(tokens.x.shape[:2] + (1,), jnp.float32))
    start = int(cfg.class_token)
    parts = [_set_aside(t, start, cfg.num_extra) for t in tokens]
    metric, _ = _set_aside(metric, start, cfg.num_extra)
    kept = remove(Tokens(*(rest for rest, _ in parts)), metric)
    return Tokens(*(_put_back(t, aside, start) for t, (_, aside) in zip(kept, parts, strict=True)))


def _merge(tokens: Tokens, matching: merge.Matching, method: str) -> Tokens:
    """Applies a matching: size-weighted average of x, sizes summed, sources joined."""
    merge_fn = partial(merge.merge_tokens, matching=matching, method=method)
    source = tokens.source
    if source is not None:
        source = merge.merge_source(merge_fn, tokens.x, source)
    x, size = merge.merge_wavg(merge_fn, tokens.x, tokens.size)
    return Tokens(x, size, source)


def _bipartite(tokens: Tokens, metric: jax.Array, r: int, cfg: MergeConfig,
               matcher: Callable[[jax.Array], merge.Matching]) -> Tokens:
    """Merges r tokens by matcher(metric [B, T', C]) -> `merge.Matching`."""
    return _remove_apart(tokens, metric, r, cfg,
                         lambda t, m: _merge(t, matcher(m), cfg.method))


def _merge_similar(tokens: Tokens, metric: jax.Array, r: int, cfg: MergeConfig) -> Tokens:
    """ToMe's merge of the r most similar pairs by metric [B, T, C] (cosine)."""
    return _bipartite(tokens, metric, r, cfg, lambda m: merge.match(m, r, cfg.class_token))


def merge_by_keys(tokens: Tokens, metrics: Metrics, r: int, cfg: MergeConfig,
                  layer: int) -> Tokens:
    """ToMe: merges the r most similar pairs by the keys [B, T, C]."""
    del layer
    return _merge_similar(tokens, metrics.keys, r, cfg)


def merge_random(tokens: Tokens, metrics: Metrics, r: int, cfg: MergeConfig,
                 layer: int) -> Tokens:
    """Merges r random pairs (the keys give only the shape)."""
    # A fixed key per block: the same random pairs on every call, so evaluation is
    # deterministic, and different pairs for each image of a batch.
    return _bipartite(tokens, metrics.keys, r, cfg, lambda keys: merge.random_match(
        jax.random.key(layer), keys.shape, r, cfg.class_token))


def prune_least_attended(tokens: Tokens, metrics: Metrics, r: int, cfg: MergeConfig,
                         layer: int) -> Tokens:
    """Drops the r tokens the class token attends to least; nothing is merged."""
    del layer

    def keep(t: Tokens, cls_attention: jax.Array) -> Tokens:
        idx = prune.keep_indices(cls_attention, r)
        return Tokens(*(None if v is None else merge.gather(v, idx) for v in t))

    return _remove_apart(tokens, metrics.cls_attention, r, cfg, keep)


def merge_by_embedding(tokens: Tokens, metrics: Metrics, r: int, cfg: MergeConfig,
                       layer: int) -> Tokens:
    """DTEM at inference: ToMe's matching on the learned embedding [B, T, F]."""
    del layer
    return _merge_similar(tokens, metrics.embedding, r, cfg)


def soft_merge_by_embedding(tokens: Tokens, metrics: Metrics, r: int, cfg: MergeConfig,
                            layer: int) -> Tokens:
    """DTEM's training step: soft merges on the embedding, r tokens leave `active`."""
    del layer
    x, size, active = dtem.dtem_soft_step(tokens.x, tokens.size, tokens.active,
                                          metrics.embedding, r, cfg.dtem_tau1, cfg.dtem_tau2,
                                          cfg.dtem_k, cfg.dtem_order)
    return tokens._replace(x=x, size=size, active=active)


_BY_STRATEGY = {"tome": merge_by_keys, "random": merge_random, "prune": prune_least_attended}


def reducer_for(strategy: str, *, embedding: bool = False, soft: bool = False) -> Reducer:
    """The reducer of a model: by strategy, or DTEM's when it has a merge embedding."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if soft:
        return soft_merge_by_embedding
    return merge_by_embedding if embedding else _BY_STRATEGY[strategy]
