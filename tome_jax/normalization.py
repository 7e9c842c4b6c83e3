"""The input normalizations the supported weights expect: x -> (x - mean) / std per channel.

    "augreg"   [-1, 1]: AugReg / big_vision (and models trained here)
    "imagenet" ImageNet mean/std: timm, DeiT, MAE, DINOv2, Hugging Face
    "unit"     [0, 1]

`NORMALIZATIONS` holds (mean, std) in 0..255 pixel units; `mean_std(name, scale=1.0)` gives
them for [0, 1] pixels. No TensorFlow here: the TF input pipeline reads the same table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (mean, std) for [0, 1] pixels; every other unit is a multiple of these.
_UNIT_SCALE = {
    "augreg": ((0.5,) * 3, (0.5,) * 3),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "unit": ((0.0,) * 3, (1.0,) * 3),
}

Triple = tuple[float, float, float]


def check(name: str) -> None:
    """ValueError unless name is a known normalization (the message lists them)."""
    if name not in _UNIT_SCALE:
        raise ValueError(f"unknown normalization {name!r}; known: {tuple(_UNIT_SCALE)}")


def mean_std(name: str, scale: float = 255.0) -> tuple[Triple, Triple]:
    """(mean, std) per channel for pixels in 0..scale (255: uint8 pixels, 1.0: [0, 1])."""
    check(name)
    mean, std = _UNIT_SCALE[name]
    return tuple(scale * m for m in mean), tuple(scale * s for s in std)


# (mean, std) in 0..255 pixel units.
NORMALIZATIONS: dict[str, tuple[Triple, Triple]] = {name: mean_std(name) for name in _UNIT_SCALE}


def normalize(images: jax.Array | np.ndarray, name: str) -> jax.Array | np.ndarray:
    """[..., 3] pixels 0..255 -> float32 (x - mean) / std (jax in, jax out; numpy likewise)."""
    check(name)
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[name])
    xp = jnp if isinstance(images, jax.Array) else np
    return (xp.asarray(images, xp.float32) - mean) / std
