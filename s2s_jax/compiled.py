"""An on-disk cache of compiled executables: a rerun, or a second `translate` of a workdir, loads
what the first compiled instead of tracing, lowering and compiling it again.

    step = compiled.jit(functools.partial(steps.eval_step, model=model))   # like jax.jit
    step(params, batch)          # first call per signature: loaded from disk, else compiled and written

`jit(fun, **jit_kwargs)` is `jax.jit(fun, **jit_kwargs)` whose executables are looked up once per
signature in this process, then under `<directory>/<key>.exe` (`configure(directory)`, which every
command calls through `cli.use_compilation_cache`: `<JAX cache dir>/executables`), else compiled
with `lower(...).compile()` and written there (a temporary file renamed into place).

The key hashes what the executable depends on: the function (qualified name, and for partials and
closures their bound values, arrays by content), the jit options (shardings with their devices,
donation), the abstract signature of every argument (pytree structure, shapes, dtypes, weak types,
shardings), the static arguments, `context` (what the function reads that its arguments do not
show, e.g. the config of the optimizer inside a train state), the jax, jaxlib, flax and optax
versions, the backend's platform and its version, and a hash of the s2s_jax source, so changed
code never loads stale executables. Static arguments are passed by keyword (their names in `static_argnames`).

`stored(parts, make)` keeps other bytes that take long to make in the same way, by a key of their
description (`export` keeps its `jax.export` serialisations so).

The folder is capped (`configure(directory, max_bytes)`; the commands give it three quarters of
`--compilation_cache_max_gb`, 2 GiB by default, and JAX's cache the rest): after each write the
least recently used entries (a load refreshes an entry's time) are removed until the rest fit, so
a cache that outlives many code versions cannot fill the disk. A corrupt or unreadable entry is a
miss: one warning, then compiled and written again. Without a
directory (library use, `--compilation_cache=off`), with several processes (an executable spans
their devices), inside a trace, or for a function whose bound values have no stable description,
executables are only kept in this process. Entries are pickles, loaded as trusted: the cache
directory is the user's own, like JAX's.

An executable that calls LAPACK (e.g. the QR of an orthogonal initialiser) reads function pointers
that jaxlib fills only when a LAPACK call is lowered; loaded into a fresh process it would crash
(segmentation fault) when called. Such entries are marked when written, and loading one first
lowers a tiny QR once per process (`_prepare_lapack`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import logging
import os
import pickle
import re
import tempfile
import time
import types
from collections.abc import Callable

import jax
import numpy as np
from jax._src import config as jax_config
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache.compilation_cache import reset_cache

from s2s_jax import files

logger = logging.getLogger(__name__)

SUFFIX = ".exe"
LOAD_EVENT = "/s2s_jax/executable_load_duration"  # seconds to look up and load an entry (logbook counts them)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")  # a repr naming a memory address is unstable
DEFAULT_MAX_BYTES = 2 << 30
LAPACK_TARGET = 'custom_call_target="lapack_'  # in the HLO of an executable that calls LAPACK
_STATE: dict = {"directory": None, "max_bytes": DEFAULT_MAX_BYTES}


def configure(directory: str | None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Keeps executables under `directory` (created when first written), at most `max_bytes` of them
    (the least recently used go first); None: only in this process."""
    _STATE["directory"], _STATE["max_bytes"] = directory, max_bytes


def directory() -> str | None:
    """Where executables are kept, or None."""
    return _STATE["directory"]


class Unstable(TypeError):
    """A value whose description would differ between processes (e.g. an object known only by address)."""


def jit(fun, *, context: str = "", **jit_kwargs) -> Cached:
    """`jax.jit(fun, **jit_kwargs)` with its executables cached (see the module docstring)."""
    return Cached(jax.jit(fun, **jit_kwargs), fun, jit_kwargs, context)


class Cached:
    """A jitted function called through executables looked up by signature (see the module docstring)."""

    def __init__(self, jitted, fun, jit_kwargs: dict, context: str):
        self.jitted, self.fun, self.context = jitted, fun, context
        self.static = frozenset(jit_kwargs.get("static_argnames", ()))
        self.jit_kwargs = jit_kwargs
        self.executables: dict = {}  # in-process signature -> jax.stages.Compiled

    def __call__(self, *args, **kwargs):
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static}
        leaves, treedef = jax.tree.flatten((args, dynamic))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # inside a trace: inline as jit does
            return self.jitted(*args, **kwargs)
        static = tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static))
        signature = (treedef, tuple(_leaf_signature(leaf) for leaf in leaves), static)
        executable = self.executables.get(signature)
        if executable is None:
            executable = self.executables[signature] = self._executable(args, kwargs, signature)
        return executable(*args, **dynamic)

    def size(self) -> int:
        """How many signatures this process has executables for."""
        return len(self.executables)

    def _executable(self, args, kwargs, signature):
        """The executable of one signature: loaded from disk, else compiled (and written)."""
        started, path = time.perf_counter(), self._path(signature)
        if path is not None:
            executable = _load(path, signature[0])
            if executable is not None:
                jax.monitoring.record_event_duration_secs(LOAD_EVENT, time.perf_counter() - started)
                return executable
        if path is None:
            return self.jitted.lower(*args, **kwargs).compile()
        with _without_jax_cache():
            executable = self.jitted.lower(*args, **kwargs).compile()
        _store(path, executable, signature[0])
        return executable

    def _path(self, signature) -> str | None:
        """The entry of `signature` on disk, or None where executables stay in this process."""
        return _entry_path(lambda: _key(self.fun, self.jit_kwargs, self.context, signature), _name(self.fun))


def stored(what, make: Callable[[], bytes]) -> bytes:
    """`make()`: bytes that depend on nothing but `what` (any value `describe` takes), the library
    versions and the package source, e.g. a `jax.export` serialisation. Kept beside the executables
    (the same folder and cap) and read from there by a later call; without a directory, with
    several processes, or for a `what` without a stable description, `make()`."""
    path = _entry_path(lambda: hashlib.sha256(
        "\n".join([describe(what), library_versions(), source_hash()]).encode()).hexdigest(), "a stored value")
    if path is None:
        return make()
    entry = _read(path)
    if entry is not None:
        return entry["bytes"]
    blob = make()
    _write(path, lambda: pickle.dumps({"bytes": blob}))
    return blob


def _entry_path(key: Callable[[], str], name: str) -> str | None:
    """The file of the entry named `key()`, or None where `name` stays in this process: no directory,
    several processes, or a key without a stable description (`Unstable`: one warning)."""
    if directory() is None or jax.process_count() > 1:
        return None
    try:
        return os.path.join(directory(), key() + SUFFIX)
    except Unstable as error:
        logger.warning("compiled functions: %s is kept in this process only (%s)", name, error)
        return None


def _leaf_signature(leaf) -> tuple:
    """(abstract value, sharding or None) of one argument leaf: what an executable is specialised on."""
    return jax.typeof(leaf), getattr(leaf, "sharding", None)


def _key(fun, jit_kwargs: dict, context: str, signature) -> str:
    """sha256 (hex) of everything the executable of `fun` at `signature` depends on."""
    treedef, leaves, static = signature
    backend = jax.devices()[0].client
    parts = [
        _name(fun), describe(fun), describe(jit_kwargs), context,
        _ADDRESS.sub("", str(treedef)),  # node types and their metadata (functions by name; `context` the rest)
        describe([(repr(aval), _describe_sharding(sharding)) for aval, sharding in leaves]),
        describe(static), library_versions(), backend.platform, backend.platform_version,
        str(jax.device_count()), source_hash(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _name(fun) -> str:
    """module.qualname of the function under partials and jit wrappers."""
    while isinstance(fun, functools.partial) or hasattr(fun, "__wrapped__"):
        fun = fun.func if isinstance(fun, functools.partial) else fun.__wrapped__
    return f"{getattr(fun, '__module__', '?')}.{getattr(fun, '__qualname__', type(fun).__qualname__)}"


def describe(value) -> str:
    """A text that is equal in two processes exactly when `value` is (for what jit may depend on);
    Unstable if a part is only known by its address."""
    if isinstance(value, functools.partial):
        return f"partial({describe(value.func)}, {describe(value.args)}, {describe(value.keywords)})"
    if isinstance(value, types.FunctionType):
        cells = [cell.cell_contents for cell in value.__closure__ or ()]
        return f"{_name(value)}({describe(cells)}, {describe(value.__defaults__)}, {describe(value.__kwdefaults__)})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(describe(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{describe(k)}: {describe(v)}' for k, v in sorted(value.items(), key=str))}}}"
    if isinstance(value, (jax.Array, np.ndarray)):
        content = hashlib.sha256(np.ascontiguousarray(np.asarray(value)).tobytes()).hexdigest()
        return f"array({value.dtype}, {value.shape}, {content})"
    if isinstance(value, jax.sharding.Sharding):
        return _describe_sharding(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # flax modules, configs
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.name != "parent"}
        return f"{type(value).__module__}.{type(value).__qualname__}{describe(fields)}"
    text = repr(value)
    if _ADDRESS.search(text):
        raise Unstable(f"no stable description of {text[:80]}")
    return text


def _describe_sharding(sharding) -> str:
    """A sharding and its devices (in mesh order where it has a mesh)."""
    if sharding is None:
        return "None"
    mesh = getattr(sharding, "mesh", None)
    devices = list(np.asarray(mesh.device_ids).flat) if mesh is not None else sorted(d.id for d in sharding.device_set)
    return f"{sharding!r} on {devices}"


@functools.cache
def library_versions() -> str:
    """The versions of the libraries whose code the traced functions run (a new flax or optax can
    compute otherwise with the same argument shapes)."""
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("jax", "jaxlib", "flax", "optax"))


@functools.cache
def source_hash() -> str:
    """sha256 of the s2s_jax package's Python source (every .py file, by path and content)."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@contextlib.contextmanager
def _without_jax_cache():
    """Compilations in this thread neither read nor write JAX's persistent cache: an executable that
    JAX loaded from it serialises without the code of its kernels ("Function ... not found" when
    such an entry is called). JAX decides once per process whether its cache is used, at the first
    compilation, so that decision is reset on the way in and out."""
    with jax_config.enable_compilation_cache(False):
        reset_cache()
        try:
            yield
        finally:
            reset_cache()


def _load(path: str, in_tree):
    """The executable stored at `path`, called with arguments of structure `in_tree`; None if there
    is none, or (with a warning) if it is unreadable."""
    entry = _read(path)
    if entry is None:
        return None
    try:
        if entry.get("lapack"):
            _prepare_lapack()
        devices = {d.id: d for d in jax.devices()}
        out_tree = _TreeUnpickler(io.BytesIO(entry["out_tree"]), in_tree).load()
        return serialize_executable.deserialize_and_load(
            entry["executable"], in_tree, out_tree, execution_devices=[devices[i] for i in entry["devices"]])
    except Exception as error:  # noqa: BLE001 - any damage is a miss: compiled and written again
        _unreadable(path, error)
        return None


def _read(path: str) -> dict | None:
    """The entry stored at `path` (now the most recently used), or None if there is none or (with a
    warning) if it is unreadable."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - any damage is a miss
        _unreadable(path, error)
        return None
    with contextlib.suppress(OSError):  # recently used: the last to be pruned (a read-only cache stays as is)
        os.utime(path)
    return entry


def _unreadable(path: str, error: Exception) -> None:
    logger.warning("compiled functions: %s is unreadable (%s: %s); compiling it again",
                   path, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")


@functools.cache
def _prepare_lapack() -> None:
    """Has jaxlib fill its LAPACK function pointers, as lowering any LAPACK call does."""
    jax.jit(jax.numpy.linalg.qr).lower(np.eye(2, dtype=np.float32))


def _store(path: str, executable, in_tree) -> None:
    """Writes `executable` (called with arguments of structure `in_tree`) to `path` (`_write`)."""
    def content() -> bytes:
        blob, _, out_tree = serialize_executable.serialize(executable)
        tree = io.BytesIO()
        _TreePickler(tree, in_tree).dump(out_tree)
        devices = [d.id for d in executable.runtime_executable().local_devices()]
        return pickle.dumps(dict(executable=blob, out_tree=tree.getvalue(), devices=devices,
                                 lapack=LAPACK_TARGET in executable.as_text()))
    _write(path, content)


def _write(path: str, content: Callable[[], bytes]) -> None:
    """Writes `content()` to `path` whole or not at all (a temporary file renamed into place), then
    prunes the folder to its cap. A failure is one warning: the caller goes on
    with what it has in memory."""
    try:
        data = content()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".", suffix=".partial", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            files.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    except Exception as error:  # noqa: BLE001 - e.g. disk full, or an output that cannot be pickled
        logger.warning("compiled functions: cannot write %s (%s: %s); kept in this process only",
                       path, type(error).__name__, error)
    else:
        _prune(os.path.dirname(path), _STATE["max_bytes"], keep=path)


def _prune(folder: str, max_bytes: int, keep: str) -> None:
    """Removes the least recently used entries of `folder` (oldest modification time first; never
    `keep`) until the entries take at most `max_bytes`. Entries another process removes meanwhile
    are skipped."""
    entries, excess = [], -max_bytes  # (modification time, size, path) of the others; bytes over the cap
    with os.scandir(folder) as listing:
        for item in listing:
            if not item.name.endswith(SUFFIX):
                continue
            try:
                info = item.stat()
            except FileNotFoundError:
                continue
            excess += info.st_size
            if item.path != keep:
                entries.append((info.st_mtime, info.st_size, item.path))
    removed = 0
    for _, size, path in sorted(entries):
        if excess <= 0:
            break
        try:
            os.remove(path)
        except FileNotFoundError:  # removed by another process meanwhile
            pass
        except OSError:
            continue
        else:
            removed += 1
        excess -= size
    if removed:
        logger.info("compiled functions: removed the %d least recently used entries of %s (cap %d bytes)",
                    removed, folder, max_bytes)


def _node_metadata(treedef) -> list:
    """The objects in the metadata of `treedef`'s nodes (e.g. a train state's optimizer functions),
    in a fixed order; tuples, lists and dicts are opened."""
    found = []

    def add(value):
        if isinstance(value, (tuple, list, dict)):
            for item in value.values() if isinstance(value, dict) else value:
                add(item)
        elif value is not None:
            found.append(value)

    def walk(node):
        data = node.node_data()
        if data is not None:
            add(data[1])
        for child in node.children():
            walk(child)

    walk(treedef)
    return found


class _TreePickler(pickle.Pickler):
    """Pickles an output tree whose node metadata may hold objects that do not pickle (functions):
    those found in the input tree's metadata are written as their position there."""

    def __init__(self, file, in_tree):
        super().__init__(file)
        self.positions = {id(value): i for i, value in enumerate(_node_metadata(in_tree))}

    def persistent_id(self, obj):
        position = self.positions.get(id(obj))
        return None if position is None else position


class _TreeUnpickler(pickle.Unpickler):
    """Reads what `_TreePickler` wrote, with the objects of this process's input tree."""

    def __init__(self, file, in_tree):
        super().__init__(file)
        self.objects = _node_metadata(in_tree)

    def persistent_load(self, pid):
        return self.objects[pid]
