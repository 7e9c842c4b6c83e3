"""Shared steps from a foreign layout to ours: prefix-token position slots, the per-head
attention split, and the ViT config read back from the converted shapes.

Flat params use our naming: {"Transformer/encoderblock_0/LayerNorm_0/scale": array}.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tome_jax.checkpoint import CheckpointError
from tome_jax.params import Flat

Config = dict[str, Any]


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor / array-like -> float32 numpy (bfloat16 and float16 upcast)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def fold_prefix_posemb(flat: Flat, pos: np.ndarray, num_slots: int) -> np.ndarray:
    """Adds the first num_slots rows of pos [1, T, D] to the prefix tokens they belong to.

    Prefix order is [cls, dist, registers...]; a constant token plus a constant position
    embedding is one constant, so ViT stores only patch position embeddings. Returns the
    patch part pos[:, num_slots:].
    """
    i = 0
    for name in ("cls", "dist", "registers"):
        if i >= num_slots or name not in flat:
            continue
        n = min(flat[name].shape[1], num_slots - i)
        flat[name] = flat[name].copy()
        flat[name][:, :n] += pos[:, i:i + n]
        i += n
    if i != num_slots:
        raise CheckpointError(f"position embeddings have {num_slots} prefix slots but the "
                              f"checkpoint has only {i} prefix tokens")
    return pos[:, num_slots:]


def square_split(total: int, candidates: list[int]) -> int:
    """The number of prefix slots k among candidates with total - k a perfect square."""
    for k in candidates:
        side = math.isqrt(max(total - k, 0))
        if total - k > 0 and side * side == total - k:
            return k
    raise CheckpointError(f"cannot split {total} position embeddings into prefix slots "
                          f"{candidates} plus a square patch grid")


def base_config(flat: Flat, num_heads: int | None, pool: str) -> Config:
    """A ViT config (dict of fields) inferred from converted shapes.

    The variant name is chosen by width; sizes that differ from it become overrides. Heads
    cannot be read from fused qkv weights: the variant's count, else width // 64.
    """
    from tome_jax.variants import VARIANT_NAMES, decode_variant

    patch, _, _, width = flat["embedding/kernel"].shape
    depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
    mlp_dim = flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]
    q = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
    name = next((n for n in VARIANT_NAMES if decode_variant(f"{n}/1").width == width), "mu")
    base = decode_variant(f"{name}/{patch}")
    if q.ndim == 3:
        heads = q.shape[1]
    else:
        heads = num_heads or (base.num_heads if base.width == width else max(width // 64, 1))
    cfg: Config = {"variant": f"{name}/{patch}"}
    for field, value, default in (("width", width, base.width), ("depth", depth, base.depth),
                                  ("mlp_dim", mlp_dim, base.mlp_dim),
                                  ("num_heads", heads, base.num_heads)):
        if value != default:
            cfg[field] = int(value)
    has_head = "head/kernel" in flat
    cfg.update(
        num_classes=int(flat["head/kernel"].shape[-1]) if has_head else 0,
        pool=pool, class_token="cls" in flat, distill_token="dist" in flat,
        num_registers=int(flat["registers"].shape[1]) if "registers" in flat else 0,
        layerscale_init=1.0 if any("LayerScale_0" in k for k in flat) else None,
        representation_size=(int(flat["pre_logits/kernel"].shape[1])
                             if "pre_logits/kernel" in flat else None),
        approximate_gelu=False)
    return cfg


def split_qkv_heads(flat: Flat, num_heads: int) -> None:
    """Reshapes 2-D attention kernels [D, D] to [D, H, hd] / [H, hd, D], biases to [H, hd]."""
    for key in list(flat):
        if "/MultiHeadDotProductAttention_0/" not in key:
            continue
        v = flat[key]
        split_dim = v.shape[0] if key.endswith("out/kernel") else v.shape[-1]
        if split_dim % num_heads:
            continue  # leave it unsplit: the shape check then names it
        if key.endswith(("query/kernel", "key/kernel", "value/kernel")) and v.ndim == 2:
            flat[key] = v.reshape(v.shape[0], num_heads, -1)
        elif key.endswith(("query/bias", "key/bias", "value/bias")) and v.ndim == 1:
            flat[key] = v.reshape(num_heads, -1)
        elif key.endswith("out/kernel") and v.ndim == 2:
            flat[key] = v.reshape(num_heads, -1, v.shape[1])
