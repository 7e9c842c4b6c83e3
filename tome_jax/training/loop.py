"""The training loop: sharded, preemption-safe, resumable.

    state = train(load_config("train/configs/cifar10_vit.json", ["r=4"]), "runs/cifar10_r4")

The run is a pure function of (config, step): batches come from a seeded stream that can start
at any batch, and the dropout/mixup key of step s is fold_in(seed + 1, s), so a run killed at any
point and restarted from its last checkpoint ends with the same parameters as one that was
never interrupted.

The workdir may be an object-store URL (gs://bucket/run, through `etils.epath`): checkpoints,
manifests, config.json, metrics.jsonl, TensorBoard events and the lock go there. The libraries'
log is a local file while the run lasts (a logging.FileHandler cannot write to an object
store; `log_path`), copied into the workdir when the run ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tome_jax import sharding
from tome_jax.storage import AnyPath, as_path, is_remote, local_log_dir, write_atomically
from tome_jax.training.agree import all_processes, any_process
from tome_jax.training.checkpoints import Checkpoints, SaveError, check_workdir
from tome_jax.training.config import Config, warn_frozen_backbone
from tome_jax.training.inputs import check_input_settings, make_train_batches
from tome_jax.training.lock import WorkdirLock, WorkdirLocked
from tome_jax.training.messages import library_logs_to, line_left_open
from tome_jax.training.metrics import MetricLog, progress_bar, run_eval, summarise_window
from tome_jax.training.optim import lr_schedule
from tome_jax.training.state import abstract_train_state, init_state
from tome_jax.training.step import make_train_step

LOG_FILE = "train.log"  # orbax's and the other libraries' logs (process i > 0: train.<i>.log)


def train(cfg: Config, workdir: str | Path, stop_after: int | None = None, *,
          fresh_start: bool = False) -> dict[str, Any]:
    """Trains to cfg.steps (or stop_after steps from the start); returns the final state.

    Holds WORKDIR/train.lock for the whole run (WorkdirLocked if another trainer has it).
    Resumes from the newest usable checkpoint in WORKDIR/checkpoints; CheckpointsUnusable if
    there are checkpoints and none is usable, unless fresh_start (then from step 0). SIGTERM
    finishes the step, saves and returns (during set-up: exits at once, lock released).
    Raises SaveError (after training on) if the last save failed.
    """
    workdir = as_path(workdir)
    check_input_settings(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    previous_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _exit_now)
    lock = WorkdirLock(workdir)
    try:
        _lock(lock)
        log = log_path(workdir)
        if is_remote(workdir):
            log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with library_logs_to(log):
                return _train(cfg, workdir, stop_after, fresh_start)
        finally:
            if is_remote(workdir):
                upload_log(log, workdir / log.name)
    finally:
        lock.release()
        signal.signal(signal.SIGTERM, previous_handler)


def log_path(workdir: str | Path) -> Path:
    """Where this process's run sends the libraries' logs: WORKDIR/train.log (process 0) or
    WORKDIR/train.<i>.log; for an object-store workdir, the same names in a local folder
    (`storage.local_log_dir`: TMPDIR/tome_jax/gs/BUCKET/PATH), copied there at the end."""
    i = jax.process_index()
    name = LOG_FILE if i == 0 else f"train.{i}.log"
    workdir = as_path(workdir)
    return (local_log_dir(workdir) if is_remote(workdir) else workdir) / name


def upload_log(local: Path, remote: AnyPath) -> None:
    """Copies a run's local log into its object-store workdir; best-effort (a failure warns)."""
    if not local.is_file():
        return  # a clean run leaves no log
    try:
        remote.write_bytes(local.read_bytes())
    except OSError as err:
        logging.warning("the log %s could not be copied to %s (%s)", local, remote,
                        err.strerror or err)


def _exit_now(signum: int, frame: Any) -> None:
    """SIGTERM before the loop: nothing to save yet; exits through the `finally` blocks."""
    raise SystemExit(128 + signum)


def _lock(lock: WorkdirLock) -> None:
    """Process 0 takes the workdir's lock; every process stops if it could not."""
    refusal = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 - the others must not wait for process 0
            refusal = err
    if not all_processes(refusal is None):
        raise refusal or WorkdirLocked(f"process 0 could not lock {lock.path.parent}")


def _train(cfg: Config, workdir: AnyPath, stop_after: int | None,
           fresh_start: bool) -> dict[str, Any]:
    check_workdir(workdir, cfg)
    mesh = sharding.batch_mesh()
    n_devices = mesh.devices.size
    if cfg.batch_size % n_devices:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_devices} "
                         "devices; training batches are not padded")
    inputs = make_train_batches(cfg, mesh)  # reads and checks the data before any write
    ckpts = Checkpoints(workdir, cfg.keep)
    try:
        state = _run(cfg, workdir, mesh, inputs, ckpts, stop_after, fresh_start)
    finally:
        closed = ckpts.close()  # never raises: an error of _run stays the one reported
    if not closed:
        raise save_error(ckpts, state)
    return state


def _run(cfg: Config, workdir: AnyPath, mesh: Mesh, inputs: tuple[Any, Any], ckpts: Checkpoints,
         stop_after: int | None, fresh_start: bool) -> dict[str, Any]:
    """Restores or initialises the state, then trains, saves, logs and evaluates."""
    batches_from, eval_split = inputs
    model, tx, abstract, state_sharding = abstract_train_state(cfg, mesh)
    warn_frozen_backbone(cfg, abstract["params"])
    restored = ckpts.restore(abstract, fresh_start=fresh_start)
    if restored is not None:
        state = restored[1]
    else:
        state = jax.jit(lambda: init_state(cfg, model, tx), out_shardings=state_sharding)()
    if jax.process_index() == 0:  # the config of the latest (re)start; the model part is fixed
        write_atomically(workdir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
    start = int(jax.device_get(state["step"]))

    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(model, tx, cfg),
                         in_shardings=(state_sharding, batch_sh),
                         out_shardings=(state_sharding, NamedSharding(mesh, P())),
                         donate_argnums=0)
    batches = batches_from(start)

    stop = {"now": False}

    def on_sigterm(signum, frame):  # preemption: finish the step, save, exit cleanly
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_sigterm)
    log = MetricLog(workdir, start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    progress = progress_bar(start, end)
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
                metrics = summarise_window(window, t_window, schedule, done // cfg.accum_steps,
                                           cfg.batch_size)
                log.write(done, metrics)
                progress(done, metrics)
                window, t_window = [], time.perf_counter()
            if done % cfg.save_every == 0 or done == end or stopping:
                saved = ckpts.save(state, cfg, force=stopping or done == end)
            else:
                ckpts.poll()  # the manifest of a save that finished meanwhile
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                log.write(done, run_eval(cfg, model, state["params"], mesh, eval_split))
                t_window = time.perf_counter()  # keep eval time out of the step time
            if stopping:
                logging.warning("SIGTERM%s: saved step %d, exiting",
                                "" if stop["now"] else " (on another process)", done)
                break
    finally:
        saved = ckpts.wait() and saved
        log.close()
        print(file=sys.stderr)
        line_left_open(False)
    if not saved:
        raise save_error(ckpts, state)
    return state


def save_error(ckpts: Checkpoints, state: dict[str, Any]) -> SaveError:
    """The run's last save failed: what, where, why, and what is kept, in one line."""
    step, why = ckpts.failure or (None, "see the warning above")
    step = int(jax.device_get(state["step"])) if step is None else step
    return SaveError(f"the checkpoint of step {step} could not be written to "
                     f"{ckpts.directory / str(step)}: {why}; {ckpts.kept()}: free space and "
                     "rerun the same command to resume from it")


def agree_to_stop(asked: bool) -> bool:
    """True on every process as soon as any one of them was asked to stop (SIGTERM).

    Preemption reaches the hosts of a pod at different moments; the save is a collective, so
    every process must stop after the same step. One tiny all-gather per step, multi-process only.
    """
    return any_process(asked)
