"""DTEM: soft top-r and soft merge against ToMe's hard merge, size conservation, where the
gradients go, the ViT integration and the add-on checkpoint, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tome_jax import dtem
from tome_jax import merge as tome
from tome_jax import numpy_reference as ref
from tome_jax.vit import ViT

TINY = dict(variant="S/8", depth=2, width=32, num_heads=2, mlp_dim=64, num_classes=5)


def tokens(seed, batch=2, num=13, channels=8):
    """Random x [B, T, C], positive sizes [B, T, 1] and a metric [B, T, 4]."""
    kx, ks, km = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, num, channels))
    size = jax.random.uniform(ks, (batch, num, 1), minval=0.5, maxval=3.0)
    return x, size, jax.random.normal(km, (batch, num, 4))


def hard(x, size, metric, r):
    """ToMe's merge with a class token at 0: x [B, T - r, C], size [B, T - r, 1]."""
    merge, _ = tome.bipartite_soft_matching(metric, r, class_token=True)
    return tome.merge_wavg(merge, x, size)


def gather(t, active):
    """The class token and the active tokens of t [B, T, C], in `active`'s order."""
    idx = np.concatenate([np.zeros((t.shape[0], 1), int), np.asarray(active)], axis=1)
    return np.take_along_axis(np.asarray(t), idx[..., None], axis=1)


soft_step = jax.jit(dtem.dtem_soft_step, static_argnames=("r", "tau1", "tau2", "k", "order"))


def test_two_tokens_small_tau_is_the_hard_merge():
    x, size, metric = tokens(0, num=3)  # class token + 2 patches: one A, one B
    active = dtem.init_active(2, 3, num_prefix=1)
    sx, ss, act = soft_step(x, size, active, metric, r=1, tau1=1e-3, tau2=1e-3, order="tome")
    hx, hs = hard(x, size, metric, 1)
    np.testing.assert_array_equal(np.asarray(act), [[1], [1]])
    np.testing.assert_allclose(np.asarray(ss[:, 2]), 0.0, atol=1e-6)  # A gave all away
    np.testing.assert_allclose(np.asarray(sx[:, :2]), np.asarray(hx), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ss[:, :2]), np.asarray(hs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sx[:, 2]), np.asarray(x[:, 2]))  # kept, size 0


@pytest.mark.parametrize("rs", [[6], [4, 3, 1]])
def test_small_tau2_is_tomes_matching_block_after_block(rs):
    # Scores / tau1 stay within -log(eps) of each other, so a chosen A row is never taken twice.
    x, size, metric = tokens(1, num=17)
    hx, hs = x, size
    pos = jnp.broadcast_to(jnp.arange(17), (2, 17))  # where ToMe's tokens sit in the soft path
    active = dtem.init_active(2, 17, num_prefix=1)
    for r in rs:
        x, size, active = soft_step(x, size, active, metric, r=r, tau1=1.0, tau2=1e-4,
                                    order="tome")
        # Each token keeps its own metric in both paths (the embedding is per position here).
        hm = jnp.take_along_axis(metric, pos[..., None], axis=1)
        matching = tome.match(hm, r, class_token=True)
        hx, hs = hard(hx, hs, hm, r)
        pos = jnp.concatenate([jnp.take_along_axis(pos[:, ::2], matching.unm_idx, 1),
                               pos[:, 1::2]], axis=1)
        np.testing.assert_array_equal(np.asarray(pos[:, 1:]), np.asarray(active))
        np.testing.assert_allclose(gather(size, active), np.asarray(hs), atol=1e-4)
        np.testing.assert_allclose(gather(x, active), np.asarray(hx), atol=1e-4)
        np.testing.assert_allclose(np.asarray(size).sum(1), np.asarray(hs).sum(1), rtol=1e-5)
    assert active.shape == (2, 16 - sum(rs))


@pytest.mark.parametrize("order", dtem.ORDERS)
def test_soft_merge_conserves_size_over_blocks(order):
    x, size, metric = tokens(2, num=17)
    active = dtem.init_active(2, 17, num_prefix=1)
    total = np.asarray(size).sum(axis=(1, 2))
    for r in [4, 3, 2, 2]:
        x, size, active = soft_step(x, size, active, metric, r=r, order=order)
        s = np.asarray(size)
        assert (s >= 0).all() and np.isfinite(np.asarray(x)).all()
        np.testing.assert_allclose(s.sum(axis=(1, 2)), total, rtol=1e-5)
    assert active.shape == (2, 16 - 11)
    for row in np.asarray(active):  # distinct patch positions
        assert len(set(row)) == len(row) and row.min() >= 1


def test_first_split_in_the_authors_order():
    # Class token at 0, patches 1..7: A = 1, 3, 5, 7 (the larger half of an odd count), B = 2,
    # 4, 6; ToMe's order is the other way round.
    active = dtem.init_active(1, 8, num_prefix=1)
    a, b = dtem.split_active(active)
    np.testing.assert_array_equal(np.asarray(a), [[1, 3, 5, 7]])
    np.testing.assert_array_equal(np.asarray(b), [[2, 4, 6]])
    a, b = dtem.split_active(active, "tome")
    np.testing.assert_array_equal(np.asarray(a), [[2, 4, 6]])
    np.testing.assert_array_equal(np.asarray(b), [[1, 3, 5, 7]])


def test_sort_by_size_is_stable_and_drops_the_smallest():
    size = jnp.asarray([[[9.0], [1.0], [0.5], [1.0], [2.0], [0.0], [1.0]]])
    active = jnp.asarray([[3, 1, 4, 6, 2, 5]])  # sizes 1, 1, 2, 1, 0.5, 0
    np.testing.assert_array_equal(np.asarray(dtem.sort_by_size(size, active, 2)),
                                  [[4, 3, 1, 6]])


def per_token_maps(seed, channels, dim):
    """(embed, body) in NumPy float64 and JAX: a per-token merge metric and a per-token residual
    update standing in for a block's attention and MLP (both see the merged features)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, dim)) / np.sqrt(channels)
    bias = 0.1 * rng.standard_normal(dim)
    v = rng.standard_normal((channels, channels)) / np.sqrt(channels)
    np_maps = (lambda x: x @ w + bias, lambda x: x + 0.5 * np.tanh(x @ v))
    w32, b32, v32 = (jnp.asarray(t, jnp.float32) for t in (w, bias, v))
    hi = jax.lax.Precision.HIGHEST
    jax_maps = (lambda x: jnp.einsum("btc,cd->btd", x, w32, precision=hi) + b32,
                lambda x: x + 0.5 * jnp.tanh(jnp.einsum("btc,cd->btd", x, v32, precision=hi)))
    return np_maps, jax_maps


@pytest.mark.parametrize("tau1, tau2", [(1.0, 1.0), (0.5, 0.25)])
def test_two_soft_blocks_in_the_authors_order_equal_the_numpy_reference(tau1, tau2):
    # Class token + 15 patches (an odd count), r = 4 then 3: the second block splits the
    # tokens as the first block's size re-sort left them. The reference moves tokens as the
    # authors' code does; `pos` follows where each of its tokens sits in the static layout.
    batch, num, channels, rs = 3, 16, 8, [4, 3]
    x0 = np.random.default_rng(7).standard_normal((batch, num, channels)).astype(np.float32)
    (np_embed, np_body), (jax_embed, jax_body) = per_token_maps(6, channels, 4)
    x, size = jnp.asarray(x0), jnp.ones((batch, num, 1), jnp.float32)
    active = dtem.init_active(batch, num, num_prefix=1)
    step = jax.jit(lambda x, size, active, r: dtem.dtem_soft_step(
        x, size, active, jax_embed(x), r, tau1, tau2), static_argnums=3)
    for r in rs:
        x, size, active = step(x, size, active, r)
        x = jax_body(x)
    for i in range(batch):
        rx, rsize, n, pos = x0[i].astype(np.float64), np.ones(num), num, np.arange(num)
        for r in rs:
            rx, rsize, n_next, perm = ref.dtem_soft_block(rx, rsize, np_embed(rx), n, r,
                                                          tau1=tau1, tau2=tau2)
            # The re-sort is well posed here: sizes tie exactly or differ far beyond rounding.
            gaps = -np.diff(rsize[1:n])
            assert ((gaps == 0) | (gaps > 1e-4)).all(), gaps
            pos, n = pos[perm], n_next
            rx = np_body(rx)
        np.testing.assert_array_equal(np.asarray(active[i]), pos[1:n])
        np.testing.assert_allclose(np.asarray(x[i])[pos], rx, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(size[i, :, 0])[pos], rsize, rtol=0, atol=1e-5)
        assert not np.allclose(rsize, 1.0)  # the merges moved size


def test_orders_differ_from_the_second_block_on():
    x, size, metric = tokens(7, num=17)
    out = {}
    for order in dtem.ORDERS:
        s, a = size, dtem.init_active(2, 17, num_prefix=1)
        _, s, a = soft_step(x, s, a, metric, r=4, order=order)
        out[order] = (np.asarray(a), np.asarray(s))
    assert not np.array_equal(out["size"][0], out["tome"][0])
    sizes = np.take_along_axis(out["size"][1][..., 0], out["size"][0], axis=1)
    assert (np.diff(sizes, axis=1) <= 0).all()  # "size": largest first


def test_gradient_finite_with_a_zero_embedding():
    # A zero-initialised class token has a zero embedding; it must not turn gradients into NaN.
    x, size, metric = tokens(4, num=7)
    metric = metric.at[:, 0].set(0.0)
    active = dtem.init_active(2, 7, num_prefix=1)
    grad = jax.jit(jax.grad(lambda e: soft_step(x, size, active, e, r=2)[0].sum()))(metric)
    assert np.isfinite(np.asarray(grad)).all() and np.asarray(grad).any()


def test_soft_top_r_rows_and_mass():
    scores = jax.random.uniform(jax.random.key(3), (2, 6, 7), minval=-1, maxval=1)
    m = np.asarray(jax.jit(dtem.soft_top_r, static_argnums=(1,))(scores, 3))
    assert (m >= 0).all() and (m.sum(-1) <= 1 + 1e-5).all()
    assert ((m > 0).sum(-1) <= 3).all()  # only the top k=3 candidates of each A token
    assert 2.0 < m.sum(axis=(1, 2)).min() <= m.sum(axis=(1, 2)).max() <= 3 + 1e-4


def test_straight_through_clip():
    v = jnp.asarray([-0.5, 0.3, 1.5])
    np.testing.assert_allclose(np.asarray(dtem.straight_through_clip(v)), [0.0, 0.3, 1.0])
    grad = jax.grad(lambda v: dtem.straight_through_clip(v).sum())(v)
    np.testing.assert_allclose(np.asarray(grad), 1.0)


def random_param(path, shape):
    """Fan-in scaled kernels, scales near 1, small biases and embeddings: no init to compile."""
    rng = np.random.default_rng(len(jax.tree_util.keystr(path)))
    v = rng.standard_normal(shape.shape).astype(np.float32)  # numpy: no compile per shape
    name = path[-1].key
    if name == "kernel":
        return jnp.asarray(v / np.sqrt(np.prod(shape.shape[:-1])))
    return jnp.asarray(1.0 + 0.1 * v if name == "scale" else 0.1 * v)


@pytest.fixture(scope="module")
def tiny():
    """(params, images) of ViT(**TINY, dtem_dim=8): its parameters fit every r, pool="tok" or
    "gap" and soft_merge, so one set serves all the model tests."""
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    shapes = jax.eval_shape(ViT(**TINY, dtem_dim=8).init, jax.random.key(0), images)
    return jax.tree_util.tree_map_with_path(random_param, shapes["params"]), images


def test_vit_hard_path_uses_the_embedding(tiny):
    model = ViT(**TINY, r=3, dtem_dim=8)
    params, images = tiny
    block = params["Transformer"]["encoderblock_0"]
    assert block["dtem_embed"]["kernel"].shape == (32, 8)
    backbone = {**params, "Transformer": {
        k: {n: p for n, p in v.items() if n != "dtem_embed"} if k.startswith("encoder") else v
        for k, v in params["Transformer"].items()}}
    run = lambda m, p: jax.jit(lambda p, x: m.apply({"params": p}, x))(p, images)  # noqa: E731
    # r = 0: the embedding is computed but unused, the logits are the backbone's bit for bit.
    np.testing.assert_array_equal(np.asarray(run(model.clone(r=0), params)[0]),
                                  np.asarray(run(ViT(**TINY), backbone)[0]))
    logits, out = run(model, params)
    tome_logits, tome_out = run(ViT(**TINY, r=3), backbone)
    assert out["encoded"].shape == tome_out["encoded"].shape == (2, 11, 32)
    assert not np.allclose(np.asarray(logits), np.asarray(tome_logits))  # another metric
    # The soft path at a small temperature follows the same hard matching (tau2 well under
    # the gaps between this init's top scores, a few 1e-4).
    soft_logits, soft_out = run(model.clone(soft_merge=True, dtem_tau1=1.0, dtem_tau2=1e-6,
                                            dtem_order="tome"), params)
    assert soft_out["encoded"].shape == (2, 17, 32)
    np.testing.assert_allclose(np.asarray(soft_out["size"]).sum(axis=(1, 2)), 17.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(soft_logits), np.asarray(logits), atol=1e-3)


def test_gradients_reach_only_the_embedding_through_the_merge(tiny):
    # Size-weighted pooling, so the last block's merge (before its MLP only) also matters.
    model = ViT(**TINY, r=3, dtem_dim=8, soft_merge=True, pool="gap")
    params, images = tiny

    def loss(params, frozen_embedding=False):
        def stop(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            frozen = frozen_embedding and context.module.name == "dtem_embed"
            return jax.lax.stop_gradient(out) if frozen else out

        with nn.intercept_methods(stop):
            logits, _ = model.apply({"params": params}, images)
        return jax.nn.log_softmax(logits)[:, 0].mean()

    grads = jax.jit(jax.grad(loss))(params)
    const = jax.jit(jax.grad(lambda p: loss(p, frozen_embedding=True)))(params)
    labels = dtem.param_labels(params)
    for g, c, label in zip(*(jax.tree_util.tree_leaves(t) for t in (grads, const, labels)),
                           strict=True):
        g, c = np.asarray(g), np.asarray(c)
        assert np.isfinite(g).all()
        if label == "backbone":  # the decoupled path adds nothing to the backbone's gradient
            np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-8)
        else:
            assert not c.any()
    for i in range(2):
        assert np.abs(np.asarray(grads["Transformer"][f"encoderblock_{i}"]["dtem_embed"]
                                 ["kernel"])).sum() > 0
    # Modular training: only the embeddings move.
    tx = dtem.modular(optax.sgd(1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, label in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(labels),
                        strict=True):
        assert np.asarray(u).any() == (label == "dtem")


def test_embeddings_round_trip_as_an_add_on(tiny, tmp_path):
    trained, _ = tiny
    path = str(tmp_path / "dtem.npz")
    dtem.save_embeddings(path, trained)
    backbone = jax.tree_util.tree_map(lambda v: v + 1.0, trained)  # other values everywhere
    restored = dtem.insert_embeddings(backbone, dtem.load_embeddings(path))
    labels = dtem.param_labels(backbone)
    for got, emb, base, label in zip(*(jax.tree_util.tree_leaves(t) for t in (
            restored, trained, backbone, labels)), strict=True):
        want = emb if label == "dtem" else base
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_input():
    x, size, metric = tokens(0, num=7)
    active = dtem.init_active(2, 7, num_prefix=1)  # 6 active: |A| = 3
    with pytest.raises(ValueError, match="too large for the soft merge"):
        dtem.dtem_soft_step(x, size, active, metric, r=4)
    with pytest.raises(ValueError, match="too large"):
        dtem.soft_top_r(jnp.zeros((1, 2, 3)), 3)
    for tau in [0.0, -0.1]:
        with pytest.raises(ValueError, match="tau1 must be > 0"):
            dtem.soft_top_r(jnp.zeros((1, 2, 3)), 1, tau1=tau)
        with pytest.raises(ValueError, match="tau2 must be > 0"):
            dtem.dtem_soft_step(x, size, active, metric, r=1, tau2=tau)
    with pytest.raises(ValueError, match="does not cover the tokens"):
        dtem.dtem_soft_step(x, size, active, metric[:, :5], r=1)
    with pytest.raises(ValueError, match="unknown DTEM order 'random'"):
        dtem.dtem_soft_step(x, size, active, metric, r=1, order="random")
    params = {"Transformer": {"encoderblock_0": {"LayerNorm_0": {"scale": jnp.ones(32)},
                                                 "dtem_embed": {"kernel": jnp.zeros((32, 8)),
                                                                "bias": jnp.zeros(8)}}}}
    wide = {"encoderblock_0": {"kernel": np.zeros((64, 8)), "bias": np.zeros(8)}}
    with pytest.raises(ValueError, match="does not fit a backbone of width 32"):
        dtem.insert_embeddings(params, wide)
    other_dim = {"encoderblock_0": {"kernel": np.zeros((32, 16)), "bias": np.zeros(16)}}
    with pytest.raises(ValueError, match="another dtem_dim"):
        dtem.insert_embeddings(params, other_dim)
    with pytest.raises(ValueError, match="no 'dtem_embed' parameters"):
        dtem.extract_embeddings({"Transformer": {"encoderblock_0": {}}})
    images = jnp.zeros((1, 32, 32, 3))
    for kwargs, match in [(dict(soft_merge=True), "needs dtem_dim"),
                          (dict(dtem_dim=0), "positive int"),
                          (dict(dtem_dim=8, soft_merge=True, dtem_tau2=0.0), "dtem_tau2"),
                          (dict(dtem_dim=8, soft_merge=True, dtem_order="x"), "dtem_order"),
                          (dict(dtem_dim=8, strategy="prune"), "strategy='tome'")]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(ViT(**TINY, r=2, **kwargs).init, jax.random.key(0), images)


def test_default_dim():
    assert dtem.default_dim(768, 12) == 64
    assert dtem.default_dim(1024, 16) == 128


def test_fused_embedding_equals_separate_and_saves_three_matmuls():
    model = ViT(variant="mu/4", num_classes=3, dtem_dim=8, r=2)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = model.init(jax.random.key(0), x)["params"]
    fused = model.clone(dtem_fused=True)
    # Same parameter layout: a DTEM checkpoint runs fused as it is.
    assert jax.tree.structure(fused.init(jax.random.key(0), x)["params"]) == \
        jax.tree.structure(params)
    want, out_want = model.apply({"params": params}, x)
    got, out_got = fused.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out_got["size"]), np.asarray(out_want["size"]))

    def dots(m):
        return str(jax.make_jaxpr(lambda p: m.apply({"params": p}, x)[0])(params)).count(
            "dot_general")
    depth = model.dims.depth
    assert dots(model) - dots(fused) == 3 * depth  # q, k, v, embed -> one matmul per block
