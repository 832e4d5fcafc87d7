"""Data parallelism over a `jax.sharding` mesh: parameters replicated, batches split on 'data'.

Several processes (JAX's multi-controller model, one process per host): `initialize` joins them
before any other JAX call; the mesh then spans every device of every process. Every process
computes the same global batch numbers, but puts on its devices only its own rows of each batch
(`shard_batch`); the jitted steps see the global batch.
"""
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
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
    the cross-process collectives are gloo's, so several processes also run on one machine. A
    process that dies (kill -9) stops sending heartbeats: after heartbeat_timeout_s JAX ends the
    others with an error, and no process waits longer than that at exit for one that is gone.
    """
    if cfg.coordinator_address == "auto":
        args = {}
    elif cfg.num_processes > 1:
        args = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                    process_id=cfg.process_id)
    else:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args, heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                               shutdown_timeout_seconds=cfg.heartbeat_timeout_s)


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


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices only (one axis, 'data'), e.g. to translate."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


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


def shard_rows(local, rows: int, mesh: Mesh):
    """A pytree of this process's rows (`process_rows`) of a global batch of `rows` rows, as global
    arrays [rows, ...] split along the batch axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (rows, *np.shape(x)[1:])), local)


def shard_batch(batch, mesh: Mesh):
    """A pytree of host arrays [B, ...], the same global batch in every process, as global arrays
    split along B; each process transfers only its own rows."""
    rows = len(jax.tree.leaves(batch)[0])
    mine = process_rows(rows, mesh)
    return shard_rows(jax.tree.map(lambda x: np.asarray(x)[mine], batch), rows, mesh)


@jax.jit
def _largest(values: jax.Array) -> jax.Array:
    return values.max()


def largest_over_processes(value: int, mesh: Mesh) -> int | jax.Array:
    """The largest of every process's `value` (a small int), to agree on a decision without a
    host-side barrier: `value` itself for one process, else a replicated scalar computed on the
    mesh while the host goes on (read it later, e.g. a step later)."""
    if jax.process_count() == 1:
        return value
    local = np.full(len(mesh.local_devices), value, np.int32)  # one entry per local device
    return _largest(shard_rows(local, mesh.size, mesh))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`; a no-op for one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def replicate(tree, mesh: Mesh):
    """A pytree of arrays holding the same values in every process, replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)

