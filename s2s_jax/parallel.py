"""Data parallelism over a `jax.sharding` mesh: parameters replicated, batches split on 'data'.

Several processes (JAX's multi-controller model, one process per host): `initialize` joins them
before any other JAX call; the mesh then spans every device of every process. Every process
computes the same global batch numbers, but puts on its devices only its own rows of each batch
(`shard_batch`); the jitted steps see the global batch.
"""
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_ADDRESS = re.compile(r"[^\s:]+:\d+")


def check_distributed(cfg) -> None:
    """Raises ValueError naming the first bad key of config.distributed (a range-checked group)."""
    address = cfg.coordinator_address
    if address not in ("", "auto") and not _ADDRESS.fullmatch(address):
        raise ValueError(f"distributed.coordinator_address={address!r} must be '' (one process), "
                         "'HOST:PORT' or 'auto'")
    if address == "auto":
        return
    if cfg.num_processes > 1 and not address:
        raise ValueError(f"distributed.num_processes={cfg.num_processes} needs "
                         "distributed.coordinator_address='HOST:PORT' (process 0's) or 'auto'")
    if cfg.process_id >= cfg.num_processes:
        raise ValueError(f"distributed.process_id={cfg.process_id} must be below "
                         f"distributed.num_processes={cfg.num_processes}")


def initialize(cfg) -> None:
    """Joins the processes of config.distributed (checked); call before any other JAX call.

    A no-op for one process. "auto" lets JAX detect the cluster (TPU pod, SLURM, Open MPI). On CPU
    the cross-process collectives are gloo's, so several processes also run on one machine.
    """
    if cfg.coordinator_address == "auto":
        args = {}
    elif cfg.num_processes > 1:
        args = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                    process_id=cfg.process_id)
    else:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)


def check_processes(cfg) -> None:
    """Raises ValueError unless JAX runs the processes config.distributed asks for."""
    if cfg.coordinator_address == "auto":
        return
    if (jax.process_count(), jax.process_index()) != (cfg.num_processes, cfg.process_id):
        raise ValueError(f"distributed.num_processes={cfg.num_processes}, process_id={cfg.process_id} "
                         f"but JAX runs process {jax.process_index()} of {jax.process_count()}: "
                         "call parallel.initialize(config.distributed) first (train.py does)")


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every host (one axis, 'data')."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the mesh."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(batch_size: int, mesh: Mesh, name: str) -> None:
    if batch_size % mesh.size:
        layout = (f" ({jax.process_count()} processes x {jax.local_device_count()} devices)"
                  if jax.process_count() > 1 else "")
        raise ValueError(f"{name}={batch_size} must be a multiple of the {mesh.size} devices{layout}")


def process_rows(batch_size: int, mesh: Mesh) -> np.ndarray:
    """The rows of a global batch [batch_size, ...] that this process's devices hold under
    `batch_sharded(mesh)`, ascending: the local data `jax.make_array_from_process_local_data`
    expects (process p of P with equal device counts: the p-th of P contiguous blocks)."""
    indices = batch_sharded(mesh).addressable_devices_indices_map((batch_size,)).values()
    return np.unique(np.concatenate([np.arange(batch_size)[index] for index in indices]))


def shard_batch(batch, mesh: Mesh):
    """A pytree of host arrays [B, ...], the same global batch in every process, as global arrays
    split along B; each process transfers only its own rows."""
    sharding = batch_sharded(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x[process_rows(len(x), mesh)], x.shape)

    return jax.tree.map(put, batch)


def replicate(tree, mesh: Mesh):
    """A pytree of arrays holding the same values in every process, replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_copy(tree):
    """Single-device copies of replicated global arrays, on this process's first device."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)
