"""The training loop: learning, device-count invariance, exact resume, bad input."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import sharding, sources
from tome_jax.checkpoint import load_model
from tome_jax.params import flatten
from tome_jax.training.config import load_config
from tome_jax.training.loop import train
from tome_jax.training.optim import lr_schedule, make_optimizer
from tome_jax.training.ship import ship
from tome_jax.training.state import abstract_train_state, init_state, make_model
from tome_jax.training.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset=image_folder", "variant=mu/8", "num_classes=3", "image_size=16",
        "batch_size=8", "eval_every=0", "log_every=2", "warmup_steps=2", "r=1", "seed=3",
        "dropout=0.1", "mixup=0.2", "cutmix=0.5", "keep=10"]

# Runs train() in a fresh process (device count and kills need their own process) and writes
# the final parameters to <workdir>/final.npz.
DRIVER = """
import os, sys, numpy as np, jax
if os.environ.get("COORDINATOR"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["COORDINATOR"], 2, int(os.environ["PROCESS_ID"]))
from tome_jax.training import load_config, train
from tome_jax.sharding import to_host
cfg = load_config(None, sys.argv[2:])
state = train(cfg, sys.argv[1])
flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
name = "final.npz" if jax.process_count() == 1 else f"final{jax.process_index()}.npz"
# One process sees every shard (FSDP too); across processes the parameters are replicated.
get = (lambda v: np.asarray(jax.device_get(v))) if jax.process_count() == 1 else to_host
np.savez(os.path.join(sys.argv[1], name), **{jax.tree_util.keystr(k): get(v) for k, v in flat})
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sources.write_image_folder(tmp_path_factory.mktemp("data"),
                                      {"train": 48, "test": 12})


def launch(workdir, folder, *overrides, devices=1, **env_extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "TF_CPP_MIN_LOG_LEVEL": "3", **env_extra}
    args = [sys.executable, "-c", DRIVER, str(workdir), *TINY, f"data_dir={folder}", *overrides]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(workdir, folder, *overrides, devices=1):
    proc = launch(workdir, folder, *overrides, devices=devices)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return dict(np.load(Path(workdir) / "final.npz")), out


def checkpoint_steps(workdir):
    """Completed checkpoints (orbax's temporary folders have a suffix)."""
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) \
        if folder.exists() else []


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def test_loss_decreases_on_a_fixed_batch():
    cfg = load_config(None, ["variant=mu/8", "num_classes=3", "image_size=16", "lr=3e-3",
                             "warmup_steps=1", "steps=40", "drop_path=0", "label_smoothing=0"])
    model = make_model(cfg)
    images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    tx = make_optimizer(cfg, jax.eval_shape(model.init, jax.random.key(0), images)["params"])
    state = init_state(cfg, model, tx)
    step = jax.jit(make_train_step(model, tx, cfg))
    batch = {"image": images, "label": jnp.arange(8) % 3}
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow  # two training runs, one on 8 simulated devices: about 2-4 min on 2 cores
def test_same_parameters_on_1_and_8_devices(folder, tmp_path):
    one, _ = run(tmp_path / "one", folder, "steps=4", "save_every=100")
    eight, _ = run(tmp_path / "eight", folder, "steps=4", "save_every=100", devices=8)
    assert_same(one, eight, atol=2e-5)


@pytest.mark.slow  # two processes compiling: minutes on 2 cores (CI runs `pytest -m slow`)
def test_two_process_run(folder, tmp_path):
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [launch(tmp_path, folder, "steps=4", "save_every=2", COORDINATOR=f"localhost:{port}",
                    PROCESS_ID=str(i)) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = (dict(np.load(tmp_path / f"final{i}.npz")) for i in range(2))
    assert_same(a, b)  # both processes hold the same replicated parameters
    assert checkpoint_steps(tmp_path) == [2, 4]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4] and all(np.isfinite(m["loss"]) for m in logged)


@pytest.mark.slow  # two processes, as test_two_process_run
def test_two_processes_with_the_device_pipeline_match_one(folder, tmp_path):
    # Every process holds the whole split and draws the same global batch, so 2 processes of
    # 1 device train exactly what 1 process of 2 devices does (and evaluate the same split).
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    extra = ("steps=4", "save_every=2", "eval_every=4", "input_pipeline=device")
    procs = [launch(tmp_path / "two", folder, *extra, COORDINATOR=f"localhost:{port}",
                    PROCESS_ID=str(i)) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    one, _ = run(tmp_path / "one", folder, *extra, devices=2)
    for i in range(2):
        assert_same(dict(np.load(tmp_path / "two" / f"final{i}.npz")), one, atol=2e-5)
    evals = [[json.loads(line) for line in (tmp_path / w / "metrics.jsonl").read_text()
              .splitlines() if "eval_top1" in line] for w in ("two", "one")]
    assert evals[0] == evals[1] and evals[0][0]["eval_count"] == 12


@pytest.mark.slow  # two processes, as test_two_process_run
def test_sigterm_on_one_process_stops_both_at_the_same_step(folder, tmp_path):
    """Preemption reaches pod hosts at different moments: the save must still be collective."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    steps = 400
    procs = [launch(tmp_path, folder, f"steps={steps}", "save_every=1000",
                    COORDINATOR=f"localhost:{port}", PROCESS_ID=str(i)) for i in range(2)]
    metrics = tmp_path / "metrics.jsonl"

    def logged_step_4() -> bool:
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 2

    # Generous: two processes compiling on a loaded 2-core machine can take minutes.
    deadline = time.time() + 900
    try:
        while time.time() < deadline and procs[0].poll() is None and not logged_step_4():
            time.sleep(0.05)
        reached = logged_step_4()
        procs[1].send_signal(signal.SIGTERM)  # process 0 is never signalled
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:  # a process left waiting in a collective would outlive the test
        for p in procs:
            p.kill()
    assert reached, ("the run had not logged step 4 within 900 s, so the signal came before "
                     "the case under test", outs)
    assert all(p.returncode == 0 for p in procs), outs
    stopped = checkpoint_steps(tmp_path)
    assert len(stopped) == 1 and 4 <= stopped[0] < steps, (stopped, outs)
    assert "on another process" in outs[0] and f"saved step {stopped[0]}" in outs[0], outs[0]
    a, b = (dict(np.load(tmp_path / f"final{i}.npz")) for i in range(2))
    assert_same(a, b)


@pytest.mark.slow
def test_fsdp_matches_data_parallel(folder, tmp_path):
    one, _ = run(tmp_path / "one", folder, "steps=4", "save_every=100", devices=8)
    fsdp, _ = run(tmp_path / "fsdp", folder, "steps=4", "save_every=100", "fsdp=true",
                  devices=8)
    assert_same(one, fsdp, atol=2e-5)


@pytest.mark.slow  # two 10-step training runs in subprocesses, one killed: 1-1.5 min
def test_sigkill_at_a_random_step_then_resume_is_exact(folder, tmp_path):
    steps = 10
    # RandAugment on: its draws must resume exactly too (only here: rebuilding its tf.data
    # graph every tiny 6-step epoch costs seconds per test).
    extra = ("randaug_ops=1",)
    whole, _ = run(tmp_path / "whole", folder, f"steps={steps}", "save_every=1", *extra)
    kill_after = int(np.random.default_rng().integers(2, steps - 2))
    workdir = tmp_path / "killed"
    proc = launch(workdir, folder, f"steps={steps}", "save_every=1", *extra)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = checkpoint_steps(workdir)
        if done and max(done) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (workdir / "final.npz").exists(), "the run finished before it was killed"
    resumed, _ = run(workdir, folder, f"steps={steps}", "save_every=1", *extra)
    assert_same(whole, resumed)
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text()
              .splitlines()]
    assert logged == list(range(2, steps + 1, 2)), logged  # each step once, resumed or not


@pytest.mark.slow  # two training runs in subprocesses: about 50 s
def test_corrupt_latest_checkpoint_falls_back(folder, tmp_path):
    run(tmp_path, folder, "steps=4", "save_every=2")
    latest = tmp_path / "checkpoints" / "4"
    for f in latest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="checkpoints/4 is unusable: .*; skipped"):
        _, shipped = ship(tmp_path, tmp_path / "shipped")
    assert shipped == 2
    (tmp_path / "final.npz").unlink()
    _, out = run(tmp_path, folder, "steps=6", "save_every=2")
    assert "checkpoints/4 is unusable" in out and "moved to" in out
    assert checkpoint_steps(tmp_path)[-1] == 6


# Trains to a first checkpoint, then makes the kernel refuse large writes (RLIMIT_FSIZE: a
# write past the limit fails with EFBIG, as a full disk fails with ENOSPC) and trains on.
FULL_DISK_DRIVER = """
import resource, signal, sys
from tome_jax.training import SaveError, load_config, train
cfg = load_config(None, sys.argv[3:])
train(cfg, sys.argv[1], stop_after=2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    state = train(cfg, sys.argv[1])
    print("RESULT finished at step", int(state["step"]))
except SaveError as err:
    print("RESULT SaveError:", err)
"""


@pytest.mark.slow  # several training runs, one with writes refused: 1-3 min
def test_failed_writes_during_save_keep_the_previous_checkpoint(folder, tmp_path):
    steps = ["steps=6", "save_every=2"]
    whole, _ = run(tmp_path / "whole", folder, *steps)
    workdir = tmp_path / "full"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    # 8 KB: the logs and config fit, a checkpoint's array files do not.
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_DRIVER, str(workdir), "8192", *TINY,
                           f"data_dir={folder}", *steps], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "saving a checkpoint failed" in out and "step 2, is kept" in out, out
    assert "RESULT SaveError: the checkpoint of step 6 could not be written" in out, out
    assert checkpoint_steps(workdir) == [2]
    assert not list((workdir / "checkpoints").glob("*tmp*")), "half-written folders left"
    resumed, _ = run(workdir, folder, *steps)  # room again: resumes from step 2
    assert checkpoint_steps(workdir)[-1] == 6
    assert_same(whole, resumed)


def test_wsd_schedule_is_warmup_constant_then_one_minus_sqrt_decay():
    cfg = load_config(None, ["schedule=wsd", "lr=1e-3", "min_lr=1e-5", "warmup_steps=10",
                             "steps=100", "decay_steps=40"])
    lr = lr_schedule(cfg)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(59), lr(60)],
                               [0.0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(70), 1e-3 - (1e-3 - 1e-5) * np.sqrt(0.25), rtol=1e-6)
    np.testing.assert_allclose(lr(100), 1e-5, rtol=1e-4)
    # A cooldown branch taken later (larger steps) follows the same lr until its own decay.
    branch = lr_schedule(dataclasses.replace(cfg, steps=500, decay_steps=100))
    np.testing.assert_allclose([branch(c) for c in range(0, 400, 7)],
                               [1e-3 * min(c / 10, 1.0) for c in range(0, 400, 7)], rtol=1e-6)
    assert branch(450) < 1e-3 and abs(branch(500) - 1e-5) < 1e-8


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ValueError, match="'linear' is not 'cosine' or 'wsd'"):
        lr_schedule(load_config(None, ["schedule=linear"]))
    with pytest.raises(ValueError, match="0 < decay_steps <= steps - warmup_steps"):
        lr_schedule(load_config(None, ["schedule=wsd", "steps=100", "warmup_steps=10"]))


def test_device_input_pipeline_trains_and_evaluates(folder, tmp_path):
    cfg = load_config(None, TINY + [f"data_dir={folder}", "input_pipeline=device",
                                    "steps=2", "save_every=2", "eval_every=2"])
    train(cfg, tmp_path)
    assert checkpoint_steps(tmp_path) == [2]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["eval_count"] for r in rows if "eval_top1" in r] == [12]  # the test split, once
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.slow
def test_device_input_pipeline_resumes_exactly(folder, tmp_path):
    # Its batch is a function of the step, so a run stopped and resumed ends with the
    # parameters of one that was not (in-process: SIGKILL is tested on the host pipeline,
    # whose stream has real state to restore).
    cfg = load_config(None, TINY + [f"data_dir={folder}", "input_pipeline=device",
                                    "steps=6", "save_every=2"])
    whole = train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "split", stop_after=3)  # saves step 3 as it stops
    resumed = train(cfg, tmp_path / "split")
    for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(resumed["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input_pipeline_settings_are_refused(folder, tmp_path):
    base = TINY + [f"data_dir={folder}"]
    for extra, message in [
            (["input_pipeline=disk"], "'disk' is not 'host' or 'device'"),
            (["input_pipeline=device", "randaug_ops=2"], "RandAugment .* needs input_pipeline"),
            (["input_pipeline=device", "dataset=cifar10"], "reads image folders"),
            (["input_pipeline=device", "num_classes=4"], "has 3 classes, the config num_cl")]:
        with pytest.raises(ValueError, match=message):
            train(load_config(None, base + extra), tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_unknown_config_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\].*'lr'"):
        load_config(None, ["learning_rate=0.1"])


def test_batch_not_divisible_by_devices(folder, tmp_path):
    proc = launch(tmp_path, folder, "steps=2", "batch_size=12", devices=8)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "batch_size 12 is not divisible by the 8 devices" in out


@pytest.mark.slow  # a training run in a subprocess: about 25 s
def test_workdir_of_another_model_is_refused(folder, tmp_path):
    run(tmp_path, folder, "steps=2", "save_every=2")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="another model"):
        train(load_config(None, TINY + [f"data_dir={folder}", "width=64"]), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert json.loads((tmp_path / "config.json").read_text())["width"] == 0


def test_ship_writes_a_loadable_model(folder, tmp_path):
    cfg = load_config(None, TINY + [f"data_dir={folder}", "steps=2", "save_every=2"])
    state = train(cfg, tmp_path / "run")
    out, step = ship(tmp_path / "run", tmp_path / "model")
    assert step == 2
    model, params, info = load_model(out)
    assert model.num_classes == 3 and model.variant == "mu/8"
    assert info.image_size == (16, 16) and info.normalization == cfg.normalization
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    want, _ = make_model(cfg, r=0, dropout=0.0, drop_path=0.0).apply(
        {"params": state["params"]}, images)
    got, _ = model.apply({"params": params}, images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    with pytest.raises(FileExistsError):
        ship(tmp_path / "run", tmp_path / "model")


@pytest.mark.slow  # a 2-device training run in a subprocess: about 30 s
def test_ship_a_run_trained_on_another_device_count(folder, tmp_path):
    # A pod's checkpoint is shipped on one host: restoring "as saved" refused the 2-device
    # topology in a 1-device process and every checkpoint was reported unreadable.
    other = 2 if jax.device_count() != 2 else 1  # any count but this process's
    trained, _ = run(tmp_path / "run", folder, "steps=2", "save_every=2", devices=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint may be skipped as unreadable
        out, step = ship(tmp_path / "run", tmp_path / "model")
    assert step == 2
    shipped = flatten(load_model(out)[1])
    assert len(shipped) == len(trained)
    for name, value in shipped.items():
        key = "".join(f"['{part}']" for part in name.split("/"))
        np.testing.assert_array_equal(np.asarray(value), trained[key], err_msg=name)


@pytest.mark.slow  # a DTEM training run in a subprocess: 1-1.5 min
def test_modular_dtem_training_leaves_the_backbone_bit_identical(folder, tmp_path):
    backbone = TINY + [f"data_dir={folder}", "steps=2", "save_every=2", "depth=2"]
    train(load_config(None, backbone), tmp_path / "backbone")
    ship(tmp_path / "backbone", tmp_path / "model")
    _, before, _ = load_model(tmp_path / "model")
    cfg = load_config(None, backbone + [
        f"init_from={tmp_path / 'model'}", "dtem_dim=8", "soft_merge=true", "steps=3",
        "freeze=^(?!.*dtem_embed)", "lr=1e-2", "warmup_steps=1"])
    state = train(cfg, tmp_path / "dtem")
    after = flatten(jax.device_get(state["params"]))
    before = flatten(before)
    embeds = [k for k in after if "dtem_embed" in k]
    assert embeds and set(after) - set(embeds) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(v), err_msg=k)
    init = flatten(init_state(cfg, make_model(cfg), make_optimizer(
        cfg, state["params"]))["params"])
    assert any(not np.array_equal(np.asarray(after[k]), np.asarray(init[k])) for k in embeds)
    # Shipped, the DTEM run is a model whose config knows its embeddings.
    model, params, _ = load_model(ship(tmp_path / "dtem", tmp_path / "dtem_model")[0])
    assert model.dtem_dim == 8
    np.testing.assert_array_equal(np.asarray(flatten(params)[embeds[0]]),
                                  np.asarray(after[embeds[0]]))


def test_summary_of_runs(tmp_path, capsys):
    from tome_jax.cli import summary
    from tome_jax.training.summary import read_metrics

    for name, step_time in (("a", 1.0), ("b", 0.5)):
        d = tmp_path / name
        d.mkdir()
        lines = [{"step": 2, "step_time": 9.0, "images_per_s": 1.0, "loss": 2.0},  # compile
                 {"step": 4, "step_time": step_time, "images_per_s": 8 / step_time,
                  "loss": 1.5},
                 {"step": 4, "eval_top1": 0.5}]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    text = summary.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert "| a | 4 | 1.000 | 8.0 | 1.00x | 1.500 | 0.5000 |" in text
    assert "| b | 4 | 0.500 | 16.0 | 2.00x |" in text
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        read_metrics(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # the command reports it in one line
        summary.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "metrics.jsonl not found" in capsys.readouterr().err


def test_abstract_state_has_the_init_shapes_without_reading_init_from(tmp_path):
    # Resume and ship restore into this target: a moved or deleted init_from directory must
    # not stop them, and the target must be what the real init builds.
    mesh = sharding.batch_mesh()
    cfg = load_config(None, TINY + ["dtem_dim=4", "freeze=^(?!.*dtem_embed)"])
    model, tx, want, _ = abstract_train_state(cfg, mesh)
    gone = dataclasses.replace(cfg, init_from=str(tmp_path / "moved_away"))
    _, _, got, shardings = abstract_train_state(gone, mesh)
    real = jax.eval_shape(lambda: init_state(cfg, model, tx))
    for other in (want, real):
        assert jax.tree.structure(got) == jax.tree.structure(other)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(other), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert jax.tree.structure(shardings) == jax.tree.structure(got)


def test_train_command_defaults_and_one_line_errors(tmp_path, capsys):
    from tome_jax.cli import ship as ship_cli
    from tome_jax.cli import train as train_cli

    args = train_cli.build_parser().parse_args(["--workdir", "w"])
    assert (args.coordinator, args.num_processes, args.process_id, args.set) == (None, 1, 0, [])
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--workdir", str(tmp_path / "w"), "--set", "learning_rate=0.1"])
    assert exit_info.value.code == 2
    assert "unknown config key(s) ['learning_rate']" in capsys.readouterr().err
    (tmp_path / "w").mkdir(exist_ok=True)
    (tmp_path / "w" / "config.json").write_text(json.dumps(dataclasses.asdict(
        load_config(None, TINY))))
    with pytest.raises(SystemExit) as exit_info:
        ship_cli.main(["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2 and "no checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_shims_answer_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    for module in ("train.train", "train.ship", "train.summary"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and f"usage: python -m {module}" in proc.stdout, proc
