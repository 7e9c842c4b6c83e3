"""Runs and checkpoints a user can trust: one trainer per workdir, checksummed checkpoints,
recovery that ends and never destroys, one-line errors."""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from tome_jax import sharding, sources
from tome_jax.checkpoint import load_model
from tome_jax.params import flatten
from tome_jax.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset=image_folder", "variant=mu/8", "num_classes=3", "image_size=16",
        "batch_size=8", "eval_every=0", "log_every=2", "warmup_steps=2", "r=1", "seed=3",
        "keep=10"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sources.write_image_folder(tmp_path_factory.mktemp("data"), {"train": 24, "test": 6})


@pytest.fixture(scope="module")
def state_and_abstract():
    """A real initial train state of the tiny model, and the target restores use."""
    from tome_jax.training.state import abstract_train_state, init_state

    cfg = load_config(None, TINY)
    model, tx, abstract, _ = abstract_train_state(cfg, sharding.batch_mesh())
    return cfg, jax.device_get(init_state(cfg, model, tx)), abstract


def at_step(state, step):
    return {**state, "step": np.asarray(step, np.int32)}


def saved_workdir(tmp_path, state_and_abstract, steps=(2, 4), keep=10):
    """A workdir whose checkpoints hold the tiny state at `steps`, manifests written."""
    from tome_jax.training.checkpoints import Checkpoints

    cfg, state, _ = state_and_abstract
    ckpts = Checkpoints(tmp_path, keep)
    for step in steps:
        assert ckpts.save(at_step(state, step), cfg)
    assert ckpts.wait()
    ckpts.close()
    return tmp_path


def garble(step_dir, seed=0):
    """64 random bytes over the middle of the checkpoint's largest array-data file."""
    data_files = [p for p in (Path(step_dir) / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    target = max(data_files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = np.random.default_rng(seed).bytes(64)
    target.write_bytes(bytes(data))
    return target.relative_to(step_dir)


def digit_dirs(folder):
    return sorted(int(p.name) for p in Path(folder).glob("*") if p.name.isdigit())


def one_line(text, prefix):
    """The lines of `text` that start with `prefix` (after a progress bar's carriage return)."""
    return [line.split("\r")[-1] for line in text.splitlines()
            if line.split("\r")[-1].startswith(prefix)]


# One trainer per workdir.

# Holds the lock in a second process; lock.py needs only the standard library, so this loads
# it by path instead of importing the package (jax, TensorFlow: seconds).
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
lock.WorkdirLock(sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        tmp_path, folder, capsys):
    from tome_jax.cli import train as train_cli

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER,
                               str(ROOT / "tome_jax/training/lock.py"), str(workdir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(["--workdir", str(workdir), "--set", *TINY, f"data_dir={folder}",
                            "steps=2", "lr=0.1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        errors = one_line(err, "python -m train.train: error:")
        assert len(errors) == 1, err
        assert (f"workdir {workdir} is in use by another trainer: pid {holder.pid} on host "
                f"{socket.gethostname()} since 20") in errors[0]
        assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up, the lock file stays behind
        holder.wait()
    record = json.loads((workdir / "train.lock").read_text())
    assert record["pid"] == holder.pid
    from tome_jax.training.lock import WorkdirLock

    with pytest.warns(UserWarning, match=f"previous holder, pid {holder.pid} on host .* no "
                                         "longer runs; taking the lock over"):
        lock = WorkdirLock(workdir)
        lock.acquire()
    assert json.loads((workdir / "train.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(FileExistsError, match=f"pid {os.getpid()}"):  # one holder at a time
        WorkdirLock(workdir).acquire()
    lock.release()
    assert not (workdir / "train.lock").exists()


def test_lock_records_that_cannot_be_checked_or_read(tmp_path):
    from tome_jax.training.lock import WorkdirLock, WorkdirLocked

    path = tmp_path / "train.lock"
    path.write_text(json.dumps({"host": "another-host", "pid": 1, "since": "2025-01-01T00:00"}))
    with pytest.raises(WorkdirLocked, match=r"pid 1 on host another-host since 2025-01-01T00:00 "
                                            r".*if that run is gone, delete .*train.lock"):
        WorkdirLock(tmp_path).acquire()
    path.write_bytes(b"\x00\xff garbage")  # killed while writing it
    with pytest.warns(UserWarning, match="unknown holder .* taking the lock over"):
        with WorkdirLock(tmp_path):
            assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert not path.exists()


# Checksums.

def test_garbled_bytes_are_detected_set_aside_and_the_previous_checkpoint_used(
        tmp_path, state_and_abstract):
    from tome_jax.training.checkpoints import CORRUPT_DIR, Checkpoints
    from tome_jax.training.manifest import MANIFEST_FILE

    cfg, state, abstract = state_and_abstract
    workdir = saved_workdir(tmp_path, state_and_abstract)
    for step in (2, 4):
        assert (workdir / "checkpoints" / str(step) / MANIFEST_FILE).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact checkpoint restores without a word, twice
        for _ in range(2):
            step, _ = Checkpoints(workdir, read_only=True).restore(abstract)
            assert step == 4
    name = garble(workdir / "checkpoints" / "4")
    # Shipping reads only: the garbled one is skipped, named, and left where it is.
    with pytest.warns(UserWarning) as shown:
        step, _ = Checkpoints(workdir, read_only=True).restore(abstract)
    assert step == 2
    assert [str(w.message) for w in shown] == [
        f"checkpoint {workdir / 'checkpoints' / '4'} is unusable: {name} differs from its "
        "checksum; skipped"]
    assert digit_dirs(workdir / "checkpoints") == [2, 4]
    # Training moves it aside (renamed, every byte kept) and resumes from the previous one.
    ckpts = Checkpoints(workdir, 10)
    with pytest.warns(UserWarning, match=f"checkpoints/4 is unusable: {name} differs from its "
                                         f"checksum; moved to .*{CORRUPT_DIR}/4-"):
        step, restored = ckpts.restore(abstract)
    assert step == 2
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(state["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert digit_dirs(workdir / "checkpoints") == [2]
    [aside] = (workdir / CORRUPT_DIR).iterdir()
    assert (aside / name).is_file() and (aside / MANIFEST_FILE).is_file()
    # The final step again, where orbax's StepAlreadyExistsError stopped the run before.
    assert ckpts.save(at_step(state, 4), cfg, force=True) and ckpts.wait()
    ckpts.close()
    assert digit_dirs(workdir / "checkpoints") == [2, 4]
    assert Checkpoints(workdir, read_only=True).restore(abstract)[0] == 4


def test_no_usable_checkpoint_refuses_to_start_until_a_fresh_start_is_asked_for(
        tmp_path, state_and_abstract):
    from tome_jax.training.checkpoints import CORRUPT_DIR, Checkpoints, CheckpointsUnusable

    _, _, abstract = state_and_abstract
    workdir = saved_workdir(tmp_path, state_and_abstract)
    names = {step: garble(workdir / "checkpoints" / str(step), seed=step) for step in (2, 4)}
    message = (f"no usable checkpoint in {workdir / 'checkpoints'}: step 4 \\({names[4]} "
               f"differs from its checksum\\); step 2 \\({names[2]} differs from its checksum\\);"
               f" moved to {workdir / CORRUPT_DIR}; to train from step 0, rerun with "
               "--fresh-start")
    with pytest.warns(UserWarning, match="is unusable"), \
            pytest.raises(CheckpointsUnusable, match=message):
        Checkpoints(workdir, 10).restore(abstract)
    assert digit_dirs(workdir / "checkpoints") == []
    assert len(list((workdir / CORRUPT_DIR).iterdir())) == 2  # moved, not deleted
    # A rerun does not mistake the emptied folder for a new run.
    with pytest.raises(CheckpointsUnusable, match="the ones found before were moved to"):
        Checkpoints(workdir, 10).restore(abstract)
    with pytest.warns(UserWarning, match="starting from step 0 as asked"):
        assert Checkpoints(workdir, 10).restore(abstract, fresh_start=True) is None
    assert len(list((workdir / CORRUPT_DIR).iterdir())) == 2


def test_a_checkpoint_without_manifest_is_used_only_if_it_restores_finite(
        tmp_path, state_and_abstract):
    # A run killed between orbax finishing a save and the manifest being written.
    from tome_jax.training.checkpoints import CORRUPT_DIR, Checkpoints
    from tome_jax.training.manifest import MANIFEST_FILE

    cfg, state, abstract = state_and_abstract
    workdir = saved_workdir(tmp_path, state_and_abstract)
    (workdir / "checkpoints" / "4" / MANIFEST_FILE).unlink()
    with pytest.warns(UserWarning, match="checkpoints/4 has no checksum manifest .* finite"):
        assert Checkpoints(workdir, 10).restore(abstract)[0] == 4
    assert (workdir / "checkpoints" / "4" / MANIFEST_FILE).is_file()  # written now
    # One holding NaN (what garbled float bytes often decode to) is set aside.
    broken = at_step(state, 6)
    broken["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), broken["params"])
    ckpts = Checkpoints(workdir, 10)
    assert ckpts.save(broken, cfg) and ckpts.wait()
    ckpts.close()
    (workdir / "checkpoints" / "6" / MANIFEST_FILE).unlink()
    with pytest.warns(UserWarning, match="checkpoints/6 is unusable: it has no checksum "
                                         "manifest and holds NaN or inf values; moved to"):
        assert Checkpoints(workdir, 10).restore(abstract)[0] == 4
    assert [p.name.split("-")[0] for p in (workdir / CORRUPT_DIR).iterdir()] == ["6"]


def test_rotation_never_deletes_the_last_checkpoint_with_a_manifest(tmp_path,
                                                                     state_and_abstract):
    from tome_jax.training.checkpoints import steps_to_delete

    assert steps_to_delete([2, 4, 6], [2, 4, 6], keep=2) == [2]
    # Newer checkpoints not yet checksummed: the newest good one stays.
    assert steps_to_delete([2, 4, 6, 8], [2, 4], keep=2) == [2]
    assert steps_to_delete([2, 4, 6, 8], [], keep=1) == [2, 4, 6]
    assert steps_to_delete([2, 4, 6], [2], keep=0) == []  # 0 keeps all
    workdir = saved_workdir(tmp_path, state_and_abstract, steps=(2, 4, 6), keep=2)
    assert digit_dirs(workdir / "checkpoints") == [4, 6]


# Disk full.

def test_a_failed_save_is_one_line_with_the_path_the_os_error_and_the_kept_step(
        tmp_path, state_and_abstract, monkeypatch):
    from tome_jax.training.checkpoints import Checkpoints, reason

    cfg, state, _ = state_and_abstract
    ckpts = Checkpoints(tmp_path, 10)
    assert ckpts.save(at_step(state, 2), cfg) and ckpts.wait()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpts.manager, "save", full)
    with pytest.warns(UserWarning) as shown:
        assert not ckpts.save(at_step(state, 4), cfg)
    assert [str(w.message) for w in shown] == [
        f"saving a checkpoint failed: step 4 to {tmp_path.resolve() / 'checkpoints' / '4'}: No "
        "space left on device; the latest complete checkpoint, step 2, is kept"]
    monkeypatch.undo()
    ckpts.close()
    # What orbax raises from its background threads: the OS error sits past 300 characters.
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.mu/0" in OCDBT '
                             'database at local file "' + "x" * 300 + '": Failed to write 183 '
                             "bytes to file 8: No space left on device [os_error_code='28']")
    assert reason(tensorstore) == "No space left on device"
    assert reason(RuntimeError("line one\nline two")) == "RuntimeError: line one"


def test_library_logs_and_stray_tracebacks_go_to_the_log_file(tmp_path, capfd):
    import logging

    from tome_jax.training.messages import library_logs_to

    with library_logs_to(tmp_path / "train.log"):
        logging.getLogger("absl").error("orbax says: Traceback (most recent call last)")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        sys.unraisablehook(type("U", (), {"exc_type": RuntimeError, "object": None,
                                          "exc_value": RuntimeError("Event loop is closed"),
                                          "exc_traceback": None, "err_msg": None})())
    out, err = capfd.readouterr()
    assert "orbax says" not in out + err and "Event loop" not in out + err
    log = (tmp_path / "train.log").read_text()
    assert "orbax says" in log and "Task exception" in log and "Event loop is closed" in log


# Config and the command lines.

def test_config_errors_name_the_key_or_the_file(tmp_path):
    for overrides, message in [
            (["steps=abc"], "--set steps=abc: steps must be an int, not 'abc'"),
            (["steps=1.5"], "--set steps=1.5: steps must be an int"),
            (["lr=fast"], "--set lr=fast: lr must be a number"),
            (["fsdp=maybe"], "--set fsdp=maybe: fsdp must be true or false")]:
        with pytest.raises(ValueError, match=message):
            load_config(None, overrides)
    binary = tmp_path / "config.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match=f"config file {binary} is not UTF-8 text"):
        load_config(binary, [])
    for text, message in [("{'steps': 2}", "is not valid JSON: Expecting property name"),
                          ("[1, 2]", "holds a JSON list, not an object"),
                          ('{"steps": "abc"}', f"{binary}: steps must be an int"),
                          ('{"fsdp": 1.5}', f"{binary}: fsdp must be true or false")]:
        binary.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(binary, [])
    binary.write_text('{"steps": 20, "fsdp": true, "r": 8}')
    cfg = load_config(binary, ["lr=0.5"])
    assert (cfg.steps, cfg.fsdp, cfg.r, cfg.lr) == (20, True, "8", 0.5)


def test_every_set_applies_and_user_errors_are_one_line_exit_2(tmp_path, capsys):
    from tome_jax.cli import ship as ship_cli
    from tome_jax.cli import train as train_cli

    args = train_cli.build_parser().parse_args(
        ["--workdir", "w", "--set", "steps=3", "lr=0.5", "--set", "steps=7", "--fresh-start"])
    assert args.set == ["steps=3", "lr=0.5", "steps=7"] and args.fresh_start
    cfg = load_config(None, args.set)
    assert (cfg.steps, cfg.lr) == (7, 0.5)  # every --set applies; a later value wins
    binary = tmp_path / "c.json"
    binary.write_bytes(bytes(range(256)))
    for argv, message in [
            (["--set", "steps=abc"], "--set steps=abc: steps must be an int"),
            (["--config", str(binary)], f"config file {binary} is not UTF-8 text"),
            (["--config", str(tmp_path / "none.json")], "config file .*none.json not found")]:
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(["--workdir", str(tmp_path / "w"), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        [error] = one_line(err, "python -m train.train: error:")  # after argparse's usage
        assert re.search(message, error), (message, err)
    for workdir, message in [(tmp_path / "nothing", "is not a training workdir"),
                             (binary.parent, "is not a training workdir")]:
        with pytest.raises(SystemExit) as exit_info:
            ship_cli.main(["--workdir", str(workdir), "--out", str(tmp_path / "m")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err
        assert len(one_line(err, "python -m train.ship: error:")) == 1, err


def test_a_resumed_run_logs_each_step_once(tmp_path):
    from tome_jax.training.metrics import MetricLog

    rows = [{"step": s, "loss": 1.0} for s in (2, 4, 6)] + [{"step": 4, "eval_top1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')  # cut by a kill
    log = MetricLog(tmp_path, start=4)  # resumed from the checkpoint of step 4
    log.write(6, {"loss": 0.5})
    log.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in logged] == [(2, 1.0), (4, 1.0), (4, None),
                                                             (6, 0.5)]


def test_metrics_without_tensorboardx(tmp_path, monkeypatch, capsys):
    from tome_jax.training.metrics import MetricLog

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    log = MetricLog(tmp_path)
    log.write(1, {"loss": 0.5})
    log.close()
    assert log.tb is None and not (tmp_path / "tb").exists()
    assert "tensorboardX is not installed" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}


# Whole runs through the command line (minutes on 2 cores).

def cli(workdir, folder, *extra, fresh=False):
    """python -m train.train in a subprocess: (exit code, stdout + stderr)."""
    args = [sys.executable, "-m", "train.train", "--workdir", str(workdir), "--set", *TINY,
            f"data_dir={folder}", *extra]
    proc = subprocess.run(args + (["--fresh-start"] if fresh else []), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def shipped_params(workdir, out):
    from tome_jax.training.ship import ship

    _, step = ship(workdir, out)
    return step, {k: np.asarray(v) for k, v in flatten(load_model(out)[1]).items()}


@pytest.mark.slow  # three tiny training runs in subprocesses: 2-5 min
def test_recovery_finishes_the_final_step_refuses_when_nothing_is_usable_and_never_deletes(
        tmp_path, folder, capsys):
    from tome_jax.cli import ship as ship_cli

    workdir = tmp_path / "run"
    steps = ["steps=4", "save_every=2"]
    code, out = cli(workdir, folder, *steps)
    assert code == 0, out
    _, whole = shipped_params(workdir, tmp_path / "whole")
    # 64 garbled bytes in the newest checkpoint: shipping names it and ships the previous one
    # (before: it shipped parameters up to 1e35 without a word).
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    name = garble(copy / "checkpoints" / "4")
    ship_cli.main(["--workdir", str(copy), "--out", str(tmp_path / "garbled")])
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 2
    assert one_line(err, "warning:") == [f"warning: checkpoint {copy / 'checkpoints' / '4'} is "
                                         f"unusable: {name} differs from its checksum; skipped"]
    # The final step's checkpoint cut short: set aside, steps 3-4 trained again, the same
    # parameters (before: StepAlreadyExistsError and a request to rerun, forever).
    data = max((p for p in (workdir / "checkpoints/4/state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
    code, out = cli(workdir, folder, *steps)
    assert code == 0, out
    warned = one_line(out, "warning:")
    assert len(warned) == 1 and "checkpoints/4 is unusable" in warned[0], out
    assert digit_dirs(workdir / "checkpoints") == [2, 4]
    step, again = shipped_params(workdir, tmp_path / "again")
    assert step == 4 and again.keys() == whole.keys()
    for k in whole:
        np.testing.assert_array_equal(again[k], whole[k], err_msg=k)
    # Every checkpoint garbled: moved aside, and the run refuses to start from scratch.
    for step in (2, 4):
        garble(workdir / "checkpoints" / str(step), seed=step)
    code, out = cli(workdir, folder, *steps)
    assert code == 2, out
    [error] = one_line(out, "python -m train.train: error:")
    assert "no usable checkpoint" in error and "step 4 (" in error and "step 2 (" in error
    assert "--fresh-start" in error and "Traceback" not in out
    assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 3  # nothing deleted
    code, out = cli(workdir, folder, *steps, fresh=True)
    assert code == 0, out
    step, fresh = shipped_params(workdir, tmp_path / "fresh")
    for k in whole:  # from step 0 with the same seed: the same run
        np.testing.assert_array_equal(fresh[k], whole[k], err_msg=k)
    logged = [json.loads(line)["step"] for line in
              (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4], logged  # a fresh start's log starts afresh too


@pytest.mark.slow  # a tiny training run in a subprocess, then a second start: 1-2 min
def test_a_running_trainer_holds_its_workdir_until_sigterm(tmp_path, folder, capsys):
    from tome_jax.cli import train as train_cli

    workdir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "train.train", "--workdir", str(workdir), "--set", *TINY,
         f"data_dir={folder}", "steps=100000", "save_every=1000", "log_every=1"],
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        metrics = workdir / "metrics.jsonl"
        while time.time() < deadline and first.poll() is None and not (
                metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[0]
        with pytest.raises(SystemExit) as exit_info:  # the second run, another lr
            train_cli.main(["--workdir", str(workdir), "--set", *TINY, f"data_dir={folder}",
                            "steps=4", "lr=0.1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        [error] = one_line(err, "python -m train.train: error:")
        assert f"in use by another trainer: pid {first.pid} on host" in error
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, out
    assert "saved step" in out and not (workdir / "train.lock").exists()
    assert json.loads((workdir / "config.json").read_text())["lr"] == 1e-3  # the first's


def mount_tmpfs(path, size):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow  # a tiny training run in a subprocess on a 1 MB tmpfs: 1-2 min
def test_disk_full_is_one_line_with_the_path_and_the_last_complete_step(tmp_path, folder):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers")
    try:
        code, out = cli(disk / "run", folder, "steps=12", "save_every=2")
        kept = digit_dirs(disk / "run" / "checkpoints")
        log = (disk / "run" / "train.log").read_text() if (disk / "run" / "train.log").exists() \
            else ""
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert code == 1, out
    [error] = one_line(out, "python -m train.train: error:")
    assert "No space left on device" in error and f"{disk}/run/checkpoints/12" in error
    assert f"the latest complete checkpoint, step {kept[-1]}, is kept" in error, error
    assert "Traceback" not in out and "Event loop is closed" not in out, out
    assert len(out.splitlines()) < 20, out
    assert not log or " ERROR " in log  # the details went there, as far as there was room
