"""Command-line pieces shared by the commands (`python -m s2s_jax.translate`, `export`, `evaluate`,
`score`, `serve`, and `train.py`): the search option flags, built from `options.OPTIONS`, the
--workdir flag, the decoding-shape flags, the --compilation_cache flag and the caches it turns on,
and absl's parsed flags.
Flags are defined only when a command runs, so importing a module defines none."""
from __future__ import annotations

import os
from collections.abc import Sequence

from s2s_jax.options import BY_NAME


def define_option_flags(names: Sequence[str]) -> None:
    """Defines a flag --NAME for each search option named, unset by default (unset: the option's
    default, or the workdir's config.eval; the help says which)."""
    from absl import flags
    for name in names:
        option = BY_NAME[name]
        text = option.help if "default:" in option.help else f"{option.help[:-1]}; default: {option.default}."
        if isinstance(option.kind, tuple):
            flags.DEFINE_enum(name, None, list(option.kind), text)
        elif option.kind is int:
            flags.DEFINE_integer(name, None, text)
        else:
            flags.DEFINE_float(name, None, text)


def option_values(parsed, names: Sequence[str]) -> dict:
    """{name: value} of the option flags named that were given; parsed: absl's parsed flags."""
    return {name: parsed[name].value for name in names if parsed[name].value is not None}


def define_decoding_flags() -> None:
    """--decode_buckets, --decode_rows and --decode_dtype: the shapes and matmul dtype of the decoding
    calls instead of the workdir's config.eval keys of those names (configuration.with_decoding checks
    them)."""
    from absl import flags
    flags.DEFINE_list("decode_buckets", None, "Source buckets of the decoding calls, e.g. 65 (one bucket: "
                      "concurrent sentences of any length share calls); default: the workdir's "
                      "config.eval.decode_buckets, else its training buckets.")
    flags.DEFINE_integer("decode_rows", None, "Rows of every decoding call; default: the workdir's "
                         "config.eval.decode_rows.")
    flags.DEFINE_enum("decode_dtype", None, ["float32", "bfloat16"], "Matmul dtype of the decoding calls "
                      "(sums stay float32); default: the workdir's config.eval.decode_dtype, else model.dtype.")


def decoding_values(parsed) -> dict:
    """{key: value} of the decoding flags that were given; ValueError for a bucket that is not an
    integer."""
    values = option_values(parsed, ("decode_rows", "decode_dtype"))
    if parsed.decode_buckets is not None:
        try:
            values["decode_buckets"] = tuple(int(b) for b in parsed.decode_buckets)
        except ValueError:
            raise ValueError(f"--decode_buckets={','.join(parsed.decode_buckets)}: give comma-separated "
                             "integers, e.g. 32,65") from None
    return values


def define_workdir_flag(what: str) -> None:
    """--workdir, required: a training workdir, or several (an ensemble); `what`: what a command
    does with them, e.g. "decode"."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizers/, checkpoints); several, "
                        f"comma-separated, {what} an ensemble (same tokenizers).", required=True)


def define_compilation_cache_flag() -> None:
    """--compilation_cache=DIR|off and --compilation_cache_max_gb (see `use_compilation_cache`)."""
    from absl import flags

    from s2s_jax import compiled
    flags.DEFINE_string(
        "compilation_cache", None, "Directory of the compilation caches (JAX's persistent cache, and the "
        "compiled functions themselves under executables/), or 'off'. Default: $JAX_COMPILATION_CACHE_DIR "
        "if set, else $XDG_CACHE_HOME/s2s_jax/jax (~/.cache/s2s_jax/jax).")
    flags.DEFINE_float("compilation_cache_max_gb", compiled.DEFAULT_MAX_BYTES / 2**30, "Cap of the cache "
                       "folder (GiB): three quarters for the compiled functions under executables/, one quarter "
                       "for JAX's XLA binaries; the least recently used go first.", lower_bound=0.0)


def use_compilation_cache(directory: str | None, max_gb: float | None = None) -> None:
    """Turns on both compilation caches (before anything is compiled): JAX's persistent cache in
    `directory` (XLA's backend step) and `compiled`'s executables under `directory`/executables
    (tracing and lowering too), so a rerun of the same shapes loads what an earlier run compiled.
    None picks the default directory; "off" leaves both off. `max_gb` caps the folder (None:
    `compiled.DEFAULT_MAX_BYTES`): a quarter for JAX's cache (`jax_compilation_cache_max_size`,
    ~15% of the folder in use), the rest for the executables (`compiled.configure`)."""
    import jax

    from s2s_jax import compiled
    if directory == "off":
        return
    if directory is None:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_home, "s2s_jax", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every shape is worth keeping, also the ones that compile in under JAX's default 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    max_bytes = compiled.DEFAULT_MAX_BYTES if max_gb is None else int(max_gb * 2**30)
    _date_jax_cache_entries(directory)
    jax.config.update("jax_compilation_cache_max_size", max_bytes // 4)
    compiled.configure(os.path.join(directory, "executables"), max_bytes - max_bytes // 4)


def _date_jax_cache_entries(directory: str) -> None:
    """Gives each entry of JAX's cache that has no access-time file (written without a size cap, as
    by earlier versions) one from its modification time: JAX's eviction reads that file for every
    entry, and would fail on the first write without it."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.endswith("-cache"):
            atime = os.path.join(directory, name.removesuffix("-cache") + "-atime")
            if not os.path.exists(atime):
                mtime_ns = os.stat(os.path.join(directory, name)).st_mtime_ns
                with open(atime, "wb") as f:
                    f.write(mtime_ns.to_bytes(8, "little"))


def parsed_flags(program: str, argv: Sequence[str], hint: str = ""):
    """absl's parsed flags for the `program` command, with the compilation caches turned on as its
    --compilation_cache says; SystemExit for positional arguments (`hint` follows the message).
    Logging is kept to warnings and errors unless --verbosity is given (orbax logs a lot at INFO)."""
    from absl import flags
    from absl import logging as absl_logging
    if len(argv) > 1:
        raise SystemExit(f"{program}: unexpected arguments {argv[1:]}{hint}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    if "compilation_cache" in flags.FLAGS:  # every command that compiles (average does not)
        use_compilation_cache(flags.FLAGS.compilation_cache, flags.FLAGS.compilation_cache_max_gb)
    return flags.FLAGS
