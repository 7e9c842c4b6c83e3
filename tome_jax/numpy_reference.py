"""An independent NumPy re-derivation of ToMe's matching and merging, one example at a time:
the reference `tome_jax.merge` is tested against and `tome_jax.torch_reference` inserts into
timm's blocks; and of DTEM's soft training merge in its authors' token order, the reference
`tome_jax.dtem` is tested against.

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


# --- DTEM's training path (soft grouping, soft merging) in the authors' token order ----------


def dtem_soft_top_r(scores: np.ndarray, r: int, k: int = 3, tau1: float = 0.1,
                    tau2: float = 0.1, eps: float = 1e-6) -> np.ndarray:
    """scores [Na, Nb] (cosine, A rows to B columns) -> soft assignment [Na, Nb].

    Each A row keeps its k best B columns, scaled by 1 / tau1. r times: one softmax over all
    kept (row, column) pairs at temperature tau2 adds its probabilities to the assignment, and
    each row's logits drop by log(1 - the mass it just took), floored at eps. Rows holding more
    than 1 in total are scaled down to 1.
    """
    num_a, num_b = scores.shape
    k = min(k, num_b)
    columns = [list(np.argsort(-scores[i], kind="stable")[:k]) for i in range(num_a)]
    z = np.array([[scores[i, j] / tau1 for j in columns[i]] for i in range(num_a)])
    taken = np.zeros_like(z)
    for _ in range(r):
        logits = z.ravel() / tau2
        p = np.exp(logits - logits.max())
        p = (p / p.sum()).reshape(z.shape)
        taken += p
        z = z + np.log(np.maximum(1.0 - p.sum(axis=1, keepdims=True), eps))
    taken /= np.maximum(taken.sum(axis=1, keepdims=True), 1.0)
    assign = np.zeros((num_a, num_b))
    for i in range(num_a):
        for c, j in enumerate(columns[i]):
            assign[i, j] += taken[i, c]
    return assign


def dtem_soft_block(x: np.ndarray, size: np.ndarray, embedding: np.ndarray, n: int, r: int,
                    k: int = 3, tau1: float = 0.1, tau2: float = 0.1
                    ) -> tuple[np.ndarray, np.ndarray, int, list[int]]:
    """One block's soft merge as the authors' training code does it, tokens moving.

    x [T, C], size [T], embedding [T, Cm] (the merge metric). Token 0 is the class token;
    tokens 1 .. n-1 take part; tokens n .. T-1 left matching in earlier blocks and stay put.
    A = tokens 1, 3, 5, ..., B = tokens 2, 4, 6, ... of the first n. A token gives away the
    fraction of its size its assignment row holds (clipped to [0, 1]); a B token receives that
    size and the size-weighted average of the features. Then A's and B's tokens, in that order,
    are sorted by size, largest first (ties keep that order), so the r smallest come last and
    leave matching.

    Returns (x [T, C], size [T], n - r, perm): perm[t] is the input index of output token t.
    """
    a, b = list(range(1, n, 2)), list(range(2, n, 2))
    unit = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
    assign = dtem_soft_top_r(unit[a] @ unit[b].T, r, k, tau1, tau2)
    x, size = x.astype(np.float64), size.astype(np.float64)
    new_x, new_size = x.copy(), size.copy()
    for j, bj in enumerate(b):
        given = [assign[i, j] * size[ai] for i, ai in enumerate(a)]
        new_size[bj] = size[bj] + sum(given)
        new_x[bj] = (size[bj] * x[bj] + sum(g * x[ai] for g, ai in zip(given, a, strict=True))
                     ) / new_size[bj]
    for i, ai in enumerate(a):
        new_size[ai] = size[ai] * min(max(1.0 - assign[i].sum(), 0.0), 1.0)
    grouped = a + b
    ranked = sorted(grouped, key=lambda t: -new_size[t])  # sorted() is stable
    perm = [0] + ranked + list(range(n, len(x)))
    return new_x[perm], new_size[perm], n - r, perm
