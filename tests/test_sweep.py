"""The sweep and its CLI: rows, files and errors on a tiny random ViT over an ImageFolder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tome_jax import sources
from tome_jax import sweep as S
from tome_jax.checkpoint import save_model
from tome_jax.cli import sweep as cli
from tome_jax.evaluation import evaluate
from tome_jax.params import random_params
from tome_jax.vit import ViT

N = 10  # examples
CLI = ["--random-init", "--variant", "mu/4", "--data", "image_folder", "--split", "test",
       "--image-size", "16", "--batch-size", "4", "--runs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sources.write_image_folder(tmp_path_factory.mktemp("folder"), {"test": N})


def _batches(seed: int = 0, n: int = 2, b: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(b, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 3, b).astype(np.int32)} for _ in range(n)]


def test_cosine_fidelity():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert S.cosine_fidelity(a, a) == pytest.approx((1.0, 1.0))
    b = np.array([[0.0, 2.0], [2.0, 2.0]])  # orthogonal, then parallel (scale ignored)
    assert S.cosine_fidelity(a, b) == pytest.approx((0.5, 0.0))
    with pytest.raises(ValueError, match="shapes differ"):
        S.cosine_fidelity(a, a[:1])


def test_plan_shares_the_r0_row_and_puts_it_first():
    model = ViT(variant="mu/4", num_classes=3)
    assert S.plan(model, 16, [4, 0, 2], ["tome", "prune"]) == [
        ("-", 0), ("tome", 4), ("tome", 2), ("prune", 4), ("prune", 2)]
    # No r = 0 asked for: it is added as the reference.
    assert S.plan(model, 16, [2], ["random"]) == [("-", 0), ("random", 2)]


def test_schedule_text_round_trips():
    from tome_jax.schedule import parse_schedule

    for text in ("8", "8,-1", "[8,8,4]"):
        assert S.schedule_text(parse_schedule(text)) == text


def test_sweep_rows_fidelity_and_accuracy():
    model = ViT(variant="mu/4", num_classes=3)
    params = random_params(model, 16, seed=1)
    rows = S.sweep(model, params, _batches(), image_size=16, schedules=[0, 2],
                   strategies=["tome"], fidelity=True, num_classes=3, runs=1, warmup=0,
                   show=False)
    assert [(r["strategy"], r["r"], r["tokens"]) for r in rows] == [("-", "0", 17),
                                                                  ("tome", "2", 15)]
    base, merged = rows
    assert base["fid_mean"] == pytest.approx(1.0) and base["fid_min"] == pytest.approx(1.0)
    assert 0.0 < merged["fid_min"] <= merged["fid_mean"] <= 1.0 + 1e-6
    assert merged["gflops"] < base["gflops"] and merged["flops_speedup"] > 1
    assert base["speedup"] == 1.0 and merged["im_s"] > 0
    for row in rows:
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["count"] == 8
    # The same network as evaluate's at r = 2.
    direct = evaluate(model.clone(r=2), params, _batches(), num_classes=3)
    assert merged["top1"] == direct["top1"]


@pytest.mark.parametrize("strategy", ["random", "prune"])
def test_baseline_strategies_keep_token_counts(strategy):
    model = ViT(variant="mu/4", num_classes=0)
    params = random_params(model, 16)
    rows = S.sweep(model, params, _batches(n=1), image_size=16, schedules=[0, 3],
                   strategies=["tome", strategy], accuracy=False, fidelity=True, runs=0,
                   show=False)
    assert [r["strategy"] for r in rows] == ["-", "tome", strategy]
    assert rows[1]["tokens"] == rows[2]["tokens"] == 14
    assert rows[1]["gflops"] == rows[2]["gflops"]
    assert rows[2]["fid_mean"] <= 1.0 + 1e-6 and rows[2]["im_s"] is None


def test_cli_writes_csv_markdown_and_png(folder, tmp_path, capsys):
    out = tmp_path / "res" / "sw"
    rows = cli.main(CLI + ["--data-dir", str(folder), "--r", "0", "2", "--fidelity",
                         "--out", str(out), "--json"])
    with open(f"{out}.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["strategy"], r["r"]) for r in table] == [("-", "0"), ("tome", "2")]
    assert list(table[0]) == list(S.COLUMNS)
    assert float(table[0]["fid_mean"]) == pytest.approx(1.0)
    assert all(float(r["im_s"]) > 0 and 0 <= float(r["top1"]) <= 1 for r in table)
    md = Path(f"{out}.md").read_text()
    assert "| - | 0 | 17 |" in md and "| tome | 2 | 15 |" in md and "cos fidelity mean" in md
    png = Path(f"{out}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert rows[0]["count"] == N
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("sweep done: 2 configurations")
    assert [r["r"] for r in json.loads(lines[-2])] == ["0", "2"]


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_input(folder, tmp_path, capsys):
    base = CLI + ["--data-dir", str(folder), "--out", str(tmp_path / "x")]
    assert "unknown strategy 'merge'" in _error(base + ["--strategy", "tome", "merge"], capsys)
    assert "invalid choice: 'nope'" in _error(
        ["--random-init", "--data", "nope"], capsys)
    assert "one of the arguments --checkpoint --random-init is required" in _error(
        ["--data", "image_folder"], capsys)
    assert "is not a converted checkpoint" in _error(
        [a for a in base if a != "--random-init"] + ["--checkpoint", str(tmp_path)], capsys)
    assert "model has 5 classes but the data has 3" in _error(
        base + ["--num-classes", "5"], capsys)
    assert "no classification head" in _error(base + ["--num-classes", "0"], capsys)
    with pytest.raises(ValueError, match="unknown strategy"):
        S.check_strategies(["tome", "bogus"])


def test_checkpoint_class_count_mismatch(folder, tmp_path, capsys):
    model = ViT(variant="mu/4", num_classes=5)
    ckpt = save_model(tmp_path / "ckpt", random_params(model, 16),
                      {"variant": "mu/4", "num_classes": 5}, image_size=16,
                      normalization="augreg")
    argv = [a for a in CLI if a != "--random-init"] + [
        "--checkpoint", str(ckpt), "--data-dir", str(folder), "--out", str(tmp_path / "x")]
    assert "model has 5 classes but the data has 3" in _error(argv, capsys)
    assert "converted for 16 px, not 32" in _error(
        [a if a != "16" else "32" for a in argv], capsys)
    # Features need no head of the data's size: fidelity alone runs.
    rows = cli.main(argv + ["--no-accuracy", "--fidelity", "--r", "0", "2", "--runs", "0"])
    assert rows[0]["fid_mean"] == pytest.approx(1.0) and rows[1]["top1"] is None


def test_csv_round_trip_and_replot(tmp_path):
    from tome_jax.cli import plots

    rows = [dict(strategy="-", r="0", tokens=17, gflops=1.0, flops_speedup=1.0, top1=None,
                 fid_mean=1.0, fid_min=1.0, im_s=10.0, speedup=1.0),
            dict(strategy="tome", r="2", tokens=15, gflops=0.8, flops_speedup=1.25, top1=None,
                 fid_mean=0.98, fid_min=0.9, im_s=12.0, speedup=1.2)]
    S.write_csv(rows, tmp_path / "a.csv")
    back = S.read_csv(tmp_path / "a.csv")
    assert back[1]["tokens"] == 15 and back[1]["fid_min"] == 0.9 and back[1]["top1"] is None
    plots.main([str(tmp_path / "a.csv"), str(tmp_path / "a.png"), "--title", "t"])
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_table_combines_sweeps_at_the_same_r(tmp_path):
    from tome_jax.cli import table

    def rows(top1):
        return [{"strategy": "-", "r": "0", "tokens": 65, "gflops": 2.0, "top1": top1[0],
                 "im_s": 100.0},
                {"strategy": "tome", "r": "7", "tokens": 23, "gflops": 1.0, "top1": top1[1],
                 "im_s": 180.0},
                {"strategy": "random", "r": "7", "tokens": 23, "gflops": 1.0, "top1": 0.1,
                 "im_s": 170.0}]

    for name, top1 in (("a", (0.9, 0.8)), ("b", (0.9, 0.85))):
        S.write_csv(S.add_speedups(rows(top1)), tmp_path / f"{name}.csv")
    text = table.main([f"ToMe={tmp_path / 'a.csv'}", f"DTEM={tmp_path / 'b.csv'}",
                       "--r", "0", "7", "--out", str(tmp_path / "t.md")])
    lines = text.splitlines()
    assert lines[0].startswith("| model | r |") and len(lines) == 2 + 4
    assert "| ToMe | 7 |" in lines[4] and "0.8000" in lines[4] and "1.80x" in lines[4]
    assert "| DTEM | 7 |" in lines[5] and "0.8500" in lines[5]
    assert (tmp_path / "t.md").read_text().strip() == text
    with pytest.raises(KeyError, match="no tome row at r = 11"):
        table.pick(S.read_csv(tmp_path / "a.csv"), "11")


def test_tables_csv_round_trip_keeps_types(tmp_path):
    from tome_jax import tables

    rows = [{"name": "a", "n": 3, "x": 0.5}, {"name": "b", "n": 4, "x": None}]
    tables.write_csv(rows, tmp_path / "t.csv", ["name", "n", "x"])
    assert tables.read_csv(tmp_path / "t.csv", text=["name"], ints=["n"]) == rows
    assert tables.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    with pytest.raises(ValueError, match="a row has 1 cells but the header 2"):
        tables.markdown_table(["a", "b"], [[1]])


def test_read_csv_takes_the_former_method_column_as_strategy(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("method,r,tokens,gflops\n-,0,65,0.14\ntome,2,53,0.12\n")
    rows = S.read_csv(path)
    assert [(r["strategy"], r["r"], r["tokens"]) for r in rows] == [("-", "0", 65),
                                                                    ("tome", "2", 53)]
    assert "method" not in rows[0] and "| strategy | r |" in S.format_markdown(rows)


def test_quickstart_help_is_its_own(capsys):
    from tome_jax.cli import quickstart

    with pytest.raises(SystemExit) as e:
        quickstart.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m eval.quickstart") and "shipped CIFAR-10" in out
    assert "--strategy" in out and "runs/quickstart/cifar10_vit" in out
