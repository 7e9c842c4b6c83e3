"""Which format a file holds (from its bytes, not its name), and reading any of them."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tome_jax.checkpoint import CheckpointError
from tome_jax.convert.hf import hf_dinov2_to_timm, is_hf_dinov2
from tome_jax.convert.layout import Config
from tome_jax.convert.npz import from_npz_arrays
from tome_jax.convert.onnx import onnx_to_hf_state_dict
from tome_jax.convert.torch import from_timm_state_dict, torch_load, unwrap
from tome_jax.params import Flat

FORMATS = ("npz", "torch", "safetensors", "onnx")
# What each format's weights were trained on: big_vision's [-1, 1], else ImageNet mean/std.
NORMALIZATION = {"npz": "augreg", "torch": "imagenet", "safetensors": "imagenet",
                 "onnx": "imagenet"}
# How each format's own code resizes position embeddings (see `resample.interp_matrix`).
RESAMPLE = {"npz": "linear", "torch": "bicubic", "safetensors": "bicubic", "onnx": "bicubic"}


def detect_format(path: str | os.PathLike) -> str:
    """"npz", "torch" (zip or legacy pickle), "safetensors" or "onnx", from the bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes)")
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


def read_checkpoint(path: str | os.PathLike, *, num_heads: int | None = None,
                    pool: str | None = None) -> tuple[Flat, Config]:
    """Any supported file -> (flat params in our naming, inferred ViT config).

    Every CheckpointError names the file (the readers' own messages get it as a prefix).
    """
    path = Path(path)
    fmt = detect_format(path)
    try:
        return _read(path, fmt, num_heads=num_heads, pool=pool)
    except CheckpointError as e:
        if str(e).startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, IndexError, ValueError) as e:  # a layout the readers did not foresee
        raise CheckpointError(f"{path}: not a ViT checkpoint this converter understands "
                              f"({type(e).__name__}: {e})") from e


def _read(path: Path, fmt: str, *, num_heads: int | None, pool: str | None
          ) -> tuple[Flat, Config]:
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
        sd = unwrap(torch_load(path))
    if is_hf_dinov2(list(sd)):
        sd = hf_dinov2_to_timm(sd)
    return from_timm_state_dict(sd, num_heads=num_heads, pool=pool)
