"""Pretrained ViTs by Hugging Face Hub name: timm and transformers repositories -> ViT + params.

    model, params, info = load_pretrained("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", r=8)
    logits, out = model.apply({"params": params}, normalize(images_nhwc, info.normalization))
    convert_pretrained("facebook/dinov2-small", "models/dinov2_s14")  # a model directory

Supported repositories (the layout is read from the repo's config.json):
  * timm: config.json with "architecture" (vit_*, deit_*, deit3_*) and "pretrained_cfg"; timm
    state-dict weights (AugReg, DeiT incl. distilled, MAE, DINOv2 incl. registers).
  * transformers: config.json "model_type" vit (ViTForImageClassification, ViTModel), vit_mae
    (ViTMAEModel, ViTMAEForPreTraining: the encoder), dinov2 (Dinov2Model),
    dinov2_with_registers (Dinov2WithRegistersModel).
The preprocessing (mean/std -> a `tome_jax.normalization` name, input size, crop fraction,
resize filter) comes from timm's "pretrained_cfg" or transformers' preprocessor_config.json.
Position embeddings are resampled (bicubic, with antialiasing where the source library uses
it, see `RESAMPLE`) when that input size differs from the grid the weights were saved at
(facebook/dinov2-*: 518 px weights, 224 px crop).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tome_jax import hub
from tome_jax import normalization as norm
from tome_jax.checkpoint import (
    CheckpointError,
    DestinationExistsError,
    ModelInfo,
    read_info,
    save_model,
)
from tome_jax.convert.fit import fit_params
from tome_jax.convert.hf import hf_to_timm
from tome_jax.convert.layout import Config
from tome_jax.convert.torch import from_timm_state_dict, torch_load, unwrap
from tome_jax.params import Flat, unflatten

if TYPE_CHECKING:
    from tome_jax.vit import ViT

TIMM_ARCHITECTURES = ("vit_", "deit_", "deit3_")
TRANSFORMERS_MODELS = {
    "vit": ("ViTForImageClassification", "ViTModel"),
    "vit_mae": ("ViTMAEModel", "ViTMAEForPreTraining"),
    "dinov2": ("Dinov2Model",),
    "dinov2_with_registers": ("Dinov2WithRegistersModel",),
}
PREPROCESSING_FILE = "preprocessing.json"
# How each layout's own code resizes position embeddings (see `convert.resample.interp_matrix`):
# timm's resample_abs_pos_embed and transformers' Dinov2WithRegisters antialias, the others not.
RESAMPLE = {"timm": "bicubic_antialias", "vit": "bicubic", "vit_mae": "bicubic",
            "dinov2": "bicubic", "dinov2_with_registers": "bicubic_antialias"}
# transformers' hidden_act -> ViT.approximate_gelu.
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_MATCH_ATOL = 1e-4  # mean/std as configs write them (0.485 vs float32 0.48500001)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How the repository prepares an image for its model.

    normalization: the `tome_jax.normalization` name; mean, std: per channel for [0, 1]
    pixels as the repo states them; image_size: (H, W) of the model input; crop_pct: the
    centre crop as a fraction of the resized image (None: not stated); interpolation: the
    resize filter ("bicubic", ...; None: not stated).
    """

    normalization: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int]
    crop_pct: float | None
    interpolation: str | None


@dataclasses.dataclass(frozen=True)
class Converted:
    """A repository converted: flat params in our naming, the ViT config, its preprocessing."""

    flat: Flat
    config: Config
    preprocessing: Preprocessing
    source: str


def match_normalization(mean: Any, std: Any, where: str) -> str:
    """The `tome_jax.normalization` name whose (mean, std) for [0, 1] pixels equal these;
    CheckpointError naming where and the known names when none does."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    for name in norm.NORMALIZATIONS:
        m, s = norm.mean_std(name, scale=1.0)
        if mean.shape == (3,) and std.shape == (3,) and np.allclose(mean, m, atol=_MATCH_ATOL) \
                and np.allclose(std, s, atol=_MATCH_ATOL):
            return name
    raise CheckpointError(f"{where}: input normalization mean {mean.tolist()} std {std.tolist()}"
                          f" is none of {tuple(norm.NORMALIZATIONS)}; pass normalization=NAME "
                          "only if you will feed inputs normalized that way")


def _hw(size: Any) -> tuple[int, int] | None:
    """224, [224, 224], {"height": 224, "width": 224} -> (224, 224); anything else None."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        return int(size["height"]), int(size["width"])
    return None


def timm_preprocessing(cfg: dict[str, Any], where: str,
                       normalization: str | None = None) -> Preprocessing:
    """timm's config.json "pretrained_cfg" -> Preprocessing (timm's ImageNet default mean/std
    when it names none, as timm itself does)."""
    pc = cfg.get("pretrained_cfg") or {}
    mean = tuple(pc.get("mean", norm.IMAGENET_MEAN))
    std = tuple(pc.get("std", norm.IMAGENET_STD))
    size = _hw(list(pc.get("input_size", (3, 224, 224)))[1:])
    return Preprocessing(normalization or match_normalization(mean, std, where), mean, std,
                         size, pc.get("crop_pct"), pc.get("interpolation"))


def transformers_preprocessing(cfg: dict[str, Any], proc: dict[str, Any] | None, where: str,
                               normalization: str | None = None) -> Preprocessing:
    """transformers' preprocessor_config.json (+ config.json's image_size) -> Preprocessing.

    Input size: crop_size when the processor centre-crops, else its fixed size, else the
    config's image_size. crop_pct: crop / resize shortest edge (1.0 for a plain resize).
    """
    proc = proc or {}
    mean, std = proc.get("image_mean"), proc.get("image_std")
    if proc.get("do_normalize", True) is False:
        mean, std = (0.0,) * 3, (1.0,) * 3
    if normalization is None:
        if mean is None or std is None:
            raise CheckpointError(f"{where}: no preprocessor_config.json with image_mean / "
                                  "image_std to say how inputs are normalized (fetch it, or "
                                  f"pass normalization= one of {tuple(norm.NORMALIZATIONS)})")
        normalization = match_normalization(mean, std, where)
    crop, size = _hw(proc.get("crop_size")), proc.get("size")
    crop_pct = None
    if crop is not None and proc.get("do_center_crop", True):
        image_hw = crop
        if isinstance(size, dict) and "shortest_edge" in size:
            crop_pct = min(crop) / size["shortest_edge"]
        elif isinstance(size, int):
            crop_pct = min(crop) / size
    elif _hw(size) is not None:
        image_hw, crop_pct = _hw(size), 1.0
    else:
        image_hw = _hw(cfg.get("image_size", 224))
    interpolation = _PIL_FILTERS.get(proc["resample"]) if "resample" in proc else None
    return Preprocessing(normalization, tuple(mean or ()), tuple(std or ()), image_hw,
                         crop_pct, interpolation)


def repo_layout(cfg: Any, where: str) -> str:
    """"timm" or "transformers" from a repo's config.json; CheckpointError naming what it
    found when it is neither (or a model family other than ViT / ViTMAE / DINOv2)."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: config.json is not a JSON object")
    if "architecture" in cfg:
        arch = str(cfg["architecture"])
        if not arch.startswith(TIMM_ARCHITECTURES):
            raise CheckpointError(f"{where}: timm architecture {arch!r} is not a supported ViT "
                                  f"({', '.join(a + '*' for a in TIMM_ARCHITECTURES)})")
        return "timm"
    if "model_type" in cfg:
        model_type, archs = cfg["model_type"], cfg.get("architectures") or []
        supported = TRANSFORMERS_MODELS.get(model_type, ())
        if not supported or (archs and archs[0] not in supported):
            known = ", ".join(a for v in TRANSFORMERS_MODELS.values() for a in v)
            raise CheckpointError(f"{where}: unsupported transformers model (model_type "
                                  f"{model_type!r}, architectures {archs}); supported: {known}")
        return "transformers"
    raise CheckpointError(f"{where}: unknown repository layout (config.json has neither timm's "
                          "\"architecture\" nor transformers' \"model_type\")")


def read_state_dict(path: Path) -> dict[str, Any]:
    """model.safetensors or pytorch_model.bin -> {name: array or tensor}."""
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            try:  # bfloat16 has no numpy dtype; torch reads it (and `to_numpy` upcasts)
                from safetensors.torch import load_file as load_torch

                return load_torch(str(path))
            except ImportError:
                raise CheckpointError(f"{path}: unreadable .safetensors ({e})") from None
    return dict(unwrap(torch_load(path)))


def _timm_args(cfg: dict[str, Any], sd: dict[str, Any], where: str
               ) -> tuple[int | None, str | None]:
    """(num_heads, pool) from timm's config.json (model_args, global_pool)."""
    model_args = cfg.get("model_args") or {}
    pool = cfg.get("global_pool", model_args.get("global_pool", "token"))
    if pool == "token":
        return model_args.get("num_heads"), "tok"
    if pool == "avg":  # with fc_norm: mean then norm ("mae"); without: norm then mean ("gap")
        return model_args.get("num_heads"), "mae" if "fc_norm.weight" in sd else "gap"
    raise CheckpointError(f"{where}: timm global_pool {pool!r} is not supported (token, avg)")


def _transformers_args(cfg: dict[str, Any], sd: dict[str, Any], where: str
                       ) -> tuple[int | None, bool]:
    """(num_heads, approximate_gelu) from transformers' config.json; CheckpointError for
    what ViT does not compute (SwiGLU, other activations, a non-tanh pooler)."""
    act = cfg.get("hidden_act", "gelu")
    if act not in _GELU:
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported ({tuple(_GELU)})")
    if cfg.get("use_swiglu_ffn"):
        raise CheckpointError(f"{where}: SwiGLU MLPs (DINOv2 giant) are not supported")
    if "pre_logits.fc.weight" in sd and cfg.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(f"{where}: pooler_act {cfg['pooler_act']!r} is not supported "
                              "(tanh)")
    return cfg.get("num_attention_heads"), _GELU[act]


def convert_repo(name: str, *, revision: str | None = None,
                 image_size: int | tuple[int, int] | None = None, num_classes: int | None = None,
                 normalization: str | None = None, cache_dir: str | os.PathLike | None = None
                 ) -> Converted:
    """Fetches (or finds in the cache) and converts a Hub repository; see the module doc.

    image_size: resample position embeddings to this instead of the repo's input size.
    num_classes: 0 drops the head, another count re-initialises it (see `fit_params`).
    normalization: record this instead of the one the repo's mean/std name (which must then
    match a known one). Raises CheckpointError (HubError for fetching) as one line.
    """
    if normalization is not None:
        norm.check(normalization)
    files = hub.fetch(name, revision=revision, cache=cache_dir)
    where = files.repo_id
    try:
        cfg = json.loads(files.config.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{where}: unreadable config.json ({e})") from None
    layout = repo_layout(cfg, where)
    sd = read_state_dict(files.weights)
    gelu_approx = False
    if layout == "timm":
        prep = timm_preprocessing(cfg, where, normalization)
        num_heads, pool = _timm_args(cfg, sd, where)
        resample = RESAMPLE["timm"]
    else:
        resample = RESAMPLE[cfg["model_type"]]
        proc = json.loads(files.preprocessor.read_text()) if files.preprocessor else None
        prep = transformers_preprocessing(cfg, proc, where, normalization)
        sd = hf_to_timm(sd)
        num_heads, gelu_approx = _transformers_args(cfg, sd, where)
        pool = None
    try:
        flat, config = from_timm_state_dict(sd, num_heads=num_heads, pool=pool)
        config["approximate_gelu"] = gelu_approx
        flat, config, image_hw = fit_params(flat, config, num_classes=num_classes,
                                            image_size=image_size or prep.image_size,
                                            resample=resample)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    prep = dataclasses.replace(prep, image_size=image_hw)
    return Converted(flat, config, prep, source=f"hf-hub:{files.repo_id}@{files.commit}")


def load_pretrained(name: str, r: Any = 0, *, revision: str | None = None,
                    image_size: int | tuple[int, int] | None = None,
                    num_classes: int | None = None, normalization: str | None = None,
                    cache_dir: str | os.PathLike | None = None, **overrides: Any
                    ) -> tuple[ViT, Any, ModelInfo]:
    """A Hub repository -> (ViT with merge schedule r, params as jax arrays, ModelInfo).

    overrides: other ViT fields (strategy="prune", dtype=jnp.bfloat16, ...). The ModelInfo is
    what `load_model` would return for `convert_pretrained(name, dst)`: config (without r and
    overrides), image_size, normalization, source "hf-hub:ORG/NAME@COMMIT".
    """
    import jax.numpy as jnp

    from tome_jax.vit import ViT

    c = convert_repo(name, revision=revision, image_size=image_size, num_classes=num_classes,
                     normalization=normalization, cache_dir=cache_dir)
    model = ViT(**{**c.config, "r": r, **overrides})
    params = unflatten({k: jnp.asarray(v) for k, v in c.flat.items()})
    info = ModelInfo(config=dict(c.config), image_size=c.preprocessing.image_size,
                     normalization=c.preprocessing.normalization, source=c.source)
    return model, params, info


pretrained = load_pretrained


def convert_pretrained(name: str, dst: str | os.PathLike, **kw: Any) -> ModelInfo:
    """Converts a Hub repository into the model directory dst (see `tome_jax.checkpoint`),
    with its preprocessing in dst/preprocessing.json; dst appears only when complete.

    kw: those of `convert_repo` (revision, image_size, num_classes, normalization, cache_dir).
    Raises DestinationExistsError before fetching anything if dst exists.
    """
    dst = Path(dst)
    if dst.exists():
        raise DestinationExistsError(f"{dst} exists; refusing to overwrite")
    c = convert_repo(name, **kw)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        prep = c.preprocessing
        out = save_model(staging / dst.name, c.flat, c.config, image_size=prep.image_size,
                         normalization=prep.normalization, source=c.source)
        (out / PREPROCESSING_FILE).write_text(json.dumps(dataclasses.asdict(prep), indent=2))
        os.replace(out, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_info(dst)


def read_preprocessing(path: str | os.PathLike) -> Preprocessing | None:
    """DIR/preprocessing.json (written by `convert_pretrained`) -> Preprocessing, or None."""
    file = Path(path) / PREPROCESSING_FILE
    if not file.is_file():
        return None
    d = json.loads(file.read_text())
    return Preprocessing(d["normalization"], tuple(d["mean"]), tuple(d["std"]),
                         _hw(d["image_size"]), d.get("crop_pct"), d.get("interpolation"))


is_repo_name = hub.is_repo_name
