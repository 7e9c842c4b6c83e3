"""PyTorch state dicts in timm naming (timm ViT / DeiT / DINOv2, MAE fine-tunes and the MAE
pretrain encoder) -> our flat params, and the safe `torch.load` that reads them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tome_jax.checkpoint import CheckpointError
from tome_jax.convert.layout import (
    Config,
    base_config,
    fold_prefix_posemb,
    split_qkv_heads,
    square_split,
    to_numpy,
)
from tome_jax.params import Flat

_TIMM_BLOCK = {
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
    "attn.proj.weight": "MultiHeadDotProductAttention_0/out/kernel",
    "attn.proj.bias": "MultiHeadDotProductAttention_0/out/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel", "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel", "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
    "ls1.gamma": "LayerScale_0/scale", "ls2.gamma": "LayerScale_1/scale",
}
_TIMM_TOP = {
    "cls_token": "cls", "dist_token": "dist", "reg_token": "registers",
    "norm.weight": "Transformer/encoder_norm/scale", "norm.bias": "Transformer/encoder_norm/bias",
    "fc_norm.weight": "fc_norm/scale", "fc_norm.bias": "fc_norm/bias",
    "head.weight": "head/kernel", "head.bias": "head/bias",
    "head_dist.weight": "head_dist/kernel", "head_dist.bias": "head_dist/bias",
    "pre_logits.fc.weight": "pre_logits/kernel", "pre_logits.fc.bias": "pre_logits/bias",
    "patch_embed.proj.bias": "embedding/bias",
}
# Keys that belong to training, not to the encoder: MAE's decoder and mask token.
_IGNORED = re.compile(r"^(decoder[._]|mask_token$|embeddings\.mask_token$)")


def from_timm_state_dict(sd: Mapping[str, Any], *, num_heads: int | None = None,
                         pool: str | None = None) -> tuple[Flat, Config]:
    """timm-named state dict (timm vit/deit/DINOv2, MAE) -> (flat params, ViT config).

    Linear weights [out, in] become kernels [in, out]; the fused qkv [3D, D] splits into
    query/key/value [D, H, hd]; patch_embed [D, C, P, P] -> [P, P, C, D]. pool defaults to
    "mae" when the checkpoint has `fc_norm` (MAE global pool), else "tok" (or "gap" without
    a class token).
    """
    sd = {k: to_numpy(v) for k, v in sd.items() if not _IGNORED.match(k)}
    flat: Flat = {}
    unknown = []
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k == "patch_embed.proj.weight":
            flat["embedding/kernel"] = v.transpose(2, 3, 1, 0)
        elif k == "pos_embed":
            continue
        elif k in _TIMM_TOP:
            flat[_TIMM_TOP[k]] = v.T if v.ndim == 2 else v
        elif m and m.group(2) in ("attn.qkv.weight", "attn.qkv.bias"):
            blk = f"Transformer/encoderblock_{m.group(1)}/MultiHeadDotProductAttention_0"
            kind = "kernel" if k.endswith("weight") else "bias"
            if v.ndim not in (1, 2) or v.shape[0] % 3:
                raise CheckpointError(f"{k} has shape {tuple(v.shape)}: a fused qkv tensor needs "
                                      "rows that split into 3 equal parts (query, key, value)")
            for name, part in zip(("query", "key", "value"), np.split(v, 3, axis=0), strict=True):
                flat[f"{blk}/{name}/{kind}"] = part.T if kind == "kernel" else part
        elif m and m.group(2) in _TIMM_BLOCK:
            key = f"Transformer/encoderblock_{m.group(1)}/{_TIMM_BLOCK[m.group(2)]}"
            flat[key] = v.T if v.ndim == 2 else v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"unsupported keys in a timm-style state dict: {unknown[:5]}")
    missing = [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in sd]
    if missing:
        raise CheckpointError(f"not a ViT state dict: no {' / '.join(missing)}")
    # Checkpoints trained without qkv bias (qkv_bias=False): our attention always has one.
    for key in [k for k in flat if k.endswith("query/kernel")]:
        for name in ("query", "key", "value"):
            flat.setdefault(key.replace("query/kernel", f"{name}/bias"),
                            np.zeros(flat[key].shape[1], np.float32))
    pos = sd["pos_embed"]
    prefix = int("cls" in flat) + int("dist" in flat)
    n_reg = flat["registers"].shape[1] if "registers" in flat else 0
    slots = square_split(pos.shape[1], [prefix, 0, prefix + n_reg])
    flat["pos_embedding"] = fold_prefix_posemb(flat, pos, slots)
    if pool is None:
        pool = "mae" if "fc_norm/scale" in flat else ("tok" if "cls" in flat else "gap")
    cfg = base_config(flat, num_heads, pool)
    from tome_jax.variants import decode_variant

    split_qkv_heads(flat, cfg.get("num_heads", decode_variant(cfg["variant"]).num_heads))
    return flat, cfg


def torch_load(path: Path) -> Mapping[str, Any]:
    """torch.load with weights_only=True: only tensors and plain containers are rebuilt.

    `argparse.Namespace` (MAE and DeiT keep their training `args`) is the one extra class
    allowed: it only holds attributes. Anything else (e.g. a `__reduce__` calling a function)
    is refused before it runs.
    """
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, truncated zip, EOF ...
        raise CheckpointError(f"{path}: refused or unreadable torch checkpoint: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return obj


def unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside common wrappers ({'model': ...}, {'state_dict': ...})."""
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}
