"""Attention implementations: each equal to the plain formulation (float32 to 1e-5, bfloat16
to 2 bf16 ulps at magnitude 1), alone and inside a merging ViT; the per-backend choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import attention as A
from tome_jax import vit
from tome_jax.vit import ViT

# bfloat16 keeps 8 significant bits: an output near 1 is rounded by up to 2^-8; paths that keep
# intermediates in bfloat16 round a second time. Two ulps at magnitude 1: 2^-6.
BF16_TOL = 2.0 ** -6
CPU_PATHS = ("cpu", "xla", "reference")
ON_GPU = jax.default_backend() == "gpu"


def _inputs(tokens: int, dtype=jnp.float32, seed: int = 0, heads: int = 3, head_dim: int = 16):
    """q, k, v [2, tokens, heads, head_dim] ~ N(0, 1) and a `+ log size` bias [2, 1, 1, tokens]
    of integer sizes 1..5, as merging makes them."""
    key = jax.random.key(seed)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (2, tokens, heads, head_dim))
               for i in range(3))
    size = jax.random.randint(jax.random.fold_in(key, 3), (2, 1, 1, tokens), 1, 6)
    return [x.astype(dtype) for x in (q, k, v, jnp.log(size.astype(jnp.float32)))]


def _reference(q, k, v, bias):
    """The reference in float32 on the same (possibly rounded) inputs."""
    up = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, bias)]
    return np.asarray(A.reference_attention(*up))


def _run(name: str, q, k, v, bias):
    if name == "fused-as-xla":  # cuDNN's arrangement of the bias (and odd-length padding)
        fn = lambda *a: A.fused_attention(*a, implementation="xla")  # noqa: E731
    else:
        fn = lambda *a: A.dot_product_attention(*a, implementation=name)  # noqa: E731
    return np.asarray(jax.jit(fn)(q, k, v, bias).astype(jnp.float32))


@pytest.mark.parametrize("name", CPU_PATHS + ("fused-as-xla",))
@pytest.mark.parametrize("tokens", [7, 8, 197])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_equals_reference(name, tokens, with_bias):
    q, k, v, bias = _inputs(tokens)
    bias = bias if with_bias else None
    got = _run(name, q, k, v, bias)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, _reference(q, k, v, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CPU_PATHS + ("fused-as-xla",))
@pytest.mark.parametrize("tokens", [7, 8, 197])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_within_two_ulps(name, tokens, with_bias):
    q, k, v, bias = _inputs(tokens, jnp.bfloat16, seed=1)
    bias = bias if with_bias else None
    out = jax.jit(lambda *a: A.dot_product_attention(*a, implementation=name)
                  if name != "fused-as-xla" else A.fused_attention(*a, implementation="xla"))(
        q, k, v, bias)
    assert out.dtype == jnp.bfloat16
    got = np.asarray(out.astype(jnp.float32))
    np.testing.assert_allclose(got, _reference(q, k, v, bias), rtol=BF16_TOL, atol=BF16_TOL)


def test_a_dominant_size_dominates():
    """The bias acts as `+ log size`: a key of size s weighs like s copies of itself."""
    q, k, v, _ = _inputs(5)
    k = k.at[:, 4].set(k[:, 3])
    v = v.at[:, 4].set(v[:, 3])
    bias = jnp.zeros((2, 1, 1, 4)).at[..., 3].set(jnp.log(2.0))
    for name in CPU_PATHS:
        got = _run(name, q[:, :4], k[:, :4], v[:, :4], bias)
        np.testing.assert_allclose(got, _reference(q[:, :4], k, v, None)[:, :4], atol=1e-5)


def _model_logits(model: ViT, params, images, name: str) -> np.ndarray:
    with A.use(name):
        logits, out = jax.jit(model.apply)({"params": params}, images)
    return np.asarray(logits), out


def _tiny(dtype=jnp.float32, **fields):
    """A 3-block ViT at 32 px (8 x 8 patches of 4 px + the class token), its images and
    params; the head perturbed away from zero so that logits show every difference."""
    model = ViT(variant="mu/4", num_classes=10, depth=3, num_heads=4, dtype=dtype, **fields)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = jax.jit(model.clone(r=0).init)(jax.random.key(1), images)["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape, np.float32), params)
    return model, images, params


@pytest.mark.parametrize("r", [0, pytest.param(8, marks=pytest.mark.slow)])  # r=8: 15 s
def test_every_path_gives_the_same_merging_vit(r):
    """Inside the model, with merging (r = 8 in each block: a size bias in blocks 2 and 3) and
    without."""
    model, images, params = _tiny(r=r)
    want, out = _model_logits(model, params, images, "reference")
    assert out["encoded"].shape[1] == 65 - 3 * r and (out["size"] is not None) == (r > 0)
    for name in ("cpu", "xla"):
        got, _ = _model_logits(model, params, images, name)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 15 s: a merging ViT traced once per path in bfloat16
def test_bfloat16_merging_vit_close_to_reference_attention():
    model, images, params = _tiny(jnp.bfloat16, r=8)
    want, _ = _model_logits(model, params, images, "reference")
    for name in ("cpu", "xla"):
        got, _ = _model_logits(model, params, images, name)
        # Three bfloat16 blocks: rounding differences compound; relative to the logits' scale.
        assert np.abs(got - want).max() <= 4 * BF16_TOL * np.abs(want).max()


def test_vit_calls_the_chosen_implementation(monkeypatch):
    seen = []
    real = dict(A._IMPLEMENTATIONS)
    for name, fn in real.items():
        monkeypatch.setitem(A._IMPLEMENTATIONS, name,
                            lambda *a, name=name, fn=fn: seen.append(name) or fn(*a))
    q, k, v, bias = _inputs(5)
    vit.dot_product_attention(q, k, v, bias)
    with A.use("xla"):
        vit.dot_product_attention(q, k, v, None)
    assert seen == [A.choose(jax.default_backend(), jnp.float32, 16, A._device()[1]), "xla"]


def test_choose_per_backend():
    f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
    assert A.choose("cpu", f32, 64) == A.choose("cpu", bf16, 64) == "cpu"
    assert A.choose("tpu", bf16, 64) == A.choose("tpu", f32, 64) == "xla"
    # cuDNN: half precision, head dims in multiples of 8 up to 128 (256 from Hopper), Ampere+.
    assert A.choose("gpu", bf16, 64, "8.0") == A.choose("gpu", f16, 128, "9.0") == "cudnn"
    assert A.choose("gpu", f32, 64, "9.0") == "xla"
    assert A.choose("gpu", bf16, 256, "9.0") == "cudnn"
    assert A.choose("gpu", bf16, 256, "8.6") == "xla"
    assert A.choose("gpu", bf16, 36, "9.0") == "xla"
    assert A.choose("gpu", bf16, 64, "7.5") == "xla"
    assert A.choose("gpu", bf16, 64, None) == "xla"  # not CUDA (ROCm)


def test_resolve_and_use():
    assert A.current() == "auto"
    expected = "cpu" if jax.default_backend() == "cpu" else None
    if expected:
        assert A.resolve("auto", jnp.float32, 64) == "cpu"
    with A.use("xla"):
        assert A.current() == "xla"
        with A.use("reference"):
            assert A.current() == "reference"
        assert A.current() == "xla"
    assert A.current() == "auto"
    for bad in (lambda: A.resolve("flash", jnp.float32, 64), lambda: A.use("flash").__enter__()):
        with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
            bad()


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_path_hands_cudnn_even_lengths_only(monkeypatch, with_bias):
    # cuDNN's backward pass refuses odd sequence lengths with or without a bias (a 257-token
    # ViT failed at its first training step), so the fused path pads them.
    seen = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.shape[1])
        return real(q, k, v, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v, bias = _inputs(257)
    bias = bias if with_bias else None
    got = np.asarray(A.fused_attention(q, k, v, bias, implementation="xla"))
    assert seen == [258]
    np.testing.assert_allclose(got, _reference(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_environment_variable_replaces_auto_only(monkeypatch):
    monkeypatch.setenv(A.ENV, "reference")
    assert A.current() == "reference"
    with A.use("xla"):  # an explicit choice still wins
        assert A.current() == "xla"
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    calls = []
    monkeypatch.setitem(A._IMPLEMENTATIONS, "reference",
                        lambda *a: calls.append(1) or A.reference_attention(*a))
    A.dot_product_attention(q, q, q, None)
    assert calls == [1]
    monkeypatch.setenv(A.ENV, "flash")
    with pytest.raises(ValueError, match="TOME_JAX_ATTENTION='flash' is not one of"):
        A.current()


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a CUDA GPU; this run has none")
@pytest.mark.parametrize("tokens", [196, 197])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cudnn_equals_reference(tokens, with_bias):
    if A.choose("gpu", jnp.bfloat16, 64, A._device()[1]) != "cudnn":
        pytest.skip("this GPU has no cuDNN flash attention (compute capability < 8.0 or ROCm)")
    q, k, v, bias = _inputs(tokens, jnp.bfloat16, heads=4, head_dim=64)
    bias = bias if with_bias else None
    got = _run("cudnn", q, k, v, bias)
    np.testing.assert_allclose(got, _reference(q, k, v, bias), rtol=BF16_TOL, atol=BF16_TOL)

    def loss(fn, q, k, v):  # the backward pass runs cuDNN's biased kernel with padding
        return fn(q, k, v, bias).astype(jnp.float32).sum()

    grads = jax.jit(jax.grad(lambda *a: loss(A.fused_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: loss(A.reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)),
                                   np.asarray(w.astype(jnp.float32)), rtol=0.05, atol=0.05)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a CUDA GPU; this run has none")
def test_cudnn_merging_vit_close_to_reference_attention():
    model = ViT(variant="B/16", num_classes=10, r=8, depth=4, dtype=jnp.bfloat16)
    if A.resolve("auto", jnp.bfloat16, 64) != "cudnn":
        pytest.skip("this GPU has no cuDNN flash attention")
    images = jax.random.normal(jax.random.key(0), (2, 224, 224, 3))
    params = jax.jit(model.clone(r=0).init)(jax.random.key(1), images)["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape, np.float32), params)
    want, _ = _model_logits(model, params, images, "reference")
    got, _ = _model_logits(model, params, images, "cudnn")
    assert np.abs(got - want).max() <= 4 * BF16_TOL * np.abs(want).max()
