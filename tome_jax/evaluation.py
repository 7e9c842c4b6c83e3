"""Sharded top-1 / top-5 evaluation: one `jax.jit` over a data-parallel device mesh.

    batches = make_dataset("cifar10_jpeg", "test", batch_size=256, image_size=32)
    result = evaluate(model, params, batches)   # {"top1", "top5", "count", ...}

The batch is split over every device of every process and the parameters are replicated
(`tome_jax.sharding`). Padded examples (mask False: the last partial batch, or rows added so a
batch divides the device count) are excluded, so every example counts exactly once and the
result does not depend on the number of devices or processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax import sharding
from tome_jax.params import num_head_classes
from tome_jax.vit import ViT

Params = Any


def check_classes(model: ViT, params: Params, num_classes: int | None) -> None:
    """ValueError unless the model, its params and the data agree on the class count."""
    head = num_head_classes(params)
    if head is not None and head != model.num_classes:
        raise ValueError(f"the checkpoint's head has {head} classes but the model was built "
                         f"with num_classes={model.num_classes}")
    if num_classes is not None and model.num_classes != num_classes:
        raise ValueError(f"the model has {model.num_classes} classes but the data has "
                         f"{num_classes}; evaluate with a checkpoint trained on this dataset")


def make_eval_step(model: ViT, mesh: jax.sharding.Mesh, return_logits: bool = False):
    """jit(params, batch) -> (sums {"correct1", "correct5", "count"}, rows).

    batch: {"image" [B, H, W, 3], "label" [B], "mask" [B], "index" [B]} sharded over the mesh.
    The sums are replicated scalars. rows is {} or, with return_logits, {"logits" [B, C],
    "mask" [B], "index" [B]} replicated, so every process can read the whole global batch.
    """
    def step(params, batch):
        logits, _ = model.apply({"params": params}, batch["image"])
        k = min(5, logits.shape[-1])
        _, top = jax.lax.top_k(logits, k)
        hit = top == batch["label"][:, None]
        mask = batch["mask"]
        sums = {"correct1": jnp.sum(hit[:, 0] & mask), "correct5": jnp.sum(hit.any(-1) & mask),
                "count": jnp.sum(mask)}
        sums = jax.tree.map(lambda s: s.astype(jnp.int32), sums)
        rows = ({"logits": logits, "mask": mask, "index": batch["index"]} if return_logits
                else {})
        return sums, rows

    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep))


def evaluate(model: ViT, params: Params, batches: Iterable[dict[str, np.ndarray]], *,
             mesh: jax.sharding.Mesh | None = None, num_classes: int | None = None,
             return_logits: bool = False) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of `model` over `batches` (this process's share of each batch).

    batches: numpy dicts with "image" [b, H, W, 3], "label" [b] and optionally "mask" [b]
      (False rows are ignored) and "index" [b] (the example's id; needed to order logits).
      Every process must yield the same number of batches of the same b (as
      `tome_jax.data.make_dataset` does). `num_classes` defaults to `batches.num_classes`.
    mesh: default `sharding.batch_mesh()` (all devices of all processes).
    Returns {"top1", "top5" (fractions), "count", "correct1", "correct5", "num_batches",
      "seconds", "images_per_s", "warm_images_per_s"} and, with return_logits, "logits"
      [count, C] float32 and "index" [count] sorted by index (arrival order without "index").
    """
    mesh = mesh or sharding.batch_mesh()
    if num_classes is None:
        num_classes = getattr(batches, "num_classes", None)
    check_classes(model, params, num_classes)
    params = sharding.replicate(params, mesh)
    step = make_eval_step(model, mesh, return_logits)
    multiple = sharding.local_multiple(mesh)

    totals, num_batches, kept = None, 0, []
    start = time.perf_counter()
    for batch in batches:
        batch = {k: np.asarray(v) for k, v in batch.items()
                 if k in ("image", "label", "mask", "index")}
        size = len(batch["label"])
        batch.setdefault("mask", np.ones(size, bool))
        batch.setdefault("index", np.full(size, -1, np.int32))
        labels = batch["label"][batch["mask"]]
        if labels.size and (labels.min() < 0 or labels.max() >= model.num_classes):
            raise ValueError(f"labels {int(labels.min())}..{int(labels.max())} are outside the "
                             f"model's {model.num_classes} classes")
        sums, rows = step(params, sharding.global_batch(sharding.pad_batch(batch, multiple),
                                                        mesh))
        if totals is None:  # the first step compiles; time the rest separately
            totals = jax.block_until_ready(sums)
            warm_start, warm_count = time.perf_counter(), int(sharding.to_host(sums["count"]))
        else:
            totals = jax.tree.map(jnp.add, totals, sums)
        if return_logits:
            kept.append({k: sharding.to_host(v) for k, v in rows.items()})
        num_batches += 1
    if totals is None:
        raise ValueError("no batches to evaluate")
    totals = {k: int(sharding.to_host(v)) for k, v in totals.items()}
    seconds = time.perf_counter() - start
    count = totals["count"]
    result = {"top1": totals["correct1"] / max(count, 1),
              "top5": totals["correct5"] / max(count, 1), **totals,
              "num_batches": num_batches, "seconds": seconds,
              "images_per_s": count / seconds,
              # Throughput without the first (compiling) step; None with a single batch.
              "warm_images_per_s": (count - warm_count) / (time.perf_counter() - warm_start)
              if num_batches > 1 else None}
    if return_logits:
        rows = {k: np.concatenate([r[k] for r in kept]) for k in kept[0]}
        logits, index = rows["logits"][rows["mask"]], rows["index"][rows["mask"]]
        order = np.argsort(index, kind="stable")  # all -1 without ids: arrival order
        result.update(logits=logits[order], index=index[order])
    return result
