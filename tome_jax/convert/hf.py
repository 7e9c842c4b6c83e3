"""Hugging Face transformers naming -> timm naming (then read as a timm state dict).

Two layouts, both as the Hub stores them (`save_pretrained`) and as transformers >= 5 names
them in memory (`layers.N.attention.q_proj`, ...):
  * "vit": `ViTModel`, `ViTForImageClassification`, `ViTMAEModel`, `ViTMAEForPreTraining`
    (post-norm names `layernorm_before` / `layernorm_after`, `intermediate` / `output` MLP;
    optional `vit.` prefix, `classifier` head, `pooler` (dense + tanh), MAE `decoder.*`).
  * "dinov2": `Dinov2Model`, `Dinov2WithRegistersModel` (`norm1` / `norm2`, `mlp.fc1`,
    LayerScale `lambda1`, `register_tokens`; optional `dinov2.` / `backbone.` prefix).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tome_jax.convert.layout import to_numpy

_PREFIX = re.compile(r"^(vit|dinov2|backbone)\.")
_EMBEDDINGS = re.compile(r"^((vit|dinov2|backbone)\.)?embeddings\.patch_embeddings\.")
_BLOCK_KEY = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)")
_QKV = re.compile(r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)")
_QKV_NAMES = {"q": "query", "k": "key", "v": "value"}
# Block sub-module (either naming) -> timm's.
_BLOCK = {
    "layernorm_before": "norm1", "layernorm_after": "norm2", "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight", "pooler.dense.bias": "pre_logits.fc.bias",
}
# Training-only parts: the masked-image-modelling token and the MAE / SimMIM decoders.
_DROPPED = re.compile(r"^(embeddings\.mask_token|decoder\..*)$")


def hf_layout(keys: list[str]) -> str | None:
    """"vit", "dinov2", or None when the keys are not a transformers ViT / Dinov2 model."""
    if not any(_EMBEDDINGS.match(k) for k in keys):
        return None
    return "vit" if any(".layernorm_before." in k for k in keys) else "dinov2"


def is_hf(keys: list[str]) -> bool:
    """True when state-dict keys use a Hugging Face ViT / ViTMAE / Dinov2 naming."""
    return hf_layout(keys) is not None


def hf_to_timm(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face names -> timm names (q, k, v fused into qkv), arrays as float32 numpy.

    `classifier` becomes timm's `head` for the "vit" layout only (Dinov2's classifier reads
    the class token and the patch mean together, which a ViT head cannot: it stays unmapped
    and `from_timm_state_dict` rejects it). A `pooler` beside a `classifier` is dropped, as
    `ViTForImageClassification` never uses it; alone (`ViTModel`) it becomes `pre_logits`.
    Unknown keys pass through unchanged, so the timm reader names them.
    """
    layout = hf_layout(list(sd))
    keys = {_PREFIX.sub("", k): k for k in sd}
    has_classifier = "classifier.weight" in keys
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for k, orig in keys.items():
        if _DROPPED.match(k) or (has_classifier and k.startswith("pooler.")):
            continue
        v = to_numpy(sd[orig])
        m = _BLOCK_KEY.fullmatch(k)
        if k in _TOP:
            out[_TOP[k]] = v
        elif layout == "vit" and k.startswith("classifier."):
            out["head." + k.split(".", 1)[1]] = v
        elif m:
            i, name, kind = m.groups()
            att = _QKV.fullmatch(name)
            if att:
                part = att.group(1) or _QKV_NAMES[att.group(2)]
                qkv.setdefault((i, kind), {})[part] = v
            elif name in _BLOCK:
                kind = "gamma" if kind == "lambda1" else kind
                out[f"blocks.{i}.{_BLOCK[name]}.{kind}"] = v
            else:
                out[k] = v
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        if parts.keys() == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
                [parts["query"], parts["key"], parts["value"]], axis=0)
        else:  # an incomplete triple: left under its own names for the reader to reject
            out.update({f"blocks.{i}.attn.{name}.{kind}": v for name, v in parts.items()})
    return out


# The names this module had when it read only Dinov2: kept, and they now cover every layout.
hf_dinov2_to_timm = hf_to_timm
is_hf_dinov2 = is_hf
