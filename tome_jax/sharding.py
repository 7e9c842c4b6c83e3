"""Data-parallel placement: a 1-D "batch" mesh over every device of every process.

Batches are split along their leading axis across all devices; parameters are replicated.
Each process supplies only its own share of a batch (see `tome_jax.data`), and
`global_batch` assembles the shares into one global array without moving data between hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "batch"


def initialize_distributed(coordinator: str | None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` for the CLIs' --coordinator flags; call before any JAX work.

    coordinator: None (one process: nothing to do), "host:port" (with num_processes and
      process_id), or "auto" (JAX finds the cluster itself: Cloud TPU pods, Slurm).
    """
    if not coordinator:
        return
    # Only CPU collectives read this (their default cannot run across processes).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D mesh named "batch" over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    # Auto axes: under Explicit sharding, concatenating the (unsharded) class token onto a
    # batch-sharded array is a sharding type error inside the model.
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh, the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_multiple(mesh: Mesh) -> int:
    """How many rows a process's share of a batch must be a multiple of: its device count."""
    return len(mesh.local_devices)


def pad_batch(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Pads every [B, ...] array with zero rows to a multiple of `multiple` rows.

    Pad rows carry mask False and index -1, so a batch size that does not divide the device
    count is padding, not an error.
    """
    size = len(next(iter(batch.values())))
    extra = -size % multiple
    if not extra:
        return batch
    if "mask" not in batch:
        batch = {**batch, "mask": np.ones(size, bool)}
    return {k: np.concatenate([v, np.full((extra,) + v.shape[1:], -1 if k == "index" else 0,
                                          v.dtype)])
            for k, v in batch.items()}


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's share [b, ...] -> global jax.Arrays [b * process_count, ...].

    b must be a multiple of `local_multiple(mesh)` (see `pad_batch`); all processes must pass
    the same b. Process p's rows land on p's devices, in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def host_slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of n examples (sizes differ by <= 1)."""
    per, extra = divmod(n, process_count)
    start = process_index * per + min(process_index, extra)
    return start, start + per + (process_index < extra)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (the same values on every process) on all devices of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A fully replicated array as numpy, also where other processes hold the other devices."""
    return np.asarray(x.addressable_data(0))
