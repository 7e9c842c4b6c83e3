"""A pure-functional Flax (linen) ViT with ToMe token merging in every block.

Parameter names follow big_vision's `models/vit.py`, so converted AugReg / big_vision weights
drop in: `embedding`, `cls`, `pos_embedding`, `Transformer/encoderblock_{i}/{LayerNorm_0,
MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1, MlpBlock_0/Dense_{0,1}}`,
`Transformer/encoder_norm`, `head`. The class token's position embedding is folded into `cls`
(it is a constant), so `pos_embedding` covers the patches only, as in big_vision.

    model = ViT(variant="B/16", num_classes=1000, r=16)
    params = model.init(jax.random.key(0), images)["params"]
    logits, out = model.apply({"params": params}, images)   # out: encoded, size, source, ...

Token layout: [cls?, dist?, registers..., patches]. Only the class token and the patches take
part in matching (the class token is never merged away); distill and register tokens are set
aside during each merge and put back in place, so they are never merged and keep their index.

Blocks pass a `reduce.Tokens` state along; between attention and MLP each calls the model's
reducer (`ViT.reducer`, one of `tome_jax.reduce`) on it with the block's static r, ranking
tokens by what attention returns (`reduce.Metrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tome_jax import attention, dtem, merge, reduce
from tome_jax import schedule as sched
from tome_jax.reduce import STRATEGIES, MergeConfig, Tokens
from tome_jax.variants import ViTSize, decode_variant

POOLS = ("tok", "gap", "mae")
Dtype = Any


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense. [B, T, D] -> [B, T, D]."""

    mlp_dim: int
    dropout: float = 0.0
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        dense = dict(dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(stddev=1e-6))
        x = nn.Dense(self.mlp_dim, **dense)(x)
        x = nn.gelu(x, approximate=self.approximate_gelu)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return nn.Dense(width, **dense)(x)


class Attended(NamedTuple):
    """What attention returns: out [B, T, D] and what the reducer ranks tokens by."""

    out: jax.Array
    metrics: reduce.Metrics


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          bias: jax.Array | None) -> jax.Array:
    """q, k, v [B, T, H, D/H], bias [B, 1, 1, T] or None -> [B, T, H, D/H]; the implementation
    that suits the backend (`tome_jax.attention.choose`), or the one `attention.use` sets."""
    return attention.dot_product_attention(q, k, v, bias)


def class_token_attention(q: jax.Array, k: jax.Array, bias: jax.Array | None) -> jax.Array:
    """The class token's attention row averaged over heads, [B, T] float32 (q, k, bias as in
    `dot_product_attention`); computed apart because the fused kernel returns no probabilities."""
    logits = jnp.einsum("bhd,bthd->bht", q[:, 0], k).astype(jnp.float32) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[:, :, 0].astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1).mean(axis=1)


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with an optional `+ log size` bias on the keys (proportional attention).

    x [B, T, D], size [B, T, 1] or None -> `Attended`: out [B, T, D] and `reduce.Metrics` (keys
    averaged over heads [B, T, D/H]; the class token's attention when cls_attention; DTEM's
    embedding when an embed layer is given). Parameter shapes match
    `flax.linen.MultiHeadDotProductAttention`. fuse_embedding: compute the embedding in the one
    matmul of q, k and v.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    cls_attention: bool = False
    fuse_embedding: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, size: jax.Array | None = None,
                 embed: nn.Dense | None = None) -> Attended:
        """embed: DTEM's Dense [D -> F], owned by the caller, applied to x."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads
        proj = dict(features=(self.num_heads, head_dim), dtype=self.dtype,
                    kernel_init=nn.initializers.xavier_uniform())
        layers = [nn.DenseGeneral(**proj, name=name) for name in ("query", "key", "value")]
        fuse = self.fuse_embedding and not self.is_initializing()
        q, k, v, embedding = _project(x, layers, embed, fuse, self.num_heads, self.dtype)
        bias = None if size is None else jnp.log(size)[:, None, None, :, 0].astype(q.dtype)
        y = dot_product_attention(q, k, v, bias)
        out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(), name="out")(y)
        cls_attention = class_token_attention(q, k, bias) if self.cls_attention else None
        return Attended(out, reduce.Metrics(k.mean(axis=-2), cls_attention, embedding))


def _project(x: jax.Array, layers: list, embed: nn.Dense | None, fuse: bool, num_heads: int,
             dtype: Dtype) -> tuple[jax.Array, ...]:
    """q, k, v [B, T, H, D/H] and embed(x) [B, T, F] (None without embed) from x [B, T, D].

    The embedding sits behind a stop-gradient: DTEM's decoupled embedding reads the block's
    features and never changes them, so training it leaves the backbone as it was.
    """
    if embed is None:
        q, k, v = (layer(x) for layer in layers)
        return q, k, v, None
    if fuse:
        q, k, v, embedding = _fused_projection(x, layers, embed, num_heads, dtype)
        return q, k, v, jax.lax.stop_gradient(embedding)
    embedding = embed(jax.lax.stop_gradient(x))
    q, k, v = (layer(x) for layer in layers)
    return q, k, v, embedding


def _fused_projection(x: jax.Array, layers: list, extra: nn.Dense, num_heads: int,
                      dtype: Dtype) -> tuple[jax.Array, ...]:
    """q, k, v [B, T, H, D/H] and extra(x) [B, T, F] from one matmul of x [B, T, D] with the
    kernels side by side ([D, 3D + F]); the parameters keep their separate layout."""
    kernels = [layer.variables["params"]["kernel"] for layer in layers]
    biases = [layer.variables["params"]["bias"] for layer in layers]
    width = x.shape[-1]
    kernel = jnp.concatenate([k.reshape(width, -1) for k in kernels]
                             + [extra.variables["params"]["kernel"]], axis=1)
    bias = jnp.concatenate([b.reshape(-1) for b in biases] + [extra.variables["params"]["bias"]])
    y = jnp.einsum("btd,df->btf", x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
    q, k, v = (y[..., i * width:(i + 1) * width].reshape(*x.shape[:2], num_heads, -1)
               for i in range(3))
    return q, k, v, y[..., 3 * width:]


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2, CaiT)."""

    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * scale.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static settings every transformer block of a model shares."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    layerscale_init: float | None = None
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32
    dtem_dim: int | None = None


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block that reduces its tokens between attention and MLP.

    reducer: the model's `reduce.Reducer`, called with this block's static r.
    """

    cfg: BlockConfig
    merge_cfg: MergeConfig
    reducer: reduce.Reducer
    r: int
    layer: int = 0
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, tokens: Tokens, deterministic: bool = True) -> Tokens:
        """T tokens -> T - r tokens (T on DTEM's soft path, which narrows `active` instead)."""
        cfg, merge_cfg = self.cfg, self.merge_cfg
        # Drop path: the whole residual branch of a sample, rescaled (stochastic depth).
        drop = nn.Dropout(rate=self.drop_path, broadcast_dims=(1, 2))

        def residual(x: jax.Array, y: jax.Array) -> jax.Array:
            y = nn.Dropout(rate=cfg.dropout)(y, deterministic)
            if cfg.layerscale_init is not None:
                y = LayerScale(cfg.layerscale_init)(y)
            return x + drop(y, deterministic)

        y = nn.LayerNorm(dtype=cfg.dtype)(tokens.x)
        embed = None
        if cfg.dtem_dim is not None:
            embed = nn.Dense(cfg.dtem_dim, dtype=cfg.dtype, name=dtem.EMBED_NAME)
        attention = MultiHeadDotProductAttention(
            cfg.num_heads, dtype=cfg.dtype, cls_attention=merge_cfg.cls_attention and self.r > 0,
            fuse_embedding=merge_cfg.dtem_fused)
        attended = attention(y, reduce.attention_size(tokens, merge_cfg), embed)
        tokens = tokens._replace(x=residual(tokens.x, attended.out))
        tokens = self.reducer(tokens, attended.metrics, self.r, merge_cfg, self.layer)
        y = nn.LayerNorm(dtype=cfg.dtype)(tokens.x)
        y = MlpBlock(cfg.mlp_dim, cfg.dropout, cfg.approximate_gelu, dtype=cfg.dtype)(
            y, deterministic)
        return tokens._replace(x=residual(tokens.x, y))


class Encoder(nn.Module):
    """The stack of blocks and the final norm. rs: static per-block r (already clamped);
    drop_path: the last block's rate, rising linearly from 0 in the first."""

    cfg: BlockConfig
    merge_cfg: MergeConfig
    reducer: reduce.Reducer
    rs: tuple[int, ...]
    final_norm: bool = True
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> Tokens:
        """x [B, T, D] -> the final `Tokens`."""
        depth = len(self.rs)
        tokens = reduce.initial_tokens(x, self.merge_cfg)
        for i, r in enumerate(self.rs):
            tokens = Encoder1DBlock(
                self.cfg, self.merge_cfg, self.reducer, r, layer=i,
                drop_path=self.drop_path * i / max(depth - 1, 1), name=f"encoderblock_{i}")(
                    tokens, deterministic)
        if self.final_norm:
            tokens = tokens._replace(
                x=nn.LayerNorm(dtype=self.cfg.dtype, name="encoder_norm")(tokens.x))
        return tokens


def _weighted_mean(x: jax.Array, size: jax.Array | None) -> jax.Array:
    """Mean over tokens of x [B, T, D] weighted by size [B, T, 1] (the merged-token counts)."""
    if size is None:
        return x.mean(axis=1)
    w = size.astype(jnp.float32)
    return ((x.astype(jnp.float32) * w).sum(axis=1) / w.sum(axis=1)).astype(x.dtype)


class ViT(nn.Module):
    """Vision Transformer with ToMe. Fields left None take the variant's sizes.

    r: merge schedule (int, per-layer list, or (r, inflect)); 0 is the plain ViT.
    prop_attn: add log(size) to attention logits once tokens are merged.
    trace_source: track which input tokens each output token holds (out["source"]).
    pool: "tok" (class token), "gap" (size-weighted mean of patch tokens after the final norm),
      "mae" (size-weighted mean of patch tokens, no final norm, then `fc_norm`).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    strategy: "tome"; or the baselines "random" (random pairs) and "prune" (drop the tokens the
      class token attends to least), which keep the same token counts per block.
    dtem_dim: DTEM. Adds a learned merge embedding of this width to every block (`dtem_embed`,
      see `tome_jax.dtem`; `dtem.default_dim` gives the paper's width) and matches on it instead
      of the keys. soft_merge: DTEM's training path (needs dtem_dim): differentiable soft
      merges with temperatures dtem_tau1, dtem_tau2 over the top dtem_k candidates; no token is
      removed, out["size"] holds fractional sizes for all tokens. dtem_order: how the soft path
      splits tokens into A/B: "size" (the authors' training code: alternately from the tokens
      re-sorted by size, largest first, after every block) or "tome" (ToMe's split and order, no
      re-sort); see `tome_jax.dtem`. Inference is ToMe's matching either way. dtem_fused:
      computes the embedding in the same matmul as q, k and v (kernels side by side, same
      parameters) for inference and export; gradients then reach the backbone through it, so
      train unfused.
    """

    variant: str = "B/16"
    num_classes: int = 1000
    r: sched.Schedule = 0
    prop_attn: bool = True
    trace_source: bool = False
    pool: str = "tok"
    dtype: Dtype = jnp.float32
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    channels: int = 3
    class_token: bool = True
    distill_token: bool = False
    num_registers: int = 0
    layerscale_init: float | None = None
    representation_size: int | None = None
    approximate_gelu: bool = False
    dropout: float = 0.0
    drop_path: float = 0.0
    merge_method: str = "segment"
    strategy: str = "tome"
    dtem_dim: int | None = None
    soft_merge: bool = False
    dtem_tau1: float = 0.1
    dtem_tau2: float = 0.1
    dtem_k: int = 3
    dtem_order: str = "size"
    dtem_fused: bool = False

    def __post_init__(self):
        self.r = sched.canonical(self.r)
        super().__post_init__()

    @property
    def dims(self) -> ViTSize:
        """The variant's architecture sizes with this model's overrides applied."""
        base = decode_variant(self.variant)
        return ViTSize(self.width or base.width, self.depth or base.depth,
                       self.mlp_dim or base.mlp_dim, self.num_heads or base.num_heads,
                       base.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distill_token) + self.num_registers

    def check(self, image_shape: tuple[int, ...]) -> None:
        """Validates the config against an input shape [B, H, W, C]; raises ValueError."""
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOLS}")
        if self.pool == "tok" and not self.class_token:
            raise ValueError("pool='tok' needs class_token=True")
        if self.distill_token and not self.class_token:
            raise ValueError("a distill token needs a class token")
        if self.distill_token and self.pool != "tok":
            raise ValueError(f"a distill token has its own head on its token and needs "
                             f"pool='tok', not {self.pool!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.strategy == "prune" and not self.class_token:
            raise ValueError("strategy='prune' ranks tokens by class-token attention and needs "
                             "class_token=True")
        if self.dtem_dim is not None:
            if isinstance(self.dtem_dim, bool) or not isinstance(self.dtem_dim, int) or (
                    self.dtem_dim <= 0):
                raise ValueError(f"dtem_dim must be a positive int, got {self.dtem_dim!r}")
            if self.strategy != "tome":
                raise ValueError(f"dtem_dim is a merge metric for strategy='tome', not "
                                 f"{self.strategy!r}")
        if self.soft_merge:
            if self.dtem_dim is None:
                raise ValueError("soft_merge=True is DTEM's training path and needs dtem_dim")
            if self.trace_source:
                raise ValueError("trace_source is not supported with soft_merge=True")
            for name in ("dtem_tau1", "dtem_tau2"):
                if not getattr(self, name) > 0:
                    raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
            if self.dtem_k < 1:
                raise ValueError(f"dtem_k must be >= 1, got {self.dtem_k!r}")
            if self.dtem_order not in dtem.ORDERS:
                raise ValueError(f"unknown dtem_order {self.dtem_order!r}; expected one of "
                                 f"{dtem.ORDERS}")
        if self.merge_method not in merge.MERGE_METHODS:
            raise ValueError(f"unknown merge_method {self.merge_method!r}; "
                             f"expected one of {merge.MERGE_METHODS}")
        if len(image_shape) != 4:
            raise ValueError("images must be [batch, height, width, channels], got shape "
                             f"{tuple(image_shape)}")
        if image_shape[-1] != self.channels:
            raise ValueError(f"images have {image_shape[-1]} channels but the model expects "
                             f"{self.channels} (shape {tuple(image_shape)}, NHWC)")
        patch = self.dims.patch_size
        for name, n in zip(("height", "width"), image_shape[1:3], strict=True):
            if n % patch:
                raise ValueError(f"image {name} {n} is not divisible by the patch size {patch}")

    def token_schedule(self, image_size: int | tuple[int, int]) -> tuple[list[int], list[int]]:
        """(clamped r per block, token count entering each block + final) at a resolution."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        patch = self.dims.patch_size
        num_match = (h // patch) * (w // patch) + int(self.class_token)
        rs, tokens = sched.token_schedule(self.r, self.dims.depth, num_match,
                                          protected=int(self.class_token))
        extra = self.num_prefix_tokens - int(self.class_token)
        return rs, [t + extra for t in tokens]

    def flops(self, image_size: int) -> float:
        """Analytic forward FLOPs (2 x MACs) per image; see `schedule.flops`."""
        return sched.flops(self.dims, image_size, self.r,
                           num_classes=self.num_classes * (1 + int(self.distill_token)),
                           num_prefix_tokens=self.num_prefix_tokens,
                           protected=int(self.class_token), channels=self.channels,
                           dtem_dim=self.dtem_dim or 0)

    def merge_config(self) -> MergeConfig:
        """The static reduction settings every block shares."""
        return MergeConfig(class_token=self.class_token,
                           num_extra=self.num_prefix_tokens - int(self.class_token),
                           prop_attn=self.prop_attn, trace_source=self.trace_source,
                           method=self.merge_method, strategy=self.strategy,
                           dtem_soft=self.soft_merge, dtem_tau1=self.dtem_tau1,
                           dtem_tau2=self.dtem_tau2, dtem_k=self.dtem_k,
                           dtem_order=self.dtem_order,
                           # The soft path trains the embedding: never fused.
                           dtem_fused=self.dtem_fused and not self.soft_merge)

    def reducer(self) -> reduce.Reducer:
        """The token-reduction function every block calls (see `tome_jax.reduce`)."""
        return reduce.reducer_for(self.strategy, embedding=self.dtem_dim is not None,
                                  soft=self.soft_merge)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False):
        """images [B, H, W, C] -> (logits [B, num_classes] float32, out dict).

        out: "encoded" [B, T', D] final tokens, "size" [B, T', 1] tokens merged into each (None
        when nothing merged), "source" [B, T', T] 0/1 (with trace_source), "pre_logits" [B, D];
        with a distill token also "logits_cls" and "logits_dist".
        """
        self.check(images.shape)
        x = self._embed(images, train)
        tokens = self._encoder(tuple(images.shape[1:3]))(x, deterministic=not train)
        out = {"encoded": tokens.x, "size": tokens.size, "source": tokens.source}
        logits, head_out = self._head(self._pool(tokens))
        return logits, {**out, **head_out}

    def _embed(self, images: jax.Array, train: bool) -> jax.Array:
        """Patches, position embedding and prefix tokens: [B, H, W, C] -> [B, T, D]."""
        dims = self.dims
        x = nn.Conv(dims.width, (dims.patch_size, dims.patch_size),
                    strides=(dims.patch_size, dims.patch_size), padding="VALID",
                    dtype=self.dtype, name="embedding")(images)
        batch, gh, gw, width = x.shape
        x = x.reshape(batch, gh * gw, width)
        posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                            (1, gh * gw, width))
        x = x + posemb.astype(x.dtype)
        prefix = []
        if self.class_token:
            prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, width)))
        if self.distill_token:
            prefix.append(self.param("dist", nn.initializers.zeros, (1, 1, width)))
        if self.num_registers:
            prefix.append(self.param("registers", nn.initializers.zeros,
                                     (1, self.num_registers, width)))
        if prefix:
            prefix = jnp.concatenate(prefix, axis=1).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(prefix, (batch,) + prefix.shape[1:]), x], 1)
        return nn.Dropout(rate=self.dropout)(x, not train)

    def _encoder(self, image_size: tuple[int, int]) -> Encoder:
        """The block stack for this resolution's static schedule."""
        dims = self.dims
        rs, _ = self.token_schedule(image_size)
        block = BlockConfig(mlp_dim=dims.mlp_dim, num_heads=dims.num_heads, dropout=self.dropout,
                            layerscale_init=self.layerscale_init,
                            approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                            dtem_dim=self.dtem_dim)
        return Encoder(block, self.merge_config(), self.reducer(), tuple(rs),
                       final_norm=self.pool != "mae", drop_path=self.drop_path,
                       name="Transformer")

    def _pool(self, tokens: Tokens) -> list[jax.Array]:
        """The pooled [B, D] features: the class token's (and the distill token's), or the
        size-weighted mean of the patch tokens."""
        x = tokens.x
        if self.pool == "tok":
            return [x[:, 0]] + ([x[:, 1]] if self.distill_token else [])
        start = self.num_prefix_tokens
        patch_size = None if tokens.size is None else tokens.size[:, start:]
        pooled = _weighted_mean(x[:, start:], patch_size)
        if self.pool == "mae":
            pooled = nn.LayerNorm(dtype=self.dtype, name="fc_norm")(pooled)
        return [pooled]

    def _head(self, pooled: list[jax.Array]) -> tuple[jax.Array, dict]:
        """Pre-logits and head(s): -> (logits [B, num_classes] float32, out entries)."""
        if self.representation_size is not None:
            pre = nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")
            pooled = [jnp.tanh(pre(p)) for p in pooled]
        out = {"pre_logits": pooled[0]}
        if not self.num_classes:
            return pooled[0].astype(jnp.float32), out
        head = dict(kernel_init=nn.initializers.zeros, dtype=self.dtype)
        logits = nn.Dense(self.num_classes, name="head", **head)(pooled[0])
        if self.distill_token:
            # DeiT distilled: average the class and distill heads, as timm does at inference.
            out["logits_cls"] = logits.astype(jnp.float32)
            out["logits_dist"] = nn.Dense(self.num_classes, name="head_dist", **head)(pooled[1])
            logits = (logits + out["logits_dist"]) / 2
        return logits.astype(jnp.float32), out
