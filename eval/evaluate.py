"""Sharded top-1 / top-5 evaluation: one `jax.jit` over a data-parallel device mesh.

    batches = make_dataset("cifar10_jpeg", "test", batch_size=256, image_size=32)
    result = evaluate(model, params, batches)   # {"top1", "top5", "count", ...}

The batch is split over every device of every process and the parameters are replicated
(`tome_jax.sharding`). Padded examples (mask False: the last partial batch, or rows added so a
batch divides the device count) are excluded, so every example counts exactly once and the
result does not depend on the number of devices or processes.

CLI (random weights unless a checkpoint is given):

    python -m eval.evaluate --data cifar10_jpeg --split test --variant mu/4 --r 2 \
        --image-size 32 --batch-size 256 [--report-rss] [--json]

Multi-process: add `--coordinator localhost:PORT --num-processes N --process-id I` to each
process (CPU processes talk through gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax import convert, sharding
from tome_jax.schedule import parse_schedule
from tome_jax.vit import ViT

Params = Any
# (checkpoint path, model) -> params. The converter (tome_jax.convert*) plugs in here; the
# default reads a params pytree saved with orbax (a dict with "params" is unwrapped).
ParamsLoader = Callable[[str, ViT], Params]


def num_head_classes(params: Params) -> int | None:
    """Output classes of a params tree's `head` (None: no head)."""
    kernel = params.get("head", {}).get("kernel") if hasattr(params, "get") else None
    return None if kernel is None else int(kernel.shape[-1])


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


# ---------------------------------------------------------------------------------------------
# CLI


def parse_r(text: str):
    """"8" -> 8; "8,-1" -> (8, -1.0) (r, inflect); "[8,8,4]" -> per layer (`parse_schedule`)."""
    try:
        return parse_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def random_params(model: ViT, image_size: int, seed: int = 0) -> Params:
    """Random weights for smoke tests and benchmarks: N(0, 0.02), LayerNorm scales 1 + N(0, 0.02).

    Drawn with numpy from the shapes alone: nothing is compiled (a jitted or op-by-op
    `model.init` costs seconds to tens of seconds on CPU), and every process and device count
    gets the same values.
    """
    x = jax.ShapeDtypeStruct((1, image_size, image_size, model.channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        value = rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype)
        return value + 1 if getattr(path[-1], "key", None) == "scale" else value

    return jax.tree_util.tree_map_with_path(draw, shapes)


def load_orbax_params(path: str, model: ViT) -> Params:
    """Default `ParamsLoader`: an orbax-saved params pytree (or a dict holding "params")."""
    del model
    import orbax.checkpoint as ocp

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
    return tree.get("params", tree) if isinstance(tree, dict) else tree


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_parser() -> argparse.ArgumentParser:
    from tome_jax import data, sources

    p = argparse.ArgumentParser(prog="python -m eval.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, choices=sources.NAMES)
    p.add_argument("--split", default=None, help="tfds split spec; default the eval split")
    p.add_argument("--data-dir", default=None, help="source location (see tome_jax.sources)")
    p.add_argument("--normalization", default="augreg", choices=tuple(data.NORMALIZATIONS))
    p.add_argument("--eval-crop", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None,
                   help="default: a converted checkpoint's, else 224")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--variant", default="B/16")
    p.add_argument("--r", type=parse_r, default=0,
                   help="ToMe r: 8 | 8,-1 (r, inflect) | [8,8,4] (per layer)")
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--mlp-dim", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--pool", default="tok")
    p.add_argument("--num-classes", type=int, default=None,
                   help="model classes; default the dataset's")
    p.add_argument("--checkpoint", default=None,
                   help="a model directory (tome_jax.convert / train.ship: its config fixes "
                        "the architecture and image size) or an orbax params tree; default "
                        "random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--report-rss", action="store_true", help="print peak host RSS (MiB)")
    p.add_argument("--dump-logits", default=None, help="save logits/index (.npz, process 0)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--coordinator", default=None,
                   help="host:port for multi-process runs, or 'auto' (Cloud TPU pods, Slurm)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    return p


def main(argv: list[str] | None = None, load_params: ParamsLoader | None = None) -> dict:
    """Runs the CLI; returns the result dict. load_params: how to read --checkpoint."""
    args = build_parser().parse_args(argv)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import tensorflow_datasets as tfds

    from tome_jax import data

    tfds.display_progress_bar(False)
    split = args.split or data.EVAL_SPLITS.get(args.data, "test")
    converted = args.checkpoint and load_params is None and os.path.isfile(
        os.path.join(args.checkpoint, convert.CONFIG_FILE))
    if converted:  # the directory knows its model and image size
        model, params, image_hw = convert.load_converted(args.checkpoint, r=args.r)
        image_size = image_hw[0] if image_hw else (args.image_size or 224)
        if args.image_size and args.image_size != image_size:  # posembs fit one grid only
            raise ValueError(f"{args.checkpoint} was converted for {image_size} px, not "
                             f"{args.image_size}; convert again with --image-size")
    else:
        image_size = args.image_size or 224
    batches = data.make_dataset(args.data, split, batch_size=args.batch_size,
                                image_size=image_size, normalization=args.normalization,
                                data_dir=args.data_dir, eval_crop=args.eval_crop)
    num_classes = args.num_classes or batches.num_classes
    if not converted:
        model = ViT(variant=args.variant, num_classes=num_classes, r=args.r, width=args.width,
                    depth=args.depth, mlp_dim=args.mlp_dim, num_heads=args.num_heads,
                    pool=args.pool)
    if args.checkpoint and not converted:
        params = (load_params or load_orbax_params)(args.checkpoint, model)
    elif not args.checkpoint:
        params = random_params(model, image_size, args.seed)
    result = evaluate(model, params, batches, return_logits=bool(args.dump_logits))
    result.update(data=args.data, split=split, devices=jax.device_count(),
                  processes=jax.process_count(), batch_size=args.batch_size,
                  gflops_per_image=model.flops(image_size) / 1e9)
    if args.report_rss:
        result["peak_rss_mib"] = peak_rss_mib()
        result["batch_mib"] = batches.batch_size * image_size ** 2 * 3 * 4 / 2 ** 20
    if args.dump_logits and jax.process_index() == 0:
        np.savez(args.dump_logits, logits=result["logits"], index=result["index"])
    result.pop("logits", None)
    result.pop("index", None)
    if jax.process_index() == 0:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{args.data} {split}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} "
                  f"over {result['count']} examples ({result['images_per_s']:.0f} img/s, "
                  f"{result['devices']} devices, {result['processes']} processes)", flush=True)
            if args.report_rss:
                print(f"peak RSS {result['peak_rss_mib']:.0f} MiB "
                      f"(one batch of images: {result['batch_mib']:.1f} MiB)", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
