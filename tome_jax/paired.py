"""Paired comparison of models on the same images: accuracy difference, 95% CI, McNemar's test.

    labels = labels_by_index(batches)
    ref, other = (correct_by_index(m, p, batches, labels) for m, p in models)
    s = paired_difference(ref, other)     # {"diff", "ci_low", "ci_high", "p", ...}

Two models evaluated on the same 10,000 images differ by less than the spread of either
accuracy alone (about +-0.9 points at 95% for 68% top-1): most images are right or wrong for
both. The paired view counts only the images where they disagree, so it tells a real
difference of a few tenths of a point from noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tome_jax.evaluation import evaluate
from tome_jax.tables import markdown_table


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b vs c discordant pairs (binomial, p = 1/2)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integers; int / int rounds once


def paired_difference(ref_correct: np.ndarray, other_correct: np.ndarray) -> dict[str, float]:
    """Accuracy difference other - ref over the same examples, with its spread.

    ref_correct, other_correct: [N] bool, example i of both is the same image.
    Returns {"ref", "other", "diff", "ci_low", "ci_high" (normal 95% CI of the paired mean),
    "only_ref" (b: right only for ref), "only_other" (c), "p" (exact McNemar), "n"}.
    """
    ref, other = np.asarray(ref_correct, bool), np.asarray(other_correct, bool)
    if ref.shape != other.shape or ref.ndim != 1 or not ref.size:
        raise ValueError(f"need two [N] vectors over the same N > 0 examples, got {ref.shape} "
                         f"and {other.shape}")
    d = other.astype(np.float64) - ref
    n = d.size
    half = 1.96 * (d.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0)
    b, c = int(np.sum(ref & ~other)), int(np.sum(other & ~ref))
    return {"ref": float(ref.mean()), "other": float(other.mean()), "diff": float(d.mean()),
            "ci_low": float(d.mean() - half), "ci_high": float(d.mean() + half),
            "only_ref": b, "only_other": c, "p": mcnemar_exact_p(b, c), "n": n}


def format_markdown(names: Sequence[str], results: Sequence[dict[str, float]], r: str) -> str:
    """One row per compared model (names[1:]) against names[0]: top-1s, difference with 95% CI,
    discordant counts, p. r: the schedule as text, for the header."""
    header = [f"model (vs {names[0]}, r = {r})", "top-1", "reference top-1",
              "difference (95% CI), points", "right only here / only in reference", "McNemar p"]
    rows = [[name, f"{s['other']:.4f}", f"{s['ref']:.4f}",
             f"{100 * s['diff']:+.2f} ({100 * s['ci_low']:+.2f} to {100 * s['ci_high']:+.2f})",
             f"{s['only_other']} / {s['only_ref']}", f"{s['p']:.3g}"]
            for name, s in zip(names[1:], results, strict=True)]
    return markdown_table(header, rows)


def labels_by_index(batches: Iterable[dict[str, np.ndarray]]) -> dict[int, int]:
    """{example index: label} over every real (unmasked) example of `batches`."""
    labels = {}
    for batch in batches:
        keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)))
        labels.update(zip(np.asarray(batch["index"])[keep].tolist(),
                          np.asarray(batch["label"])[keep].tolist(), strict=True))
    return labels


def correct_by_index(model: Any, params: Any, batches: Iterable[dict[str, np.ndarray]],
                     labels: dict[int, int]) -> np.ndarray:
    """[N] bool, top-1 right or not, ordered by example index; `labels` from labels_by_index."""
    result = evaluate(model, params, batches, return_logits=True)
    if len(labels) != len(result["index"]) or -1 in labels:
        raise ValueError("the data must give each example a distinct index to pair models")
    truth = np.array([labels[i] for i in result["index"].tolist()])
    return result["logits"].argmax(-1) == truth
