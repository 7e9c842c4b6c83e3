"""A run's checkpoints (WORKDIR/checkpoints, orbax): open, restore the newest, save async.

    manager = make_manager(workdir, keep=3)              # training: writes
    manager = make_manager(workdir, read_only=True)      # shipping: reads
    step, state = restore_latest(manager, abstract_state)

A kill mid-save leaves a temporary folder, never a half checkpoint: orbax renames the folder
only once it is complete, and cleans the leftovers up on the next start.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tome_jax.training.config import Config, model_fingerprint

CHECKPOINT_ITEMS = ("state", "meta")  # the train state; its step and model fingerprint (JSON)


class SaveError(RuntimeError):
    """The run's last checkpoint could not be written (the previous complete one is kept)."""


def make_manager(workdir: str | Path, keep: int | None = None, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """The manager of WORKDIR/checkpoints: keeping the newest `keep`, or (read_only) reading.

    Training saves asynchronously and removes the temporary folders of a killed save; a
    read-only manager creates, removes and writes nothing.
    """
    directory = (Path(workdir) / "checkpoints").resolve()
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options, item_names=CHECKPOINT_ITEMS)


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


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
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


def save(manager: ocp.CheckpointManager, state: dict[str, Any], cfg: Config,
         force: bool = False) -> bool:
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
