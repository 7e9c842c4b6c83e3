"""Parameter-tree helpers: flat "a/b/c" views, shapes without allocation, random weights.

    flat = flatten(params)            # {"Transformer/encoderblock_0/LayerNorm_0/scale": array}
    params = unflatten(flat)
    shapes = abstract_params(model, 224)  # ShapeDtypeStruct tree, nothing computed
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tome_jax.vit import ViT

Flat = dict[str, np.ndarray]
Params = Any


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


def path_names(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The same nested dict with every leaf replaced by its "a/b/c" path."""
    return unflatten({k: k for k in flatten(tree)})


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def abstract_params(model: ViT, image_size: int | tuple[int, int]) -> Params:
    """The model's params as a ShapeDtypeStruct tree for [1, H, W, C] images.

    Traced with r=0: parameters do not depend on the merge schedule, and a schedule too
    large for a small image would otherwise refuse to trace.
    """
    import jax
    import jax.numpy as jnp

    h, w = _image_hw(image_size)
    x = jax.ShapeDtypeStruct((1, h, w, model.channels), jnp.float32)
    return jax.eval_shape(model.clone(r=0).init, jax.random.key(0), x)["params"]


def random_params(model: ViT, image_size: int | tuple[int, int], seed: int = 0) -> Params:
    """Random weights for smoke tests and benchmarks: N(0, 0.02), LayerNorm scales 1 + N(0, 0.02).

    Drawn with numpy from the shapes alone: nothing is compiled (a jitted or op-by-op
    `model.init` costs seconds to tens of seconds on CPU), and every process and device count
    gets the same values.
    """
    import jax

    shapes = abstract_params(model, image_size)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        value = rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype)
        return value + 1 if getattr(path[-1], "key", None) == "scale" else value

    return jax.tree_util.tree_map_with_path(draw, shapes)


def num_head_classes(params: Params) -> int | None:
    """Output classes of a params tree's `head` (None: no head)."""
    kernel = params.get("head", {}).get("kernel") if hasattr(params, "get") else None
    return None if kernel is None else int(kernel.shape[-1])
