"""Attention cores: softmax(q k^T / sqrt(d) + bias) v, one implementation per backend.

    out = dot_product_attention(q, k, v, bias)       # q, k, v [B, T, H, d], bias [B, 1, 1, T]
    with use("xla"): ...                              # overrides "auto" while tracing

The bias is ToMe's proportional attention, `log size` of every key (None before the first
merge). Which implementation runs is decided when the model is traced (`choose`):

    "cpu"    head-major ([B, H, T, d]) batched matmuls with the 1/sqrt(d) scale folded into q
             and the softmax normalised after the second matmul ([T, d] divisions instead of
             [T, T]); XLA's CPU backend fuses the whole core into one kernel. Low-precision
             inputs are computed in float32: as fast there as bfloat16, and more accurate.
    "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused kernel, on
             CUDA GPUs of compute capability >= 8.0 for float16 / bfloat16 and head dims cuDNN
             takes (multiples of 8 up to 128, 256 from compute capability 9.0).
    "xla"    `jax.nn.dot_product_attention(implementation="xla")`: everywhere else (TPU, GPUs
             in float32 or with head dims cuDNN refuses). On TPU XLA's own fusion is used:
             the Pallas flash-attention kernel needs sequence lengths in multiples of its
             blocks, which merged token counts are not.
    "reference"  the plain formulation in float32 at the highest matmul precision; every other
             implementation is tested against it.

"auto" follows `jax.default_backend()`; the environment variable `TOME_JAX_ATTENTION` (one of
IMPLEMENTATIONS) replaces "auto" for every command, e.g. `TOME_JAX_ATTENTION=xla` where a
cuDNN build refuses its fused kernel. To lower for another platform than the default one
(`jax.export` with `platforms=`), trace inside `use("xla")`, which runs everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "cpu", "xla", "cudnn", "reference")
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)

_override: contextvars.ContextVar[str] = contextvars.ContextVar("attention", default="auto")


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        bias: jax.Array | None) -> jax.Array:
    """The textbook formulation in float32 at the highest precision, returned in q's dtype.

    q, k, v [B, T, H, d], bias [B, 1, 1, T] (broadcast over heads and queries) or None.
    """
    highest = jax.lax.Precision.HIGHEST
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q32, k32, precision=highest) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v32, precision=highest).astype(q.dtype)


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  bias: jax.Array | None) -> jax.Array:
    """Head-major attention for XLA's CPU backend; shapes as in `reference_attention`.

    [B, H, T, d] operands make both matmuls plain batched GEMMs that XLA fuses with the softmax
    into one kernel; on [B, T, H, d] it splits the core and copies the [T, T] probabilities in
    between. Dividing by the softmax's sum after the second matmul touches [T, d] values
    instead of [T, T].
    """
    dtype = q.dtype
    qh, kh, vh = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh * np.float32(1 / np.sqrt(q.shape[-1])), kh)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, vh) / weights.sum(axis=-1, keepdims=True)
    return out.transpose(0, 2, 1, 3).astype(dtype)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  bias: jax.Array | None) -> jax.Array:
    """`jax.nn.dot_product_attention`'s XLA implementation; shapes as in
    `reference_attention`."""
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                    implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with the bias in the form cuDNN takes; shapes as in
    `reference_attention`.

    cuDNN wants a bias row per query ([B, 1, T, T]) and, when a gradient flows through its
    kernel, even sequence lengths (with or without a bias: 257 tokens fail at the first
    training step): an odd T is padded by one token that the sequence lengths mask out, and
    its row is dropped again. `implementation="xla"` runs the same arrangement through XLA
    (how it is tested without a GPU).
    """
    batch, tokens = q.shape[:2]
    if bias is not None:
        bias = jnp.broadcast_to(bias.astype(q.dtype), (batch, 1, tokens, tokens))
    if tokens % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
    q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
    if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 1)))
    lengths = jnp.full((batch,), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :tokens]


_IMPLEMENTATIONS = {"cpu": cpu_attention, "xla": xla_attention, "cudnn": fused_attention,
                    "reference": reference_attention}


def cudnn_supports(dtype: Any, head_dim: int, compute_capability: str | None) -> bool:
    """Whether cuDNN's fused attention (as `jax.nn.dot_product_attention` calls it) takes
    these inputs on a CUDA device of compute_capability ("9.0"; None: not a CUDA device)."""
    if compute_capability is None:
        return False
    major = int(compute_capability.split(".")[0])
    max_head_dim = 256 if major >= 9 else 128
    return (major >= 8 and jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES]
            and head_dim % 8 == 0 and head_dim <= max_head_dim)


def choose(platform: str, dtype: Any, head_dim: int,
           compute_capability: str | None = None) -> str:
    """The implementation for a backend ("cpu", "gpu", "tpu", ...), the inputs' dtype and
    head dim; compute_capability: the CUDA device's ("8.0"), None elsewhere."""
    if platform == "cpu":
        return "cpu"
    if platform in ("gpu", "cuda") and cudnn_supports(dtype, head_dim, compute_capability):
        return "cudnn"
    return "xla"


def _device() -> tuple[str, str | None]:
    """(platform, CUDA compute capability or None) of the default device."""
    device = jax.devices()[0]
    platform = jax.default_backend()
    cuda = platform == "gpu" and "cuda" in getattr(device.client, "platform_version", "").lower()
    return platform, getattr(device, "compute_capability", None) if cuda else None


def _check(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one "
                         f"of {IMPLEMENTATIONS}")


def resolve(implementation: str, dtype: Any, head_dim: int) -> str:
    """`implementation`, with "auto" replaced by `choose`'s pick for the default device."""
    _check(implementation)
    if implementation != "auto":
        return implementation
    platform, compute_capability = _device()
    return choose(platform, dtype, head_dim, compute_capability)


@contextlib.contextmanager
def use(implementation: str) -> Iterator[None]:
    """Makes `dot_product_attention` use `implementation` while functions are traced inside.

    It acts at trace time: a function jitted and called before keeps the attention it was
    traced with.
    """
    _check(implementation)
    token = _override.set(implementation)
    try:
        yield
    finally:
        _override.reset(token)


ENV = "TOME_JAX_ATTENTION"


def current() -> str:
    """The implementation `use` has set; outside it `$TOME_JAX_ATTENTION`, else "auto"."""
    name = _override.get()
    if name == "auto" and os.environ.get(ENV):
        name = os.environ[ENV]
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"{ENV}={name!r} is not one of {IMPLEMENTATIONS}")
    return name


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                          implementation: str | None = None) -> jax.Array:
    """q, k, v [B, T, H, d], bias [B, 1, 1, T] or None -> [B, T, H, d] in q's dtype.

    implementation: one of IMPLEMENTATIONS; None takes `use`'s (by default "auto": `choose`).
    """
    name = resolve(implementation or current(), q.dtype, q.shape[-1])
    return _IMPLEMENTATIONS[name](q, k, v, bias)
