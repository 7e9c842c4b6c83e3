"""Hugging Face `Dinov2Model` naming -> timm naming (then read as a timm state dict)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tome_jax.convert.layout import to_numpy

_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def hf_dinov2_to_timm(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face `Dinov2Model` names -> timm names (q, k, v fused into qkv).

    Accepts an optional "dinov2." / "backbone." prefix (task heads keep theirs: "classifier"
    is not a ViT head here and is rejected by `from_timm_state_dict`).
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for k, v in sd.items():
        k = re.sub(r"^(dinov2|backbone)\.", "", k)
        v = to_numpy(v)
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", k)
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.register_tokens":
            out["reg_token"] = v
        elif k == "embeddings.mask_token":
            continue
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif m:
            i, name, kind = m.groups()
            att = re.fullmatch(r"attention\.attention\.(query|key|value)", name)
            if att:
                qkv.setdefault((i, kind), {})[att.group(1)] = v
            elif name in ("layer_scale1", "layer_scale2"):
                out[f"blocks.{i}.ls{name[-1]}.gamma"] = v
            elif name in _HF_BLOCK:
                out[f"blocks.{i}.{_HF_BLOCK[name]}.{kind}"] = v
            else:
                out[k] = v  # unknown (e.g. SwiGLU weights_in): rejected downstream
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0)
    return out


def is_hf_dinov2(keys: list[str]) -> bool:
    """True when state-dict keys use Hugging Face Dinov2 naming (maybe under a prefix)."""
    return any(re.match(r"^((dinov2|backbone)\.)?embeddings\.patch_embeddings\.", k)
               for k in keys)
