"""Data parallelism over a `jax.sharding` mesh: parameters replicated, batches split on 'data'."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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
        raise ValueError(f"{name}={batch_size} must be a multiple of the {mesh.size} devices")


def shard_batch(batch, mesh: Mesh):
    """Puts a pytree of host arrays [B, ...] on the mesh, split along B."""
    return jax.device_put(batch, batch_sharded(mesh))
