"""An interrupted sweep resumes: progress kept per configuration, reused only under its key."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tome_jax import sources
from tome_jax import sweep as S
from tome_jax import sweep_resume as resume
from tome_jax.cli import sweep as cli
from tome_jax.params import random_params
from tome_jax.vit import ViT

CLI = ["--random-init", "--variant", "mu/4", "--data", "image_folder", "--split", "test",
       "--image-size", "16", "--batch-size", "4", "--runs", "1", "--warmup", "0",
       "--no-progress", "--r", "0", "2", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sources.write_image_folder(tmp_path_factory.mktemp("folder"), {"test": 10})


def _batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 3, 4).astype(np.int32)} for _ in range(2)]


def _counting_evaluate(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Replaces the sweep's evaluate with one that logs each call (and raises on call fail_at)."""
    calls: list[str] = []
    real = S.evaluate

    def evaluate(model, *args, **kwargs):
        calls.append(f"{model.strategy} {model.r}")
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(model, *args, **kwargs)

    monkeypatch.setattr(S, "evaluate", evaluate)
    return calls


def _table(out: Path) -> list[tuple[str, str, float, float]]:
    with open(f"{out}.csv") as f:
        return [(r["strategy"], r["r"], float(r["top1"]), float(r["top5"]))
                for r in csv.DictReader(f)]


def test_fingerprint_names_the_weights_bytes_and_the_settings():
    params = {"a": np.zeros((2, 3), np.float32), "b": {"c": np.ones(4, np.float32)}}
    key = resume.fingerprint(params, {"data": "x", "split": "test"})
    assert len(key) == 16
    assert key == resume.fingerprint(params, {"split": "test", "data": "x"})  # order-free
    assert key != resume.fingerprint(params, {"data": "x", "split": "train"})
    changed = {"a": params["a"].copy(), "b": params["b"]}
    changed["a"][1, 2] = 1e-7
    assert key != resume.fingerprint(changed, {"data": "x", "split": "test"})
    wider = {"a": params["a"].astype(np.float64), "b": params["b"]}
    assert key != resume.fingerprint(wider, {"data": "x", "split": "test"})


def test_sweep_takes_measured_rows_and_reports_the_rest():
    model = ViT(variant="mu/4", num_classes=3)
    params = random_params(model, 16, seed=1)
    kw = dict(image_size=16, schedules=[0, 2], strategies=["tome"], fidelity=True,
              num_classes=3, runs=0, show=False)
    fresh = S.sweep(model, params, _batches(), **kw)
    reused = {("-", "0"): {"top1": 0.125, "top5": 0.5, "count": 8, "fid_mean": 1.0,
                           "fid_min": 1.0}}
    seen: list[str] = []
    rows = S.sweep(model, params, _batches(), measured=reused,
                   on_measured=lambda row: seen.append(row["r"]), **kw)
    assert seen == ["2"]  # only what was not measured before
    assert rows[0]["top1"] == 0.125 and rows[0]["top5"] == 0.5
    # The r = 0 reference features are extracted again for the fidelity of the rest.
    assert rows[1]["fid_mean"] == pytest.approx(fresh[1]["fid_mean"], rel=1e-6)
    assert rows[1]["top1"] == fresh[1]["top1"]


def test_an_interrupted_sweep_resumes_where_it_stopped(folder, tmp_path, monkeypatch, capsys):
    argv = CLI + ["--data-dir", str(folder)]
    out = tmp_path / "sw"
    calls = _counting_evaluate(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--out", str(out)])
    lines = resume.progress_path(out).read_text().splitlines()
    assert [json.loads(line)["r"] for line in lines] == ["0", "2"]
    assert not Path(f"{out}.csv").exists()

    calls = _counting_evaluate(monkeypatch)
    cli.main(argv + ["--out", str(out)])
    assert calls == ["tome 3"]  # r = 0 and r = 2 came from the progress file
    assert "resuming: 2 configuration(s) already measured" in capsys.readouterr().err
    assert not resume.progress_path(out).exists()  # gone once the outputs are written

    calls = _counting_evaluate(monkeypatch)
    cli.main(argv + ["--out", str(tmp_path / "whole")])
    assert len(calls) == 3
    assert _table(out) == _table(tmp_path / "whole")  # resumed = measured in one go


def test_progress_of_another_sweep_or_a_broken_line_is_measured_again(folder, tmp_path,
                                                                      monkeypatch, capsys):
    argv = CLI + ["--data-dir", str(folder)]
    out = tmp_path / "sw"
    _counting_evaluate(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--out", str(out)])
    partial = resume.progress_path(out)
    kept = partial.read_text()

    calls = _counting_evaluate(monkeypatch)  # other options: a different key
    cli.main([a if a != "4" else "5" for a in argv] + ["--out", str(out)])
    assert len(calls) == 3
    err = capsys.readouterr().err
    assert f"{partial}: 2 configuration(s) of another sweep" in err and "resuming" not in err

    partial.write_text(kept.splitlines()[0] + "\n" + '{"key": "trunc')  # one good, one broken
    calls = _counting_evaluate(monkeypatch)
    cli.main(argv + ["--out", str(out)])
    assert calls == ["tome 2", "tome 3"]
    assert "1 line(s) that do not parse" in capsys.readouterr().err

    partial.write_text(kept)
    calls = _counting_evaluate(monkeypatch)
    cli.main(argv + ["--out", str(out), "--no-resume"])
    assert len(calls) == 3
