"""Accuracy (or feature fidelity) against cost over r schedules and token-reduction strategies.

    rows = sweep(model, params, batches, image_size=224, schedules=[0, 8, 16],
                 strategies=["tome", "random", "prune"], fidelity=True)
    print(format_markdown(rows)); write_csv(rows, "out.csv")

For every (strategy, r) a row holds tokens left, GFLOPs (2 x MACs), top-1 / top-5 accuracy
(`tome_jax.evaluation.evaluate`, sharded over all devices), optionally the cosine similarity of
each image's final features (`pre_logits`) to the r = 0 features, and images/s of the jitted
forward on one batch (timed interleaved over all configurations), with speed-ups over r = 0.

Strategies (`ViT.strategy`): "tome", "random" (the same bipartite merge with random pairs) and
"prune" (drop the r tokens the class token attends to least). All three leave the same token
counts at the same r, so same r means same FLOPs; r = 0 is one shared row, strategy "-".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax import sharding, tables, timing
from tome_jax.evaluation import check_classes, evaluate
from tome_jax.reduce import STRATEGIES
from tome_jax.schedule import Schedule
from tome_jax.vit import ViT

Params = Any
Row = dict[str, Any]
# Columns of the CSV, in order; a value that was not measured is left empty.
COLUMNS = ("strategy", "r", "tokens", "gflops", "flops_speedup", "top1", "top5", "fid_mean",
           "fid_min", "im_s", "speedup", "compile_s")
# (row key, Markdown header, format spec) of the Markdown table, in order. "model" appears only
# in tables that put several models side by side.
_MARKDOWN = (("model", "model", "s"), ("strategy", "strategy", "s"), ("r", "r", "s"),
             ("tokens", "tokens left", "d"), ("gflops", "GFLOPs", ".4g"),
             ("flops_speedup", "FLOPs-limit speed-up", ".2f"), ("top1", "top-1", ".4f"),
             ("top5", "top-5", ".4f"), ("fid_mean", "cos fidelity mean", ".4f"),
             ("fid_min", "cos fidelity min", ".4f"), ("im_s", "im/s", ".1f"),
             ("speedup", "measured speed-up", ".2f"))
_RATIOS = ("flops_speedup", "speedup")


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


def check_strategies(strategies: Sequence[str]) -> list[str]:
    """Validates and de-duplicates strategy names (order kept); ValueError on an unknown one."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; expected any of {STRATEGIES}")
    if not strategies:
        raise ValueError(f"no strategy given; expected any of {STRATEGIES}")
    return list(dict.fromkeys(strategies))


def plan(model: ViT, image_size: int, schedules: Sequence[Schedule],
         strategies: Sequence[str]) -> list[tuple[str, Schedule]]:
    """(strategy, r) pairs to run; schedules that merge nothing collapse into one ("-", r) pair.

    r = 0 (or any schedule that merges nothing at this resolution) is the same network for
    every strategy, so it runs once; it is always first, as the reference of speed-ups and
    fidelity (r = 0 is added when the list lacks it).
    """
    idle = [r for r in schedules if not any(model.clone(r=r).token_schedule(image_size)[0])]
    pairs = [("-", idle[0] if idle else 0)]
    for strategy in strategies:
        pairs += [(strategy, r) for r in schedules if r not in idle]
    return pairs


def configure(model: ViT, strategy: str, r: Schedule) -> ViT:
    """The model at schedule r with `strategy` ("-", the shared r = 0 row: the model's own)."""
    return model.clone(r=r) if strategy == "-" else model.clone(r=r, strategy=strategy)


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


def _cell(key: str, value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) + ("x" if key in _RATIOS else "")


def format_markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table; columns nobody measured (or no row has) are left out."""
    cols = [c for c in _MARKDOWN if any(row.get(c[0]) is not None for row in rows)]
    return tables.markdown_table([header for _, header, _ in cols],
                                 [[_cell(key, row.get(key), spec) for key, _, spec in cols]
                                  for row in rows])


def write_csv(rows: list[Row], path: str | Path) -> None:
    """One line per row, `COLUMNS` in order; unmeasured values empty."""
    tables.write_csv(rows, path, COLUMNS)


def read_csv(path: str | Path) -> list[Row]:
    """Rows back from `write_csv` (numbers as floats, tokens as int, empty cells None).

    A CSV written before the column was named "strategy" calls it "method"; it reads the same.
    """
    rows = tables.read_csv(path, text=("strategy", "method", "r"), ints=("tokens",))
    return [{("strategy" if k == "method" else k): v for k, v in row.items()} for row in rows]


def summary(rows: list[Row], seconds: float) -> str:
    """One line: configurations, time, and the largest-r row of each strategy against r = 0."""
    parts = [f"{len(rows)} configurations in {seconds:.0f} s"]
    base = rows[0]
    for strategy in dict.fromkeys(row["strategy"] for row in rows[1:]):
        last = [row for row in rows if row["strategy"] == strategy][-1]
        bits = [f"{strategy} r={last['r']}: {last['gflops']:.4g} GFLOPs "
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


def _len(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


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


def sweep(model: ViT, params: Params, batches: Iterable[dict[str, np.ndarray]], *,
          image_size: int, schedules: Sequence[Schedule], strategies: Sequence[str] = ("tome",),
          accuracy: bool = True, fidelity: bool = False, num_classes: int | None = None,
          runs: int = 5, warmup: int = 1, time_batch: int | None = None,
          cache_bytes: float = 0, show: bool = True,
          measured: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
          on_measured: Callable[[Row], None] | None = None) -> list[Row]:
    """Evaluates every (strategy, r) of `plan`; returns one row dict per configuration.

    model: any ViT (its own r and strategy are ignored). batches: re-iterable numpy batches
      (`tome_jax.data.make_dataset`); num_classes defaults to `batches.num_classes`.
    accuracy: top-1 / top-5 through `tome_jax.evaluation.evaluate` (needs a head of
      num_classes; checked before any work).
    fidelity: cosine similarity of `pre_logits` to the r = 0 row's, per image.
    time_batch: rows of the timed batch (default the first data batch's size); runs = 0 skips
      timing.
    cache_bytes: keep the decoded batches in memory when they fit (`cache_batches`); 0 reads
      the data again for every configuration.
    measured: quality already measured by an interrupted run of this same sweep, keyed by
      (strategy, r text) (`tome_jax.sweep_resume`): those rows take it instead of evaluating
      again. Timing is always measured afresh.
    on_measured: called with each row once its quality is measured (to keep progress).
    Rows: strategy, r (text), schedule, tokens, gflops, flops_speedup, top1, top5, fid_mean,
      fid_min, im_s, speedup, compile_s (None where not measured).
    """
    strategies = check_strategies(strategies)
    if not accuracy and not fidelity and runs < 1:
        raise ValueError("nothing to measure: enable accuracy, fidelity or timing")
    if num_classes is None:
        num_classes = getattr(batches, "num_classes", None)
    if accuracy:
        if not model.num_classes:
            raise ValueError("the model has no classification head (num_classes=0), so it has "
                             "no accuracy; use --fidelity for a backbone")
        check_classes(model, params, num_classes)  # before the data is decoded and cached
    pairs = plan(model, image_size, schedules, strategies)
    models = [configure(model, s, r) for s, r in pairs]
    for m in models:  # fail on a bad config (e.g. prune without a class token) before any work
        m.check((1, image_size, image_size, model.channels))

    batches = cache_batches(batches, image_size, cache_bytes) if cache_bytes else batches
    rows = []
    for (strategy, r), m in zip(pairs, models, strict=True):
        rows.append(dict(strategy=strategy, r=schedule_text(r), schedule=r,
                         tokens=m.token_schedule(image_size)[1][-1],
                         gflops=m.flops(image_size) / 1e9, top1=None, top5=None,
                         fid_mean=None, fid_min=None, im_s=None, speedup=None,
                         compile_s=None))

    measured = measured or {}
    todo = [(row, m) for row, m in zip(rows, models, strict=True)
            if (row["strategy"], row["r"]) not in measured]
    for row in rows:
        row.update(measured.get((row["strategy"], row["r"]), {}))
    ref = None
    if fidelity and todo and todo[0][0] is not rows[0]:  # the r = 0 reference was reused
        ref = extract_features(models[0], params, batches, show=show)
    for row, m in progress(todo, "configs", enabled=show):
        if accuracy:
            res = evaluate(m, params, batches, num_classes=num_classes)
            row.update(top1=res["top1"], top5=res["top5"], count=res["count"])
        if fidelity:
            feats = extract_features(m, params, batches, show=show)
            ref = feats if ref is None else ref  # rows[0] is the r = 0 reference
            row["fid_mean"], row["fid_min"] = cosine_fidelity(feats, ref)
            row["count"] = len(feats)
        if on_measured is not None:
            on_measured(row)

    if runs > 0:
        first = next(iter(batches))["image"]
        n = time_batch or len(first)
        images = np.resize(np.asarray(first), (n,) + first.shape[1:])  # repeats rows if n > b
        images = jnp.asarray(images, model.dtype)
        timings = timing.time_interleaved(
            [timing.forward(m) for m in models], (params, images), runs, warmup,
            progress=lambda items, desc: progress(items, desc, enabled=show))
        for row, t in zip(rows, timings, strict=True):
            row.update(im_s=n / t.median, compile_s=t.compile_s, seconds=t.median)
    return add_speedups(rows)
