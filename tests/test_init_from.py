"""Fine-tuning a pretrained backbone: init_from with DINOv2-style blocks at another resolution."""

import jax
import numpy as np
import pytest

from tome_jax.checkpoint import load_model, save_model
from tome_jax.convert.resample import resample_posemb
from tome_jax.params import flatten
from tome_jax.training import load_config
from tome_jax.training.optim import make_optimizer
from tome_jax.training.ship import model_config
from tome_jax.training.state import init_state, make_model

# A DINOv2-like backbone in miniature: LayerScale, registers, no head, pretrained at 16 px
# (a 2x2 grid of 8 px patches).
BACKBONE = ["variant=mu/8", "depth=2", "num_classes=0", "image_size=16",
            "layerscale_init=1.0", "num_registers=2"]


def _backbone_dir(tmp_path):
    cfg = load_config(None, BACKBONE)
    model = make_model(cfg)
    params = model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32))["params"]
    # LayerScale's init is 1.0 everywhere; other values show the tensors really arrive.
    params = jax.tree.map(lambda x: x + np.random.default_rng(0).normal(size=x.shape), params)
    return save_model(tmp_path / "backbone", flatten(params), model_config(cfg),
                      image_size=(16, 16), normalization="imagenet"), flatten(params)


def test_backbone_fields_round_trip_through_ship_config(tmp_path):
    cfg = load_config(None, BACKBONE)
    fields = model_config(cfg)
    assert fields["layerscale_init"] == 1.0 and fields["num_registers"] == 2
    assert "class_token" not in fields  # only what differs from a plain ViT
    model, _, _ = load_model(_backbone_dir(tmp_path)[0])
    assert model.layerscale_init == 1.0 and model.num_registers == 2


def test_init_from_at_another_resolution_resamples_position_embeddings(tmp_path):
    path, pretrained = _backbone_dir(tmp_path)
    cfg = load_config(None, [o for o in BACKBONE if not o.startswith(("image_size",
                                                                      "num_classes"))]
                      + ["image_size=32", "num_classes=10", f"init_from={path}"])
    model = make_model(cfg)
    params = flatten(jax.jit(lambda: init_state(cfg, model, make_optimizer(
        cfg, model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)))["params"])))()["params"])
    # The 2x2 grid becomes 4x4, bicubic, as the converter's NumPy resampler does it.
    want = resample_posemb(np.asarray(pretrained["pos_embedding"], np.float64), (4, 4))
    np.testing.assert_allclose(np.asarray(params["pos_embedding"]), want, atol=1e-5)
    for key, value in pretrained.items():
        if key != "pos_embedding":
            np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(value),
                                          err_msg=key)
    assert params["head/kernel"].shape[-1] == 10  # a new head beside the headless backbone


def test_init_from_with_another_token_layout_names_the_tensor(tmp_path):
    path, _ = _backbone_dir(tmp_path)
    cfg = load_config(None, [o for o in BACKBONE if not o.startswith("num_registers")]
                      + [f"init_from={path}"])
    model = make_model(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))["params"]
    with pytest.raises(ValueError, match="'registers' is not a parameter of this model"):
        init_state(cfg, model, make_optimizer(cfg, params))


def test_dinov2_cifar10_recipe_describes_the_converted_backbone_at_224_px():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "train/configs/dinov2_s14_cifar10.json", [])
    model = make_model(cfg)
    assert (model.dims.width, model.dims.depth, model.dims.patch_size) == (384, 12, 14)
    assert model.layerscale_init == 1.0 and cfg.normalization == "imagenet"
    assert model.token_schedule(cfg.image_size)[1][0] == 257  # 16 x 16 patches + the class token
