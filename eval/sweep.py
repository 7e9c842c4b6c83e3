"""Accuracy (or feature fidelity) against cost over a list of r schedules and token strategies.

    python -m eval.sweep --checkpoint /tmp/dinov2_s14 --data imagenet_sample \
        --normalization imagenet --image-size 224 --batch-size 25 --fidelity \
        --r 0 2 4 8 16 --method tome random prune --out docs/dinov2_sweep

For every (method, r) it reports tokens left, GFLOPs (2 x MACs), top-1 / top-5 accuracy
(`eval.evaluate.evaluate`, sharded over all devices) when the model has a head the data's
size, with `--fidelity` the cosine similarity of each image's final features (`pre_logits`)
to the r = 0 features (mean and min over images), and images/s of the jitted forward on one
batch (median of `--runs` timed runs after warm-up, interleaved over all configurations so
machine drift hits them alike), with the speed-up over r = 0. Writes OUT.csv, OUT.md and
OUT.png (quality against im/s and against GFLOPs, one line per method).

Methods ("strategy" of `tome_jax.vit.ViT`): "tome" (ToMe), "random" (the same bipartite merge
with random pairs) and "prune" (drop the r tokens the class token attends to least). All three
leave the same token counts at the same r, so same r means same FLOPs; r = 0 is one shared row.

Weights: `--checkpoint DIR` (written by `python -m tome_jax.convert`) or `--variant X/P
--random-init` for smoke tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eval import evaluate as ev
from eval.benchmark import compile_and_time, parse_schedule, time_once
from tome_jax import sharding
from tome_jax.schedule import Schedule
from tome_jax.vit import ViT

METHODS = ("tome", "random", "prune")
Params = Any
Row = dict[str, Any]
# Columns of the CSV, in order; a value that was not measured is left empty.
COLUMNS = ("method", "r", "tokens", "gflops", "flops_speedup", "top1", "top5", "fid_mean",
           "fid_min", "im_s", "speedup", "compile_s")


# ---------------------------------------------------------------------------------------------
# Progress


def progress(items: Iterable, desc: str, total: int | None = None,
             enabled: bool = True) -> Iterator:
    """`tqdm` on stderr when it is installed and enabled, the bare iterable otherwise."""
    if not enabled:
        return iter(items)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: it arrives with tensorflow-datasets
        return iter(items)
    return iter(tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True))


# ---------------------------------------------------------------------------------------------
# Pure helpers


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validates and de-duplicates method names (order kept); ValueError on an unknown one."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected any of {METHODS}")
    if not methods:
        raise ValueError(f"no method given; expected any of {METHODS}")
    return list(dict.fromkeys(methods))


def with_strategy(model: ViT, method: str, r: Schedule) -> ViT:
    """The model at schedule r with token strategy `method` ("tome" needs no strategy field)."""
    if method == "tome" and "strategy" not in model.__dataclass_fields__:
        return model.clone(r=r)
    if "strategy" not in model.__dataclass_fields__:
        raise ValueError(f"method {method!r} needs tome_jax.vit.ViT's `strategy` field, which "
                         "this version of the model lacks")
    return model.clone(r=r, strategy=method)


def plan(model: ViT, image_size: int, schedules: Sequence[Schedule],
         methods: Sequence[str]) -> list[tuple[str, Schedule]]:
    """(method, r) pairs to run; schedules that merge nothing collapse into one ("-", r) pair.

    r = 0 (or any schedule that merges nothing at this resolution) is the same network for
    every method, so it runs once; it is always first, as the reference of speed-ups and
    fidelity (r = 0 is added when the list lacks it).
    """
    idle = [r for r in schedules if not any(model.clone(r=r).token_schedule(image_size)[0])]
    pairs = [("-", idle[0] if idle else 0)]
    for method in methods:
        pairs += [(method, r) for r in schedules if r not in idle]
    return pairs


def cosine_fidelity(feats: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Per-image cosine similarity of feats [N, D] to ref [N, D] -> (mean, min) over images."""
    if feats.shape != ref.shape:
        raise ValueError(f"feature shapes differ: {feats.shape} vs {ref.shape}")
    a, b = feats.astype(np.float64), ref.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = num / np.maximum(den, 1e-12)
    return float(cos.mean()), float(cos.min())


def add_speedups(rows: list[Row]) -> list[Row]:
    """Speed-ups against rows[0] (the r = 0 row): measured (im/s) and FLOPs-limit."""
    base = rows[0]
    for row in rows:
        row["flops_speedup"] = base["gflops"] / row["gflops"]
        if row.get("im_s") is not None and base.get("im_s"):
            row["speedup"] = row["im_s"] / base["im_s"]
    return rows


def schedule_text(r: Schedule) -> str:
    """A schedule as `parse_schedule` reads it: 8, "8,-1" (r, inflect), "[8,8,4]" per layer."""
    if isinstance(r, list):
        return "[" + ",".join(str(v) for v in r) + "]"
    if isinstance(r, tuple):
        return f"{r[0]},{r[1]:g}"
    return str(r)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table; columns nobody measured are left out."""
    cols = [("method", "method", "s"), ("r", "r", "s"), ("tokens", "tokens left", "d"),
            ("gflops", "GFLOPs", ".4g"), ("flops_speedup", "FLOPs-limit speed-up", ".2f"),
            ("top1", "top-1", ".4f"), ("top5", "top-5", ".4f"),
            ("fid_mean", "cos fidelity mean", ".4f"), ("fid_min", "cos fidelity min", ".4f"),
            ("im_s", "im/s", ".1f"), ("speedup", "measured speed-up", ".2f")]
    cols = [c for c in cols if any(row.get(c[0]) is not None for row in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for key, _, spec in cols:
            value = row.get(key)
            text = _fmt(value, spec)
            if key in ("flops_speedup", "speedup") and value is not None:
                text += "x"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: str | Path) -> None:
    """One line per row, `COLUMNS` in order; unmeasured values empty."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row[c] for c in COLUMNS])


def read_csv(path: str | Path) -> list[Row]:
    """Rows back from `write_csv` (numbers as floats, tokens as int, empty cells None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key in ("method", "r"):
                continue
            row[key] = None if value == "" else (int(value) if key == "tokens" else float(value))
    return rows


def plot(rows: list[Row], path: str | Path, title: str = "") -> None:
    """quality vs im/s and vs GFLOPs, one line per method through the shared r = 0 point."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps tests headless
    import matplotlib.pyplot as plt

    key = "top1" if rows[0].get("top1") is not None else "fid_mean"
    label = "top-1 accuracy" if key == "top1" else "cosine similarity to r = 0 features"
    xs = [("im_s", "images / s (measured)"), ("gflops", "GFLOPs per image")]
    xs = [x for x in xs if rows[0].get(x[0]) is not None]
    fig, axes = plt.subplots(1, len(xs), figsize=(6 * len(xs), 4.5), squeeze=False)
    base = rows[0]
    methods = list(dict.fromkeys(row["method"] for row in rows[1:])) or ["-"]
    for ax, (x, xlabel) in zip(axes[0], xs, strict=True):
        for method in methods:
            line = [base] + [row for row in rows[1:] if row["method"] == method]
            (drawn,) = ax.plot([row[x] for row in line], [row[key] for row in line], "o-",
                               label=method)
            if key == "fid_mean":  # the worst image too: a mean can hide a few broken ones
                ax.plot([row[x] for row in line], [row["fid_min"] for row in line], "x--",
                        color=drawn.get_color(), alpha=0.5, label=f"{method} (min)")
            for row in line:
                ax.annotate(str(row["r"]), (row[x], row[key]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(title="method (labels: r)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Measurements


def cache_batches(batches: Iterable[dict[str, np.ndarray]], image_size: int,
                  limit_bytes: float) -> Iterable[dict[str, np.ndarray]]:
    """The batches as a list when their images fit in limit_bytes, else the re-iterable as is.

    A sweep reads the data once per configuration; decoding JPEGs each time costs more than
    the forward of a small model.
    """
    n = getattr(batches, "num_batches", None)
    b = getattr(batches, "batch_size", None)
    if n is None or b is None or n * b * image_size ** 2 * 3 * 4 > limit_bytes:
        return batches
    return [{k: np.asarray(v) for k, v in batch.items()} for batch in batches]


def extract_features(model: ViT, params: Params, batches: Iterable[dict[str, np.ndarray]],
                     mesh: jax.sharding.Mesh | None = None, show: bool = True) -> np.ndarray:
    """Final features `out["pre_logits"]` [N, D] float32 of the unmasked examples, in order.

    batches: {"image" [b, H, W, 3], optional "mask" [b]}, sharded over `mesh` like `evaluate`.
    """
    mesh = mesh or sharding.batch_mesh()
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    def fn(p, images, mask):
        feats = model.apply({"params": p}, images)[1]["pre_logits"].astype(jnp.float32)
        return feats, mask

    # Replicated outputs: every process sees the whole global batch, in process order.
    step = jax.jit(fn, in_shardings=(rep, data, data), out_shardings=(rep, rep))
    params = sharding.replicate(params, mesh)
    out = []
    for batch in progress(batches, "features", total=_len(batches), enabled=show):
        images = np.asarray(batch["image"])
        mask = np.asarray(batch.get("mask", np.ones(len(images), bool)))
        padded = sharding.pad_batch({"image": images, "mask": mask},
                                    sharding.local_multiple(mesh))
        g = sharding.global_batch(padded, mesh)
        feats, keep = step(params, g["image"], g["mask"])
        out.append(sharding.to_host(feats)[sharding.to_host(keep)])
    if not out:
        raise ValueError("no batches to extract features from")
    return np.concatenate(out)


def _len(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def time_forwards(models: Sequence[ViT], params: Params, images: jax.Array, runs: int,
                  warmup: int, show: bool = True) -> list[tuple[float, float]]:
    """(compile seconds, median forward seconds) per model on images [B, H, W, C].

    Compiles everything first, then runs the models in turn `runs` times, so slow drift in the
    machine's load is shared by all of them instead of biasing the last ones.
    """
    compiled, compile_s = [], []
    for model in progress(models, "compile", enabled=show):
        fn, secs = compile_and_time(lambda p, x, m=model: m.apply({"params": p}, x)[0],
                                    (params, images))
        for _ in range(warmup):
            time_once(fn, (params, images))
        compiled.append(fn)
        compile_s.append(secs)
    times: list[list[float]] = [[] for _ in models]
    for _ in progress(range(runs), "timing", enabled=show):
        for i, fn in enumerate(compiled):
            times[i].append(time_once(fn, (params, images)))
    return [(c, statistics.median(t)) for c, t in zip(compile_s, times, strict=True)]


def sweep(model: ViT, params: Params, batches: Iterable[dict[str, np.ndarray]], *,
          image_size: int, schedules: Sequence[Schedule], methods: Sequence[str] = ("tome",),
          accuracy: bool = True, fidelity: bool = False, num_classes: int | None = None,
          runs: int = 5, warmup: int = 1, time_batch: int | None = None,
          show: bool = True) -> list[Row]:
    """Evaluates every (method, r) of `plan`; returns one row dict per configuration.

    model: any ViT (its own r and strategy are ignored). batches: re-iterable numpy batches
      (`tome_jax.data.make_dataset`); num_classes defaults to `batches.num_classes`.
    accuracy: top-1 / top-5 through `eval.evaluate.evaluate` (needs a head of num_classes).
    fidelity: cosine similarity of `pre_logits` to the r = 0 row's, per image.
    time_batch: rows of the timed batch (default the first data batch's size); runs = 0 skips
      timing.
    Rows: method, r (text), schedule, tokens, gflops, flops_speedup, top1, top5, fid_mean,
      fid_min, im_s, speedup, compile_s (None where not measured).
    """
    methods = check_methods(methods)
    if not accuracy and not fidelity and runs < 1:
        raise ValueError("nothing to measure: enable accuracy, fidelity or timing")
    if num_classes is None:
        num_classes = getattr(batches, "num_classes", None)
    if accuracy:
        if not model.num_classes:
            raise ValueError("the model has no classification head (num_classes=0), so it has "
                             "no accuracy; use --fidelity for a backbone")
        ev.check_classes(model, params, num_classes)
    pairs = plan(model, image_size, schedules, methods)
    models = [with_strategy(model, m, r) if m != "-" else model.clone(r=r) for m, r in pairs]
    for m in models:  # fail on a bad config (e.g. prune without a class token) before any work
        m.check((1, image_size, image_size, model.channels))

    rows = []
    for (method, r), m in zip(pairs, models, strict=True):
        rows.append(dict(method=method, r=schedule_text(r), schedule=r,
                         tokens=m.token_schedule(image_size)[1][-1],
                         gflops=m.flops(image_size) / 1e9, top1=None, top5=None,
                         fid_mean=None, fid_min=None, im_s=None, speedup=None,
                         compile_s=None))

    ref = None
    for row, m in progress(list(zip(rows, models, strict=True)), "configs", enabled=show):
        if accuracy:
            res = ev.evaluate(m, params, batches, num_classes=num_classes)
            row.update(top1=res["top1"], top5=res["top5"], count=res["count"])
        if fidelity:
            feats = extract_features(m, params, batches, show=show)
            ref = feats if ref is None else ref  # rows[0] is the r = 0 reference
            row["fid_mean"], row["fid_min"] = cosine_fidelity(feats, ref)
            row["count"] = len(feats)

    if runs > 0:
        first = next(iter(batches))["image"]
        n = time_batch or len(first)
        images = np.resize(np.asarray(first), (n,) + first.shape[1:])  # repeats rows if n > b
        images = jnp.asarray(images, model.dtype)
        for row, (compile_s, secs) in zip(
                rows, time_forwards(models, params, images, runs, warmup, show), strict=True):
            row.update(im_s=n / secs, compile_s=compile_s, seconds=secs)
    return add_speedups(rows)


def summary(rows: list[Row], seconds: float) -> str:
    """One line: configurations, time, and the largest-r row of each method against r = 0."""
    parts = [f"{len(rows)} configurations in {seconds:.0f} s"]
    base = rows[0]
    for method in dict.fromkeys(row["method"] for row in rows[1:]):
        last = [row for row in rows if row["method"] == method][-1]
        bits = [f"{method} r={last['r']}: {last['gflops']:.4g} GFLOPs "
                f"({last['flops_speedup']:.2f}x fewer)"]
        if last.get("speedup") is not None:
            bits.append(f"{last['speedup']:.2f}x im/s")
        if last.get("top1") is not None:
            bits.append(f"top-1 {last['top1']:.4f} (r=0 {base['top1']:.4f})")
        if last.get("fid_mean") is not None:
            bits.append(f"fidelity {last['fid_mean']:.4f}")
        parts.append(", ".join(bits))
    return "sweep done: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from tome_jax import data, sources

    p = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="directory written by python -m tome_jax.convert")
    weights.add_argument("--random-init", action="store_true",
                         help="random weights of --variant (smoke tests)")
    p.add_argument("--variant", default="B/16", help="with --random-init")
    p.add_argument("--num-classes", type=int, default=None,
                   help="with --random-init: head size (default the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--data", required=True, choices=sources.NAMES)
    p.add_argument("--split", default=None, help="tfds split spec; default the eval split")
    p.add_argument("--data-dir", default=None, help="source location (see tome_jax.sources)")
    p.add_argument("--normalization", default="augreg", choices=tuple(data.NORMALIZATIONS))
    p.add_argument("--eval-crop", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the checkpoint's, else 224")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--r", nargs="+", default=["0", "4", "8", "12", "16"],
                   help="schedules: 16, 16,-1 (r, inflect) or [8,8,4] per layer")
    p.add_argument("--method", nargs="+", default=["tome"],
                   help=f"any of {' '.join(METHODS)}")
    p.add_argument("--fidelity", action="store_true",
                   help="cosine similarity of final features to r = 0 (unlabelled data)")
    p.add_argument("--no-accuracy", action="store_true",
                   help="skip top-1/top-5 (implied for a model without a head)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--runs", type=int, default=5, help="timed runs per config (0: no timing)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--time-batch", type=int, default=None,
                   help="images per timed forward (default --batch-size)")
    p.add_argument("--cache-mib", type=float, default=2048,
                   help="keep decoded batches in memory up to this size")
    p.add_argument("--out", default="sweep_results/sweep",
                   help="output prefix: writes OUT.csv, OUT.md, OUT.png")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    return p


def load_checkpoint(path: str | Path) -> tuple[ViT, Params, int]:
    """(model, params, image size it was converted for) from a `tome_jax.convert` directory."""
    from tome_jax import convert

    model, params, image_hw = convert.load_converted(path)
    return model, params, (image_hw or (224, 224))[0]


def run(args: argparse.Namespace) -> list[Row]:
    """The CLI's work: loads data and weights, sweeps, writes OUT.{csv,md,png}; returns rows."""
    import tensorflow_datasets as tfds

    from tome_jax import data

    methods = check_methods(args.method)  # before any slow loading
    schedules = [parse_schedule(s) for s in args.r]
    tfds.display_progress_bar(False)
    split = args.split or data.EVAL_SPLITS.get(args.data, "test")
    if args.checkpoint:  # first: it knows the image size
        model, params, converted = load_checkpoint(args.checkpoint)
        image_size = args.image_size or converted
        if image_size != converted:  # the position embeddings fit one grid only
            raise ValueError(f"{args.checkpoint} was converted for {converted} px, not "
                             f"{image_size}; convert again with python -m tome_jax.convert "
                             f"... --image-size {image_size}")
    else:
        image_size = args.image_size or 224
    batches = data.make_dataset(args.data, split, batch_size=args.batch_size,
                                image_size=image_size, normalization=args.normalization,
                                data_dir=args.data_dir, eval_crop=args.eval_crop)
    num_classes = batches.num_classes
    if not args.checkpoint:
        classes = args.num_classes if args.num_classes is not None else (num_classes or 0)
        model = ViT(variant=args.variant, num_classes=classes)
        params = ev.random_params(model, image_size, args.seed)
    model = model.clone(dtype=jnp.dtype(args.dtype))
    accuracy = not args.no_accuracy and bool(model.num_classes)
    if not accuracy and not args.fidelity:
        raise ValueError("the model has no classification head (num_classes=0): pass "
                         "--fidelity to compare features")
    num_classes = batches.num_classes
    if accuracy:
        ev.check_classes(model, params, num_classes)  # fail before the slow part
    cached = cache_batches(batches, image_size, args.cache_mib * 2 ** 20)
    start = time.perf_counter()
    rows = sweep(model, params, cached, image_size=image_size, schedules=schedules,
                 methods=methods, accuracy=accuracy, fidelity=args.fidelity,
                 num_classes=num_classes, runs=args.runs, warmup=args.warmup,
                 time_batch=args.time_batch, show=not args.no_progress)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    name = args.checkpoint or f"random {args.variant}"
    title = args.title or (f"{name}, {args.data} {split} ({rows[0].get('count', '?')} images), "
                           f"{image_size}px, {args.dtype}, {device.platform}")
    write_csv(rows, f"{out}.csv")
    header = (f"{title}; timed batch {args.time_batch or batches.batch_size}, median of "
              f"{args.runs} runs on {jax.device_count()} {device.platform} device(s) "
              f"({device.device_kind})")
    Path(f"{out}.md").write_text(f"{header}\n\n{format_markdown(rows)}\n")
    plot(rows, f"{out}.png", title)
    if jax.process_index() == 0:
        print(header)
        print(format_markdown(rows))
        if args.json:
            print(json.dumps([{k: v for k, v in row.items() if k != "schedule"}
                              for row in rows]))
        print(summary(rows, seconds) + f"; wrote {out}.csv, {out}.md, {out}.png", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.runs < 0 or args.warmup < 0:
        parser.error("--batch-size must be positive, --runs and --warmup non-negative")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))  # exits 2 with the usage line and the message
    return []  # unreachable; keeps type checkers calm


if __name__ == "__main__":
    main(sys.argv[1:])
