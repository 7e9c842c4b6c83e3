"""The training loop: sharded, preemption-safe, resumable.

    state = train(load_config("train/configs/cifar10_vit.json", ["r=4"]), "runs/cifar10_r4")

The run is a pure function of (config, step): batches come from a seeded stream that can start
at any batch, and the dropout/mixup key of step s is fold_in(seed + 1, s), so a run killed at any
point and restarted from its last checkpoint ends with the same parameters as one that was
never interrupted.
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
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tome_jax import sharding
from tome_jax.training.checkpoints import (
    SaveError,
    check_workdir,
    make_manager,
    restore_latest,
    save,
    wait_for_saves,
)
from tome_jax.training.config import Config
from tome_jax.training.inputs import check_input_settings, make_train_batches
from tome_jax.training.metrics import MetricLog, progress_bar, run_eval, summarise_window
from tome_jax.training.optim import lr_schedule
from tome_jax.training.state import abstract_train_state, init_state
from tome_jax.training.step import make_train_step


def train(cfg: Config, workdir: str | Path, stop_after: int | None = None) -> dict[str, Any]:
    """Trains to cfg.steps (or stop_after steps from the start); returns the final state.

    Resumes from the newest readable checkpoint in WORKDIR/checkpoints. SIGTERM finishes the
    step, saves and returns. Raises SaveError (after training on) if the last save failed.
    """
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
    manager = make_manager(workdir, cfg.keep)
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
        raise SaveError(
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
