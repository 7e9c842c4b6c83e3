"""The speed benchmark: schedule parsing, a tiny timed run, the table, the timm reference row,
and its command line (`python -m eval.benchmark`)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from tome_jax import benchmark as B
from tome_jax import torch_reference
from tome_jax.cli import benchmark as cli
from tome_jax.schedule import parse_schedule


def test_parse_schedule():
    assert parse_schedule("16") == 16
    assert parse_schedule(" 16,-1 ") == (16, -1.0)
    assert parse_schedule("8,0.5") == (8, 0.5)
    assert parse_schedule("[8,8,4]") == [8, 8, 4]
    assert parse_schedule("[8, 8, 4,]") == [8, 8, 4]
    with pytest.raises(ValueError):
        parse_schedule("eight")


def test_tiny_benchmark_rows_and_table():
    rows = B.benchmark("mu/4", 2, 16, [0, 2], runs=2, warmup=0, dtype=jnp.float32,
                       merge_methods=["segment", "onehot"])
    assert [(r["r"], r["method"]) for r in rows] == [(0, "-"), (2, "segment"), (2, "onehot")]
    assert [r["tokens"] for r in rows] == [17, 15, 15]  # 16 patches + class token
    base = rows[0]
    assert base["speedup"] == base["flops_speedup"] == 1.0 and base["merge_s"] == 0.0
    for row in rows:
        assert row["im_s"] > 0 and row["compile_s"] > 0 and len(row["times"]) == 2
        assert row["flops_speedup"] == pytest.approx(base["gflops"] / row["gflops"])
    assert all(r["merge_s"] > 0 for r in rows[1:])
    table = B.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| r | merge method |")
    assert table[2].startswith("| 0 | - | keys | 17 | 0.00 | 1.00x |")


def test_dtem_metric_rows_fused_and_not():
    rows = B.benchmark("mu/4", 2, 16, [0, 2], runs=1, warmup=0, dtype=jnp.float32,
                       merge_methods=["segment"], metrics=["keys", "dtem", "dtem-fused"],
                       dtem_dim=8)
    assert [(r["r"], r["metric"]) for r in rows] == [
        (0, "keys"), (0, "dtem"), (0, "dtem-fused"), (2, "keys"), (2, "dtem"), (2, "dtem-fused")]
    assert rows[4]["gflops"] == rows[5]["gflops"] > rows[3]["gflops"]  # the embedding's cost
    assert "| 2 | segment | dtem-fused | 15 |" in B.format_table(rows)


def test_timm_reference_row():
    pytest.importorskip("timm")
    row = B.benchmark_torch("mu/4", 2, 16, runs=1, warmup=0, dtype="float32", threads=1)
    assert row["method"] == B.TORCH_LABEL and row["tokens"] == 17 and row["im_s"] > 0
    assert row["threads"] == 1
    base = dict(r=0, method="-", tokens=17, gflops=row["gflops"], flops_speedup=1.0,
                im_s=100.0, seconds=0.02, speedup=1.0, efficiency=1.0, compile_s=1.0,
                merge_s=0.0, merge_share=0.0)
    rows = B.add_torch_row([base], row)
    assert rows[1]["flops_speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(0.02 / row["seconds"])
    assert B.format_table(rows).splitlines()[-1].endswith("| - | - | - |")


def test_timm_names():
    timm = pytest.importorskip("timm")
    model = torch_reference.timm_vit("Ti/16", 32, num_classes=10)
    assert model.default_cfg["architecture"] == "vit_tiny_patch16_224"
    assert model.patch_embed.img_size == (32, 32) and model.embed_dim == 192
    custom = torch_reference.timm_vit("mu/4", 16)  # no timm name: built from the sizes
    assert isinstance(custom, timm.models.vision_transformer.VisionTransformer)
    assert custom.embed_dim == 32 and len(custom.blocks) == 1


def _fake_rows(variant, batch, resolution, schedules, runs, warmup, dtype, methods,
               metrics=("keys",), dtem_dim=None):
    row = dict(r=0, method="-", tokens=17, gflops=1.0, flops_speedup=1.0, im_s=float(batch),
               seconds=1.0, speedup=1.0, efficiency=1.0, compile_s=0.5, merge_s=0.0,
               merge_share=0.0, dtype=dtype)
    return [row]


def test_cli_one_table_per_batch_and_dtype(monkeypatch, capsys):
    monkeypatch.setattr(B, "benchmark", _fake_rows)
    cli.main(["--variant", "mu/4", "--image-size", "16", "--batch-size", "1", "3", "--dtype",
            "float32", "bfloat16", "--report-rss"])
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("ViT-mu/4")]
    assert [h.split(", ")[1:3] for h in headers] == [
        ["batch 1", "float32"], ["batch 3", "float32"], ["batch 1", "bfloat16"],
        ["batch 3", "bfloat16"]]
    assert out.count("| 0 | - | keys | 17 |") == 4 and out.count("peak RSS so far:") == 4


def test_cli_vs_torch(monkeypatch, capsys):
    pytest.importorskip("timm")
    monkeypatch.setattr(B, "benchmark", _fake_rows)
    cli.main(["--variant", "mu/4", "--image-size", "16", "--batch-size", "2", "--runs", "1",
            "--vs-torch", "--torch-threads", "1"])
    out = capsys.readouterr().out
    assert f"| 0 | {B.TORCH_LABEL} | - | 17 |" in out and "1 threads, CPU" in out


def test_cli_defaults_unchanged(monkeypatch):
    """`python -m eval.benchmark` with no arguments still runs the README's job."""
    seen = {}

    def fake_benchmark(*args):
        seen["args"] = args
        raise SystemExit(0)

    monkeypatch.setattr(B, "benchmark", fake_benchmark)
    with pytest.raises(SystemExit):
        cli.main([])
    variant, batch, resolution, schedules, runs, warmup, dtype, methods, metrics, dim = seen[
        "args"]
    assert (variant, batch, resolution, runs, warmup, dtype, methods, metrics, dim) == (
        "B/16", 8, 224, 7, 2, jnp.float32, ["segment"], ["keys"], None)
    assert schedules == [0, 8, 13, 16, (16, -1.0)]


def test_bad_cli_input(capsys):
    for argv, message in ((["--batch-size", "0"], "must be positive"),
                          (["--dtype", "float16"], "invalid choice"),
                          (["--merge-method", "nope"], "invalid choice")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err


def test_entry_points_and_lazy_torch():
    """eval/ shims run the tome_jax commands; importing the library needs neither torch nor
    timm (both are imported inside the functions that use them)."""
    import subprocess
    import sys

    from eval import benchmark as benchmark_shim
    from eval import parity as parity_shim
    from tome_jax.cli import parity

    assert benchmark_shim.main is cli.main and parity_shim.main is parity.main
    assert cli.build_parser().prog == "python -m eval.benchmark"
    code = ("import sys; sys.modules['torch'] = sys.modules['timm'] = None; "
            "import tome_jax.benchmark, tome_jax.torch_reference, tome_jax.cli.parity")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
