"""Sharded evaluation: exact counts and logits on 1 device, 8 devices and 2 processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tome_jax import data, sharding, sources
from tome_jax.checkpoint import save_model
from tome_jax.cli.evaluate import main
from tome_jax.evaluation import evaluate
from tome_jax.params import random_params
from tome_jax.vit import ViT

N = 37  # examples; divides neither the batch sizes nor the device counts used
ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(variant="mu/4", num_classes=3, r=2)
CLI = ["--data", "image_folder", "--split", "test", "--variant", "mu/4", "--r", "2",
       "--image-size", "16", "--batch-size", "12", "--seed", "3", "--json"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sources.write_image_folder(tmp_path_factory.mktemp("folder"), {"test": N})


def _batches(folder, **kw):
    return data.make_dataset("image_folder", "test", batch_size=kw.pop("batch_size", 12),
                             image_size=16, data_dir=folder, **kw)


def test_matches_unsharded_reference(folder):
    model = ViT(**MODEL)
    params = random_params(model, 16, seed=3)
    result = evaluate(model, params, _batches(folder), return_logits=True)
    everything = next(iter(_batches(folder, batch_size=64)))
    m = everything["mask"]
    logits, _ = jax.jit(model.apply)({"params": params}, everything["image"][m])
    logits = np.asarray(logits)
    labels = everything["label"][m]
    top5 = np.argsort(-logits, axis=1)[:, :3]  # 3 classes: top-5 is top-3
    assert result["count"] == N and result["num_batches"] == 4
    assert result["correct1"] == int((logits.argmax(1) == labels).sum())
    assert result["correct5"] == int((top5 == labels[:, None]).any(1).sum()) == N
    assert result["top1"] == pytest.approx(result["correct1"] / N)
    np.testing.assert_array_equal(result["index"], np.arange(N))
    np.testing.assert_allclose(result["logits"], logits, atol=1e-5)


def test_plain_batches_without_mask_or_index():
    model = ViT(**MODEL)
    params = random_params(model, 16)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(5, 16, 16, 3)).astype(np.float32),
                "label": rng.integers(0, 3, 5).astype(np.int32)} for _ in range(2)]
    result = evaluate(model, params, batches, return_logits=True)
    assert result["count"] == 10 and result["logits"].shape == (10, 3)


def test_pad_batch():
    b = {"image": np.ones((5, 2)), "label": np.arange(5), "index": np.arange(5)}
    p = sharding.pad_batch(b, 4)
    assert p["image"].shape == (8, 2) and p["mask"].tolist() == [True] * 5 + [False] * 3
    assert p["index"][5:].tolist() == [-1] * 3
    assert sharding.pad_batch(p, 4) is p


def test_class_count_mismatch(folder, tmp_path):
    model = ViT(**MODEL)
    with pytest.raises(ValueError, match="model has 5 classes but the data has 3"):
        five = ViT(**{**MODEL, "num_classes": 5})
        evaluate(five, random_params(five, 16), _batches(folder))
    params4 = random_params(ViT(**{**MODEL, "num_classes": 4}), 16)
    with pytest.raises(ValueError, match="checkpoint's head has 4 classes"):
        evaluate(model, params4, _batches(folder))
    bad = [{"image": np.zeros((2, 16, 16, 3), np.float32), "label": np.array([0, 7])}]
    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        evaluate(model, random_params(model, 16), bad)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, random_params(model, 16), [])


def _error(argv, capsys) -> str:
    """The one-line error of a CLI run that must fail (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_checkpoint(folder, tmp_path, capsys):
    args = CLI + ["--data-dir", str(folder)]
    assert "is not a converted checkpoint" in _error(
        args + ["--checkpoint", str(tmp_path / "nope")], capsys)
    config = {"variant": "mu/4", "num_classes": 3}
    ckpt = save_model(tmp_path / "ckpt", random_params(ViT(**MODEL), 16, seed=3), config,
                      image_size=16, normalization="augreg")
    from_ckpt = main(args + ["--checkpoint", str(ckpt)])
    assert from_ckpt["correct1"] == main(args)["correct1"]
    five = save_model(tmp_path / "five", random_params(ViT(**{**MODEL, "num_classes": 5}), 16),
                      {**config, "num_classes": 5}, image_size=16, normalization="augreg")
    assert "model has 5 classes but the data has 3" in _error(
        args + ["--checkpoint", str(five)], capsys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "eval.evaluate", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> dict | None:
    """The JSON result line (only process 0 prints one)."""
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


@pytest.mark.slow  # three evaluation subprocesses, two of them a 2-process job: 1-2 min
def test_same_result_on_1_and_8_devices_and_2_processes(folder, tmp_path):
    """Counts exactly equal and logits to 1e-5; the batch of 12 pads to 16 on 8 devices."""
    args = CLI + ["--data-dir", str(folder)]
    port = _free_port()
    procs = {"8dev": _spawn(args + ["--dump-logits", str(tmp_path / "8dev.npz")], 8)}
    for i in range(2):  # 2 processes x 2 devices, talking through gloo on localhost
        procs[f"2proc{i}"] = _spawn(args + [
            "--dump-logits", str(tmp_path / "2proc.npz"), "--coordinator", f"localhost:{port}",
            "--num-processes", "2", "--process-id", str(i)], 2)
    assert jax.device_count() == 1
    one = main(args + ["--dump-logits", str(tmp_path / "1dev.npz")])
    results = {k: _finish(p) for k, p in procs.items()}
    assert results["8dev"]["devices"] == 8 and results["2proc0"]["processes"] == 2
    assert results["2proc0"]["devices"] == 4
    ref = np.load(tmp_path / "1dev.npz")
    assert ref["logits"].shape == (N, 3)
    for name in ("8dev", "2proc0"):
        for key in ("count", "correct1", "correct5", "num_batches"):
            assert results[name][key] == one[key], (name, key)
        got = np.load(tmp_path / f"{name.rstrip('0')}.npz")
        np.testing.assert_array_equal(got["index"], ref["index"])
        np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-5)
    assert one["count"] == N


def test_cli_reads_a_converted_model_directory(folder, tmp_path, capsys):
    """The directory's config fixes the model and image size; --r still applies."""
    model = ViT(variant="mu/4", num_classes=3)
    params = random_params(model, 16, seed=5)
    ckpt = save_model(tmp_path / "m", params, {"variant": "mu/4", "num_classes": 3},
                      image_size=16, normalization="augreg")
    argv = ["--data", "image_folder", "--split", "test", "--data-dir", str(folder),
            "--batch-size", "12", "--checkpoint", str(ckpt), "--r", "[2]"]
    result = main(argv)
    expected = evaluate(model.clone(r=[2]), params, _batches(folder))
    assert result["top1"] == expected["top1"] and result["count"] == N
    assert result["gflops_per_image"] == pytest.approx(model.clone(r=[2]).flops(16) / 1e9)
    assert "converted for 16 px, not 32" in _error(argv + ["--image-size", "32"], capsys)


def test_load_weights_takes_size_and_normalization_from_the_directory(tmp_path):
    from tome_jax.cli.evaluate import load_weights

    assert load_weights(None, image_size=None, normalization=None) == (None, None, 224,
                                                                        "augreg")
    assert load_weights(None, image_size=32, normalization="unit")[2:] == (32, "unit")
    model = ViT(variant="mu/4", num_classes=3)
    ckpt = save_model(tmp_path / "m", random_params(model, 16), {"variant": "mu/4",
                                                                  "num_classes": 3},
                      image_size=16, normalization="imagenet")
    loaded, params, size, normalization = load_weights(str(ckpt), image_size=None,
                                                       normalization=None, r=2)
    assert (loaded.r, size, normalization) == (2, 16, "imagenet")
    assert load_weights(str(ckpt), image_size=16, normalization="unit")[3] == "unit"
    with pytest.raises(ValueError, match="converted for 16 px, not 32"):
        load_weights(str(ckpt), image_size=32, normalization=None)
    with pytest.raises(ValueError, match="unknown normalization"):
        load_weights(None, image_size=None, normalization="bogus")
