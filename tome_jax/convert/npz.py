"""AugReg / vision_transformer `.npz` (pre-linen names) and big_vision `.npz` (linen names,
optional `params/` prefix, scan-stacked blocks): already flax layout, renamed to ours.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tome_jax.checkpoint import CheckpointError
from tome_jax.convert.layout import Config, base_config, fold_prefix_posemb, square_split
from tome_jax.params import Flat

_PRE_LINEN = (("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
              ("LayerNorm_2", "LayerNorm_1"), ("MlpBlock_3", "MlpBlock_0"))


def from_npz_arrays(arrays: Mapping[str, np.ndarray], *, pool: str | None = None
                    ) -> tuple[Flat, Config]:
    """AugReg (pre-linen) or big_vision (linen, maybe scanned) npz arrays -> (flat, config).

    Pre-linen: `Transformer/posembed_input/pos_embedding` [1, 1+N, D] has a class slot
    (folded into `cls`). big_vision: top-level `pos_embedding` [1, N, D]; a scanned encoder
    stores `Transformer/encoderblock/<param>` with a leading depth axis, unstacked here.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    for prefix in ("opt/target/", "params/"):
        if any(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if "embedding/kernel" not in flat:
        raise CheckpointError("not a ViT .npz: no embedding/kernel (keys: "
                              f"{sorted(flat)[:5]})")
    if any(k.startswith("MAPHead_0/") for k in flat):
        raise CheckpointError("big_vision MAP-head pooling (MAPHead_0) is not supported")
    out: Flat = {}
    for k, v in flat.items():
        if k.startswith("Transformer/encoderblock/"):
            for i in range(v.shape[0]):  # scan-stacked: [depth, ...]
                out[k.replace("encoderblock/", f"encoderblock_{i}/", 1)] = v[i]
            continue
        if k.startswith("Transformer/encoderblock_"):
            for old, new in _PRE_LINEN:
                k = k.replace(f"/{old}/", f"/{new}/")
        out[k] = v
    if "Transformer/posembed_input/pos_embedding" in out:
        pos = out.pop("Transformer/posembed_input/pos_embedding")
        slots = square_split(pos.shape[1], [int("cls" in out), 0])
        out["pos_embedding"] = fold_prefix_posemb(out, pos, slots)
    if "pos_embedding" not in out:
        raise CheckpointError("no position embeddings in the .npz: neither "
                              "'Transformer/posembed_input/pos_embedding' (AugReg) nor "
                              "'pos_embedding' (big_vision) is there")
    if pool is None:
        pool = "tok" if "cls" in out else "gap"
    return out, base_config(out, None, pool)
