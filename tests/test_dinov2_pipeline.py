"""train.dinov2_cifar10 end to end at --smoke size: fine-tune, ship as float16, sweep, DTEM
runs side by side, paired tables (a random S/14 backbone and a tiny 10-class folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tome_jax import checkpoint as ck
from tome_jax import sources
from tome_jax.params import random_params
from tome_jax.vit import ViT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_chain(tmp_path):
    folder = sources.write_image_folder(tmp_path / "data", {"train": 40, "test": 20},
                                        classes=sources.CIFAR10_CLASSES, sizes=((32, 32),))
    backbone = ViT(variant="S/14", num_classes=0, layerscale_init=1.0)
    ck.save_model(tmp_path / "backbone", random_params(backbone, 28), {
        "variant": "S/14", "num_classes": 0, "layerscale_init": 1.0}, image_size=28,
        normalization="imagenet")
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "train.dinov2_cifar10", "--backbone", str(tmp_path / "backbone"),
         "--data-dir", str(folder), "--dataset", "image_folder", "--work", str(work),
         "--smoke", "--r", "0", "1", "--dtem-r", "1", "--seed", "0", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    commands = [e["cmd"] for e in summary["log"]]
    assert all(e["rc"] == 0 for e in summary["log"]), summary
    assert summary["skipped"] == []
    for what in ("train.train", "train.ship", "eval.sweep", "eval.paired"):
        assert any(f"-m {what}" in c for c in commands), what
    assert sum("dtem_dinov2_s14_cifar10.json" in c for c in commands) == 2  # both seeds

    model = work / "dinov2_s14_cifar10"
    from flax import serialization

    stored = serialization.msgpack_restore((model / ck.PARAMS_FILE).read_bytes())
    kernel = stored["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert np.asarray(kernel).dtype == np.float16  # shipped with --param-dtype float16
    rows = (work / "sweep.csv").read_text().splitlines()
    assert {r.split(",")[0] for r in rows[1:]} == {"-", "tome", "random", "prune"}
    table = (work / "paired_r1.md").read_text()
    assert "DTEM modular seed 0" in table and "DTEM modular seed 1" in table


def test_commands_are_logged_with_their_status_and_a_timeout_kills(tmp_path, capsys):
    from train.dinov2_cifar10 import finish, run

    log = []
    assert run([sys.executable, "-c", "raise SystemExit(3)"], log, timeout=60) == 3
    started = run([sys.executable, "-c", "import time; time.sleep(60)"], log, timeout=0.5,
                  wait=False)
    assert finish(started) == "timeout" and started.proc.poll() is not None
    assert [e["rc"] for e in log] == [3, "timeout"] and all("seconds" in e for e in log)
    assert "-> timeout after" in capsys.readouterr().out


def test_step_time_is_the_median_without_the_compile_window(tmp_path):
    from train.dinov2_cifar10 import step_time

    rows = [{"step": 10 * (i + 1), "step_time": t, "images_per_s": 32 / t}
            for i, t in enumerate((50.0, 2.0, 4.0, 3.0))] + [{"step": 40, "eval_top1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step_time(tmp_path) == 3.0
    assert step_time(tmp_path / "absent") is None  # a reused model: no fine-tune workdir
