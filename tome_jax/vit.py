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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tome_jax import dtem, prune
from tome_jax import merge as tome
from tome_jax import schedule as sched
from tome_jax.variants import ViTSize, decode_variant

POOLS = ("tok", "gap", "mae")
# tome: ToMe. random: the same bipartite merge with random scores (random pairs). prune: drop the
# r tokens with the least class-token attention (EViT-style). Same r gives the same token counts.
STRATEGIES = ("tome", "random", "prune")
Dtype = Any


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Static per-model merge settings a block needs."""

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
    dtem_fused: bool = False  # inference: the embedding rides in the q/k/v matmul


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


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with an optional `+ log size` bias on the keys (proportional attention).

    x [B, T, D], size [B, T, 1] or None -> (out [B, T, D], keys averaged over heads [B, T, D/H]).
    Parameter shapes match `flax.linen.MultiHeadDotProductAttention`.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    return_cls_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, size: jax.Array | None = None,
                 extra: nn.Dense | None = None):
        """extra: a Dense on the same input (DTEM's embedding) to compute in the one matmul
        of q, k and v; its output [B, T, F] is then returned third."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads
        proj = dict(features=(self.num_heads, head_dim), dtype=self.dtype,
                    kernel_init=nn.initializers.xavier_uniform())
        layers = [nn.DenseGeneral(**proj, name=name) for name in ("query", "key", "value")]
        if extra is None or self.is_initializing():
            q, k, v = (layer(x) for layer in layers)
            extra_out = None if extra is None else extra(x)
        else:
            q, k, v, extra_out = _fused_projection(x, layers, extra, self.num_heads, self.dtype)
        bias = None if size is None else jnp.log(size)[:, None, None, :, 0].astype(q.dtype)
        y = jax.nn.dot_product_attention(q, k, v, bias=bias)
        out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(), name="out")(y)
        if extra is not None:
            return out, k.mean(axis=-2), extra_out
        if not self.return_cls_attention:
            return out, k.mean(axis=-2)
        # The class token's attention row, head-averaged [B, T]: only the pruning baseline needs
        # it, and the fused attention kernel does not return probabilities.
        logits = jnp.einsum("bhd,bthd->bht", q[:, 0], k).astype(jnp.float32) / np.sqrt(head_dim)
        if bias is not None:
            logits = logits + bias[:, :, 0].astype(jnp.float32)
        return out, jax.nn.softmax(logits, axis=-1).mean(axis=1)


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


def merge_step(x: jax.Array, size: jax.Array | None, source: jax.Array | None,
               metric: jax.Array, r: int, cfg: MergeConfig, layer: int = 0):
    """One token-reduction step on x [B, T, D], size [B, T, 1] | None, source [B, T, N] | None.

    metric: [B, T, C] keys for "tome"/"random", [B, T] class-token attention for "prune".
    Returns (x, size, source) with T - r tokens. r is static and already clamped.
    """
    if r == 0:
        return x, size, source
    if size is None:
        size = jnp.ones(x.shape[:2] + (1,), jnp.float32)
    start = int(cfg.class_token)
    x, x_extra = _set_aside(x, start, cfg.num_extra)
    size, size_extra = _set_aside(size, start, cfg.num_extra)
    source, source_extra = _set_aside(source, start, cfg.num_extra)
    metric, _ = _set_aside(metric, start, cfg.num_extra)
    x, size, source = _reduce_tokens(x, size, source, metric, r, cfg, layer)
    return (_put_back(x, x_extra, start), _put_back(size, size_extra, start),
            _put_back(source, source_extra, start))


def _reduce_tokens(x: jax.Array, size: jax.Array, source: jax.Array | None, metric: jax.Array,
                   r: int, cfg: MergeConfig, layer: int):
    """Removes r tokens by cfg.strategy from tokens that all take part in matching."""
    if cfg.strategy == "prune":
        keep = prune.keep_indices(metric, r)
        source = None if source is None else prune.gather_tokens(source, keep)
        return prune.gather_tokens(x, keep), prune.gather_tokens(size, keep), source
    if cfg.strategy == "random":
        # A fixed key per block: the same random pairs on every call, so evaluation is
        # deterministic, and different pairs for each image of a batch.
        metric = jax.random.normal(jax.random.key(layer), metric.shape, jnp.float32)
    merge, _ = tome.bipartite_soft_matching(metric, r, class_token=cfg.class_token,
                                            method=cfg.method)
    if source is not None:
        source = tome.merge_source(merge, x, source)
    x, size = tome.merge_wavg(merge, x, size)
    return x, size, source


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block with a ToMe merge between attention and MLP."""

    mlp_dim: int
    num_heads: int
    r: int
    merge_cfg: MergeConfig
    layer: int = 0
    dropout: float = 0.0
    drop_path: float = 0.0
    layerscale_init: float | None = None
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32
    dtem_dim: int | None = None

    @nn.compact
    def __call__(self, x, size, source, deterministic: bool = True, active=None):
        """(x, size, source) -> the same, or with the DTEM soft path (active [B, n] given)
        (x, size, source, active [B, n - r]); see `tome_jax.dtem`."""
        # Drop path: the whole residual branch of a sample, rescaled (stochastic depth).
        drop = nn.Dropout(rate=self.drop_path, broadcast_dims=(1, 2))
        y = nn.LayerNorm(dtype=self.dtype)(x)
        embed, embed_layer = None, None
        fused = self.merge_cfg.dtem_fused and self.dtem_dim is not None and active is None
        if self.dtem_dim is not None:
            embed_layer = nn.Dense(self.dtem_dim, dtype=self.dtype, name=dtem.EMBED_NAME)
            if not fused:
                # Stop-gradient: the decoupled embedding reads the block's features and never
                # changes them, so training it leaves the backbone as it was.
                embed = embed_layer(jax.lax.stop_gradient(y))
        prune_here = self.merge_cfg.strategy == "prune" and self.r > 0
        if active is not None:
            # Soft sizes reach 0: floor them so log(size) stays finite (and its gradient too).
            attn_size = jnp.maximum(size, dtem.MIN_SIZE)
        else:
            attn_size = size if self.merge_cfg.prop_attn else None
        attention = MultiHeadDotProductAttention(
            self.num_heads, dtype=self.dtype, return_cls_attention=prune_here)
        if fused:
            y, metric, embed = attention(y, attn_size, extra=embed_layer)
            embed = jax.lax.stop_gradient(embed)
        else:
            y, metric = attention(y, attn_size)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        if self.layerscale_init is not None:
            y = LayerScale(self.layerscale_init)(y)
        x = x + drop(y, deterministic)
        cfg = self.merge_cfg
        if active is not None:
            x, size, active = dtem.dtem_soft_step(x, size, active, embed, self.r,
                                                  cfg.dtem_tau1, cfg.dtem_tau2, cfg.dtem_k)
        else:
            metric = metric if embed is None else embed
            x, size, source = merge_step(x, size, source, metric, self.r, cfg, self.layer)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = MlpBlock(self.mlp_dim, self.dropout, self.approximate_gelu, dtype=self.dtype)(
            y, deterministic)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        if self.layerscale_init is not None:
            y = LayerScale(self.layerscale_init)(y)
        x = x + drop(y, deterministic)
        if active is not None:
            return x, size, source, active
        return x, size, source


class Encoder(nn.Module):
    """The stack of blocks and the final norm. rs: static per-block r (already clamped)."""

    depth: int
    mlp_dim: int
    num_heads: int
    rs: tuple[int, ...]
    merge_cfg: MergeConfig
    final_norm: bool = True
    dropout: float = 0.0
    drop_path: float = 0.0
    layerscale_init: float | None = None
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32
    dtem_dim: int | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        size, source, active = None, None, None
        batch, tokens = x.shape[:2]
        if self.merge_cfg.trace_source:
            source = jnp.broadcast_to(jnp.eye(tokens, dtype=jnp.float32),
                                      (batch, tokens, tokens))
        if self.merge_cfg.dtem_soft:
            size = jnp.ones((batch, tokens, 1), jnp.float32)
            active = dtem.init_active(batch, tokens, int(self.merge_cfg.class_token)
                                      + self.merge_cfg.num_extra)
        for i in range(self.depth):
            block = Encoder1DBlock(
                mlp_dim=self.mlp_dim, num_heads=self.num_heads, r=self.rs[i],
                merge_cfg=self.merge_cfg, layer=i, dropout=self.dropout,
                drop_path=self.drop_path * i / max(self.depth - 1, 1),
                layerscale_init=self.layerscale_init, approximate_gelu=self.approximate_gelu,
                dtype=self.dtype, dtem_dim=self.dtem_dim, name=f"encoderblock_{i}")
            if active is None:
                x, size, source = block(x, size, source, deterministic)
            else:
                x, size, source, active = block(x, size, source, deterministic, active=active)
        if self.final_norm:
            x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
        return x, size, source


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
      removed, out["size"] holds fractional sizes for all tokens. dtem_fused: computes the
      embedding in the same matmul as q, k and v (kernels side by side, same parameters) for
      inference and export; gradients then reach the backbone through it, so train unfused.
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
    dtem_fused: bool = False

    def __post_init__(self):
        self.r = sched.canonical(self.r)
        super().__post_init__()

    @property
    def size(self) -> ViTSize:
        """The variant's sizes with this model's overrides applied."""
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
        if self.merge_method not in tome.MERGE_METHODS:
            raise ValueError(f"unknown merge_method {self.merge_method!r}; "
                             f"expected one of {tome.MERGE_METHODS}")
        if len(image_shape) != 4:
            raise ValueError("images must be [batch, height, width, channels], got shape "
                             f"{tuple(image_shape)}")
        if image_shape[-1] != self.channels:
            raise ValueError(f"images have {image_shape[-1]} channels but the model expects "
                             f"{self.channels} (shape {tuple(image_shape)}, NHWC)")
        patch = self.size.patch_size
        for name, n in zip(("height", "width"), image_shape[1:3], strict=True):
            if n % patch:
                raise ValueError(f"image {name} {n} is not divisible by the patch size {patch}")

    def token_schedule(self, image_size: int | tuple[int, int]) -> tuple[list[int], list[int]]:
        """(clamped r per block, token count entering each block + final) at a resolution."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        patch = self.size.patch_size
        num_match = (h // patch) * (w // patch) + int(self.class_token)
        rs, tokens = sched.token_schedule(self.r, self.size.depth, num_match,
                                          protected=int(self.class_token))
        extra = self.num_prefix_tokens - int(self.class_token)
        return rs, [t + extra for t in tokens]

    def flops(self, image_size: int) -> float:
        """Analytic forward FLOPs (2 x MACs) per image; see `schedule.flops`."""
        return sched.flops(self.size, image_size, self.r,
                           num_classes=self.num_classes * (1 + int(self.distill_token)),
                           num_prefix_tokens=self.num_prefix_tokens,
                           protected=int(self.class_token), channels=self.channels,
                           dtem_dim=self.dtem_dim or 0)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False):
        """images [B, H, W, C] -> (logits [B, num_classes] float32, out dict).

        out: "encoded" [B, T', D] final tokens, "size" [B, T', 1] tokens merged into each (None
        when nothing merged), "source" [B, T', T] 0/1 (with trace_source), "pre_logits" [B, D].
        """
        self.check(images.shape)
        size = self.size
        rs, _ = self.token_schedule(tuple(images.shape[1:3]))
        out = {}

        x = nn.Conv(size.width, (size.patch_size, size.patch_size),
                    strides=(size.patch_size, size.patch_size), padding="VALID",
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
        x = nn.Dropout(rate=self.dropout)(x, not train)

        merge_cfg = MergeConfig(class_token=self.class_token,
                                num_extra=self.num_prefix_tokens - int(self.class_token),
                                prop_attn=self.prop_attn, trace_source=self.trace_source,
                                method=self.merge_method, strategy=self.strategy,
                                dtem_soft=self.soft_merge, dtem_tau1=self.dtem_tau1,
                                dtem_tau2=self.dtem_tau2, dtem_k=self.dtem_k,
                                dtem_fused=self.dtem_fused)
        x, tok_size, source = Encoder(
            depth=size.depth, mlp_dim=size.mlp_dim, num_heads=size.num_heads, rs=tuple(rs),
            merge_cfg=merge_cfg, final_norm=self.pool != "mae", dropout=self.dropout,
            drop_path=self.drop_path, layerscale_init=self.layerscale_init,
            approximate_gelu=self.approximate_gelu, dtype=self.dtype, dtem_dim=self.dtem_dim,
            name="Transformer")(x, deterministic=not train)
        out.update(encoded=x, size=tok_size, source=source)

        if self.pool == "tok":
            pooled = [x[:, 0]] + ([x[:, 1]] if self.distill_token else [])
        else:
            start = self.num_prefix_tokens
            patch_size = None if tok_size is None else tok_size[:, start:]
            pooled = [_weighted_mean(x[:, start:], patch_size)]
            if self.pool == "mae":
                pooled = [nn.LayerNorm(dtype=self.dtype, name="fc_norm")(pooled[0])]
        if self.representation_size is not None:
            pre = nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")
            pooled = [jnp.tanh(pre(p)) for p in pooled]
        out["pre_logits"] = pooled[0]
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
