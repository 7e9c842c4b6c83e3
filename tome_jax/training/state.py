"""The train state {"step", "params", "opt_state"}: its model, initial values and shardings.

    model, tx, abstract, shardings = abstract_train_state(cfg, mesh)   # shapes only
    state = jax.jit(lambda: init_state(cfg, model, tx), out_shardings=shardings)()
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tome_jax import sharding
from tome_jax.params import abstract_params, flatten, unflatten
from tome_jax.schedule import parse_schedule
from tome_jax.training.config import Config
from tome_jax.training.optim import make_optimizer
from tome_jax.vit import ViT

State = dict[str, Any]


def make_model(cfg: Config, **overrides: Any) -> ViT:
    """The ViT a config describes; overrides replace any of its fields (r=0, dropout=0.0)."""
    kwargs = dict(variant=cfg.variant, num_classes=cfg.num_classes, r=parse_schedule(cfg.r),
                  pool=cfg.pool, dropout=cfg.dropout, drop_path=cfg.drop_path,
                  dtype=jnp.dtype(cfg.dtype), width=cfg.width or None, depth=cfg.depth or None,
                  mlp_dim=cfg.mlp_dim or None, num_heads=cfg.num_heads or None,
                  dtem_dim=cfg.dtem_dim or None, soft_merge=cfg.soft_merge,
                  dtem_tau1=cfg.dtem_tau1, dtem_tau2=cfg.dtem_tau2, dtem_k=cfg.dtem_k,
                  dtem_order=cfg.dtem_order,
                  class_token=cfg.class_token, distill_token=cfg.distill_token,
                  num_registers=cfg.num_registers,
                  layerscale_init=cfg.layerscale_init or None,
                  representation_size=cfg.representation_size or None,
                  approximate_gelu=cfg.approximate_gelu, prop_attn=cfg.prop_attn)
    kwargs.update(overrides)
    return ViT(**kwargs)


def param_sharding(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """Replicated, or (FSDP) each array split over the mesh along its largest divisible axis."""
    n = mesh.devices.size

    def one(x):
        if not fsdp or n == 1:
            return NamedSharding(mesh, P())
        for axis in np.argsort(x.shape)[::-1]:
            if x.shape[axis] % n == 0 and x.shape[axis] >= n:
                spec = [None] * len(x.shape)
                spec[axis] = sharding.BATCH_AXIS
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


def overlay_params(params: Any, path: str) -> Any:
    """params with every tensor of the model directory `path` put in place.

    Parameters the directory lacks keep their initial values: that is how a DTEM embedding
    starts fresh beside a pretrained backbone, or a new head beside a headless one. Position
    embeddings of another patch grid are resampled (bicubic, as DINOv2, MAE and timm do), so a
    backbone pretrained at 224 px fine-tunes at 168 px; every other shape must match.
    """
    from tome_jax.checkpoint import load_model

    _, loaded, _ = load_model(path)
    flat = flatten(params)
    for key, value in flatten(loaded).items():
        if key not in flat:
            raise ValueError(f"init_from {path}: {key!r} is not a parameter of this model")
        if key == "pos_embedding" and value.shape != flat[key].shape:
            value = _resampled_posemb(value, tuple(flat[key].shape), path)
        if tuple(flat[key].shape) != tuple(value.shape):
            raise ValueError(f"init_from {path}: {key!r} has shape {tuple(value.shape)}, the "
                             f"model {tuple(flat[key].shape)}")
        flat[key] = jnp.asarray(value)
    return unflatten(flat)


def _resampled_posemb(posemb: jax.Array, shape: tuple[int, ...], path: str) -> jax.Array:
    """[1, N, D] patch position embeddings on the square grid of `shape` [1, n, D].

    jnp, not NumPy: init_state runs under jit, where the loaded tensors are traced.
    """
    from tome_jax.convert.resample import interp_matrix

    old, new = math.isqrt(posemb.shape[1]), math.isqrt(shape[1])
    if old * old != posemb.shape[1] or new * new != shape[1] or posemb.shape[2] != shape[2]:
        raise ValueError(f"init_from {path}: 'pos_embedding' has shape {tuple(posemb.shape)}, "
                         f"the model {shape}; only square patch grids are resampled")
    m = jnp.asarray(interp_matrix(old, new, "bicubic"), jnp.float32)
    grid = posemb.reshape(old, old, shape[2]).astype(jnp.float32)
    out = jnp.einsum("hH,wW,HWd->hwd", m, m, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(shape).astype(posemb.dtype)


def _state(params: Any, tx: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def init_state(cfg: Config, model: ViT, tx: optax.GradientTransformation) -> State:
    """{"step", "params", "opt_state"} on the host (params identical on every process).

    Params drawn from cfg.seed, then overwritten by cfg.init_from's tensors when set.
    """
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    params = jax.jit(model.clone(r=0).init)(jax.random.key(cfg.seed), images)["params"]
    if cfg.init_from:
        params = overlay_params(params, cfg.init_from)
    return _state(params, tx)


def abstract_train_state(cfg: Config, mesh: Mesh) -> tuple[ViT, optax.GradientTransformation,
                                                           State, State]:
    """(model, optimizer, abstract state, state shardings) of a run on `mesh`'s devices.

    Shapes only: cfg.init_from is not read (its tensors have the shapes of the fresh
    parameters). Restoring into this target reshards a checkpoint written on any other device
    count (a pod's checkpoint shipped or resumed on one host); restoring "as saved" needs the
    same topology.
    """
    model = make_model(cfg)
    shapes = abstract_params(model, cfg.image_size)
    tx = make_optimizer(cfg, shapes)
    abstract = jax.eval_shape(lambda p: _state(p, tx), shapes)
    state_sharding = {"step": NamedSharding(mesh, P()),
                      "params": param_sharding(abstract["params"], mesh, cfg.fsdp),
                      "opt_state": param_sharding(abstract["opt_state"], mesh, cfg.fsdp)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sharding)
    return model, tx, abstract, state_sharding
