"""DTEM's modular recipe (train/configs/dtem_modular.json): what it sets, that a run with it
trains only the embeddings, and the warning for stochastic depth/dropout in a frozen backbone."""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import dtem, sources
from tome_jax.checkpoint import save_model
from tome_jax.params import flatten, random_params
from tome_jax.training.config import frozen_backbone_warnings, load_config
from tome_jax.training.loop import train
from tome_jax.training.optim import lr_schedule, make_optimizer
from tome_jax.training.state import abstract_train_state, init_state, make_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train" / "configs" / "dtem_modular.json"
# Small model and data; everything else is the recipe's. 16 patches: r = 16 clamps to 8 then
# 4, so the second block still chooses among several pairs (with one, its embedding gets no
# gradient).
TINY = ["dataset=image_folder", "variant=mu/8", "width=0", "depth=2", "num_heads=0",
        "mlp_dim=0", "dtem_dim=8", "num_classes=3", "image_size=32", "batch_size=8", "steps=2",
        "save_every=2", "eval_every=0", "log_every=1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sources.write_image_folder(tmp_path_factory.mktemp("data"), {"train": 16, "test": 8})


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A model directory without embeddings (as a pretrained backbone is) and a non-zero head,
    so that gradients reach the embeddings; ViT's fresh head is zero."""
    cfg = load_config(RECIPE, TINY)
    model = make_model(cfg, dtem_dim=None, soft_merge=False, r=0)
    params = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    head = params["head"]["kernel"]
    params = {**params, "head": {**params["head"], "kernel": jax.random.normal(
        jax.random.key(2), head.shape)}}
    return save_model(tmp_path_factory.mktemp("models") / "backbone", params,
                      {"variant": "mu/8", "depth": 2, "num_classes": 3}, image_size=32,
                      normalization=cfg.normalization)


def test_recipe_is_the_authors_modular_setting():
    cfg = load_config(RECIPE, [])
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.schedule) == (1e-4, 1e-6, 0, "cosine")
    assert (cfg.weight_decay, cfg.grad_clip, cfg.label_smoothing) == (1e-4, 5.0, 0.0)
    assert (cfg.mixup, cfg.cutmix, cfg.randaug_ops, cfg.randaug_magnitude) == (0.8, 1.0, 2, 9.0)
    assert (cfg.drop_path, cfg.dropout, cfg.r) == (0.0, 0.0, "16")
    assert cfg.soft_merge and cfg.dtem_order == "size"
    assert cfg.dtem_dim == dtem.default_dim(cfg.width, cfg.num_heads)
    assert cfg.init_from == ""  # each user's backbone: --set init_from=DIR
    # Per-step cosine from the peak at step 0 (no warm-up) down to min_lr.
    schedule = lr_schedule(cfg)
    assert float(schedule(0)) == pytest.approx(cfg.lr)
    assert float(schedule(cfg.steps // 2)) < cfg.lr
    assert float(schedule(cfg.steps)) == pytest.approx(cfg.min_lr)


def test_recipe_decays_only_the_embedding_kernels():
    # With zero gradients AdamW's update is the decay alone: -lr * wd * param where decayed.
    cfg = load_config(RECIPE, TINY)
    _, _, abstract, _ = abstract_train_state(cfg, jax.sharding.Mesh(jax.devices()[:1], ("b",)))
    params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract["params"])
    tx = make_optimizer(cfg, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    flat = {k: np.asarray(v) for k, v in flatten(updates).items()}
    embeds = {k for k in flat if f"/{dtem.EMBED_NAME}/" in k}
    assert embeds and all(k.endswith(("/kernel", "/bias")) for k in embeds)
    for k, u in flat.items():
        if k in embeds and k.endswith("/kernel"):
            np.testing.assert_allclose(u, -cfg.lr * cfg.weight_decay, rtol=1e-6, err_msg=k)
        else:  # biases are not decayed; the backbone is frozen
            assert not u.any(), k


def test_frozen_parameters_cost_no_weight_gradients(monkeypatch):
    # The frozen step must update exactly as differentiating everything and discarding the
    # frozen part would, with the backbone's weight-gradient matmuls gone from the program.
    from tome_jax.training import step as step_module

    cfg = load_config(RECIPE, TINY + ["mixup=0", "cutmix=0"])
    model = make_model(cfg)
    params = random_params(model, 32)  # the head too: every gradient is non-zero
    tx = make_optimizer(cfg, params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    batch = {"image": jax.random.normal(jax.random.key(2), (8, 32, 32, 3)),
             "label": jnp.arange(8) % 3}

    def compiled():
        return jax.jit(step_module.make_train_step(model, tx, cfg)).lower(state, batch).compile()

    stopped = compiled()
    monkeypatch.setattr(step_module, "stop_frozen_gradients", lambda p, freeze: p)
    full = compiled()
    (new, metrics), (want, _) = stopped(state, batch), full(state, batch)
    for k, v in flatten(new["params"]).items():
        np.testing.assert_allclose(np.asarray(v), np.asarray(flatten(want["params"])[k]),
                                   rtol=1e-6, atol=1e-7, err_msg=k)
    assert float(metrics["grad_norm"]) > 0
    ratio = stopped.cost_analysis()["flops"] / full.cost_analysis()["flops"]
    assert ratio < 0.8, ratio


@pytest.mark.slow  # a training run: about 50 s on 2 cores
def test_tiny_run_with_the_recipe_trains_only_the_embeddings(folder, backbone, tmp_path):
    cfg = load_config(RECIPE, TINY + [f"data_dir={folder}", f"init_from={backbone}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = train(cfg, tmp_path / "run")
    assert not [w for w in caught if "frozen blocks" in str(w.message)]
    init = flatten(init_state(cfg, make_model(cfg), make_optimizer(cfg, state["params"]))
                   ["params"])
    after = flatten(jax.device_get(state["params"]))
    embeds = [k for k in after if f"/{dtem.EMBED_NAME}/" in k]
    assert len(embeds) == 2 * 2  # kernel and bias in each of 2 blocks
    for k, v in after.items():
        if k not in embeds:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(init[k]), err_msg=k)
    # The last block merges after its attention, and its MLP acts per token: with the class
    # token pooled, only the first block's merge reaches the loss.
    for k in embeds:
        if "encoderblock_0/" in k:
            assert not np.array_equal(np.asarray(after[k]), np.asarray(init[k])), k


def test_drop_path_or_dropout_in_a_frozen_backbone_warns(folder, tmp_path):
    names = ["embedding/kernel", "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel",
             f"Transformer/encoderblock_0/{dtem.EMBED_NAME}/kernel", "head/kernel"]
    cfg = load_config(RECIPE, ["drop_path=0.1"])
    (line,) = frozen_backbone_warnings(cfg, names)
    assert "drop_path=0.1" in line and "3 of 3 backbone tensors" in line
    assert "\n" not in line
    (line,) = frozen_backbone_warnings(load_config(RECIPE, ["dropout=0.1", "drop_path=0.1"]),
                                       names)
    assert "drop_path=0.1 and dropout=0.1" in line
    # Nothing to warn about: no noise, nothing frozen, or only the embeddings frozen.
    assert frozen_backbone_warnings(load_config(RECIPE, []), names) == []
    assert frozen_backbone_warnings(load_config(RECIPE, ["drop_path=0.1", "freeze="]),
                                    names) == []
    assert frozen_backbone_warnings(load_config(RECIPE, ["drop_path=0.1",
                                                         "freeze=dtem_embed"]), names) == []
    # The trainer says it once at start-up (here: before any step).
    run = load_config(RECIPE, TINY + [f"data_dir={folder}", "drop_path=0.1"])
    with pytest.warns(UserWarning, match=r"drop_path=0\.1 with freeze=.*stochastic depth"):
        train(run, tmp_path / "noisy", stop_after=0)
