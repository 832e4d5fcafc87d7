"""Command-line pieces shared by the commands that decode (translate, export, evaluate, score, serve):
the search option flags, built from `options.OPTIONS`, the --workdir flag, the decoding-shape flags
and absl's parsed flags.
Flags are defined only when a command runs, so importing a module defines none."""
from __future__ import annotations

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
    """--decode_buckets and --decode_rows: the shapes of the decoding calls instead of the workdir's
    config.eval.decode_buckets and decode_rows (configuration.with_decoding checks them)."""
    from absl import flags
    flags.DEFINE_list("decode_buckets", None, "Source buckets of the decoding calls, e.g. 65 (one bucket: "
                      "concurrent sentences of any length share calls); default: the workdir's "
                      "config.eval.decode_buckets, else its training buckets.")
    flags.DEFINE_integer("decode_rows", None, "Rows of every decoding call; default: the workdir's "
                         "config.eval.decode_rows.")


def decoding_values(parsed) -> dict:
    """{key: value} of the decoding-shape flags that were given; ValueError for a bucket that is not
    an integer."""
    values = {} if parsed.decode_rows is None else {"decode_rows": parsed.decode_rows}
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


def parsed_flags(program: str, argv: Sequence[str], hint: str = ""):
    """absl's parsed flags for the `program` command; SystemExit for positional arguments (`hint`
    follows the message). Logging is kept to warnings and errors unless --verbosity is given
    (orbax logs a lot at INFO)."""
    from absl import flags
    from absl import logging as absl_logging
    if len(argv) > 1:
        raise SystemExit(f"{program}: unexpected arguments {argv[1:]}{hint}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    return flags.FLAGS
