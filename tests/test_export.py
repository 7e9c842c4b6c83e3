"""jax.export of a merged ViT: reload in a fresh process without tome_jax, same logits."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from tome_jax import export
from tome_jax.checkpoint import save_model
from tome_jax.cli import export as cli
from tome_jax.vit import ViT

TINY = dict(variant="S/8", depth=2, width=32, num_heads=2, mlp_dim=64, num_classes=10)
R = 5


@pytest.fixture(scope="module")
def tiny():
    """A random tiny ViT with r > 0, random (not zero-init) head so logits depend on all."""
    model = ViT(**TINY, r=R)
    x = np.zeros((1, 32, 32, 3), np.float32)
    params = jax.jit(model.clone(r=0).init)(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.02 * jax.random.normal(jax.random.key(len(str(path))), v.shape),
        params)
    return model, params


@pytest.fixture(scope="module")
def artefacts(tiny, tmp_path_factory):
    """The tiny model exported with a symbolic batch and with a fixed batch of 2."""
    model, params = tiny
    d = tmp_path_factory.mktemp("export")
    for name, batch in (("sym", None), ("fixed", 2)):
        ex = export.export_model(model, params, (batch, 32, 32, 3))
        export.save_exported(d / f"{name}.jaxexport", ex,
                             lambda data, ex=ex: export.describe(ex, model, (32, 32), data))
    return d


DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def documented_loader() -> str:
    """The `load_verified` function that docs/export.md shows for serving without tome_jax."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    (block,) = [b for b in blocks if "def load_verified" in b]
    return block.split("\nexported = ")[0]


# Runs in a fresh interpreter; tome_jax and flax are blocked, so only jax + numpy serve it. It
# loads through the documented checked loader, which must refuse a copy with 2 bytes flipped.
FRESH = textwrap.dedent("""
    import json, sys
    sys.modules["tome_jax"] = None  # any import of it now fails
    sys.modules["flax"] = None
    import jax, numpy as np
    d = sys.argv[1]
    exec(open(f"{d}/loader.py").read())
    out = {}
    sym = load_verified(f"{d}/sym.jaxexport")
    for b in (1, 3):
        out[f"sym{b}"] = np.asarray(sym.call(np.load(f"{d}/x{b}.npy")))
    fixed = load_verified(f"{d}/fixed.jaxexport")
    out["fixed2"] = np.asarray(fixed.call(np.load(f"{d}/x2.npy")))
    try:
        load_verified(f"{d}/flipped.jaxexport")
        out["flip_refused"] = np.array(False)
    except ValueError as e:
        out["flip_refused"] = np.array("checksum mismatch" in str(e))
    try:
        fixed.call(np.load(f"{d}/x3.npy"))
        out["fixed_rejects_3"] = np.array(False)
    except Exception:
        out["fixed_rejects_3"] = np.array(True)
    np.savez(f"{d}/out.npz", **out)
    print(json.dumps(sorted(m for m, mod in sys.modules.items()
                            if m.startswith(("tome_jax", "flax")) and mod is not None)))
""")


def test_artefact_reloads_in_a_fresh_process_with_the_same_logits(tiny, artefacts):
    model, params = tiny
    x3 = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    for b in (1, 2, 3):
        np.save(artefacts / f"x{b}.npy", x3[:b])
    (artefacts / "loader.py").write_text(documented_loader())
    data = bytearray((artefacts / "sym.jaxexport").read_bytes())
    i = len(data) // 2  # inside the baked-in weights: deserializes and runs when unchecked
    data[i] ^= 0x40
    data[i + 1] ^= 0x40
    (artefacts / "flipped.jaxexport").write_bytes(data)
    (artefacts / "flipped.jaxexport.json").write_bytes(
        (artefacts / "sym.jaxexport.json").read_bytes())
    # What the check prevents: unchecked, damaged weights still run. Eight 0xFF bytes hold at
    # least one whole float32 NaN, so the damage shows whatever byte the middle falls on (a
    # 2-byte flip can land in a low mantissa byte and move the logits by only ~1e-6).
    garbled = bytearray(data)
    garbled[i:i + 8] = b"\xff" * 8
    unchecked = jax.export.deserialize(garbled).call(x3)
    proc = subprocess.run([sys.executable, "-c", FRESH, str(artefacts)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # neither was imported
    got = np.load(artefacts / "out.npz")
    # One live compile: images are independent (merging is per image), so rows of the batch
    # of 3 are the live logits for the batches of 1 and 2.
    live = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x)[0])(x3))
    assert np.abs(live).max() > 1e-2  # a real comparison, not zeros against zeros
    for key, b in (("sym1", 1), ("sym3", 3), ("fixed2", 2)):
        want = live[:b]
        np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=0)
    assert bool(got["fixed_rejects_3"])
    assert bool(got["flip_refused"])
    assert not np.allclose(unchecked, live, atol=1e-3)  # what the check prevents


def test_sidecar_records_shape_schedule_and_version(tiny, artefacts):
    meta = json.loads((artefacts / "sym.jaxexport.json").read_text())
    assert meta["input"]["shape"] == ["b", 32, 32, 3] and meta["input"]["dtype"] == "float32"
    assert meta["output"]["shape"] == ["b", 10]
    assert meta["r"] == R and meta["r_per_block"] == [5, 5]
    assert meta["tokens_per_block"] == [17, 12, 7]
    assert meta["variant"] == "S/8" and meta["model"]["dtype"] == "float32"
    assert meta["jax_version"] == jax.__version__ and meta["platforms"] == ["cpu"]
    data = (artefacts / "sym.jaxexport").read_bytes()
    assert meta["bytes"] == len(data)
    fixed = json.loads((artefacts / "fixed.jaxexport.json").read_text())
    assert fixed["input"]["shape"] == [2, 32, 32, 3]


def test_corrupt_and_truncated_artefacts_give_clear_errors(artefacts, tmp_path):
    data = (artefacts / "sym.jaxexport").read_bytes()
    side = (artefacts / "sym.jaxexport.json").read_text()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 100,
             "flipped": data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]}
    for name, content in cases.items():
        # With the sidecar: size / hash checked first.
        path = tmp_path / f"{name}.jaxexport"
        path.write_bytes(content)
        export.sidecar_path(path).write_text(side)
        with pytest.raises(export.ExportError, match=f"{name}.jaxexport.*(truncated|corrupt)"):
            export.load_exported(path)
    for name in ("truncated", "garbage"):
        # Without it: refused as unverifiable; unchecked, the deserializer's own failure,
        # wrapped with the file's name.
        path = tmp_path / f"{name}.jaxexport"
        export.sidecar_path(path).unlink()
        with pytest.raises(export.ExportError, match=f"{name}.jaxexport: no sidecar"):
            export.load_exported(path)
        with pytest.raises(export.ExportError, match="not a readable jax.export artefact"):
            export.load_exported(path, verify=False)
    with pytest.raises(export.ExportError, match="no exported model"):
        export.load_exported(tmp_path / "missing.jaxexport")
    ok = export.load_exported(artefacts / "sym.jaxexport")
    assert str(ok.in_avals[0].shape[0]) == "b"


def test_cli(tiny, tmp_path, capsys):
    model, params = tiny
    ckpt = tmp_path / "ckpt"
    config = {k: TINY[k] for k in ("variant", "num_classes", "width", "depth", "mlp_dim",
                                   "num_heads")}
    save_model(ckpt, jax.device_get(params), config, image_size=(32, 32),
               normalization="augreg")
    out = tmp_path / "m.jaxexport"
    assert cli.main(["--checkpoint", str(ckpt), "--r", "5", "--out", str(out),
                        "--batch-size", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["input"]["shape"] == [3, 32, 32, 3] and printed["r_per_block"] == [5, 5]
    # Same function as the fixture's artefacts, whose numbers the fresh-process test checks.
    reloaded = export.load_exported(out)
    assert reloaded.in_avals[0].shape == (3, 32, 32, 3)
    assert reloaded.out_avals[0].shape == (3, 10)
    other = tmp_path / "other.jaxexport"
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(other), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(other),
                        "--image-size", "36"]) == 2
    assert "not divisible by the patch size" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(other),
                        "--image-size", "48"]) == 2
    assert "position embeddings cover 16 patches" in capsys.readouterr().err
    assert not other.exists()
    # An existing artefact is kept unless --overwrite.
    before = out.read_bytes()
    assert cli.main(["--checkpoint", str(ckpt), "--r", "0", "--out", str(out),
                     "--batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert err == (f"python -m tome_jax.export: error: {out} exists; refusing to overwrite it "
                   "(--overwrite replaces it)\n")
    assert out.read_bytes() == before
    assert cli.main(["--checkpoint", str(ckpt), "--r", "0", "--out", str(out), "--batch-size", "3",
                     "--overwrite"]) == 0
    capsys.readouterr()
    assert out.read_bytes() != before
    assert export.load_exported(out).in_avals[0].shape == (3, 32, 32, 3)
