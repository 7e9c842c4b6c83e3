"""An independent NumPy re-derivation of ToMe's matching and merging, one example at a time:
the reference `tome_jax.merge` is tested against and `tome_jax.torch_reference` inserts into
timm's blocks.

Written from the algorithm's description (alternate A/B split, cosine scores, best partner per
A token, r best edges, size-weighted average), with explicit loops so it reads as the maths.
"""

from __future__ import annotations

import numpy as np

Positions = list[int]


def match(metric: np.ndarray, r: int, class_token: bool = True, distill_token: bool = False
          ) -> tuple[Positions, Positions, Positions]:
    """metric [T, C] -> (kept A positions, merged A positions best-first, their B partners)."""
    unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    a_pos, b_pos = list(range(0, len(unit), 2)), list(range(1, len(unit), 2))
    best_score, best_partner = [], []
    for i, ai in enumerate(a_pos):
        scores = []
        for j, bj in enumerate(b_pos):
            forbidden = (class_token and i == 0) or (distill_token and j == 0)
            scores.append(-np.inf if forbidden else float(unit[ai] @ unit[bj]))
        best_partner.append(int(np.argmax(scores)))
        best_score.append(max(scores))
    order = sorted(range(len(a_pos)), key=lambda i: -best_score[i])
    src = order[:r]
    kept = sorted(order[r:]) if class_token else order[r:]
    dst = [best_partner[i] for i in src]
    return kept, src, dst


def merge(x: np.ndarray, kept: Positions, src: Positions, dst: Positions, mode: str
          ) -> np.ndarray:
    """x [T, C] -> [T - r, C]: kept A tokens, then B tokens with their sources reduced in."""
    a, b = x[0::2], x[1::2]
    groups = {j: [b[j]] for j in range(len(b))}
    for i, j in zip(src, dst, strict=True):
        groups[j].append(a[i])
    reduce = {"sum": np.sum, "mean": np.mean, "max": np.max}[mode]
    merged_b = [reduce(np.stack(groups[j]), axis=0) for j in range(len(b))]
    return np.concatenate([a[kept], np.stack(merged_b)], axis=0)


def merge_wavg(x: np.ndarray, size: np.ndarray, kept: Positions, src: Positions,
               dst: Positions) -> tuple[np.ndarray, np.ndarray]:
    """Size-weighted average: sum x * size and size per group, then divide.

    x [T, C], size [T, 1] -> (x [T - r, C], size [T - r, 1]).
    """
    summed = merge(x * size, kept, src, dst, "sum")
    new_size = merge(size, kept, src, dst, "sum")
    return summed / new_size, new_size


def unmerge(y: np.ndarray, kept: Positions, src: Positions, dst: Positions,
            num_tokens: int) -> np.ndarray:
    """y [T - r, C] -> [T, C]: each original token takes the value of the token it went into."""
    out = np.zeros((num_tokens, y.shape[-1]), y.dtype)
    b = y[len(kept):]
    for j in range(len(b)):
        out[2 * j + 1] = b[j]
    for k, i in enumerate(kept):
        out[2 * i] = y[k]
    for i, j in zip(src, dst, strict=True):
        out[2 * i] = b[j]
    return out
