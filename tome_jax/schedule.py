"""Merge schedules: how many tokens (r) each block removes, and what that costs.

Everything here is plain Python on static shapes, run before tracing, so the jitted model sees
one fixed token count per block.

A schedule is one of:
  * an int `r`: every block merges r tokens;
  * a list of per-block ints, padded with zeros to the depth;
  * a tuple `(r, inflect)`: a linear ramp with mean r; inflect -1 starts at 2r and decreases to
    0, +1 starts at 0 and increases to 2r, 0 is constant (any value in [-1, 1] interpolates).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Union

from tome_jax.variants import ViTSize, decode_variant


class Ramp(NamedTuple):
    """The `(r, inflect)` schedule, named so it stays apart from a per-layer tuple."""

    r: int
    inflect: float


class PerLayer(NamedTuple):
    """A per-layer schedule, named so a two-layer one is not read as `(r, inflect)`."""

    rs: tuple[int, ...]


Schedule = Union[int, list, tuple, Ramp, PerLayer]


def canonical(r: Schedule) -> int | Ramp | PerLayer:
    """A hashable, unambiguous form: list -> PerLayer, plain 2-tuple -> Ramp.

    Flax turns list fields into tuples, which would make [r0, r1] look like (r, inflect);
    models store their schedule in this form instead.
    """
    if isinstance(r, (Ramp, PerLayer)):
        return r
    if isinstance(r, list):
        return PerLayer(tuple(r))
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"an r schedule tuple must be (r, inflect), got {r!r}; "
                             "use a list for per-layer values")
        return Ramp(*r)
    return r


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def parse_r(r: Schedule, *, depth: int) -> list[int]:
    """Expands a schedule into one requested r per block (before clamping to what is possible).

    parse_r((16, -1), depth=12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]. depth is
    keyword-only: the reference ToMe's `parse_r(num_layers, r)` puts the arguments the other way.
    """
    depth = _check_int(depth, "depth")
    r = canonical(r)
    if isinstance(r, PerLayer):
        r = list(r.rs)
    if isinstance(r, list):
        if len(r) > depth:
            raise ValueError(f"per-layer r schedule has {len(r)} entries but the model has "
                             f"only {depth} blocks")
        return [_check_int(v, f"r[{i}]") for i, v in enumerate(r)] + [0] * (depth - len(r))
    inflect = 0.0
    if isinstance(r, Ramp):
        r, inflect = r
        if not -1.0 <= float(inflect) <= 1.0:
            raise ValueError(f"inflect must lie in [-1, 1], got {inflect}")
    r = _check_int(r, "r")
    if depth <= 1:
        return [r] * depth
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    step = (last - first) / (depth - 1)
    # The tiny epsilon keeps e.g. 32 - 11 * (32 / 11) from truncating to -1 through rounding.
    return [max(0, int(first + step * i + 1e-9)) for i in range(depth)]


def parse_schedule(text: str) -> Schedule:
    """A schedule from command-line text: "16" -> 16, "16,-1" -> (16, -1.0), "[8,8,4]" -> list."""
    text = text.strip()
    try:
        if text.startswith("["):
            return [int(v) for v in text.strip("[]").split(",") if v.strip()]
        if "," in text:
            r, inflect = text.split(",")
            return (int(r), float(inflect))
        return int(text)
    except ValueError:
        raise ValueError(f"cannot read the r schedule {text!r}; write 16, 16,-1 (r, inflect) "
                         "or [8,8,4] (per layer)") from None


def max_r(num_tokens: int, protected: int) -> int:
    """Most tokens one bipartite step can merge: half of the unprotected tokens."""
    return max(0, (num_tokens - protected) // 2)


def token_schedule(r: Schedule, depth: int, num_tokens: int, protected: int = 1,
                   strict: bool | None = None) -> tuple[list[int], list[int]]:
    """Per-block clamped r and the token count entering each block.

    Args:
      r: a schedule (see module docstring).
      depth: number of blocks.
      num_tokens: tokens entering the first block, protected ones included.
      protected: tokens that are never merged (class token, distill token).
      strict: if True, a request above what a block can merge is an error instead of being
        clamped. Defaults to True for explicit per-layer lists and False otherwise, as in the
        paper, where r=16 on ViT-B/16 clamps in the last block and leaves 11 tokens.

    Returns:
      (rs, tokens): rs[i] tokens are merged in block i, which is entered by tokens[i] tokens;
      tokens has depth + 1 entries, the last being the count leaving the final block.
    """
    requested = parse_r(r, depth=depth)
    if strict is None:
        strict = isinstance(canonical(r), PerLayer)
    rs, tokens = [], [num_tokens]
    for layer, want in enumerate(requested):
        limit = max_r(tokens[-1], protected)
        if strict and want > limit:
            raise ValueError(f"r={want} cannot be met in block {layer}: it is entered by "
                             f"{tokens[-1]} tokens ({protected} protected), so at most {limit} "
                             "can be merged")
        rs.append(min(want, limit))
        tokens.append(tokens[-1] - rs[-1])
    return rs, tokens


def flops(variant: str | ViTSize, image_size: int, r: Schedule = 0, *, num_classes: int = 1000,
          num_prefix_tokens: int = 1, protected: int | None = None,
          channels: int = 3, dtem_dim: int = 0) -> float:
    """Analytic forward FLOPs (2 x multiply-accumulates) of one image.

    Counted the usual way: patch embedding, q/k/v projections, the two attention matmuls, the
    output projection, the MLP and the head. Merging happens between attention and MLP, so the
    MLP of block i sees tokens[i] - rs[i] tokens. Norms, softmax and the merge step itself are
    left out (they are a few percent at most).

    Args:
      variant: "B/16" or a `ViTSize`.
      image_size: square input resolution in pixels.
      r: merge schedule.
      num_classes: head size (0 for no head).
      num_prefix_tokens: class, distill and register tokens prepended to the patches.
      protected: tokens excluded from merging; defaults to num_prefix_tokens.
      dtem_dim: width of DTEM's merge embedding (0: none), a Dense on every block's tokens.
    """
    dims = decode_variant(variant) if isinstance(variant, str) else variant
    if image_size % dims.patch_size:
        raise ValueError(f"image size {image_size} is not divisible by patch {dims.patch_size}")
    num_patches = (image_size // dims.patch_size) ** 2
    protected = num_prefix_tokens if protected is None else protected
    rs, tokens = token_schedule(r, dims.depth, num_patches + num_prefix_tokens, protected)
    d, m = dims.width, dims.mlp_dim
    macs = num_patches * dims.patch_size ** 2 * channels * d
    for t, r_i in zip(tokens, rs, strict=False):
        macs += 3 * t * d * d      # q, k, v
        macs += t * d * dtem_dim   # DTEM's merge embedding
        macs += 2 * t * t * d      # q @ k^T and attn @ v
        macs += t * d * d          # output projection
        macs += 2 * (t - r_i) * d * m  # MLP, after the merge
    macs += d * num_classes
    return 2.0 * macs
