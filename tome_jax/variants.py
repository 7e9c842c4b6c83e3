"""ViT variant strings ("B/16", "S/14", "mu/8") decoded into architecture sizes.

The names and sizes follow big_vision's `decode_variant`, so a config string means the same
network in both code bases.
"""

from __future__ import annotations

from typing import NamedTuple


class ViTSize(NamedTuple):
    """Architecture sizes of one ViT variant."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int


_WIDTH = {"mu": 32, "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "So400m": 1152,
          "H": 1280, "g": 1408, "G": 1664, "e": 1792}
_DEPTH = {"mu": 1, "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27,
          "H": 32, "g": 40, "G": 48, "e": 56}
_MLP_DIM = {"mu": 128, "Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "So400m": 4304,
            "H": 5120, "g": 6144, "G": 8192, "e": 15360}
_HEADS = {"mu": 2, "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16,
          "H": 16, "g": 16, "G": 16, "e": 16}

VARIANT_NAMES = tuple(_WIDTH)


def decode_variant(variant: str) -> ViTSize:
    """Parses "X/P" (X one of `VARIANT_NAMES`, P the patch size) into a `ViTSize`."""
    if not isinstance(variant, str) or variant.count("/") != 1:
        raise ValueError(f"variant must look like 'B/16' (name/patch), got {variant!r}")
    name, patch = variant.split("/")
    if name not in _WIDTH:
        raise ValueError(f"unknown ViT variant {name!r} in {variant!r}; known: {VARIANT_NAMES}")
    if not patch.isdigit() or int(patch) <= 0:
        raise ValueError(f"patch size in {variant!r} must be a positive integer")
    return ViTSize(_WIDTH[name], _DEPTH[name], _MLP_DIM[name], _HEADS[name], int(patch))
