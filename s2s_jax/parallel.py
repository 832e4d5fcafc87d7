"""Data parallelism over a `jax.sharding` mesh: parameters replicated, batches split on 'data'.

Several processes (JAX's multi-controller model, one process per host): `join` joins them before
any other JAX call and checks that they were started with the same config; the mesh then spans
every device of every process. Every process computes the same global batch numbers, but puts on
its devices only its own rows of each batch (`shard_batch`); the jitted steps see the global batch.
"""
import json
import logging
import re
import socket
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordinator's key-value store
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

_ADDRESS = re.compile(r"[^\s:]+:\d+")
PROGRESS_S = 10  # seconds between two "waiting for the processes" lines
_SETTINGS_KEY = "s2s_jax/settings/"  # + process id: that process's config (JSON) in the key-value store
_NOT_SHARED = ("distributed.process_id", "distributed.coordinator_address")  # a host may name process 0 its own way


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


def join(cfg, settings: dict, on_timeout: Callable[[str], None]) -> None:
    """Joins the processes of config.distributed (checked) and checks that every one has process
    0's `settings` ({"group.key": value} of its config); call before any other JAX call.

    A no-op for one process. Raises ValueError (one line) if process 0's port is taken or the
    processes' settings differ (every process raises, naming the keys). Logs a line every
    PROGRESS_S while waiting; calls `on_timeout(message)` (from another thread; it must end the
    process) if the processes have not all joined after cfg.init_timeout_s: JAX's own timeouts
    abort with a dump.
    """
    if cfg.coordinator_address != "auto" and cfg.num_processes == 1:
        return
    if cfg.coordinator_address != "auto" and cfg.process_id == 0:
        check_port_free(cfg.coordinator_address)
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(cfg, done, on_timeout), daemon=True)
    watchdog.start()
    try:
        initialize(cfg)
        check_same_settings(settings, timeout_s=cfg.init_timeout_s)
    finally:
        done.set()


def check_port_free(address: str) -> None:
    """Raises ValueError if this machine's port of `address` ('HOST:PORT', process 0's
    coordinator) is in use: JAX would crash binding it."""
    port = int(address.rsplit(":", 1)[1])
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignores closed connections
        try:
            probe.bind(("", port))
        except OSError as error:
            raise ValueError(f"distributed.coordinator_address={address}: port {port} is in use on this "
                             f"machine ({error.strerror}: another run's coordinator, a second process "
                             "with process_id=0, or another program); start every process with a free "
                             "port") from error


def _watch(cfg, done: threading.Event, on_timeout: Callable[[str], None]) -> None:
    """Logs progress every PROGRESS_S until `done`; calls on_timeout after cfg.init_timeout_s."""
    started = time.monotonic()
    where = ("the coordinator JAX detects" if cfg.coordinator_address == "auto"
             else f"coordinator {cfg.coordinator_address}")
    while not done.wait(min(PROGRESS_S, max(0.0, started + cfg.init_timeout_s - time.monotonic()))):
        waited = time.monotonic() - started
        if waited >= cfg.init_timeout_s:
            on_timeout(f"process {cfg.process_id}: the {cfg.num_processes} processes did not all join at "
                       f"{where} within distributed.init_timeout_s={cfg.init_timeout_s}: start every "
                       "process (each with its own distributed.process_id, once) with the same "
                       "coordinator_address and num_processes")
            return
        logger.info("waiting for the %d processes to join at %s (process %d, %.0f s of "
                    "distributed.init_timeout_s=%d)", cfg.num_processes, where, cfg.process_id, waited,
                    cfg.init_timeout_s)


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
                               shutdown_timeout_seconds=cfg.heartbeat_timeout_s,
                               initialization_timeout=2 * cfg.init_timeout_s)  # join's watchdog ends first


def check_same_settings(settings: dict, timeout_s: int) -> None:
    """Raises ValueError, in every process alike, unless every process has process 0's `settings`
    (but for _NOT_SHARED), or if another process joined with this one's id. Exchanged through
    the coordinator's key-value store: no collective, so no mismatch can hang one."""
    client = jax_distributed.global_state.client
    mine = {k: v for k, v in settings.items() if k not in _NOT_SHARED}
    try:
        client.key_value_set(f"{_SETTINGS_KEY}{jax.process_index()}", json.dumps(mine, sort_keys=True))
    except jax.errors.JaxRuntimeError as error:
        raise ValueError(f"distributed.process_id={jax.process_index()}: another process joined with "
                         "this id; start each process with its own distributed.process_id") from error
    everyone = [json.loads(client.blocking_key_value_get(f"{_SETTINGS_KEY}{p}", timeout_s * 1000))
                for p in range(jax.process_count())]
    differences = [_difference(everyone[0], theirs, p) for p, theirs in enumerate(everyone)]
    differences = [d for d in differences if d]
    if differences:
        raise ValueError(f"process {jax.process_index()}: the processes were started with other settings "
                         f"than process 0 ({'; '.join(differences)}); start every process with the same "
                         "config and flags, each with its own distributed.process_id")


def _difference(first: dict, other: dict, process: int) -> str:
    """ "process p: key (a on process 0, b there), ..." for the keys where `other` differs; "" if none."""
    keys = sorted(k for k in first.keys() | other.keys() if first.get(k, "absent") != other.get(k, "absent"))
    changes = [f"{k} ({first.get(k, 'absent')!r} on process 0, {other.get(k, 'absent')!r} there)" for k in keys]
    return f"process {process}: {', '.join(changes)}" if changes else ""


def check_processes(cfg) -> None:
    """Raises ValueError unless JAX runs the processes config.distributed asks for."""
    if cfg.coordinator_address == "auto":
        return
    if (jax.process_count(), jax.process_index()) != (cfg.num_processes, cfg.process_id):
        raise ValueError(f"distributed.num_processes={cfg.num_processes}, process_id={cfg.process_id} "
                         f"but JAX runs process {jax.process_index()} of {jax.process_count()}: "
                         "call parallel.initialize(config.distributed) first (train.py does)")


def failed_collective(error: BaseException) -> bool:
    """True if `error`, or an error it was raised from, is a failed cross-process collective
    (mostly: another process died): JAX's JaxRuntimeError of a computation, or the ValueError of a
    gloo collective run from the host (multihost_utils, orbax)."""
    while error is not None:
        if isinstance(error, jax.errors.JaxRuntimeError) or (
                isinstance(error, ValueError) and "Gloo " in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


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


def check_batch_size(batch_size: int, mesh: Mesh, name: str, micro_batches: int = 1) -> None:
    """ValueError unless every device gets the same rows of each of `micro_batches` micro-batches
    (optimizer.accumulate_steps)."""
    if batch_size % (mesh.size * micro_batches):
        layout = (f" ({jax.process_count()} processes x {jax.local_device_count()} devices)"
                  if jax.process_count() > 1 else "")
        parts = f" x optimizer.accumulate_steps={micro_batches}" if micro_batches > 1 else ""
        raise ValueError(f"{name}={batch_size} must be a multiple of the {mesh.size} devices{layout}{parts}")


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

