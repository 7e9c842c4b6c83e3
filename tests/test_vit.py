"""The linen ViT: parity with timm, ToMe invariants inside the model, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import schedule
from tome_jax.vit import Encoder1DBlock, ViT

SMALL = dict(variant="S/8", depth=4, width=64, num_heads=4, mlp_dim=128, num_classes=10)


def init(model, shape=(2, 32, 32, 3), seed=0):
    images = jax.random.normal(jax.random.key(seed + 1), shape)
    # Parameters do not depend on the merge schedule; init without merging compiles faster.
    variables = jax.jit(model.clone(r=0, trace_source=False).init)(jax.random.key(seed), images)
    # Random (not zero) head and class token so logits depend on everything.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.02 * jax.random.normal(jax.random.key(len(str(path))), v.shape),
        variables["params"])
    return params, images


def run(model, params, images, **kwargs):
    """Jitted forward: eager flax dispatch is several times slower on the CPU."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x, **kwargs))(params, images)


def test_param_names_follow_big_vision():
    params, _ = init(ViT(**SMALL))
    assert set(params) == {"embedding", "cls", "pos_embedding", "Transformer", "head"}
    block = params["Transformer"]["encoderblock_0"]
    assert set(block) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                          "MlpBlock_0"}
    assert set(block["MultiHeadDotProductAttention_0"]) == {"query", "key", "value", "out"}
    assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (64, 4, 16)
    assert set(params["Transformer"]) == {f"encoderblock_{i}" for i in range(4)} | {
        "encoder_norm"}
    assert params["pos_embedding"].shape == (1, 16, 64)


def test_parameter_count_vit_b16():
    model = ViT(variant="B/16", num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))
    # timm counts 86,567,656; our class token carries its position embedding (768 fewer).
    assert count == 86_567_656 - 768


def test_r0_is_the_plain_model_bit_for_bit():
    params, images = init(ViT(**SMALL))
    base, _ = run(ViT(**SMALL, r=0, prop_attn=False), params, images)
    for kwargs in [dict(r=0), dict(r=[0, 0]), dict(r=(0, -1)), dict(r=0, trace_source=True)]:
        logits, _ = run(ViT(**SMALL, **kwargs), params, images)
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(base))


@pytest.mark.parametrize("r", [3, [6, 0, 2], (3, -1)])
def test_token_counts_sizes_and_sources(r):
    model = ViT(**SMALL, r=r, trace_source=True)
    params, images = init(model)
    rs, tokens = model.token_schedule(32)
    _, state = run(model, params, images,
                   capture_intermediates=lambda m, _: isinstance(m, Encoder1DBlock))
    blocks = state["intermediates"]["Transformer"]
    for i in range(4):
        block_out = blocks[f"encoderblock_{i}"]["__call__"][0]
        assert block_out.x.shape[1] == tokens[i + 1] == tokens[i] - rs[i]
    logits, out = run(model, params, images)
    assert out["encoded"].shape == (2, tokens[-1], 64)
    np.testing.assert_array_equal(np.asarray(out["size"].sum(axis=(1, 2))), 17.0)
    source = np.asarray(out["source"])
    np.testing.assert_array_equal(source.sum(axis=1), 1.0)  # a partition of the inputs
    np.testing.assert_array_equal(source.sum(axis=2), np.asarray(out["size"][..., 0]))
    assert source[:, 0, 0].all() and (source[:, 0].sum(-1) == 1).all()  # class token alone


def test_merged_forward_matches_timm_blocks_with_numpy_merge():
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from tome_jax.torch_reference import timm_forward_with_tome, timm_to_params

    torch.manual_seed(0)
    ref_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                  img_size=96).eval()
    params = timm_to_params(ref_model)
    images = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype(np.float32)
    for r in [0, 4, (8, -1)]:
        model = ViT(variant="Ti/16", num_classes=10, r=r)
        ours, _ = run(model, params, images)
        rs, _ = model.token_schedule(96)
        want = timm_forward_with_tome(ref_model, images, rs)
        assert np.abs(want).max() > 1e-2  # a meaningful comparison, not zeros against zeros
        np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4, rtol=0)


def test_r0_matches_timm_vit_base_patch16_224():
    pytest.importorskip("timm")
    pytest.importorskip("torch")
    from tome_jax.torch_reference import vit_b16_r0_logits

    ours, want = vit_b16_r0_logits()
    assert np.abs(want).std() > 1e-2
    assert np.abs(ours - want).max() <= 1e-4


def test_no_retrace_and_finite_gradients():
    model = ViT(**SMALL, r=3)
    params, images = init(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(params, images):
        logits, _ = run(model, params, images)
        return (jax.nn.log_softmax(logits)[:, 0]).mean()

    for seed in range(3):
        loss(params, jax.random.normal(jax.random.key(seed), images.shape))
    grads = jax.grad(loss)(params, images)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads["embedding"]["kernel"])).sum() > 0


def test_bfloat16_compute_float32_params():
    model = ViT(**SMALL, r=3, dtype=jnp.bfloat16)
    params, images = init(model)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
    logits16, out = run(model, params, images)
    logits32, _ = run(ViT(**SMALL, r=3), params, images)
    assert out["encoded"].dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    assert np.abs(np.asarray(logits16) - np.asarray(logits32)).max() < 0.1


@pytest.mark.parametrize("pool", ["gap", "mae"])
def test_pooled_variants_weight_by_size(pool):
    model = ViT(**SMALL, r=4, pool=pool)
    params, images = init(model)
    _, out = run(model, params, images)
    assert ("fc_norm" in params) == (pool == "mae")
    assert ("encoder_norm" in params["Transformer"]) == (pool != "mae")
    x, size = np.asarray(out["encoded"][:, 1:]), np.asarray(out["size"][:, 1:])
    pooled = (x * size).sum(1) / size.sum(1)
    if pool == "mae":
        mean, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
        p = params["fc_norm"]
        pooled = (pooled - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]
    np.testing.assert_allclose(np.asarray(out["pre_logits"]), pooled, atol=1e-5)


def test_registers_and_distill_token_are_never_merged():
    model = ViT(**SMALL, r=4, num_registers=2, trace_source=True)
    params, images = init(model)
    _, out = run(model, params, images)
    src = np.asarray(out["source"])
    for t in range(3):  # cls and both registers stay alone and in place
        assert (src[:, t, t] == 1).all() and (src[:, t].sum(-1) == 1).all()
    model = ViT(**SMALL, r=4, distill_token=True, trace_source=True)
    params, images = init(model)
    logits, out = run(model, params, images)
    assert (np.asarray(out["source"])[:, 1, 1] == 1).all()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(
        out["logits_cls"] + out["logits_dist"]) / 2, atol=1e-6)


def test_flops_method_matches_schedule():
    model = ViT(variant="B/16", r=16)
    assert model.flops(224) == schedule.flops("B/16", 224, 16)
    assert model.token_schedule(224)[1][-1] == 11


@pytest.mark.parametrize("shape,match", [
    ((2, 30, 32, 3), "height 30 is not divisible by the patch size 8"),
    ((2, 32, 32, 1), "1 channels"),
    ((32, 32, 3), r"\[batch, height, width, channels\]"),
])
def test_bad_input_shapes(shape, match):
    model = ViT(**SMALL)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.zeros(shape))


def test_bad_config():
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="13 entries"):
        ViT(**SMALL, r=[1] * 13).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="cannot be met in block 0"):
        ViT(**SMALL, r=[9]).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="unknown pool"):
        ViT(**SMALL, pool="max").init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="unknown strategy"):
        ViT(**SMALL, strategy="drop").init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="unknown ViT variant"):
        ViT(variant="Q/16").init(jax.random.key(0), images)


def test_prune_keeps_most_attended_tokens_in_order():
    from tome_jax import prune

    attention = jnp.asarray([[0.0, 0.5, 0.1, 0.3, 0.05, 0.05],
                             [0.9, 0.01, 0.02, 0.03, 0.04, 0.0]])
    np.testing.assert_array_equal(np.asarray(prune.keep_indices(attention, 2)),
                                  [[0, 1, 2, 3], [0, 2, 3, 4]])


@pytest.mark.slow  # op by op with source tracing: about 20 s each
@pytest.mark.parametrize("strategy", ["random", "prune"])
def test_baseline_strategies_match_tome_token_counts(strategy):
    model = ViT(**SMALL, r=3, strategy=strategy, trace_source=True)
    params, images = init(model)
    logits, out = run(model, params, images)
    tome_logits, tome_out = run(model.clone(strategy="tome"), params, images)
    assert out["encoded"].shape == tome_out["encoded"].shape
    assert not np.allclose(np.asarray(logits), np.asarray(tome_logits))
    source = np.asarray(out["source"])
    assert (source[:, 0, 0] == 1).all()
    if strategy == "prune":  # nothing merged: each kept token holds only itself
        np.testing.assert_array_equal(source.sum(axis=2), 1.0)
    else:
        np.testing.assert_array_equal(source.sum(axis=1), 1.0)
        again, _ = run(model, params, images)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


def test_reducer_for_picks_one_function_per_model():
    from tome_jax import reduce

    assert reduce.reducer_for("tome") is reduce.merge_by_keys
    assert reduce.reducer_for("random") is reduce.merge_random
    assert reduce.reducer_for("prune") is reduce.prune_least_attended
    assert reduce.reducer_for("tome", embedding=True) is reduce.merge_by_embedding
    assert reduce.reducer_for("tome", embedding=True, soft=True) is \
        reduce.soft_merge_by_embedding
    assert ViT(**SMALL, strategy="prune").reducer() is reduce.prune_least_attended
    with pytest.raises(ValueError, match="unknown strategy 'drop'"):
        reduce.reducer_for("drop")


@pytest.mark.parametrize("strategy", ["tome", "random", "prune", "dtem"])
def test_hard_reducers_keep_extra_tokens_in_place(strategy):
    from tome_jax import reduce

    # cls, two extra tokens, 10 patches: 11 tokens take part in matching, r=3 of them leave.
    cfg = reduce.MergeConfig(class_token=True, num_extra=2, prop_attn=True, trace_source=True,
                             method="segment", strategy="tome" if strategy == "dtem" else strategy)
    keys = jax.random.normal(jax.random.key(0), (2, 13, 4))
    x = jax.random.normal(jax.random.key(1), (2, 13, 6))
    start = reduce.initial_tokens(x, cfg)
    metrics = reduce.Metrics(keys, jax.nn.softmax(keys[..., 0]), keys[..., :3])
    fn = reduce.reducer_for(cfg.strategy, embedding=strategy == "dtem")
    assert fn(start, metrics, 0, cfg, 0) is start
    out = fn(start, metrics, 3, cfg, 1)
    assert out.x.shape == (2, 10, 6) and out.active is None
    np.testing.assert_array_equal(np.asarray(out.x[:, :3]), np.asarray(x[:, :3]))
    np.testing.assert_array_equal(np.asarray(out.source[:, :3]),
                                  np.broadcast_to(np.eye(13)[:3], (2, 3, 13)))
    np.testing.assert_array_equal(np.asarray(out.size.sum(axis=(1, 2))),
                                  10.0 if strategy == "prune" else 13.0)
    np.testing.assert_array_equal(np.asarray(out.source.sum(axis=2)),
                                  np.asarray(out.size[..., 0]))


def test_soft_reducer_narrows_active_and_keeps_tokens():
    from tome_jax import reduce

    cfg = reduce.MergeConfig(class_token=True, num_extra=0, prop_attn=True, trace_source=False,
                             method="segment", dtem_soft=True)
    x = jax.random.normal(jax.random.key(1), (2, 9, 6))
    start = reduce.initial_tokens(x, cfg)
    assert start.active.shape == (2, 8) and start.size.shape == (2, 9, 1)
    metrics = reduce.Metrics(x, None, jax.random.normal(jax.random.key(2), (2, 9, 4)))
    out = reduce.soft_merge_by_embedding(start, metrics, 3, cfg, 0)
    assert out.x.shape == x.shape and out.active.shape == (2, 5)
    np.testing.assert_allclose(np.asarray(out.size.sum(axis=(1, 2))), 9.0, rtol=1e-6)
