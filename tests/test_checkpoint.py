"""The model directory (save_model / load_model), the param-tree helpers and the one
normalization table."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import checkpoint as ck
from tome_jax import normalization as norm
from tome_jax.params import (
    abstract_params,
    flatten,
    num_head_classes,
    path_names,
    random_params,
    unflatten,
)
from tome_jax.vit import ViT

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"variant": "mu/4", "num_classes": 3}


def at(path) -> str:
    """A regex matching the path literally (error messages must name the file)."""
    return re.escape(str(path))


def tiny(**config):
    model = ViT(**{**CONFIG, **config})
    return model, random_params(model, 16)


def assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# --------------------------------------------------------------------------------------------
# Param-tree helpers.


def test_flatten_unflatten_path_names():
    tree = {"a": {"b": np.zeros(2), "c": {"d": np.ones(1)}}, "e": np.ones(3)}
    flat = flatten(tree)
    assert sorted(flat) == ["a/b", "a/c/d", "e"]
    assert_trees_equal(unflatten(flat), tree)
    assert path_names(tree) == {"a": {"b": "a/b", "c": {"d": "a/c/d"}}, "e": "e"}


def test_abstract_params_and_head_classes():
    model = ViT(variant="mu/4", num_classes=3, r=8)  # r too large for 16 px: shapes still fine
    shapes = abstract_params(model, (16, 8))
    assert shapes["pos_embedding"].shape[:2] == (1, 4 * 2)
    assert isinstance(shapes["head"]["kernel"], jax.ShapeDtypeStruct)
    assert num_head_classes(shapes) == 3
    assert num_head_classes(random_params(ViT(variant="mu/4", num_classes=0), 16)) is None


def test_random_params_deterministic_and_as_before():
    model, params = tiny()
    assert_trees_equal(params, random_params(model, 16))
    other = flatten(random_params(model, 16, seed=1))
    assert any(not np.array_equal(v, other[k]) for k, v in flatten(params).items())
    # The values eval/evaluate.py drew before: N(0, 0.02) in leaf order, LayerNorm scales + 1.
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        value = rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype)
        return value + 1 if getattr(path[-1], "key", None) == "scale" else value

    assert_trees_equal(params, jax.tree_util.tree_map_with_path(draw, shapes))
    scale = params["Transformer"]["encoder_norm"]["scale"]
    assert abs(float(np.mean(scale)) - 1) < 0.02


# --------------------------------------------------------------------------------------------
# Normalization.


def test_normalization_table_is_the_old_one():
    old_host = {  # tome_jax/data.py, 0..255 units
        "augreg": ((127.5,) * 3, (127.5,) * 3),
        "imagenet": (tuple(255 * m for m in (0.485, 0.456, 0.406)),
                     tuple(255 * s for s in (0.229, 0.224, 0.225))),
        "unit": ((0.0,) * 3, (255.0,) * 3),
    }
    assert norm.NORMALIZATIONS == old_host
    for name in old_host:
        assert norm.mean_std(name) == old_host[name]
    assert norm.mean_std("imagenet", 1.0) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert norm.mean_std("augreg", 1.0) == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match=r"unknown normalization 'x'.*augreg.*imagenet.*unit"):
        norm.check("x")
    with pytest.raises(ValueError, match="unknown normalization"):
        norm.normalize(np.zeros(3), "x")


@pytest.mark.parametrize("name", ["augreg", "imagenet", "unit"])
def test_normalize_equals_the_old_formulas(name):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    old_device = {  # tome_jax/memory_data.py
        "augreg": ((127.5,) * 3, (127.5,) * 3),
        "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
        "unit": ((0.0,) * 3, (255.0,) * 3),
    }
    mean, std = (np.asarray(v, np.float32) for v in old_device[name])
    want = (pixels.astype(np.float32) - mean) / std
    got = norm.normalize(pixels, name)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    got_jax = norm.normalize(jnp.asarray(pixels), name)
    assert isinstance(got_jax, jax.Array) and got_jax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_jax), want, rtol=1e-6, atol=1e-6)
    # tome_jax/vis.py worked on [0, 1] pixels.
    unit_mean, unit_std = (np.asarray(v, np.float32) for v in norm.mean_std(name, 1.0))
    np.testing.assert_allclose((pixels.astype(np.float32) / 255 - unit_mean) / unit_std, want,
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The model directory.


@pytest.mark.parametrize("as_flat", [False, True])
def test_save_load_round_trip(tmp_path, as_flat):
    model, params = tiny()
    tree = flatten(params) if as_flat else params
    dst = ck.save_model(tmp_path / "m", tree, CONFIG, image_size=16, normalization="imagenet",
                        source="random")
    assert ck.is_model_dir(dst) and not ck.is_model_dir(tmp_path)
    assert sorted(p.name for p in dst.iterdir()) == [ck.CONFIG_FILE, ck.PARAMS_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    meta = json.loads((dst / ck.CONFIG_FILE).read_text())
    assert meta["format"] == ck.FORMAT and meta["image_size"] == [16, 16]
    loaded, got, info = ck.load_model(dst)
    assert loaded == model
    assert_trees_equal(got, params)
    assert info == ck.ModelInfo(config=CONFIG, image_size=(16, 16), normalization="imagenet",
                                source="random")
    assert ck.read_info(dst) == info


def test_float16_matrices_halve_the_file_and_load_as_float32(tmp_path):
    config = {**CONFIG, "layerscale_init": 1e-6}
    _, params = tiny(layerscale_init=1e-6)
    full = ck.save_model(tmp_path / "f32", params, config, image_size=16, normalization="augreg")
    half = ck.save_model(tmp_path / "f16", params, config, image_size=16, normalization="augreg",
                         param_dtype="float16")
    size = lambda d: (d / ck.PARAMS_FILE).stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    _, got, _ = ck.load_model(half)
    flat, want = flatten(got), flatten(params)
    for k, v in want.items():
        v = np.asarray(v)
        assert np.asarray(flat[k]).dtype == np.float32, k
        # Matrices round to float16; vectors (here LayerScale at 1e-6, which float16 would
        # flush to a subnormal) stay exact.
        expect = v.astype(np.float16).astype(np.float32) if v.ndim >= 2 else v
        np.testing.assert_array_equal(np.asarray(flat[k]), expect, err_msg=k)
    assert any(np.asarray(v).ndim >= 2 and np.any(np.asarray(v).astype(np.float16) != v)
               for v in want.values())  # the rounding is real, so the check above can fail
    with pytest.raises(ValueError, match="does not fit float16"):
        big = {**flatten(params)}
        key = next(k for k, v in big.items() if np.asarray(v).ndim >= 2)
        big[key] = np.full(np.shape(big[key]), 1e6, np.float32)
        ck.save_model(tmp_path / "big", big, CONFIG, image_size=16, normalization="augreg",
                      param_dtype="float16")
    assert not (tmp_path / "big").exists()
    with pytest.raises(ValueError, match="param_dtype"):
        ck.save_model(tmp_path / "x", params, CONFIG, image_size=16, normalization="augreg",
                      param_dtype="bfloat16")


def test_overrides_apply_at_load_time(tmp_path):
    _, params = tiny()
    dst = ck.save_model(tmp_path / "m", params, CONFIG, image_size=(16, 16),
                        normalization="augreg")
    model, got, info = ck.load_model(dst, r=4, strategy="prune")
    assert model.r == 4 and model.strategy == "prune"
    assert info.config == CONFIG  # what was saved, not the overrides
    logits, out = model.apply({"params": got}, jnp.zeros((1, 16, 16, 3)))
    assert logits.shape == (1, 3) and out["encoded"].shape[1] == 17 - 4  # mu/4: 2 blocks


def test_existing_destination_is_refused_untouched(tmp_path):
    _, params = tiny()
    dst = ck.save_model(tmp_path / "m", params, CONFIG, image_size=16, normalization="augreg")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    for error in (ck.CheckpointError, FileExistsError):
        with pytest.raises(error, match="exists; refusing to overwrite"):
            ck.save_model(dst, params, {**CONFIG, "num_classes": 5}, image_size=32,
                          normalization="unit")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_refuses_unknown_normalization(tmp_path):
    _, params = tiny()
    with pytest.raises(ValueError, match="unknown normalization"):
        ck.save_model(tmp_path / "m", params, CONFIG, image_size=16, normalization="bogus")
    assert not (tmp_path / "m").exists()


def test_old_directory_without_normalization_or_image_size(tmp_path):
    """config.json as `tome_jax.convert/1` wrote it: augreg inputs, 224 px if no size."""
    from flax import serialization

    for name, config, size in (("old", CONFIG, [16, 16]),
                               ("no_size", {"variant": "mu/16", "num_classes": 3}, None)):
        model = ViT(**config)
        params = random_params(model, size or ck.DEFAULT_IMAGE_SIZE)
        d = tmp_path / name
        d.mkdir()
        (d / ck.PARAMS_FILE).write_bytes(serialization.msgpack_serialize(jax.device_get(params)))
        meta = {"model": config, "source": "x", "format": "tome_jax.convert/1"}
        if size:
            meta["image_size"] = size
        (d / ck.CONFIG_FILE).write_text(json.dumps(meta))
        _, got, info = ck.load_model(d)
        assert info.normalization == "augreg" == ck.LEGACY_NORMALIZATION
        assert info.image_size == (tuple(size) if size else (224, 224))
        assert_trees_equal(got, params)


def test_shipped_cifar10_model_loads():
    model, params, info = ck.load_model(REPO / "models" / "cifar10_vit", r=4)
    assert info.image_size == (32, 32) and info.normalization == "augreg"
    assert model.r == 4 and model.num_classes == 10 and num_head_classes(params) == 10


def test_each_error_names_the_file(tmp_path):
    from tome_jax import dtem

    model = ViT(variant="mu/4", num_classes=3, dtem_dim=8)
    x = jnp.zeros((1, 16, 16, 3))
    flat = flatten(jax.device_get(model.init(jax.random.key(0), x)["params"]))
    dtem_config = {"variant": "mu/4", "num_classes": 3, "dtem_dim": 8}
    ok = ck.save_model(tmp_path / "ok", flat, dtem_config, image_size=(16, 16),
                       normalization="augreg")
    loaded, params, info = ck.load_model(ok, r=2)
    assert loaded.dtem_dim == 8 and loaded.r == 2 and info.image_size == (16, 16)
    # The DTEM embeddings without dtem_dim in the config: refused, not silently ignored.
    no_dtem = ck.save_model(tmp_path / "no_dtem", flat, CONFIG, image_size=(16, 16),
                            normalization="augreg")
    with pytest.raises(ck.CheckpointError, match=f"{at(no_dtem)}.*unexpected.*{dtem.EMBED_NAME}"):
        ck.load_model(no_dtem)
    other = ck.save_model(tmp_path / "other", flat, {**dtem_config, "num_classes": 5},
                          image_size=(16, 16), normalization="augreg")
    with pytest.raises(ck.CheckpointError, match=fr"{at(other)}.*head/kernel \(.*3\) vs \(.*5\)"):
        ck.load_model(other)
    # Missing files.
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(ck.CheckpointError,
                       match=f"not a converted.*{at(missing / ck.CONFIG_FILE)} is missing"):
        ck.load_model(missing)
    with pytest.raises(ck.CheckpointError, match=f"{at(missing / ck.CONFIG_FILE)} is missing"):
        ck.read_info(missing)
    (missing / ck.CONFIG_FILE).write_text(json.dumps({"model": CONFIG}))
    with pytest.raises(ck.CheckpointError, match=f"{at(missing / ck.PARAMS_FILE)} is missing"):
        ck.load_model(missing)
    # Corrupt params: the recorded sha256 catches it; without one, msgpack does.
    (ok / ck.PARAMS_FILE).write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ck.CheckpointError,
                       match=f"{at(ok / ck.PARAMS_FILE)}: checksum mismatch.*the file is corrupt"):
        ck.load_model(ok)
    meta = json.loads((ok / ck.CONFIG_FILE).read_text())
    del meta[ck.CHECKSUMS]
    (ok / ck.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ck.CheckpointError, match=f"{at(ok / ck.PARAMS_FILE)} is corrupt"):
        ck.load_model(ok)
    # Bad config: not a ViT, not JSON, no model, bad normalization.
    config_file = other / ck.CONFIG_FILE
    for text, message in (('{"model": {"variant": "mu/4", "bogus": 1}}',
                           "does not describe a tome_jax ViT"),
                          ("{not json", "does not describe a tome_jax ViT.*JSONDecodeError"),
                          ('{"image_size": [16, 16]}', 'no "model" object'),
                          (json.dumps({"model": CONFIG, "normalization": "bogus"}),
                           "unknown normalization 'bogus'")):
        config_file.write_text(text)
        with pytest.raises(ck.CheckpointError, match=f"{at(config_file)}.*{message}"):
            ck.load_model(other)
