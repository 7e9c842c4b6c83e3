"""A run's checkpoints (WORKDIR/checkpoints, orbax), checksummed, verified, never lost.

    ckpts = Checkpoints(workdir, keep=3)                      # training: writes
    restored = ckpts.restore(abstract_state)                  # (step, state) or None
    ckpts.save(state, cfg); ckpts.poll(); ...; ckpts.wait(); ckpts.close()
    restored = Checkpoints(workdir, read_only=True).restore(abstract_state)   # shipping

Integrity. A kill mid-save leaves a temporary folder, never a half checkpoint: orbax renames the
folder only once it is complete (and removes leftovers on the next start). Once a save is
complete, its folder gets a manifest of the sha256 of every file (`training.manifest`), and a
restore checks it first: flipped or garbled bytes are caught before anything is loaded.
Saves are asynchronous, so the manifest is written as soon as the save is seen finished (the
loop polls after every step, and the next save and the end of the run wait for it). A run
killed in between leaves its newest checkpoint without one: such a checkpoint is used only if
it restores and every floating-point value in it is finite (then it gets its manifest).

Recovery. A checkpoint that fails either test is moved aside, not deleted, to
WORKDIR/corrupt_checkpoints/<step>-<time>, with one warning, and the previous one is tried. If
none is usable, the run refuses to start (CheckpointsUnusable) unless it is asked for a fresh
start. Rotation (`keep`) deletes an old checkpoint only once a newer one has its manifest, and
never the newest one that has.

In multi-process runs process 0 checks, moves and writes manifests; every process restores,
and they agree on the outcome before going on.

Object stores (a gs:// workdir, through `etils.epath`). Orbax writes a step there in place and
marks it complete with a commit file (COMMIT_FILE) instead of renaming a temporary folder; a
step folder without it is unfinished (orbax removes it on the next start). Rotation deletes
that marker first, so a delete cut short leaves an unfinished folder, never a half step that
looks complete. Moving a folder aside is a copy and a delete there.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tome_jax import sharding
from tome_jax.storage import AnyPath, as_path, copy_tree, is_remote, remove_tree
from tome_jax.training.agree import all_processes, from_process_0
from tome_jax.training.config import Config, model_fingerprint
from tome_jax.training.manifest import (
    MANIFEST_FILE,
    MISSING,
    check_manifest,
    has_manifest,
    write_manifest,
)

CHECKPOINT_ITEMS = ("state", "meta")  # the train state; its step and model fingerprint (JSON)
CORRUPT_DIR = "corrupt_checkpoints"
_REASON_CHARS = 200
_DELETING = ".deleting"
COMMIT_FILE = "commit_success.txt"  # orbax's mark of a finished step on an object store


class SaveError(RuntimeError):
    """The run's last checkpoint could not be written (the previous complete one is kept)."""


class CheckpointsUnusable(ValueError):
    """The workdir holds checkpoints, and none of them is usable."""


def check_workdir(workdir: AnyPath, cfg: Config) -> None:
    """Refuses a workdir whose run trained another model (nothing there is overwritten)."""
    meta = workdir / "config.json"
    if meta.exists():
        try:
            previous = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{meta} is unreadable ({type(err).__name__}); is {workdir} a "
                             "training workdir?") from None
        mine = model_fingerprint(cfg)
        defaults = Config()  # a key added since that run was written has its default there
        theirs = {k: previous.get(k, getattr(defaults, k)) for k in mine}
        if theirs != mine:
            diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
            raise ValueError(f"workdir {workdir} holds a run of another model (checkpoint vs "
                             f"config: {diff}); use a new workdir")


def steps_to_delete(steps: Sequence[int], manifested: Sequence[int], keep: int) -> list[int]:
    """The checkpoints rotation removes: all but the `keep` newest, and never the newest one
    with a manifest (the last known-good one). keep <= 0 keeps everything."""
    if keep <= 0:
        return []
    kept = set(sorted(steps)[-keep:])
    if manifested:
        kept.add(max(manifested))
    return sorted(s for s in steps if s not in kept)


def reason(err: BaseException) -> str:
    """An exception in a few words: the OS error behind it when there is one ("No space left
    on device"), else its first line, cut short."""
    chain = list(_chain(err))
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    text = "\n".join(str(e) for e in chain)
    code = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", text)
    if code:
        return os.strerror(int(code.group(1) or code.group(2)))
    first = (str(err).strip().splitlines() or [""])[0]
    first = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return first if len(first) <= _REASON_CHARS else first[:_REASON_CHARS] + " ..."


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])


class Checkpoints:
    """WORKDIR/checkpoints: async orbax saves with manifests, verified restores, set-aside."""

    def __init__(self, workdir: str | Path, keep: int = 0, *, read_only: bool = False):
        workdir = as_path(workdir)
        self.workdir = workdir if is_remote(workdir) else workdir.resolve()
        self.directory = self.workdir / "checkpoints"
        self.keep = keep
        self.read_only = read_only
        self.primary = jax.process_index() == 0
        self.failure: tuple[int, str] | None = None  # (step, reason) of the last failed save
        self._pending: list[int] = []  # saves started whose manifests are not written yet
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:  # rotation is ours (after the manifest), so orbax keeps everything
            options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                   enable_async_checkpointing=True,
                                                   cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=CHECKPOINT_ITEMS)
        if self.primary and not read_only:  # a rotation killed mid-delete
            for doomed in self.directory.glob(f"*{_DELETING}"):
                remove_tree(doomed)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> AnyPath:
        return self.directory / str(step)

    def latest_complete(self) -> int | None:
        """The newest step whose folder orbax finished (on disk now)."""
        done = [int(p.name) for p in self.directory.glob("*") if p.name.isdigit()] \
            if self.directory.is_dir() else []
        if is_remote(self.directory):  # written in place there: finished once committed
            done = [s for s in done if (self.step_dir(s) / COMMIT_FILE).exists()]
        return max(done, default=None)

    # Restoring.

    def restore(self, abstract_state: dict[str, Any], *,
                fresh_start: bool = False) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the newest usable checkpoint, None for a fresh start.

        abstract_state (`abstract_train_state`) gives shapes, dtypes and the shardings to
        restore into (restoring as saved fails on another topology). Unusable checkpoints are
        moved aside (read-only: skipped), each with one warning. CheckpointsUnusable when there
        were checkpoints and none is usable, unless fresh_start.
        """
        unusable: list[str] = []
        for step in sorted(self.steps(), reverse=True):
            restored, problem = self._try(step, abstract_state)
            if problem is None:
                self._settle()
                return step, restored
            unusable.append(f"step {step} ({problem})")
        self._settle()
        corrupt = self.workdir / CORRUPT_DIR
        if unusable:
            found = "; ".join(unusable) + ("" if self.read_only else f"; moved to {corrupt}")
        elif not self.read_only and not self.steps() and self._set_aside_before():
            found = f"the ones found before were moved to {corrupt}"
        else:
            return None
        if fresh_start and not self.read_only:
            warnings.warn(f"no usable checkpoint in {self.directory} ({found}); starting from "
                          "step 0 as asked", stacklevel=2)
            return None
        hint = "" if self.read_only else (
            "; to train from step 0, rerun with --fresh-start (train(..., fresh_start=True))")
        raise CheckpointsUnusable(f"no usable checkpoint in {self.directory}: {found}{hint}")

    def _try(self, step: int, abstract_state: dict[str, Any]
             ) -> tuple[dict[str, Any] | None, str | None]:
        """(state, None) if `step` is usable, else (None, why) with the folder set aside."""
        step_dir = self.step_dir(step)
        problem = check_manifest(step_dir) if self.primary else None
        verdict = from_process_0(0 if problem is None else 1 if problem == MISSING else 2)
        if verdict == 2:
            return None, self._unusable(step, problem or "checksum mismatch on process 0")
        state, error = None, None
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside alike
            error = reason(err)
        if not all_processes(error is None):
            error = error or "it failed on another process"
            return None, self._unusable(step, f"it could not be restored ({error})")
        if verdict == 1:
            if not all_finite(state):
                return None, self._unusable(step, "it has no checksum manifest and holds NaN "
                                                  "or inf values")
            if self.primary and not self.read_only:
                warnings.warn(f"checkpoint {step_dir} has no checksum manifest (its run stopped "
                              "right after saving it): it restores and its values are finite, "
                              "so it is used and its manifest written now", stacklevel=3)
                write_manifest(step_dir)
        return state, None

    def _unusable(self, step: int, problem: str) -> str:
        """Warns once; training moves the folder to CORRUPT_DIR. Returns `problem`."""
        step_dir = self.step_dir(step)
        if self.read_only:
            if self.primary:
                warnings.warn(f"checkpoint {step_dir} is unusable: {problem}; skipped",
                              stacklevel=4)
            return problem
        if self.primary:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            dest = self.workdir / CORRUPT_DIR / f"{step}-{stamp}"
            dest.parent.mkdir(exist_ok=True)
            n = 1
            while dest.exists():  # the same step set aside twice within a second
                dest, n = dest.with_name(f"{step}-{stamp}-{n}"), n + 1
            if is_remote(step_dir):  # copied, unmarked (orbax forgets it), then deleted
                copy_tree(step_dir, dest)
                (step_dir / COMMIT_FILE).unlink(missing_ok=True)
                remove_tree(step_dir)
            else:
                step_dir.rename(dest)
            warnings.warn(f"checkpoint {step_dir} is unusable: {problem}; moved to {dest}",
                          stacklevel=4)
        return problem

    def _settle(self) -> None:
        """After process 0 moved folders: everyone waits for it, then re-reads the steps."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tome_jax.training.checkpoints.restore")
        self.manager.reload()

    def _set_aside_before(self) -> bool:
        folder = self.workdir / CORRUPT_DIR
        return folder.is_dir() and any(folder.iterdir())

    # Saving.

    def save(self, state: dict[str, Any], cfg: Config, force: bool = False) -> bool:
        """Starts an async save of `state`; False if it or the save still in flight failed.

        A failed save (a full disk, a lost mount) never costs the previous checkpoint: orbax
        writes to a temporary folder and renames it only once complete. Training goes on and
        the next save tries again.
        """
        ok = self.wait()
        step = int(jax.device_get(state["step"]))
        try:
            started = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"step": step, **model_fingerprint(cfg)})), force=force)
        except Exception as err:  # noqa: BLE001 - orbax raises OSError or tensorstore's ValueError
            self._failed(step, reason(err))
            return False
        if not started:
            self._failed(step, f"orbax skipped it (the workdir holds step "
                               f"{self.manager.latest_step()})")
            return False
        self._pending.append(step)
        return ok

    def poll(self) -> None:
        """Writes the manifest of a save that finished in the background (cheap when none)."""
        if self._pending and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> bool:
        """Waits for the background save and writes its manifest; False if it failed."""
        errors = []
        for finish in (self.manager.wait_until_finished,
                       self.manager.check_for_errors):  # orbax may hold the error for a 2nd raise
            try:
                finish()
            except Exception as err:  # noqa: BLE001 - see save()
                errors.append(err)
        ok = not errors
        if errors:
            self._failed(self._pending[-1] if self._pending else None, reason(errors[0]))
        pending, self._pending = self._pending, []
        if self.primary:
            for step in pending:
                if self.step_dir(step).is_dir():
                    self._write_manifest(step)
            if pending:
                self._rotate()
        return ok

    def _write_manifest(self, step: int) -> None:
        """The manifest of a complete checkpoint; if it cannot be written, the checkpoint is
        still kept (a restore checks it as one whose run stopped before its manifest)."""
        step_dir = self.step_dir(step)
        try:
            write_manifest(step_dir)
        except OSError as err:
            (step_dir / (MANIFEST_FILE + ".tmp")).unlink(missing_ok=True)
            warnings.warn(f"the checksum manifest of {step_dir} could not be written "
                          f"({reason(err)}); the checkpoint is kept, and checked by restoring "
                          "it if it is ever needed", stacklevel=4)

    def _rotate(self) -> None:
        steps = [int(p.name) for p in self.directory.glob("*") if p.name.isdigit()]
        good = [s for s in steps if has_manifest(self.step_dir(s))]
        for step in steps_to_delete(steps, good, self.keep):
            if is_remote(self.directory):
                # A rename copies every object there; unmarking it does the same job.
                (self.step_dir(step) / COMMIT_FILE).unlink(missing_ok=True)
                remove_tree(self.step_dir(step))
                continue
            # Renamed first (orbax ignores the name), so a kill mid-delete leaves no half step.
            doomed = self.directory / f"{step}{_DELETING}"
            self.step_dir(step).rename(doomed)
            remove_tree(doomed)

    def _failed(self, step: int | None, why: str) -> None:
        """Records and reports a failed save; frees its half-written folder."""
        self.failure = (step, why)
        if self.primary:  # free the half-written folder so the next save has room
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                remove_tree(tmp)
            what = f"step {step} to {self.step_dir(step)}" if step is not None else \
                str(self.directory)
            warnings.warn(f"saving a checkpoint failed: {what}: {why}; {self.kept()}",
                          stacklevel=3)

    def kept(self) -> str:
        """"the latest complete checkpoint, step 4, is kept" (or that there is none yet)."""
        latest = self.latest_complete()
        if latest is None:
            return "no complete checkpoint exists yet"
        return f"the latest complete checkpoint, step {latest}, is kept"

    def close(self) -> bool:
        """Waits for the background work and closes; False if a failure shows up only now.

        Orbax raises a failed save's error again on close; one already reported is not
        reported twice.
        """
        try:
            self.manager.close()
        except Exception as err:  # noqa: BLE001 - see save()
            if self.failure is None:
                self._failed(self._pending[-1] if self._pending else None, reason(err))
                return False
        return True


def all_finite(tree: Any) -> bool:
    """True if every floating-point array of `tree` (jax arrays, any sharding) is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return True
    finite = jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves)
    return bool(sharding.to_host(finite))

