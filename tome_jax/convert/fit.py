"""Fitting converted params to the requested model: variant and head overrides, position
embeddings resampled to the image size, every shape checked against the model.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

from tome_jax.checkpoint import CheckpointError
from tome_jax.convert.layout import Config, split_qkv_heads
from tome_jax.convert.resample import resample_posemb
from tome_jax.params import Flat, abstract_params, flatten


def model_shapes(config: Config, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Flat parameter shapes of ViT(**config) at image_size (H, W), without allocating."""
    from tome_jax.vit import ViT

    shapes = abstract_params(ViT(**config), image_size)
    return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def fit_params(flat: Flat, config: Config, *, image_size: int | tuple[int, int] | None = None,
               variant: str | None = None, num_classes: int | None = None,
               resample: str = "bicubic") -> tuple[Flat, Config, tuple[int, int]]:
    """Adapts converted params to the requested model; returns (flat, config, image (H, W)).

    variant: overrides the inferred sizes (then every shape must fit it). num_classes: a
    different count drops the checkpoint's head(s) with a warning; they are re-initialised
    as the model initialises them (zeros). image_size: resamples the patch position
    embeddings with `resample` (see `interp_matrix`). Raises CheckpointError naming the
    first mismatched key and both shapes.
    """
    flat, config = dict(flat), dict(config)
    patch = flat["embedding/kernel"].shape[0]
    if variant is not None:
        for field in ("width", "depth", "mlp_dim", "num_heads"):
            config.pop(field, None)
        config["variant"] = variant
        _check_variant_heads(flat, variant)
        from tome_jax.variants import decode_variant

        patch = decode_variant(variant).patch_size
    side = math.isqrt(flat["pos_embedding"].shape[1])
    old_hw = (side, side)
    if image_size is None:
        new_hw = old_hw
    else:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if hw[0] % patch or hw[1] % patch:
            raise CheckpointError(f"image size {hw} is not a multiple of the patch size {patch}")
        new_hw = (hw[0] // patch, hw[1] // patch)
    if new_hw != old_hw and flat["pos_embedding"].shape[1] == side * side:
        flat["pos_embedding"] = resample_posemb(flat["pos_embedding"], new_hw, old_hw, resample)
    if num_classes is not None and num_classes != config["num_classes"]:
        dropped = [k for k in flat if k.split("/")[0] in ("head", "head_dist")]
        if dropped and num_classes:
            warnings.warn(f"checkpoint head has {config['num_classes']} classes, model "
                          f"{num_classes}: dropping {dropped} and re-initialising", stacklevel=2)
        for k in dropped:
            del flat[k]
        config["num_classes"] = num_classes
    image_hw = (new_hw[0] * patch, new_hw[1] * patch)
    try:
        expected = model_shapes(config, image_hw)
    except ValueError as e:
        raise CheckpointError(f"invalid model config {config}: {e}") from e
    for key, shape in sorted(expected.items(), key=lambda kv: _model_order(kv[0])):
        if key not in flat:
            if key.split("/")[0] in ("head", "head_dist"):
                flat[key] = np.zeros(shape, np.float32)
                continue
            raise CheckpointError(f"checkpoint lacks {key!r} (model shape {shape})")
        if tuple(flat[key].shape) != shape:
            raise CheckpointError(f"shape mismatch at {key!r}: checkpoint "
                                  f"{tuple(flat[key].shape)} vs model {shape} "
                                  f"(variant {config['variant']})")
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint has keys the model lacks: {extra[:5]}")
    return flat, config, image_hw


_TOP_ORDER = ("embedding", "cls", "dist", "registers", "pos_embedding", "Transformer",
              "fc_norm", "pre_logits", "head", "head_dist")


def _model_order(key: str) -> tuple:
    """Sort key following the forward pass (embedding first, blocks by number), so the
    "first mismatch" reported is the earliest in the network, not the alphabetically first."""
    top, *rest = key.split("/")
    block = re.match(r"encoderblock_(\d+)", rest[0]) if rest else None
    return (_TOP_ORDER.index(top) if top in _TOP_ORDER else len(_TOP_ORDER),
            int(block.group(1)) if block else 1 << 30, key.endswith("bias"), key)


def _check_variant_heads(flat: Flat, variant: str) -> None:
    """Re-splits attention params for the variant's head count (merge heads, split again)."""
    from tome_jax.variants import decode_variant

    for key in list(flat):
        if "/MultiHeadDotProductAttention_0/" not in key:
            continue
        v = flat[key]
        if key.endswith("out/kernel"):
            flat[key] = v.reshape(-1, v.shape[-1])
        elif key.endswith("kernel"):
            flat[key] = v.reshape(v.shape[0], -1)
        elif not key.endswith("out/bias"):
            flat[key] = v.reshape(-1)
    split_qkv_heads(flat, decode_variant(variant).num_heads)
