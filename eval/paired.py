"""Paired comparison of models on the same images: accuracy difference, 95% CI, McNemar's test.

    python -m eval.paired --data cifar10_jpeg --split test --r 11 \
        "ToMe (keys)=models/cifar10_vit" "DTEM modular=runs/dtem_model"

Two models evaluated on the same 10,000 images differ by less than the spread of either
accuracy alone (about +-0.9 points at 95% for 68% top-1): most images are right or wrong for
both. The paired view counts only the images where they disagree, so it tells a real
difference of a few tenths of a point from noise. The first model is the reference; each other
model is compared with it at the same r.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np


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
    """One row per compared model: top-1s, difference with 95% CI, discordant counts, p."""
    lines = [f"| model (vs {names[0]}, r = {r}) | top-1 | reference top-1 | difference "
             "(95% CI), points | right only here / only in reference | McNemar p |",
             "|---|---|---|---|---|---|"]
    for name, s in zip(names[1:], results, strict=True):
        lines.append(f"| {name} | {s['other']:.4f} | {s['ref']:.4f} | {100 * s['diff']:+.2f} "
                     f"({100 * s['ci_low']:+.2f} to {100 * s['ci_high']:+.2f}) | "
                     f"{s['only_other']} / {s['only_ref']} | {s['p']:.3g} |")
    return "\n".join(lines)


def labels_by_index(batches) -> dict[int, int]:
    """{example index: label} over every real (unmasked) example of `batches`."""
    labels = {}
    for batch in batches:
        keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)))
        labels.update(zip(np.asarray(batch["index"])[keep].tolist(),
                          np.asarray(batch["label"])[keep].tolist(), strict=True))
    return labels


def correct_by_index(model, params, batches, labels: dict[int, int]) -> np.ndarray:
    """[N] bool, top-1 right or not, ordered by example index; `labels` from labels_by_index."""
    from eval.evaluate import evaluate

    result = evaluate(model, params, batches, return_logits=True)
    if len(labels) != len(result["index"]) or -1 in labels:
        raise ValueError("the data must give each example a distinct index to pair models")
    truth = np.array([labels[i] for i in result["index"].tolist()])
    return result["logits"].argmax(-1) == truth


def main(argv: Sequence[str] | None = None) -> str:
    import tensorflow_datasets as tfds

    from eval.sweep import cache_batches
    from tome_jax import convert, data, sources
    from tome_jax.schedule import parse_schedule

    p = argparse.ArgumentParser(prog="python -m eval.paired", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="NAME=MODEL_DIR; the first is the reference")
    p.add_argument("--r", default="0", help="the schedule every model runs at")
    p.add_argument("--data", required=True, choices=sources.NAMES)
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--normalization", default="augreg", choices=tuple(data.NORMALIZATIONS))
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=None, help="also write the table to this .md file")
    args = p.parse_args(argv)
    named = [spec.rsplit("=", 1) for spec in args.models]  # names may hold "="
    if len(named) < 2 or any(len(pair) != 2 for pair in named):
        p.error("give at least two NAME=MODEL_DIR")
    tfds.display_progress_bar(False)

    correct, image_size, batches, labels = [], None, None, {}
    for _, path in named:
        model, params, image_hw = convert.load_converted(path, r=parse_schedule(args.r))
        size = (image_hw or (224, 224))[0]
        if image_size is None:
            image_size = size
            batches = cache_batches(
                data.make_dataset(args.data, args.split, batch_size=args.batch_size,
                                  image_size=size, normalization=args.normalization,
                                  data_dir=args.data_dir), size, 2 * 2 ** 30)
            labels = labels_by_index(batches)  # once: every model sees the same batches
        elif size != image_size:
            raise ValueError(f"{path} takes {size} px images, {named[0][1]} {image_size} px")
        correct.append(correct_by_index(model, params, batches, labels))
    results = [paired_difference(correct[0], c) for c in correct[1:]]
    table = format_markdown([name for name, _ in named], results, args.r)
    header = f"{args.data} {args.split}, {results[0]['n']} images, r = {args.r}"
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{header}\n\n{table}\n")
    print(header)
    print(table, flush=True)
    return table


if __name__ == "__main__":
    main()
