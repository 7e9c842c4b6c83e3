"""The speed benchmark: schedule parsing, a tiny timed run, the table, the PyTorch ToMe it is
compared with (equal to our model), the training step, the timing helpers, and its command line
(`python -m eval.benchmark`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import benchmark as B
from tome_jax import merge, timing, torch_reference
from tome_jax.cli import benchmark as cli
from tome_jax.schedule import parse_schedule
from tome_jax.vit import ViT


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


def test_vs_torch_rows_and_table():
    pytest.importorskip("timm")
    rows = B.benchmark("mu/4", 2, 16, [0, 2], runs=2, warmup=0, dtype=jnp.float32,
                       merge_methods=["segment"], vs_torch=True, torch_threads=1,
                       merge_time=False)
    assert [r["r"] for r in rows] == [0, 2]
    for row in rows:
        assert len(row["torch_times"]) == 2 and row["torch_im_s"] > 0
        assert row["vs_torch"] == pytest.approx(row["im_s"] / row["torch_im_s"])
        assert row["mib"] > 0 and row["torch_mib"] > 0 and row["merge_s"] is None
        assert row["torch_threads"] == 1 and row["torch_device"] == "CPU"
    assert rows[0]["torch_speedup"] == 1.0
    table = B.format_vs_torch(rows).splitlines()
    assert len(table) == 4 and table[0].startswith("| r | merge method | tokens left |")
    assert "| ours / PyTorch |" in table[0] and table[3].startswith("| 2 | segment | 15 |")


def test_vs_torch_skips_dtem_rows():
    pytest.importorskip("timm")
    rows = B.benchmark("mu/4", 1, 16, [2], runs=1, warmup=0, dtype=jnp.float32,
                       merge_methods=["segment"], metrics=["keys", "dtem"], dtem_dim=8,
                       vs_torch=True, torch_threads=1, merge_time=False)
    assert ["torch_im_s" in r for r in rows] == [True, False]
    assert len(B.format_vs_torch(rows).splitlines()) == 3


def _tiny_timm(depth: int = 3):
    timm = pytest.importorskip("timm")
    import torch

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=4,
        num_classes=10).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # timm zero-inits the head
    return model


@pytest.mark.parametrize("r", [0, 8])
def test_torch_tome_equals_our_model_and_the_numpy_reference(r):
    """The PyTorch ToMe we time is the same model: same logits as ours (timm weights mapped)
    and as timm's blocks with the NumPy merge, at r = 8 in each of 3 blocks of 65 tokens."""
    import torch

    model = _tiny_timm()
    ours = ViT(variant="mu/4", depth=3, num_classes=10, r=r)
    rs = ours.token_schedule(32)[0]
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.inference_mode():
        got = torch_reference.torch_tome_forward(
            model, torch.from_numpy(images).permute(0, 3, 1, 2), rs).numpy()
    want = torch_reference.timm_forward_with_tome(model, images, rs)
    params = torch_reference.timm_to_params(model)
    jax_logits = np.asarray(jax.jit(ours.apply)({"params": params}, images)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax_logits, got, rtol=1e-4, atol=1e-4)
    assert np.abs(want).max() > 0.1  # the head is not zero: logits tell models apart


def test_torch_match_and_merge_equal_ours():
    pytest.importorskip("torch")
    import torch

    metric = np.random.default_rng(0).standard_normal((3, 17, 8)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 17, 5)).astype(np.float32)
    size = np.random.default_rng(2).integers(1, 4, (3, 17, 1)).astype(np.float32)
    matching = torch_reference.torch_match(torch.from_numpy(metric), 5)
    want = merge.match(jnp.asarray(metric), 5)
    for got, w in zip(matching, want, strict=True):
        np.testing.assert_array_equal(got.numpy(), np.asarray(w))
    got_x, got_size = torch_reference.torch_merge_wavg(torch.from_numpy(x),
                                                       torch.from_numpy(size), matching)
    fn = lambda y, mode: merge.merge_tokens(y, want, mode)  # noqa: E731
    want_x, want_size = merge.merge_wavg(fn, jnp.asarray(x), jnp.asarray(size))
    np.testing.assert_allclose(got_x.numpy(), np.asarray(want_x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_size.numpy(), np.asarray(want_size))


def test_torch_tome_bfloat16_runs():
    pytest.importorskip("timm")
    call = B.torch_tome("mu/4", 2, 16, jnp.bfloat16, [2], threads=1)
    out = call()
    assert out.shape == (2, 1000) and str(out.dtype) == "torch.bfloat16"
    assert call.threads == 1 and call.device == "CPU" and call.peak_bytes() > 0


def test_torch_peak_bytes_counts_live_tensors_once():
    torch = pytest.importorskip("torch")

    def call():
        a = torch.ones(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = b * 2  # 4000 more, a and c alive together
        del a, b
        d = c + 1  # a was freed: c and d, 8000
        return d.sum()  # 4 more while c and d are alive

    assert B.torch_peak_bytes(call) == 8004


def test_train_rows_and_table():
    rows = B.benchmark_train("mu/4", 2, 16, [0, 2], runs=1, warmup=0, dtype=jnp.float32)
    assert [r["tokens"] for r in rows] == [17, 15]
    for row in rows:
        assert row["im_s"] > 0 and row["compile_s"] > 0 and row["total_mib"] > row["mib"] > 0
    table = B.format_train(rows).splitlines()
    assert table[0].startswith("| r | step | tokens left |")
    assert table[3].startswith("| 2 | fine-tune | 15 |")


def test_dtem_modular_train_rows():
    # r = 0 fine-tunes everything; r = 2 is DTEM's modular step: soft merging keeps all 17
    # tokens, and with only the embeddings trained its program has fewer FLOPs than the
    # fine-tune's despite the embeddings and the soft matching.
    rows = B.benchmark_train("mu/4", 2, 16, [0, 2], runs=1, warmup=0, dtype=jnp.float32,
                             dtem_modular=True, dtem_dim=4)
    assert [(r["step"], r["tokens"]) for r in rows] == [("fine-tune", 17), ("DTEM modular", 17)]
    assert rows[1]["gflops"] > rows[0]["gflops"]  # the embeddings' matmuls
    assert all(r["im_s"] > 0 and r["total_mib"] > r["mib"] > 0 for r in rows)
    assert "| 2 | DTEM modular | 17 |" in B.format_train(rows)


def test_time_calls_round_robin_and_xla_memory():
    order = []
    times = timing.time_calls([lambda: order.append("a"), lambda: order.append("b")], runs=2,
                              warmup=1)
    assert order == ["a", "b"] * 3 and [len(t) for t in times] == [2, 2]
    compiled, _ = timing.compile_and_time(lambda x: jnp.tanh(x) @ x.T, (jnp.ones((64, 32)),))
    memory = timing.xla_memory(compiled)
    assert memory.argument == 64 * 32 * 4 and memory.output == 64 * 64 * 4
    assert memory.total == memory.argument + memory.working
    assert memory.working == memory.output + memory.temp - memory.alias
    (t,) = timing.time_interleaved([lambda x: x + 1], (jnp.ones(3),), runs=2)
    assert t.memory is not None and len(t.times) == 2


def test_timm_names():
    timm = pytest.importorskip("timm")
    model = torch_reference.timm_vit("Ti/16", 32, num_classes=10)
    assert model.default_cfg["architecture"] == "vit_tiny_patch16_224"
    assert model.patch_embed.img_size == (32, 32) and model.embed_dim == 192
    custom = torch_reference.timm_vit("mu/4", 16)  # no timm name: built from the sizes
    assert isinstance(custom, timm.models.vision_transformer.VisionTransformer)
    assert custom.embed_dim == 32 and len(custom.blocks) == 1


def _fake_rows(variant, batch, resolution, schedules, runs, warmup, dtype, methods,
               metrics=("keys",), dtem_dim=None, *, vs_torch=False, torch_threads=None,
               merge_time=True):
    row = dict(r=0, method="-", tokens=17, gflops=1.0, flops_speedup=1.0, im_s=float(batch),
               seconds=1.0, speedup=1.0, efficiency=1.0, compile_s=0.5, merge_s=0.0,
               merge_share=0.0, dtype=dtype, mib=1.0)
    if vs_torch:
        assert not merge_time
        row.update(torch_im_s=2.0 * batch, vs_torch=0.5, torch_speedup=1.0, torch_mib=2.0,
                   torch_threads=torch_threads, torch_version="torch x", torch_device="CPU")
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
    monkeypatch.setattr(B, "benchmark", _fake_rows)
    cli.main(["--case", "mu/4:2", "S/16:32", "--image-size", "16", "--runs", "1",
              "--vs-torch", "--torch-threads", "1"])
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("ViT-")]
    assert [h.split(", ")[:2] for h in headers] == [["ViT-mu/4 @ 16px", "batch 2"],
                                                   ["ViT-S/16 @ 16px", "batch 32"]]
    assert "| 0 | - | 17 | 1.00 | 1.00x | 2.00 | 4.00 | 0.50x |" in out
    assert "torch x, eager, CPU, 1 threads" in out


def test_cli_train(monkeypatch, capsys):
    seen = {}

    def fake_train(variant, batch, resolution, schedules, runs, warmup, dtype, *,
                   dtem_modular, dtem_dim):
        seen.update(variant=variant, batch=batch, schedules=schedules, modular=dtem_modular,
                    dim=dtem_dim)
        return [dict(r=0, step="fine-tune", tokens=17, gflops=1.0, flops_speedup=1.0, im_s=2.0,
                     speedup=1.0, efficiency=1.0, compile_s=0.5, mib=3.0, total_mib=5.0)]

    monkeypatch.setattr(B, "benchmark_train", fake_train)
    cli.main(["--variant", "mu/4", "--batch-size", "2", "--r", "0", "16", "--train"])
    out = capsys.readouterr().out
    assert seen == dict(variant="mu/4", batch=2, schedules=[0, 16], modular=False, dim=None)
    assert "training step" in out
    assert "| 0 | fine-tune | 17 | 1.00 | 1.00x | 2.00 | 1.00x |" in out
    cli.main(["--variant", "mu/4", "--batch-size", "2", "--r", "0", "16", "--train",
              "--dtem-modular", "--dtem-dim", "8"])
    assert seen["modular"] is True and seen["dim"] == 8


def test_cli_defaults_unchanged(monkeypatch):
    """`python -m eval.benchmark` with no arguments still runs the README's job."""
    seen = {}

    def fake_benchmark(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise SystemExit(0)

    monkeypatch.setattr(B, "benchmark", fake_benchmark)
    with pytest.raises(SystemExit):
        cli.main([])
    variant, batch, resolution, schedules, runs, warmup, dtype, methods, metrics, dim = seen[
        "args"]
    assert (variant, batch, resolution, runs, warmup, dtype, methods, metrics, dim) == (
        "B/16", 8, 224, 7, 2, jnp.float32, ["segment"], ["keys"], None)
    assert schedules == [0, 8, 13, 16, (16, -1.0)]
    assert seen["kwargs"] == dict(vs_torch=False, torch_threads=None, merge_time=True)


def test_bad_cli_input(capsys):
    for argv, message in ((["--batch-size", "0"], "must be positive"),
                          (["--dtype", "float16"], "invalid choice"),
                          (["--merge-method", "nope"], "invalid choice"),
                          (["--case", "B/16"], "expected VARIANT:BATCH"),
                          (["--case", "B/16:0"], "expected VARIANT:BATCH"),
                          (["--attention", "flash"], "invalid choice"),
                          (["--train", "--vs-torch"], "do not go together"),
                          (["--dtem-modular"], "add --train")):
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
