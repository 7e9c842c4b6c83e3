"""DTEM: learned merge embeddings with a differentiable (soft) merge for training.

Lee and Hong, NeurIPS 2024, "Learning to Merge Tokens via Decoupled Embedding for Efficient
Vision Transformers". Each block gets a small `Dense(d_m)` (`dtem_embed`) on its pre-attention
LayerNorm output, behind a stop-gradient, whose L2-normalised output replaces the keys as the
merge metric. At inference that is plain ToMe matching (`merge.match`) on the new metric. For
training, merging is relaxed so the embedding gets a gradient:

    m = soft_top_r(scores, r, k, tau1, tau2)             # [B, Na, Nb] soft assignment A -> B
    x, size = soft_merge(x, size, m, a_idx, b_idx)        # nothing removed, sizes fractional
    x, size, active = dtem_soft_step(x, size, active, embedding, r, tau1, tau2)  # one block

Static-shape design: tokens never move and never leave the sequence. The tokens that can still
be matched are tracked as `active` [B, n] int32, their positions; n is static (it is the
array's shape) and shrinks by r per block, while which positions stay active is data-dependent.
Prefix tokens (class, distill, registers) are never active, so they are never merged. Inactive
tokens still take part in attention (with a `+ log size` bias, so those of size ~0 vanish) and
in the MLP; they are only never matched again.

`active` lists the tokens in an order that fixes the next block's A/B split; `order` picks
which (both alternate A/B along `active`, with the class token before entry 0):

    "size" (default, the authors' training code): after each step the active tokens are
      re-sorted by size, largest first (a stable sort: ties keep A's order, then B's), and the r
      smallest leave. A takes entries 0, 2, 4, ... (positions 1, 3, 5, ... in the first block),
      B the rest, so with an odd count A gets the larger half.
    "tome" (ToMe's order): A takes entries 1, 3, 5, ... and B 0, 2, 4, ..., ToMe's split
      behind a leading class token; after each step the surviving A tokens, then the surviving B
      tokens, in their order (ToMe's `merge_tokens` output order), lose the r smallest. With a
      class token the soft path at a small temperature then makes ToMe's choices block after
      block, not only in the first one.

Inference never uses either: it is ToMe's hard matching on the embedding (`merge.match`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax.merge import gather

# Parameter name of the per-block embedding inside `Encoder1DBlock`.
EMBED_NAME = "dtem_embed"
# How `active` is ordered between blocks (see the module docstring).
ORDERS = ("size", "tome")
# log(0) would turn a vanished token's attention bias into -inf with a NaN gradient.
MIN_SIZE = 1e-6


def default_dim(width: int, num_heads: int) -> int:
    """The paper's embedding width: the head dimension, doubled for width >= 1024."""
    head_dim = width // num_heads
    return 2 * head_dim if width >= 1024 else head_dim


def _check_tau(tau1: float, tau2: float) -> None:
    for name, tau in (("tau1", tau1), ("tau2", tau2)):
        if not tau > 0:
            raise ValueError(f"{name} must be > 0, got {tau!r}")


def _check_r(r: int, num_a: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative Python int (static), got {r!r}")
    if r > num_a:
        raise ValueError(f"r={r} is too large for the soft merge: at most {num_a} tokens can "
                         "merge (half the active tokens, rounded down, per block)")


def straight_through_clip(v: jax.Array, lo: float = 0.0, hi: float = 1.0) -> jax.Array:
    """clip(v, lo, hi) forward, identity backward, so clamped tokens still pass a gradient."""
    return v + jax.lax.stop_gradient(jnp.clip(v, lo, hi) - v)


def soft_top_r(scores: jax.Array, r: int, k: int = 3, tau1: float = 0.1, tau2: float = 0.1,
               eps: float = 1e-6) -> jax.Array:
    """Soft choice of r A->B merges from cosine scores [B, Na, Nb] -> M [B, Na, Nb].

    Each A token keeps its top k B candidates (Z = S_top / tau1). r rounds of a joint softmax
    over all Na * k candidate pairs (temperature tau2) each add one unit of mass to P; a row that
    took mass p is damped by log(1 - p), so later rounds pick other A tokens. Rows are then
    scaled to sum to at most 1 (the scale is a constant for the gradient). As tau2 -> 0 with
    2 / tau1 < -log(eps), M is ToMe's hard matching: 1 on the r best A rows' best edges.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [batch, Na, Nb], got shape {scores.shape}")
    _check_tau(tau1, tau2)
    batch, num_a, num_b = scores.shape
    _check_r(r, num_a)
    if r == 0 or num_b == 0:
        return jnp.zeros(scores.shape, jnp.float32)
    k = min(k, num_b)
    top, idx = jax.lax.top_k(scores.astype(jnp.float32), k)  # [B, Na, k]

    def round_(_, carry):
        z, p_sum = carry
        p = jax.nn.softmax(z.reshape(batch, -1) / tau2, axis=-1).reshape(z.shape)
        taken = p.sum(axis=-1, keepdims=True)
        return z + jnp.log(jnp.maximum(1.0 - taken, eps)), p_sum + p

    _, p = jax.lax.fori_loop(0, r, round_, (top / tau1, jnp.zeros_like(top)))
    rows = p.sum(axis=-1, keepdims=True)
    p = p / jnp.maximum(jax.lax.stop_gradient(rows), 1.0)
    # Scatter the k candidates back to dense columns; a one-hot matmul keeps it differentiable.
    onehot = jax.nn.one_hot(idx, num_b, dtype=p.dtype)  # [B, Na, k, Nb]
    return jnp.einsum("bik,bikj->bij", p, onehot, precision=jax.lax.Precision.HIGHEST)


def _scatter(t: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """t [B, T, C] with rows idx [B, K] (distinct) replaced by values [B, K, C]."""
    rows = jnp.arange(t.shape[0])[:, None]
    return t.at[rows, idx].set(values.astype(t.dtype))


def soft_merge(x: jax.Array, size: jax.Array, m: jax.Array, a_idx: jax.Array,
               b_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Soft size-weighted merge of A tokens into B tokens; no token is removed.

    x [B, T, C], size [B, T, 1], m [B, Na, Nb] (rows sum to <= 1), a_idx [B, Na] and b_idx
    [B, Nb] distinct positions in x. Returns x [B, T, C] (x's dtype) and size [B, T, 1] float32:
    s_B' = s_B + m^T s_A, x_B' = (s_B x_B + m^T (s_A x_A)) / s_B', s_A' = s_A (1 - rowsum m).
    The total size is conserved; A tokens keep their features, only their size shrinks.
    """
    size = size.astype(jnp.float32)
    m = m.astype(jnp.float32)
    x_a, s_a = gather(x, a_idx).astype(jnp.float32), gather(size, a_idx)
    x_b, s_b = gather(x, b_idx).astype(jnp.float32), gather(size, b_idx)
    hi = jax.lax.Precision.HIGHEST
    s_b_new = s_b + jnp.einsum("bij,bic->bjc", m, s_a, precision=hi)
    x_b_new = (s_b * x_b + jnp.einsum("bij,bic->bjc", m, s_a * x_a, precision=hi)) / (
        jnp.maximum(s_b_new, MIN_SIZE))
    # Rounding can push rowsum m a hair past 1; the clamp keeps sizes >= 0 without cutting the
    # gradient that tells the embedding how much each A token gave away.
    s_a_new = s_a * straight_through_clip(1.0 - m.sum(axis=-1, keepdims=True))
    x = _scatter(x, b_idx, x_b_new)
    size = _scatter(_scatter(size, a_idx, s_a_new), b_idx, s_b_new)
    return x, size


def init_active(batch: int, tokens: int, num_prefix: int) -> jax.Array:
    """All non-prefix positions, [B, tokens - num_prefix] int32."""
    idx = jnp.arange(num_prefix, tokens, dtype=jnp.int32)
    return jnp.broadcast_to(idx, (batch, tokens - num_prefix))


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown DTEM order {order!r}; expected one of {ORDERS}")


def split_active(active: jax.Array, order: str = "size") -> tuple[jax.Array, jax.Array]:
    """active [B, n] -> (a_idx, b_idx). "size": A the even entries (ceil(n / 2) of them), B the
    odd ones; "tome": A the odd entries (n // 2), B the even ones."""
    _check_order(order)
    if order == "size":
        return active[:, 0::2], active[:, 1::2]
    return active[:, 1::2], active[:, 0::2]


def cosine_scores(embedding: jax.Array, a_idx: jax.Array, b_idx: jax.Array) -> jax.Array:
    """embedding [B, T, Cm] -> cosine similarities [B, Na, Nb] of A to B tokens (float32)."""
    def unit(idx):
        # Not jnp.linalg.norm: its gradient at a zero vector is NaN (a zero-initialised class
        # token has a zero embedding), and 0 * NaN would still poison the embedding's gradient.
        e = gather(embedding, idx).astype(jnp.float32)
        return e * jax.lax.rsqrt(jnp.maximum((e * e).sum(axis=-1, keepdims=True), 1e-24))

    return jnp.einsum("bic,bjc->bij", unit(a_idx), unit(b_idx),
                      precision=jax.lax.Precision.HIGHEST)


def drop_smallest(size: jax.Array, active: jax.Array, r: int) -> jax.Array:
    """Deactivates the r active tokens of smallest size: [B, n] -> [B, n - r].

    The survivors keep their relative order in `active`; ties drop the earlier entries.
    """
    num = active.shape[1]
    s = jax.lax.stop_gradient(gather(size, active)[..., 0])
    dropped = jnp.argsort(s, axis=-1, stable=True)[:, :r]
    rows = jnp.arange(active.shape[0])[:, None]
    gone = jnp.zeros(active.shape, bool).at[rows, dropped].set(True)
    # A stable sort on the drop flag moves survivors to the front in their order.
    order = jnp.argsort(gone, axis=-1, stable=True)[:, :num - r]
    return jnp.take_along_axis(active, order, axis=-1)


def sort_by_size(size: jax.Array, active: jax.Array, r: int) -> jax.Array:
    """The active tokens re-sorted by size, largest first, less the r smallest: [B, n] ->
    [B, n - r]. A stable sort (ties keep their order in `active`) of a static-shape slice: only
    the active tokens take part, so inactive ones can never be re-admitted.
    """
    s = jax.lax.stop_gradient(gather(size, active)[..., 0])
    # `-s` with a stable ascending sort is a stable descending one (sizes are >= 0, so no NaN
    # and no -0.0 / 0.0 pair to split ties).
    order = jnp.argsort(-s, axis=-1, stable=True)[:, :active.shape[1] - r]
    return jnp.take_along_axis(active, order, axis=-1)


def dtem_soft_step(x: jax.Array, size: jax.Array, active: jax.Array, embedding: jax.Array,
                   r: int, tau1: float = 0.1, tau2: float = 0.1,
                   k: int = 3, order: str = "size") -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block's relaxed merge. x [B, T, C], size [B, T, 1], active [B, n], embedding
    [B, T, Cm] -> (x [B, T, C], size [B, T, 1], active [B, n - r]).

    r is static and at most n // 2, as the schedule clamps it (with order "size" set A has
    ceil(n / 2) tokens, but only n // 2 in B). order: "size" or "tome", see the module docstring.
    """
    if embedding.shape[:2] != x.shape[:2]:
        raise ValueError(f"embedding {embedding.shape} does not cover the tokens of x "
                         f"{x.shape}")
    if size.shape != x.shape[:2] + (1,):
        raise ValueError(f"size must be {x.shape[:2] + (1,)}, got {size.shape}")
    _check_tau(tau1, tau2)
    a_idx, b_idx = split_active(active, order)
    # At most half the active tokens merge per block in either order (the authors' clamp).
    _check_r(r, min(a_idx.shape[1], b_idx.shape[1]))
    if r == 0:
        return x, size, active
    m = soft_top_r(cosine_scores(embedding, a_idx, b_idx), r, k, tau1, tau2)
    x, size = soft_merge(x, size, m, a_idx, b_idx)
    # A then B: the order both orders start from (see the module docstring).
    merged = jnp.concatenate([a_idx, b_idx], axis=1)
    if order == "size":
        return x, size, sort_by_size(size, merged, r)
    return x, size, drop_smallest(size, merged, r)


# --- the embeddings as a small add-on checkpoint, and modular training -----------------------


def _is_embed(path) -> bool:
    return any(getattr(p, "key", None) == EMBED_NAME for p in path)


def param_labels(params) -> object:
    """"dtem" for embedding parameters, "backbone" for the rest (for `optax.multi_transform`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "dtem" if _is_embed(path) else "backbone", params)


def modular(tx):
    """Wraps an optax transform so only the embeddings train; backbone updates are zero."""
    import optax

    return optax.multi_transform({"dtem": tx, "backbone": optax.set_to_zero()}, param_labels)


def extract_embeddings(params) -> dict[str, dict[str, np.ndarray]]:
    """{"encoderblock_i": {"kernel": [D, Cm], "bias": [Cm]}} from a ViT's params."""
    blocks = params["Transformer"]
    out = {name: {k: np.asarray(v) for k, v in block[EMBED_NAME].items()}
           for name, block in blocks.items() if EMBED_NAME in block}
    if not out:
        raise ValueError(f"no {EMBED_NAME!r} parameters in these params (ViT(dtem_dim=None)?)")
    return out


def insert_embeddings(params, embeddings: dict[str, dict]) -> dict:
    """Returns params with each block's embedding set from `embeddings`; checks the widths."""
    blocks = dict(params["Transformer"])
    for name, emb in embeddings.items():
        if name not in blocks:
            raise ValueError(f"embedding for {name!r}, which this backbone does not have")
        width = blocks[name]["LayerNorm_0"]["scale"].shape[0]
        kernel, bias = np.asarray(emb["kernel"]), np.asarray(emb["bias"])
        if kernel.ndim != 2 or kernel.shape[0] != width or bias.shape != kernel.shape[1:]:
            raise ValueError(f"{name}: embedding kernel {kernel.shape} / bias {bias.shape} "
                             f"does not fit a backbone of width {width}")
        current = blocks[name].get(EMBED_NAME)
        if current is not None and current["kernel"].shape != kernel.shape:
            raise ValueError(f"{name}: embedding kernel {kernel.shape} but the model expects "
                             f"{current['kernel'].shape} (another dtem_dim?)")
        blocks[name] = {**blocks[name], EMBED_NAME: {"kernel": jnp.asarray(kernel),
                                                     "bias": jnp.asarray(bias)}}
    return {**params, "Transformer": blocks}


def save_embeddings(path: str, params) -> None:
    """Writes only the embeddings (a few hundred KB) to an .npz next to the backbone."""
    flat = {f"{name}/{k}": v for name, emb in extract_embeddings(params).items()
            for k, v in emb.items()}
    with open(path, "wb") as f:
        np.savez(f, **flat)


def load_embeddings(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Reads `save_embeddings`' file; combine with `insert_embeddings(params, ...)`."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            name, leaf = key.split("/")
            out.setdefault(name, {})[leaf] = data[key]
    return out
