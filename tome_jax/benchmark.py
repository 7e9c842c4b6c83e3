"""Throughput of ToMe schedules against the FLOPs limit, on whatever device JAX sees.

    rows = benchmark("B/16", batch=8, resolution=224, schedules=[0, 8, 16], runs=7, warmup=2,
                     dtype=jnp.float32, merge_methods=["segment"])
    print(format_table(rows))

One row per (schedule, merge method, metric): tokens left, GFLOPs (2 x MACs), the FLOPs-limit
speed-up, measured images/s (median of the timed runs, rows interleaved so machine noise hits
them alike), compile time apart, the measured speed-up over the first row, and the time spent
in matching and merging (each block's merge step timed on its own shapes). Random weights:
speed does not depend on their values.

    rows = benchmark("B/16", 8, 224, [0, 8, 16], 7, 2, jnp.float32, ["segment"], vs_torch=True)
    print(format_vs_torch(rows))
    print(format_train(benchmark_train("B/16", 8, 224, [0, 16], 5, 1, jnp.float32)))

vs_torch times a PyTorch ToMe at every r in the same round robin (timm's blocks with this
repository's merge in torch ops, `torch_reference.torch_tome_forward`), so each row carries
both speeds and their ratio. Memory: XLA's buffer plan of the compiled forward
(`timing.Memory`: what a call allocates on top of its inputs) and, for torch, the peak bytes of
tensors alive at once during one forward (`torch_peak_bytes`); neither counts the weights or
the input images.
`benchmark_train` times the project's training step (`tome_jax.training.step`) per r.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tome_jax import dtem
from tome_jax import merge as tome
from tome_jax.schedule import Schedule
from tome_jax.tables import markdown_table
from tome_jax.timing import (
    compile_and_time,
    forward,
    num_cores,
    time_calls,
    time_interleaved,
    time_once,
    xla_memory,
)
from tome_jax.variants import decode_variant
from tome_jax.vit import ViT

METRICS = ("keys", "dtem", "dtem-fused")
TORCH_LABEL = "PyTorch ToMe"
MIB = 2 ** 20
HEADER = ("r", "merge method", "metric", "tokens left", "GFLOPs", "FLOPs-limit speed-up", "im/s",
          "measured speed-up", "measured / limit", "compile s", "merge ms", "merge % of forward")


def merge_step_seconds(model: ViT, batch: int, resolution: int, runs: int,
                       method: str) -> float:
    """Median seconds of all blocks' matching + size-weighted merges, each on its own shapes."""
    rs, tokens = model.token_schedule(resolution)
    dims = model.dims
    head_dim = dims.width // dims.num_heads
    total = 0.0
    for r, t in zip(rs, tokens, strict=False):
        if not r:
            continue
        key = jax.random.key(t)
        x = jax.random.normal(key, (batch, t, dims.width), model.dtype)
        metric = jax.random.normal(jax.random.fold_in(key, 1), (batch, t, head_dim), model.dtype)
        token_size = jnp.ones((batch, t, 1), jnp.float32)

        def step(x, metric, token_size, r=r):
            merge, _ = tome.bipartite_soft_matching(metric, r, method=method)
            return tome.merge_wavg(merge, x, token_size)

        (timing,) = time_interleaved([step], (x, metric, token_size), runs, warmup=1)
        total += timing.median
    return total


def _plan_rows(base: ViT, resolution: int, schedules: Sequence[Schedule],
               merge_methods: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """One row per (schedule, metric, method); a schedule that merges nothing gets one method,
    "-", since the method cannot change its speed."""
    rows = []
    for r in schedules:
        merges = any(base.clone(r=r).token_schedule(resolution)[0])
        for metric in metrics:
            for method in merge_methods if merges else merge_methods[:1]:
                rows.append(dict(r=r, method=method if merges else "-", metric=metric))
    return rows


def _row_model(base: ViT, row: dict, merge_methods: Sequence[str],
               dtem_dim: int | None) -> ViT:
    method = row["method"] if row["method"] != "-" else merge_methods[0]
    return base.clone(r=row["r"], merge_method=method,
                      dtem_dim=None if row["metric"] == "keys" else dtem_dim,
                      dtem_fused=row["metric"] == "dtem-fused")


def _add_speedups(rows: list[dict], batch: int) -> None:
    """Fills seconds, im/s and the speed-ups against rows[0] from each row's times and GFLOPs."""
    base = rows[0]
    for row in rows:
        row["seconds"] = statistics.median(row["times"])
        row["im_s"] = batch / row["seconds"]
        row["flops_speedup"] = base["gflops"] / row["gflops"]
        row["speedup"] = base["seconds"] / row["seconds"]
        row["efficiency"] = row["speedup"] / row["flops_speedup"]


def benchmark(variant: str, batch: int, resolution: int, schedules: Sequence[Schedule],
              runs: int, warmup: int, dtype: Any, merge_methods: Sequence[str],
              metrics: Sequence[str] = ("keys",), dtem_dim: int | None = None, *,
              vs_torch: bool = False, torch_threads: int | None = None,
              merge_time: bool = True) -> list[dict]:
    """Measures every (schedule, merge method, metric); returns the table's rows.

    Images [batch, resolution, resolution, 3] in dtype. The first schedule is the baseline of
    the speed-ups. Schedules that merge nothing are measured once, whatever the method.
    metrics: what matching runs on: "keys" (ToMe), "dtem" (a DTEM embedding of width dtem_dim,
    its own matmul) or "dtem-fused" (the same embedding computed in the q/k/v matmul).
    vs_torch: also time the PyTorch ToMe (`torch_tome`) at each row's r, in the same round
    robin, with torch_threads threads (default `num_cores()`); keys rows only.
    merge_time: also time each block's merge step on its own (`merge_step_seconds`).
    """
    if any(m != "keys" for m in metrics):
        dims = decode_variant(variant)
        dtem_dim = dtem_dim or dtem.default_dim(dims.width, dims.num_heads)
    base = ViT(variant=variant, num_classes=1000, dtype=dtype)
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3), dtype)
    # One parameter set for every row: the keys model ignores the embeddings.
    params = jax.jit(base.clone(dtem_dim=dtem_dim).init)(jax.random.key(1), images)["params"]

    rows = _plan_rows(base, resolution, schedules, merge_methods, metrics)
    models = [_row_model(base, row, merge_methods, dtem_dim) for row in rows]
    torch_calls = {}
    if vs_torch:
        torch_calls = {i: torch_tome(variant, batch, resolution, dtype,
                                     models[i].token_schedule(resolution)[0], torch_threads)
                       for i, row in enumerate(rows) if row["metric"] == "keys"}
    compiled = []
    for row, model in zip(rows, models, strict=True):
        c, seconds = compile_and_time(forward(model), (params, images))
        for _ in range(warmup):
            time_once(c, (params, images))
        compiled.append(c)
        memory = xla_memory(c)
        row.update(tokens=model.token_schedule(resolution)[1][-1],
                   gflops=model.flops(resolution) / 1e9, compile_s=seconds,
                   mib=None if memory is None else memory.working / MIB)
    for call in torch_calls.values():
        call.warm_up(warmup)
    calls, slots = [], []
    for i, c in enumerate(compiled):  # each JAX row next to its torch twin
        calls.append(lambda c=c: jax.block_until_ready(c(params, images)))
        slots.append((i, "times"))
        if i in torch_calls:
            calls.append(torch_calls[i])
            slots.append((i, "torch_times"))
    for (i, key), times in zip(slots, time_calls(calls, runs), strict=True):
        rows[i][key] = times
    _add_speedups(rows, batch)
    for i, call in torch_calls.items():
        _add_torch(rows[i], rows[min(torch_calls)], batch, call)
    for row in rows:
        model = base.clone(r=row["r"])
        measure = merge_time and row["method"] != "-"
        row["merge_s"] = (merge_step_seconds(model, batch, resolution, runs, row["method"])
                          if measure else (0.0 if merge_time else None))
        row["merge_share"] = None if row["merge_s"] is None else row["merge_s"] / row["seconds"]
    return rows


def _add_torch(row: dict, base: dict, batch: int, call: TorchToMe) -> None:
    """Fills a row's torch fields from its torch_times; base: the first row with a torch twin."""
    row["torch_seconds"] = statistics.median(row["torch_times"])
    row["torch_im_s"] = batch / row["torch_seconds"]
    row["vs_torch"] = row["im_s"] / row["torch_im_s"]
    row["torch_speedup"] = statistics.median(base["torch_times"]) / row["torch_seconds"]
    row["torch_mib"] = call.peak_bytes() / MIB
    row["torch_threads"], row["torch_version"] = call.threads, call.version
    row["torch_device"] = call.device


class TorchToMe:
    """One forward of the PyTorch ToMe on fixed random images: call() runs it (eager,
    `torch.inference_mode`) and returns when done.

    model: timm's ViT (`torch_reference.timm_vit`), images [B, 3, H, W] on the model's device,
    rs the clamped r of every block (`ViT.token_schedule`).
    """

    def __init__(self, model: Any, images: Any, rs: Sequence[int]):
        import torch

        self.model, self.images, self.rs = model, images, list(rs)
        self.cuda = images.is_cuda
        self.threads, self.version = torch.get_num_threads(), f"torch {torch.__version__}"
        self.device = torch.cuda.get_device_name() if self.cuda else "CPU"

    def __call__(self) -> Any:
        import torch

        from tome_jax.torch_reference import torch_tome_forward

        with torch.inference_mode():
            out = torch_tome_forward(self.model, self.images, self.rs)
        if self.cuda:
            torch.cuda.synchronize()
        return out

    def warm_up(self, calls: int, seconds: float = 1.0) -> None:
        """At least `calls` calls and `seconds`: right after JAX has run in this process,
        torch's first calls are 10-100x slower (thread pools, oneDNN kernels)."""
        import time

        start, done = time.perf_counter(), 0
        while done < calls or (time.perf_counter() - start < seconds and done < 100):
            self()
            done += 1

    def peak_bytes(self) -> int:
        """Peak bytes one call adds to what is allocated already: torch's CUDA allocator
        statistics on a GPU, `torch_peak_bytes` on the CPU."""
        import torch

        if not self.cuda:
            return torch_peak_bytes(self)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self()
        return torch.cuda.max_memory_allocated() - before


def torch_tome(variant: str, batch: int, resolution: int, dtype: Any, rs: Sequence[int],
               threads: int | None = None) -> TorchToMe:
    """A `TorchToMe` of timm's `variant` (random weights) in dtype ("float32", "bfloat16" or
    the jnp dtype) on images [batch, 3, resolution, resolution]; on the GPU when JAX runs on
    one and torch sees CUDA, else on the CPU with `threads` intra-op threads (default
    `num_cores()`)."""
    import torch

    from tome_jax.torch_reference import timm_vit

    torch.set_num_threads(threads or num_cores())
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[jnp.dtype(dtype).name]
    torch.manual_seed(0)
    model = timm_vit(variant, resolution).eval().to(device=device, dtype=torch_dtype)
    images = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator()
                         .manual_seed(0)).to(device=device, dtype=torch_dtype)
    return TorchToMe(model, images, rs)


def torch_peak_bytes(call: Callable[[], Any]) -> int:
    """Peak bytes of torch tensors alive at once while call() runs, counting only those its
    operations create (so not the weights or inputs); each storage once, however many views.

    Tracked with a TorchDispatchMode: every operator's outputs are counted when created and
    released when their last Python reference dies; workspace a kernel allocates and frees
    internally is not seen.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.refs: dict[int, int] = {}

        def _release(self, key: int, nbytes: int) -> None:
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key]
                self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if hasattr(t, "untyped_storage"):
                    storage = t.untyped_storage()
                    key, nbytes = storage.data_ptr(), storage.nbytes()
                    if key not in self.refs:
                        self.refs[key] = 0
                        self.live += nbytes
                        self.peak = max(self.peak, self.live)
                    self.refs[key] += 1
                    weakref.finalize(t, self._release, key, nbytes)
            return out

    tracker = LiveBytes()
    with tracker:
        call()
    return tracker.peak


TRAIN_HEADER = ("r", "step", "tokens left", "GFLOPs", "FLOPs-limit speed-up", "im/s",
                "measured speed-up", "measured / limit", "compile s", "MiB", "MiB with inputs")
FINETUNE, DTEM_MODULAR = "fine-tune", "DTEM modular"


def benchmark_train(variant: str, batch: int, resolution: int, schedules: Sequence[Schedule],
                    runs: int, warmup: int, dtype: Any, *, dtem_modular: bool = False,
                    dtem_dim: int | None = None) -> list[dict]:
    """Training-step speed per schedule: the project's step (`training.step.make_train_step`:
    AdamW, clipping, label smoothing, drop path 0.1) on random images and labels, 1000 classes.

    Rows as `benchmark`'s (im/s = images trained per second, speed-ups against the first
    schedule, GFLOPs of the forward: the backward scales with it), plus XLA's memory plan of the
    step: mib (what a step allocates on top of its inputs: the new state, the activations kept
    for the backward, gradients, temporaries) and total_mib (with the inputs: parameters,
    optimizer state and batch).

    dtem_modular: every schedule that merges is timed as DTEM's modular step instead (the soft
    path with an embedding of width dtem_dim, default `dtem.default_dim`; everything but the
    embeddings frozen, no drop path), against r = 0 fine-tuning the whole model. The soft path
    keeps every token (merged ones get size ~0), so its forward FLOPs are r = 0's plus the
    embeddings'.
    """
    from tome_jax.training.config import Config
    from tome_jax.training.optim import make_optimizer
    from tome_jax.training.state import init_state
    from tome_jax.training.step import make_train_step

    cfg = Config(variant=variant, num_classes=1000, image_size=resolution, batch_size=batch,
                 dtype=jnp.dtype(dtype).name)
    base = ViT(variant=variant, num_classes=1000, dtype=dtype, drop_path=cfg.drop_path)
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3), dtype)
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 1000)

    def setup(config: Config, model: ViT) -> tuple[optax.GradientTransformation, dict]:
        params = jax.eval_shape(model.init, jax.random.key(2), images[:1])["params"]
        tx = make_optimizer(config, params)
        return tx, init_state(config, model, tx)

    tx, state = setup(cfg, base)
    steps, models, kinds, states = [], [], [], [state]
    if dtem_modular:
        dims = base.dims
        soft = base.clone(dtem_dim=dtem_dim or dtem.default_dim(dims.width, dims.num_heads),
                          soft_merge=True, drop_path=0.0)
        soft_cfg = dataclasses.replace(cfg, drop_path=0.0, freeze=f"^(?!.*{dtem.EMBED_NAME})")
        soft_tx, soft_state = setup(soft_cfg, soft)
        states.append(soft_state)
    for r in schedules:
        # A schedule that merges nothing (r = 0 in any of its forms) is fine-tuned as is.
        modular = dtem_modular and any(base.clone(r=r).token_schedule(resolution)[0])
        model = soft.clone(r=r) if modular else base.clone(r=r)
        step = (make_train_step(model, soft_tx, soft_cfg) if modular
                else make_train_step(model, tx, cfg))
        # Every step gets both states; each uses its own.
        steps.append(functools.partial(_own_state, step, int(modular)))
        models.append(model)
        kinds.append(DTEM_MODULAR if modular else FINETUNE)
    timings = time_interleaved(steps, (tuple(states), {"image": images, "label": labels}),
                               runs, warmup)
    rows = []
    for r, model, kind, timing in zip(schedules, models, kinds, timings, strict=True):
        memory = timing.memory
        counted = model.clone(r=0) if kind == DTEM_MODULAR else model
        rows.append(dict(r=r, step=kind, tokens=counted.token_schedule(resolution)[1][-1],
                         gflops=counted.flops(resolution) / 1e9, compile_s=timing.compile_s,
                         times=timing.times,
                         mib=None if memory is None else memory.working / MIB,
                         total_mib=None if memory is None else memory.total / MIB))
    _add_speedups(rows, batch)
    return rows


def _own_state(step: Callable, index: int, states: tuple, batch: dict) -> Any:
    return step(states[index], batch)


def format_train(rows: list[dict]) -> str:
    """`benchmark_train`'s rows as a Markdown table."""
    return markdown_table(TRAIN_HEADER, [
        [str(row["r"]), row["step"], str(row["tokens"]), f"{row['gflops']:.2f}",
         f"{row['flops_speedup']:.2f}x",
         f"{row['im_s']:.2f}", f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}",
         f"{row['compile_s']:.1f}", _opt(row["mib"], 1, ".0f"), _opt(row["total_mib"], 1, ".0f")]
        for row in rows])


def _opt(value: float | None, scale: float, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{scale * value:{spec}}{suffix}"


def _cells(row: dict) -> list[str]:
    """One row of `benchmark` / `benchmark_torch` -> the table's cells, under HEADER."""
    return [str(row["r"]), row["method"], row.get("metric", "keys"), str(row["tokens"]),
            f"{row['gflops']:.2f}", f"{row['flops_speedup']:.2f}x", f"{row['im_s']:.1f}",
            f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}",
            _opt(row["compile_s"], 1, ".1f"), _opt(row["merge_s"], 1e3, ".2f"),
            _opt(row["merge_share"], 100, ".1f", "%")]


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, one line per row."""
    return markdown_table(HEADER, [_cells(row) for row in rows])


VS_TORCH_HEADER = ("r", "merge method", "tokens left", "GFLOPs", "FLOPs-limit speed-up", "im/s",
                   f"{TORCH_LABEL} im/s", "ours / PyTorch", "speed-up", "speed-up / limit",
                   "PyTorch speed-up", "compile s", "MiB", "PyTorch MiB")


def format_vs_torch(rows: list[dict]) -> str:
    """Rows of `benchmark(..., vs_torch=True)` with a torch twin as a Markdown table: both
    speeds, their ratio, each side's speed-up over the first row, ours against the FLOPs
    limit, our compile time and both sides' memory (see the module docstring)."""
    return markdown_table(VS_TORCH_HEADER, [
        [str(row["r"]), row["method"], str(row["tokens"]), f"{row['gflops']:.2f}",
         f"{row['flops_speedup']:.2f}x", f"{row['im_s']:.2f}", f"{row['torch_im_s']:.2f}",
         f"{row['vs_torch']:.2f}x", f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}",
         f"{row['torch_speedup']:.2f}x", f"{row['compile_s']:.1f}", _opt(row["mib"], 1, ".0f"),
         f"{row['torch_mib']:.0f}"]
        for row in rows if "torch_im_s" in row])
