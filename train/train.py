"""Train or fine-tune a ViT with ToMe merging: sharded, preemption-safe, resumable.

    python -m train.train --config train/configs/cifar10_vit.json --workdir runs/cifar10
    python -m train.train --config ... --workdir ... --set r=4 lr=3e-4 steps=2000

Sections: config, mesh, input, model and optimizer, sharding, train step, checkpoint, eval,
loop. The run is a pure function of (config, step): batches come from a seeded stream that can
start at any batch, and the dropout/mixup key of step s is fold_in(seed, s), so a run killed at
any point and restarted from its last checkpoint ends with the same parameters as one that was
never interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tome_jax import memory_data, sharding
from tome_jax.schedule import parse_schedule
from tome_jax.vit import ViT

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a run. A JSON file sets some; `--set key=value` overrides any."""

    # Model.
    variant: str = "S/4"
    width: int = 0  # 0: the variant's
    depth: int = 0
    mlp_dim: int = 0
    num_heads: int = 0
    num_classes: int = 10
    image_size: int = 32
    pool: str = "tok"
    r: str = "0"  # ToMe schedule: "8", "16,-1" or "[8,8,4]"
    dropout: float = 0.0
    drop_path: float = 0.1
    dtype: str = "float32"  # compute dtype; parameters stay float32
    init_from: str = ""  # a converted checkpoint dir (tome_jax.convert) to fine-tune
    dtem_dim: int = 0  # DTEM merge-embedding width; 0 = ToMe on the keys
    soft_merge: bool = False  # DTEM's relaxed merging while training (eval stays hard)
    dtem_tau1: float = 0.1
    dtem_tau2: float = 0.1
    dtem_k: int = 3  # candidates per token in DTEM's soft top-r
    # Data.
    dataset: str = "cifar10_jpeg"
    data_dir: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    normalization: str = "augreg"
    batch_size: int = 128  # global, over all devices and processes
    # "host": tf.data on the host CPUs, any dataset and augmentation. "device": the whole split
    # decoded once (no TensorFlow) into accelerator memory and augmented there, CIFAR style
    # (pad-crop-flip); for small image-folder datasets, whose JPEGs the host cannot feed fast
    # enough to an accelerator (tome_jax.memory_data).
    input_pipeline: str = "host"
    randaug_ops: int = 0  # RandAugment ops per training image; 0 = off
    randaug_magnitude: float = 9.0  # 0..10
    # Optimisation.
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine", or "wsd": warm-up, constant, then decay_steps of decay
    decay_steps: int = 0  # wsd only: the last decay_steps fall from lr to min_lr (1 - sqrt)
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(a, a) mixup; 0 = off
    cutmix: float = 0.0  # Beta(a, a) cutmix; 0 = off (with both on, each step picks one)
    accum_steps: int = 1  # gradient accumulation (optax.MultiSteps)
    freeze: str = ""  # regex over "a/b/c" parameter paths; matches get no updates
    # Sharding.
    fsdp: bool = False  # shard parameters and optimizer state over the devices
    # Checkpoints, eval, logs.
    save_every: int = 500
    keep: int = 3
    eval_every: int = 1000
    eval_batch_size: int = 500
    log_every: int = 50
    seed: int = 0


def load_config(path: str | None, overrides: list[str]) -> Config:
    """Config from a JSON file plus "key=value" overrides; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    if path:
        values.update(json.loads(Path(path).read_text()))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        values[key] = value
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
    typed = {}
    for key, value in values.items():
        kind = type(fields[key].default)
        if isinstance(value, str) and kind is not str:
            value = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        typed[key] = str(value) if kind is str else kind(value)
    return Config(**typed)


def model_fingerprint(cfg: Config) -> dict:
    """The fields that fix parameter shapes: a checkpoint from another model is refused."""
    keys = ("variant", "width", "depth", "mlp_dim", "num_heads", "num_classes", "image_size",
            "pool", "dtem_dim")
    return {k: getattr(cfg, k) for k in keys}


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def param_sharding(tree: Any, mesh, fsdp: bool) -> Any:
    """Replicated, or (FSDP) each array split over the mesh along its largest divisible axis."""
    n = mesh.devices.size

    def one(x):
        if not fsdp or n == 1:
            return NamedSharding(mesh, P())
        for axis in np.argsort(x.shape)[::-1]:
            if x.shape[axis] % n == 0 and x.shape[axis] >= n:
                spec = [None] * len(x.shape)
                spec[axis] = sharding.BATCH_AXIS
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------


def make_input(cfg: Config, train: bool):
    """The host pipeline's batches (`tome_jax.data.Batches`)."""
    from tome_jax import data  # TensorFlow: only for the host pipeline

    return data.make_dataset(
        cfg.dataset, cfg.train_split if train else cfg.eval_split,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        image_size=cfg.image_size, normalization=cfg.normalization, train=train,
        data_dir=cfg.data_dir or None, shuffle_seed=cfg.seed,
        randaugment=(cfg.randaug_ops, cfg.randaug_magnitude) if cfg.randaug_ops else None)


DEVICE_INPUT_DATASETS = ("cifar10_jpeg", "image_folder")


def check_input_settings(cfg: Config) -> None:
    if cfg.input_pipeline not in ("host", "device"):
        raise ValueError(f"input_pipeline {cfg.input_pipeline!r} is not 'host' or 'device'")
    if cfg.input_pipeline == "device":
        if cfg.dataset not in DEVICE_INPUT_DATASETS:
            raise ValueError(f"input_pipeline=device reads image folders "
                             f"{DEVICE_INPUT_DATASETS}, not {cfg.dataset!r}")
        if cfg.randaug_ops:
            raise ValueError("input_pipeline=device augments with pad-crop-flip only; "
                             "RandAugment (randaug_ops) needs input_pipeline=host")


def read_split(cfg: Config, train: bool):
    """The split decoded into memory (`memory_data.ImageArrays`), for input_pipeline=device."""
    source = cfg.data_dir
    if not source:
        from tome_jax import sources

        source = sources.default_data_dir(cfg.dataset)
    split = cfg.train_split if train else cfg.eval_split
    arrays = memory_data.read_image_folder(source, split, cfg.image_size)
    if arrays.num_classes != cfg.num_classes:
        raise ValueError(f"{source} split {split!r} has {arrays.num_classes} classes, the config "
                         f"num_classes={cfg.num_classes}")
    return arrays


def make_train_batches(cfg: Config, mesh) -> tuple[Callable[[int], Iterator[dict]], Any]:
    """(start -> the global training batches from batch `start` on, the eval split's arrays).

    The eval arrays are None except for input_pipeline=device, which reads and checks both
    splits here, before the run writes anything.
    """
    if cfg.input_pipeline == "device":
        stream = memory_data.DeviceStream(read_split(cfg, train=True),
                                          batch_size=cfg.batch_size, mesh=mesh, seed=cfg.seed,
                                          normalization=cfg.normalization)
        eval_split = read_split(cfg, train=False) if cfg.eval_every else None
        return functools.partial(memory_data.iterate, stream), eval_split
    host = make_input(cfg, train=True)

    def from_batch(start: int) -> Iterator[dict]:
        for b in host.iterate_from(start):
            yield sharding.global_batch({"image": b["image"], "label": b["label"]}, mesh)

    return from_batch, None


# ----------------------------------------------------------------------------------------------
# Model and optimizer
# ----------------------------------------------------------------------------------------------


def make_model(cfg: Config, **overrides) -> ViT:
    kwargs = dict(variant=cfg.variant, num_classes=cfg.num_classes, r=parse_schedule(cfg.r),
                  pool=cfg.pool, dropout=cfg.dropout, drop_path=cfg.drop_path,
                  dtype=jnp.dtype(cfg.dtype), width=cfg.width or None, depth=cfg.depth or None,
                  mlp_dim=cfg.mlp_dim or None, num_heads=cfg.num_heads or None,
                  dtem_dim=cfg.dtem_dim or None, soft_merge=cfg.soft_merge,
                  dtem_tau1=cfg.dtem_tau1, dtem_tau2=cfg.dtem_tau2, dtem_k=cfg.dtem_k)
    kwargs.update(overrides)
    return ViT(**kwargs)


def path_names(tree: Any) -> Any:
    """The same tree with each leaf replaced by its "a/b/c" path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), tree)


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Warm-up then decay, counted in optimizer updates (micro-steps / accum_steps).

    "cosine" decays over the whole run, so its length must be known from the start. "wsd"
    (warm-up, stable, decay) holds the peak until the last `decay_steps`: a run of unknown
    length trains at a constant lr with a large `steps`, and a copy of its workdir resumed with
    `steps=<now + D> decay_steps=D` is a finished model at any point (Hagele et al. 2024, "Scaling
    laws and compute-optimal training beyond fixed training durations", whose 1 - sqrt cooldown
    this is), while the original goes on.
    """
    total = max(cfg.steps // cfg.accum_steps, cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, total,
                                                  cfg.min_lr)
    if cfg.schedule != "wsd":
        raise ValueError(f"schedule {cfg.schedule!r} is not 'cosine' or 'wsd'")
    decay = cfg.decay_steps // cfg.accum_steps
    if not 0 < decay <= total - cfg.warmup_steps:
        raise ValueError(f"wsd needs 0 < decay_steps <= steps - warmup_steps (in updates: "
                         f"{decay} of {total - cfg.warmup_steps})")
    start = total - decay

    def wsd(count):
        warm = cfg.lr * count / max(cfg.warmup_steps, 1)
        frac = jnp.clip((count - start) / decay, 0.0, 1.0)
        return jnp.where(count < cfg.warmup_steps, warm,
                         cfg.lr - (cfg.lr - cfg.min_lr) * jnp.sqrt(frac))

    return wsd


def make_optimizer(cfg: Config, params: Any) -> optax.GradientTransformation:
    """AdamW, warm-up + cosine, clipping, decay off 1-D params and tokens, optional freezing."""
    schedule = lr_schedule(cfg)
    names = path_names(params)
    no_decay = re.compile(r"(^|/)(cls|dist|registers|pos_embedding)$")
    decay_mask = jax.tree.map(lambda x, n: len(x.shape) > 1 and not no_decay.search(n),
                              params, names)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask))
    if cfg.freeze:
        frozen = re.compile(cfg.freeze)
        labels = jax.tree.map(lambda n: "frozen" if frozen.search(n) else "trained", names)
        if not any(v == "trained" for v in jax.tree.leaves(labels)):
            raise ValueError(f"freeze={cfg.freeze!r} freezes every parameter")
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx


def overlay_params(params: Any, path: str) -> Any:
    """params with every tensor of a converted checkpoint put in place.

    Parameters the checkpoint lacks keep their initial values: that is how a DTEM embedding
    starts fresh beside a pretrained backbone.
    """
    from tome_jax.convert import flatten, load_pretrained, unflatten

    _, loaded = load_pretrained(path)
    flat = flatten(params)
    for key, value in flatten(loaded).items():
        if key not in flat:
            raise ValueError(f"init_from {path}: {key!r} is not a parameter of this model")
        if tuple(flat[key].shape) != tuple(value.shape):
            raise ValueError(f"init_from {path}: {key!r} has shape {tuple(value.shape)}, the "
                             f"model {tuple(flat[key].shape)}")
        flat[key] = jnp.asarray(value)
    return unflatten(flat)


def init_state(cfg: Config, model: ViT, tx: optax.GradientTransformation) -> dict:
    """{"step", "params", "opt_state"} on the host (params identical on every process)."""
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    params = jax.jit(model.clone(r=0).init)(jax.random.key(cfg.seed), images)["params"]
    if cfg.init_from:
        params = overlay_params(params, cfg.init_from)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


# ----------------------------------------------------------------------------------------------
# Train step
# ----------------------------------------------------------------------------------------------


def mix_batch(images: jax.Array, labels: jax.Array, key: jax.Array, cfg: Config):
    """Mixup or cutmix with the batch reversed as partner. labels are one-hot [B, K]."""
    use_mixup, use_cutmix = cfg.mixup > 0, cfg.cutmix > 0
    if not (use_mixup or use_cutmix):
        return images, labels
    k_lam, k_choice, k_box = jax.random.split(key, 3)
    alpha = cfg.mixup if use_mixup else cfg.cutmix
    cut = (jax.random.bernoulli(k_choice) if use_mixup and use_cutmix
           else jnp.asarray(use_cutmix))
    alpha = jnp.where(cut, cfg.cutmix or alpha, alpha)
    lam = jax.random.beta(k_lam, alpha, alpha)
    partner_images, partner_labels = images[::-1], labels[::-1]
    h, w = images.shape[1:3]
    # Cutmix: a box of area (1 - lam), lam then corrected to the exact pasted area.
    cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([h, w])
    bh, bw = h * jnp.sqrt(1 - lam), w * jnp.sqrt(1 - lam)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((ys >= cy - bh / 2) & (ys < cy + bh / 2) & (xs >= cx - bw / 2) & (xs < cx + bw / 2))
    box_lam = 1 - box.mean()
    mixed_cut = jnp.where(box[None, :, :, None], partner_images, images)
    mixed_up = lam * images + (1 - lam) * partner_images
    images = jnp.where(cut, mixed_cut, mixed_up)
    lam = jnp.where(cut, box_lam, lam)
    return images, lam * labels + (1 - lam) * partner_labels


def make_train_step(model: ViT, tx: optax.GradientTransformation, cfg: Config):
    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(jax.random.key(cfg.seed + 1), state["step"])
        k_mix, k_dropout = jax.random.split(key)
        labels = jax.nn.one_hot(batch["label"], cfg.num_classes)
        images, targets = mix_batch(batch["image"], labels, k_mix, cfg)
        targets = optax.smooth_labels(targets, cfg.label_smoothing)

        def loss_fn(params):
            logits, _ = model.apply({"params": params}, images, train=True,
                                    rngs={"dropout": k_dropout})
            return optax.softmax_cross_entropy(logits, targets).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
                   "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------


CHECKPOINT_ITEMS = ("state", "meta")  # the train state; its step and model fingerprint (JSON)


def make_manager(workdir: Path, cfg: Config) -> ocp.CheckpointManager:
    # A kill mid-save leaves a temporary folder, never a half checkpoint: orbax renames the
    # folder only once it is complete, and cleans the leftovers up on the next start.
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options,
                                 item_names=CHECKPOINT_ITEMS)


def check_workdir(workdir: Path, cfg: Config) -> None:
    """Refuses a workdir whose run trained another model (nothing there is overwritten)."""
    meta = workdir / "config.json"
    if meta.exists():
        previous = json.loads(meta.read_text())
        mine = model_fingerprint(cfg)
        defaults = Config()  # a key added since that run was written has its default there
        theirs = {k: previous.get(k, getattr(defaults, k)) for k in mine}
        if theirs != mine:
            diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
            raise ValueError(f"workdir {workdir} holds a run of another model (checkpoint vs "
                             f"config: {diff}); use a new workdir")


def abstract_train_state(cfg: Config, mesh) -> tuple[ViT, optax.GradientTransformation, dict,
                                                     dict]:
    """(model, optimizer, abstract state, state shardings) of a run on `mesh`'s devices.

    Restoring into this target reshards a checkpoint written on any other device count (a pod's
    checkpoint shipped or resumed on one host); restoring "as saved" needs the same topology.
    """
    model = make_model(cfg)
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    abstract_params = jax.eval_shape(model.clone(r=0).init, jax.random.key(0), images)["params"]
    tx = make_optimizer(cfg, abstract_params)
    abstract = jax.eval_shape(lambda: init_state(cfg, model, tx))
    state_sharding = {"step": NamedSharding(mesh, P()),
                      "params": param_sharding(abstract["params"], mesh, cfg.fsdp),
                      "opt_state": param_sharding(abstract["opt_state"], mesh, cfg.fsdp)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sharding)
    return model, tx, abstract, state_sharding


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: dict) -> tuple[int, dict] | None:
    """(step, state) of the newest checkpoint that restores; a corrupt one is skipped with a
    warning. `abstract_state` (from `abstract_train_state`) gives shapes, dtypes and the
    shardings to restore into; required, since restoring as saved fails on another topology."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
            return step, restored["state"]
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped alike
            warnings.warn(f"checkpoint at step {step} could not be restored ({type(err).__name__}:"
                          f" {err}); falling back to the previous one", stacklevel=2)
    return None


class CheckpointError(RuntimeError):
    """The run's last checkpoint could not be written (the previous complete one is kept)."""


def save(manager: ocp.CheckpointManager, state: dict, cfg: Config, force: bool = False) -> bool:
    """Starts an async save of `state`; False if it or the save still in flight failed.

    A failed save (a full disk, a lost mount) never costs the previous checkpoint: orbax writes
    to a temporary folder and renames it only once complete. Training goes on and the next save
    tries again.
    """
    ok = wait_for_saves(manager)
    step = int(jax.device_get(state["step"]))
    try:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": step, **model_fingerprint(cfg)})), force=force)
    except Exception as err:  # noqa: BLE001 - orbax raises OSError or tensorstore's ValueError
        _report_failed_save(manager, err)
        return False
    return ok


def wait_for_saves(manager: ocp.CheckpointManager) -> bool:
    """Waits for the background save; False (logged, temporary files removed) if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001 - see save()
        _report_failed_save(manager, err)
        return False
    return True


def _report_failed_save(manager: ocp.CheckpointManager, err: Exception) -> None:
    saved = [p for p in Path(manager.directory).iterdir() if p.name.isdigit()]
    latest = max((int(p.name) for p in saved), default=None)
    logging.error("saving a checkpoint failed (%s: %s); the latest complete checkpoint, step %s,"
                  " is kept", type(err).__name__, str(err).splitlines()[0][:300], latest)
    if jax.process_index() == 0:  # free the half-written folder so the next save has room
        for tmp in Path(manager.directory).glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------


def run_eval(cfg: Config, model: ViT, params: Any, mesh, eval_split=None) -> dict:
    """Top-1/top-5 on cfg.eval_split; eval_split: its decoded arrays (input_pipeline=device)."""
    from eval.evaluate import evaluate

    if eval_split is None:
        batches = make_input(cfg, train=False)
    else:
        batches = memory_data.eval_batches(eval_split, cfg.eval_batch_size, cfg.normalization)
    # DTEM's soft merging is for training; evaluation uses the hard matching, as at inference.
    result = evaluate(model.clone(soft_merge=False), params, batches, mesh=mesh,
                      num_classes=cfg.num_classes)
    return {"eval_top1": result["top1"], "eval_top5": result["top5"],
            "eval_count": result["count"]}


# ----------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------


class MetricLog:
    """JSONL (always) and TensorBoard event files (process 0)."""

    def __init__(self, workdir: Path):
        self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self.tb = None
        if jax.process_index() == 0:
            import tensorboardX

            self.tb = tensorboardX.SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if jax.process_index() != 0:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def train(cfg: Config, workdir: str | Path, stop_after: int | None = None) -> dict:
    """Trains to cfg.steps (or stop_after steps from the start); returns the final state."""
    workdir = Path(workdir)
    check_input_settings(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    check_workdir(workdir, cfg)

    mesh = sharding.batch_mesh()
    n_devices = mesh.devices.size
    if cfg.batch_size % n_devices:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_devices} "
                         "devices; training batches are not padded")
    batches_from, eval_split = make_train_batches(cfg, mesh)
    model, tx, abstract, state_sharding = abstract_train_state(cfg, mesh)
    manager = make_manager(workdir, cfg)
    restored = restore_latest(manager, abstract)
    if restored is not None:
        state = restored[1]
    else:
        state = jax.jit(lambda: init_state(cfg, model, tx), out_shardings=state_sharding)()
    if jax.process_index() == 0:  # the config of the latest (re)start; the model part is fixed
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    start = int(jax.device_get(state["step"]))

    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(model, tx, cfg),
                         in_shardings=(state_sharding, batch_sh),
                         out_shardings=(state_sharding, NamedSharding(mesh, P())),
                         donate_argnums=0)
    batches = batches_from(start)

    stop = {"now": False}
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # preemption: finish the step, save, exit cleanly
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_sigterm)
    log = MetricLog(workdir)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    progress = _progress(start, end)
    schedule = lr_schedule(cfg)  # for the log; the optimizer holds its own
    window, t_window = [], time.perf_counter()
    saved = True
    try:
        for step in range(start, end):
            state, metrics = train_step(state, next(batches))
            window.append(metrics)
            done = step + 1
            stopping = agree_to_stop(stop["now"])
            if done % cfg.log_every == 0 or done == end:
                metrics = {k: float(np.mean([jax.device_get(m[k]) for m in window]))
                           for k in window[0]}
                seconds = time.perf_counter() - t_window
                metrics.update(lr=float(schedule(done // cfg.accum_steps)),
                               step_time=seconds / len(window),
                               images_per_s=len(window) * cfg.batch_size / seconds)
                log.write(done, metrics)
                progress(done, metrics)
                window, t_window = [], time.perf_counter()
            if done % cfg.save_every == 0 or done == end or stopping:
                saved = save(manager, state, cfg, force=stopping or done == end)
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                log.write(done, run_eval(cfg, model, state["params"], mesh, eval_split))
                t_window = time.perf_counter()  # keep eval time out of the step time
            if stopping:
                logging.warning("SIGTERM%s: saved step %d, exiting",
                                "" if stop["now"] else " (on another process)", done)
                break
    finally:
        saved = wait_for_saves(manager) and saved
        manager.close()
        log.close()
        signal.signal(signal.SIGTERM, previous_handler)
        print(file=sys.stderr)
    if not saved:
        raise CheckpointError(
            f"the checkpoint of step {int(jax.device_get(state['step']))} could not be written"
            " (see the error above); the latest complete one is kept: free space and rerun the"
            " same command to resume from it")
    return state


def agree_to_stop(asked: bool) -> bool:
    """True on every process as soon as any one of them was asked to stop (SIGTERM).

    Preemption reaches the hosts of a pod at different moments; the save is a collective, so
    every process must stop after the same step. One tiny all-gather per step, multi-process only.
    """
    if jax.process_count() == 1:
        return asked
    return bool(np.any(multihost_utils.process_allgather(np.asarray(asked))))


def _progress(start: int, end: int):
    """A one-line console progress bar with ETA (process 0 only)."""
    t0 = time.perf_counter()

    def show(step: int, metrics: dict) -> None:
        if jax.process_index() != 0:
            return
        frac = (step - start) / max(end - start, 1)
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(frac, 1e-9) * (1 - frac)
        bar = "#" * int(30 * frac)
        print(f"\r[{bar:<30}] {step}/{end} loss {metrics['loss']:.3f} "
              f"acc {metrics['accuracy']:.3f} {metrics['images_per_s']:.0f} im/s "
              f"eta {eta / 60:.1f} min", end="", file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="JSON file of Config fields")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config fields")
    parser.add_argument("--coordinator", help="host:port for multi-process runs, or 'auto' "
                        "where JAX finds the cluster itself (Cloud TPU pods, Slurm)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args(argv)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = load_config(args.config, args.set)
    train(cfg, args.workdir)


if __name__ == "__main__":
    main()
