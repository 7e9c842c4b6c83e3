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
