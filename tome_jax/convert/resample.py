"""Position-embedding resampling: a patch grid trained at one resolution, used at another.

Each method reproduces the resize its checkpoints' own code applies, as a separable matrix.
"""

from __future__ import annotations

import math

import numpy as np

from tome_jax.checkpoint import CheckpointError

RESAMPLE_METHODS = ("linear", "bicubic", "bicubic_antialias")


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
