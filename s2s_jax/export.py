"""Self-contained translation artifacts: the jitted search serialised with `jax.export`, next to the
tokenizers, loadable and runnable without the model code (no flax, no `s2s_jax.models`).

    python -m s2s_jax.export --workdir=runs/demo --output=demo.s2s.zip [--n_best=1,5] [--platforms=cpu,cuda]
    python -m s2s_jax.export --workdir=runs/a,runs/b ...  # an ensemble (Translator.from_workdirs)

    translator = s2s_jax.export.load("demo.s2s.zip")     # jax, numpy, sentencepiece only
    translator.translate(["Y dijo Dios: Sea la luz."])   # == Translator.translate, same floats
    translator.translate(sentences, n_best=3)            # [[best, second, third], ...]
    translator.hypotheses(sentences, n_best=3)           # [[Hypothesis(text, ids, score), ...], ...]
    translator.hypotheses(sentences, return_attention=True)   # Hypothesis.attention [T, S]

The file is a zip archive:
    manifest.json          format, search options, rows per call, buckets, limits, tokenizer kind
    params.npz             the model parameters, flattened: "0000", "0001", ... in pytree order
    decode/S{s}_N{n}.jax   one `jax.export` serialisation per source bucket length s and n-best n:
                           (param leaves, src int32[b, s], src_len int32[b], max_lens int32[b])
                           -> (sequences int32[b, n, L], scores float32[b, n], lengths int32[b, n]),
                           b symbolic, L the bucket's compiled output limit
    decode/S{s}_N{n}_A.jax the same with return_attention (when exported with attention): also
                           attention float32[b, n, L, s]; a separate function because tracking
                           attention changes the compiled search
    tokenizers/{src,tgt}.model   sentencepiece models (absent for synthetic id tasks)

Why one function per bucket rather than a symbolic source length: the compiled output limit
L = min(eval.max_decode_len, 2 * s + 10) is a static loop bound and array size of the search, and
XLA's floats depend on shapes; exporting each bucket keeps every shape of `CorpusDecoder`, so the
loaded artifact returns exactly what `Translator` returns. The batch is symbolic, but the loader
decodes through the same driver as `CorpusDecoder` (`s2s_jax.driver`): the same rows per call
(batch invariance), each with the same per-row limit floor(max_len_a * source pieces + max_len_b).
The parameters are arguments, not constants, so they are stored once for all the functions.

`export` checks its output place and platforms first, writes the archive under a temporary name
unique to the run and renames it once complete. `load` raises ExportError, naming the file, for a
missing, damaged or foreign archive.

Only the loader's imports are at module level (jax, numpy, sentencepiece through `s2s_jax.data`,
and the jax-only `s2s_jax.driver`); `export` imports the model code when it runs.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import sentencepiece as spm

from s2s_jax import compiled, data
from s2s_jax.driver import CallInputs, Driver, output_limits
from s2s_jax.hypotheses import Hypothesis
from s2s_jax.options import SearchOptions, check_option

FORMAT = "s2s_jax.export/1"
MANIFEST, PARAMS = "manifest.json", "params.npz"


def _function_path(length: int, n_best: int, attention: bool) -> str:
    return f"decode/S{length}_N{n_best}{'_A' if attention else ''}.jax"


# ---------------------------------------------------------------------------------- export
def export(workdirs: str | Sequence[str], output: str, *, n_best: Sequence[int] | None = None,
           attention: bool = True, platforms: Sequence[str] | None = None, decoding: dict | None = None,
           **options) -> dict:
    """Writes the artifact of a workdir's best (else latest) checkpoint, or of an ensemble of
    several workdirs, to the zip file `output`; returns its manifest.

    n_best: the n-best sizes to export (default 1 and the beam size); attention: also export the
    searches that return attention; options: `SearchOptions` fields fixed in the artifact (default:
    the workdir's config.eval, as `Translator`), search "beam" or "greedy"; platforms: jax.export
    lowering platforms, some of PLATFORMS (default: this machine's); decoding: the call shapes
    (`Translator.from_workdir`), fixed in the artifact. `output` is written under a
    temporary name and renamed once complete (see `_archive`).
    """
    check_platforms(platforms)
    with _archive(output) as archive:  # opened first: an unwritable output fails before the work
        manifest = _export(archive, workdirs, n_best, attention, platforms, decoding, options)
    return manifest


def _export(archive: zipfile.ZipFile, workdirs, n_best, attention: bool, platforms, decoding: dict | None,
            options: dict) -> dict:
    """Exports into `archive` (see `export`); returns the manifest."""
    from s2s_jax.translate import Translator

    translator = Translator.from_workdirs([workdirs] if isinstance(workdirs, str) else list(workdirs), decoding)
    base = translator.options(**options)
    if base.search == "sample":
        raise ValueError("search='sample' is not exported (beam or greedy)")
    sizes = sorted({1, base.static()["beam_size"]} if n_best is None else set(n_best))
    if not sizes:
        raise ValueError("n_best: no size to export")
    for n in sizes:  # SearchOptions.check names a bad one
        translator.options(**options, n_best=n)
    decoder = translator.decoder
    limits = output_limits(decoder.boundaries, decoder.max_source_len, decoder.max_decode_len, base.max_len)
    start = time.perf_counter()
    functions, lowered_for = _functions(translator, base, limits, sizes, attention, platforms)
    seconds = time.perf_counter() - start
    tokenizers = {}
    if isinstance(translator.src_tokenizer, data.Tokenizer):
        tokenizers = {f"tokenizers/{side}.model": tok.model_proto()
                      for side, tok in (("src", translator.src_tokenizer), ("tgt", translator.tgt_tokenizer))}
    manifest = {
        "format": FORMAT,
        "workdir": translator.workdir,
        "jax_version": jax.__version__,
        "platforms": lowered_for,
        "options": base._replace(n_best=None)._asdict(),
        "n_best": sizes,
        "attention": attention,
        "rows": decoder.rows_per_call(base),
        "buckets": [{"length": length, "max_len": cap} for length, cap in limits.items()],
        "boundaries": decoder.boundaries,
        "max_source_len": decoder.max_source_len,
        "tokenizer": "sentencepiece" if tokenizers else "ids",
        "vocab_sizes": [translator.src_tokenizer.vocab_size, translator.tgt_tokenizer.vocab_size],
        "export_seconds": round(seconds, 2),
    }
    params = io.BytesIO()
    np.savez(params, **{f"{i:04d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(translator.params))})
    archive.writestr(MANIFEST, json.dumps(manifest, indent=1))
    archive.writestr(PARAMS, params.getvalue())
    for name, content in {**functions, **tokenizers}.items():
        archive.writestr(name, content)
    return manifest


def _functions(translator, base: SearchOptions, limits: dict[int, int], sizes: list[int], attention: bool,
               platforms) -> tuple[dict[str, bytes], list[str]]:
    """({path in the archive: serialised jax.export function} for every bucket, n-best size and
    (with `attention`) attention or not, the platforms they were lowered for)."""
    from s2s_jax import inference

    platforms = list(platforms or [jax.export.default_export_platform()])
    leaves, treedef = jax.tree.flatten(translator.params)
    leaf_specs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    batch = jax.export.symbolic_shape("b")[0]
    vector = jax.ShapeDtypeStruct((batch,), np.int32)  # src_len, max_lens
    functions = {}
    for length, cap in limits.items():
        for n in sizes:
            for tracks in (False, True) if attention else (False,):
                def decode(param_leaves, src, src_len, max_lens, cap=cap, n=n, tracks=tracks):
                    out = inference.decode_batch(translator.model, jax.tree.unflatten(treedef, param_leaves), src,
                                                 src_len, max_len=cap, max_lens=max_lens, return_attention=tracks,
                                                 **base._replace(n_best=n).static())
                    return (*out[0], out[1]) if tracks else tuple(out)

                def serialised(decode=decode, length=length) -> bytes:
                    return jax.export.export(jax.jit(decode), platforms=platforms)(
                        leaf_specs, jax.ShapeDtypeStruct((batch, length), np.int32), vector, vector).serialize()

                what = ("s2s_jax.export", translator.model, base._replace(n_best=n), length, cap, tracks, leaf_specs,
                        str(treedef), platforms)
                functions[_function_path(length, n, tracks)] = compiled.stored(what, serialised)
    return functions, platforms


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def check_platforms(platforms: Sequence[str] | None) -> None:
    """ValueError naming an unknown jax.export platform."""
    unknown = [p for p in platforms or () if p not in PLATFORMS]
    if unknown or platforms is not None and not platforms:
        raise ValueError(f"--platforms: unknown platform(s) {unknown}; give some of {list(PLATFORMS)}, "
                         "comma-separated")


@contextlib.contextmanager
def _archive(output: str) -> Iterator[zipfile.ZipFile]:
    """A zip archive written to a temporary file unique to this run, next to `output`, and renamed
    onto it once complete: a failed run leaves nothing, and two runs never write one file. OSError
    naming `output` if it cannot be written there; ValueError if it is a directory or a special file."""
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; give a file name (e.g. model.s2s.zip)")
    if os.path.exists(output) and not os.path.isfile(output):  # renaming would replace a device or pipe
        raise ValueError(f"--output {output} is not a regular file; give a file name (e.g. model.s2s.zip)")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        temporary = new_file_next_to(output)
    except OSError as error:
        raise OSError(error.errno, f"cannot be written there ({error.strerror or error}); choose another --output",
                      output) from None
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            yield archive
        os.replace(temporary, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def new_file_next_to(path: str) -> str:
    """Creates an empty file in the directory of `path`, named after it and unique to this run,
    with the permissions a plain open would give it; returns its path."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return temporary


# ---------------------------------------------------------------------------------- loading
class ExportedTranslator:
    """A loaded artifact: `translate` and `hypotheses` as `Translator`'s, with the exported options."""

    def __init__(self, archive: zipfile.ZipFile):
        manifest = json.loads(archive.read(MANIFEST))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} artifact: format {manifest.get('format')!r}")
        self.manifest, self.options = manifest, SearchOptions(**manifest["options"])
        self.n_best_sizes = manifest["n_best"]
        self.output_limits = {b["length"]: b["max_len"] for b in manifest["buckets"]}  # compiled, per bucket
        if manifest["tokenizer"] == "sentencepiece":
            self.src_tokenizer, self.tgt_tokenizer = (
                data.Tokenizer(spm.SentencePieceProcessor(model_proto=archive.read(f"tokenizers/{side}.model")))
                for side in ("src", "tgt"))
        else:
            self.src_tokenizer, self.tgt_tokenizer = (data.IdTokenizer(v) for v in manifest["vocab_sizes"])
        with np.load(io.BytesIO(archive.read(PARAMS))) as stored:
            self.params = [jax.device_put(stored[name]) for name in sorted(stored.files)]
        # Deserialised now; each compiles for [rows, length] on first use.
        self.functions = {
            (length, n, tracks): jax.jit(jax.export.deserialize(bytearray(
                archive.read(_function_path(length, n, tracks)))).call)
            for length in self.output_limits for n in self.n_best_sizes
            for tracks in ((False, True) if manifest["attention"] else (False,))}

    def translate(self, sentences: Sequence[str], n_best: int = 1, on_long: str | None = None) -> list:
        """The best translation of each sentence ("" for a blank one); n_best > 1: per sentence a
        list of up to n_best texts, best first (the texts of `hypotheses`)."""
        results = self.hypotheses(sentences, n_best, on_long=on_long)
        return [hyps[0].text for hyps in results] if n_best == 1 else [[h.text for h in hyps] for hyps in results]

    def hypotheses(self, sentences: Sequence[str], n_best: int = 1, *, return_attention: bool = False,
                   on_long: str | None = None) -> list[list[Hypothesis]]:
        """Per sentence, up to n_best Hypothesis(text, ids, score[, attention]), best first; a blank
        sentence gives [Hypothesis("", [], 0.0)]. on_long: "truncate" or "error" (default: the
        exported option)."""
        if n_best not in self.n_best_sizes:
            raise ValueError(f"n_best must be one of the exported sizes {self.n_best_sizes}, got {n_best!r}")
        if return_attention and not self.manifest["attention"]:
            raise ValueError("this artifact was exported without attention")
        options = self.options._replace(n_best=n_best, on_long=on_long or self.options.on_long)
        check_option("on_long", options.on_long)
        return self.driver(n_best, return_attention)(sentences, options)

    def driver(self, n_best: int, return_attention: bool) -> Driver:
        """The decode driver of the exported functions for `n_best` (and attention)."""
        def decode(inputs: CallInputs, max_len: int) -> tuple:
            del max_len  # compiled into each bucket's function
            function = self.functions[inputs.src.shape[1], n_best, return_attention]
            out = function(self.params, inputs.src, inputs.src_len, inputs.max_lens)
            return (*out, None) if len(out) == 3 else tuple(out)

        return Driver(decode, self.src_tokenizer, self.tgt_tokenizer, self.manifest["boundaries"],
                      self.manifest["max_source_len"], self.output_limits, self.manifest["rows"])


class ExportError(ValueError):
    """An artifact that cannot be loaded; the message names its file and what is wrong."""


# What a damaged archive raises while loading: zip, deflate, npz, JSON, sentencepiece, jax.export.
_DAMAGED = (zipfile.BadZipFile, zlib.error, KeyError, struct.error, EOFError, ValueError, RuntimeError,
            IndexError, TypeError, OSError)


def load(path: str) -> ExportedTranslator:
    """Loads an artifact written by `export` (needs jax, numpy, sentencepiece and flatbuffers).
    Raises ExportError naming `path` if it is missing, damaged or not an artifact."""
    try:
        with zipfile.ZipFile(path) as archive:
            return ExportedTranslator(archive)
    except _DAMAGED as error:
        what = " ".join(str(error).split()) or type(error).__name__
        raise ExportError(f"{path}: cannot load the translation artifact ({type(error).__name__}: {what}); "
                          "export it again") from error


# ---------------------------------------------------------------------------------- command line
OPTION_FLAGS = ("search", "beam_size", "alpha", "min_len", "no_repeat_ngram_size", "coverage", "max_len_a",
                "max_len_b", "max_len")


def main(argv) -> None:
    from s2s_jax import checkpoints, cli
    f = cli.parsed_flags("export", argv)
    try:
        manifest = export(f.workdir.split(","), f.output, n_best=_n_best_flag(f.n_best), attention=f.attention,
                          platforms=f.platforms, decoding=cli.decoding_values(f), **cli.option_values(f, OPTION_FLAGS))
    except (ValueError, checkpoints.CheckpointError) as error:  # DataError, ConfigError are ValueErrors
        raise SystemExit(f"export: {error}") from None
    except OSError as error:  # disk full, unwritable places
        raise SystemExit(f"export: {error.filename or f.output}: {error.strerror or error}") from None
    print(f"{f.output}: {os.path.getsize(f.output) / 2**20:.2f} MiB, buckets "
          f"{[b['length'] for b in manifest['buckets']]} x n_best {manifest['n_best']}"
          f"{' (+ attention)' if manifest['attention'] else ''}, exported in {manifest['export_seconds']:.1f} s")


def _n_best_flag(values: list[str] | None) -> list[int] | None:
    """--n_best as integers; ValueError naming the flag if one is not an integer."""
    if values is None:
        return None
    try:
        return [int(n) for n in values]
    except ValueError:
        raise ValueError(f"--n_best must be comma-separated integers (e.g. 1,5), got {','.join(values)!r}") from None


def run() -> None:
    from absl import app, flags

    from s2s_jax import cli
    cli.define_workdir_flag("export")
    cli.define_compilation_cache_flag()
    flags.DEFINE_string("output", None, "The artifact to write (a zip file).", required=True)
    flags.DEFINE_list("n_best", None, "N-best sizes to export; default: 1 and the beam size.")
    flags.DEFINE_bool("attention", True, "Also export the searches that return attention.")
    flags.DEFINE_list("platforms", None, "jax.export platforms, e.g. cpu,cuda; default: this machine's.")
    cli.define_option_flags(OPTION_FLAGS)
    cli.define_decoding_flags()
    app.run(main)


if __name__ == "__main__":
    run()
