"""ToMe matching and merging against the NumPy re-derivation, plus invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import merge as tome
from tome_jax import numpy_reference as ref
from tome_jax import schedule


def random_inputs(seed, batch=3, tokens=17, metric_dim=8, channels=5):
    rng = np.random.default_rng(seed)
    metric = rng.standard_normal((batch, tokens, metric_dim)).astype(np.float32)
    x = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
    size = rng.integers(1, 5, (batch, tokens, 1)).astype(np.float32)
    return metric, x, size


@pytest.mark.parametrize("tokens", [16, 17])
@pytest.mark.parametrize("r", [1, 5, 7])
@pytest.mark.parametrize("class_token,distill_token", [(True, False), (False, False),
                                                        (True, True)])
def test_matching_equals_numpy(tokens, r, class_token, distill_token):
    metric, _, _ = random_inputs(tokens * 100 + r, tokens=tokens)
    r = tome.clamp_r(r, tokens, class_token, distill_token)
    got = tome.match(jnp.asarray(metric), r, class_token, distill_token)
    for b in range(metric.shape[0]):
        kept, src, dst = ref.match(metric[b], r, class_token, distill_token)
        np.testing.assert_array_equal(np.asarray(got.unm_idx[b]), kept)
        np.testing.assert_array_equal(np.asarray(got.src_idx[b]), src)
        np.testing.assert_array_equal(np.asarray(got.dst_idx[b]), dst)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("method", tome.MERGE_METHODS)
def test_merge_modes_equal_numpy(mode, method):
    metric, x, _ = random_inputs(1)
    m = tome.match(jnp.asarray(metric), 6)
    got = np.asarray(tome.merge_tokens(jnp.asarray(x), m, mode=mode, method=method))
    for b in range(x.shape[0]):
        kept, src, dst = ref.match(metric[b], 6)
        np.testing.assert_allclose(got[b], ref.merge(x[b], kept, src, dst, mode), atol=1e-6)


@pytest.mark.parametrize("method", tome.MERGE_METHODS)
def test_merge_wavg_and_unmerge_equal_numpy(method):
    metric, x, size = random_inputs(2, tokens=21)
    merge, unmerge = tome.bipartite_soft_matching(jnp.asarray(metric), 8, method=method)
    y, new_size = tome.merge_wavg(merge, jnp.asarray(x), jnp.asarray(size))
    back = np.asarray(unmerge(y))
    for b in range(x.shape[0]):
        kept, src, dst = ref.match(metric[b], 8)
        want_y, want_size = ref.merge_wavg(x[b], size[b], kept, src, dst)
        np.testing.assert_allclose(np.asarray(y[b]), want_y, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new_size[b]), want_size, atol=1e-6)
        np.testing.assert_allclose(back[b], ref.unmerge(want_y, kept, src, dst, 21), atol=1e-6)


def test_unmerge_restores_shape_and_unmerged_tokens():
    metric, x, _ = random_inputs(3, tokens=20)
    merge, unmerge = tome.bipartite_soft_matching(jnp.asarray(metric), 6)
    m = tome.match(jnp.asarray(metric), 6)
    back = np.asarray(unmerge(merge(jnp.asarray(x))))
    assert back.shape == x.shape
    for b in range(x.shape[0]):
        untouched = set(range(20)) - {2 * int(i) for i in m.src_idx[b]}
        untouched -= {2 * int(j) + 1 for j in m.dst_idx[b]}
        for t in untouched:
            np.testing.assert_array_equal(back[b, t], x[b, t])


def test_sizes_sum_and_sources_partition():
    metric, x, _ = random_inputs(4, tokens=33)
    size, source = None, None
    x, metric = jnp.asarray(x), jnp.asarray(metric)
    for r in [8, 8, 4, 3]:
        merge, _ = tome.bipartite_soft_matching(metric, r)
        source = tome.merge_source(merge, x, source)
        x, size = tome.merge_wavg(merge, x, size)
        metric = merge(metric)
    assert x.shape[1] == 33 - 23
    np.testing.assert_array_equal(np.asarray(size.sum(axis=(1, 2))), 33.0)
    # Every input token is held by exactly one output token, the class token only by itself.
    np.testing.assert_array_equal(np.asarray(source.sum(axis=1)), 1.0)
    # Each output token holds as many inputs as its size says.
    np.testing.assert_array_equal(np.asarray(source.sum(axis=2)), np.asarray(size[..., 0]))
    np.testing.assert_array_equal(np.asarray(source[:, 0, 0]), 1.0)
    np.testing.assert_array_equal(np.asarray(source[:, 0].sum(axis=-1)), 1.0)


def test_class_token_stays_first_and_unmerged():
    rng = np.random.default_rng(5)
    metric = rng.standard_normal((2, 15, 4)).astype(np.float32)
    metric[:, 0] = metric[:, 1]  # the class token's best partner is perfect, yet it must stay
    x = jnp.asarray(rng.standard_normal((2, 15, 3)).astype(np.float32))
    merge, _ = tome.bipartite_soft_matching(jnp.asarray(metric), 7)
    np.testing.assert_array_equal(np.asarray(merge(x)[:, 0]), np.asarray(x[:, 0]))


def test_r_is_clamped_and_zero_is_identity():
    metric, x, _ = random_inputs(6, tokens=11)
    merge, _ = tome.bipartite_soft_matching(jnp.asarray(metric), 100)
    assert merge(jnp.asarray(x)).shape[1] == 11 - 5
    merge0, unmerge0 = tome.bipartite_soft_matching(jnp.asarray(metric), 0)
    np.testing.assert_array_equal(np.asarray(merge0(jnp.asarray(x))), x)
    np.testing.assert_array_equal(np.asarray(unmerge0(jnp.asarray(x))), x)


def test_random_match_is_match_on_random_scores():
    key = jax.random.key(3)
    got = tome.random_match(key, (3, 17, 8), 5)
    noise = np.asarray(jax.random.normal(key, (3, 17, 8), jnp.float32))
    for b in range(3):
        kept, src, dst = ref.match(noise[b], 5)
        np.testing.assert_array_equal(np.asarray(got.unm_idx[b]), kept)
        np.testing.assert_array_equal(np.asarray(got.src_idx[b]), src)
        np.testing.assert_array_equal(np.asarray(got.dst_idx[b]), dst)
    again = tome.random_match(key, (3, 17, 8), 5)
    other = tome.random_match(jax.random.key(4), (3, 17, 8), 5)
    np.testing.assert_array_equal(np.asarray(again.src_idx), np.asarray(got.src_idx))
    assert not np.array_equal(np.asarray(other.src_idx), np.asarray(got.src_idx))
    # The class token stays first and is never merged away.
    assert (np.asarray(got.unm_idx[:, 0]) == 0).all()


def test_gather_and_clamp():
    x = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
    idx = jnp.asarray([[4, 0], [1, 1]])
    np.testing.assert_array_equal(np.asarray(tome.gather(x, idx)),
                                  np.asarray(x)[np.arange(2)[:, None], np.asarray(idx)])
    for tokens in range(8):
        for class_token, distill_token in [(True, False), (False, False), (True, True)]:
            limit = schedule.max_r(tokens, int(class_token) + int(distill_token))
            assert tome.clamp_r(100, tokens, class_token, distill_token) == limit
            assert tome.clamp_r(1, tokens, class_token, distill_token) == min(1, limit)


def test_merge_methods_agree_in_bfloat16():
    metric, x, size = random_inputs(7, tokens=40, channels=16)
    xb = jnp.asarray(x, jnp.bfloat16)
    outs = []
    for method in tome.MERGE_METHODS:
        merge, _ = tome.bipartite_soft_matching(jnp.asarray(metric, jnp.bfloat16), 12,
                                                method=method)
        y, s = tome.merge_wavg(merge, xb, jnp.asarray(size))
        assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        outs.append(np.asarray(y, np.float32))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_jit_vmap_grad_and_no_retrace():
    metric, x, size = random_inputs(8, tokens=24)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(x, metric, size):
        merge, _ = tome.bipartite_soft_matching(metric, 5)
        y, s = tome.merge_wavg(merge, x, size)
        return (y ** 2 * s).sum()

    for seed in range(3):
        _, x2, _ = random_inputs(seed + 20, tokens=24)
        loss(jnp.asarray(x2), jnp.asarray(metric), jnp.asarray(size))
    gx, gm = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size))
    assert np.isfinite(np.asarray(gx)).all() and np.abs(np.asarray(gx)).sum() > 0
    np.testing.assert_array_equal(np.asarray(gm), 0.0)  # matching carries no gradient

    def single(x1, m1):  # one example, batched through vmap
        merge, _ = tome.bipartite_soft_matching(m1[None], 5)
        return merge(x1[None])[0]

    batched = jax.vmap(single)(jnp.asarray(x), jnp.asarray(metric))
    direct = tome.bipartite_soft_matching(jnp.asarray(metric), 5)[0](jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(direct))


def test_bad_inputs():
    with pytest.raises(ValueError, match="metric must be"):
        tome.bipartite_soft_matching(jnp.zeros((4, 3)), 1)
    with pytest.raises(ValueError, match="r must be"):
        tome.bipartite_soft_matching(jnp.zeros((1, 4, 3)), -1)
    with pytest.raises(ValueError, match="r must be"):
        tome.bipartite_soft_matching(jnp.zeros((1, 4, 3)), 1.5)
    m = tome.match(jnp.ones((1, 6, 2)), 1)
    with pytest.raises(ValueError, match="merge mode"):
        tome.merge_tokens(jnp.ones((1, 6, 2)), m, mode="median")
    with pytest.raises(ValueError, match="merge method"):
        tome.merge_tokens(jnp.ones((1, 6, 2)), m, method="scatterx")
