"""Translate text with a trained workdir: a Python API (`Translator`) and a command line.

    python -m s2s_jax.translate --workdir=runs/demo --input=data/bible-es-en/test.es --output=hyp.en
    python -m s2s_jax.translate --workdir=runs/a,runs/b ...      # an ensemble of two runs
    python -m s2s_jax.translate --workdir=runs/demo < big.es > big.en   # any size: streamed

The command streams: it reads CHUNK_LINES (4096) lines, translates them, writes their output lines
(in input order) and reads on, so memory stays constant; above one chunk it prints a progress line
per chunk on stderr. --output is written as a temporary file unique to the run, next to it,
renamed onto it when complete: a failed or stopped run leaves no file, and two runs writing the same
--output never mix (the last to finish wins). Every place it writes to is checked before decoding.
SIGINT and SIGTERM stop it promptly (status 130, 143) with one line; errors are one line, status 1.

Python:
    translator = Translator.from_workdir("runs/demo")
    translator.translate(["Y dijo Dios: Sea la luz."], beam_size=5)          # -> ["..."]
    translator.hypotheses(sentences, n_best=3)                               # -> [[Hypothesis, ...], ...]
    translator.hypotheses(sentences, return_attention=True)                  # Hypothesis.attention [T, S]
    weights, src_pieces, out_pieces = translator.attention(sentence, output)  # [T, S], any output
    Translator.from_workdirs(["runs/a", "runs/b"])                            # an ensemble

Ensembles (`from_workdirs`) average the members' probabilities (`decoding.ensemble_step_fn`). The
members must share their source and target tokenizers (identical sentencepiece models, or the same
synthetic vocabulary size); the first workdir's config gives the buckets and the default options.
An ensemble's attention is the mean of its members'.

Decoding is `inference.CorpusDecoder` through the decode driver (`s2s_jax.driver`), the same code
that computes dev BLEU during training: sentences are grouped into the config's length buckets by
source length, decoded inference.ROWS_PER_CALL rows per call (each call split over this process's
devices), and returned in input order. Options (`s2s_jax.options`) default to the workdir's
`config.eval` (beam size, alpha, length rule), so `--search=greedy` reproduces the run's dev BLEU.
A source may hold at most `config.data.max_len` pieces (plus EOS): longer sources are truncated
with a warning (on_long="truncate") or rejected (on_long="error").
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from s2s_jax import (BOS_ID, EOS_ID, checkpoints, cli, configuration, data, export, inference, parallel,
                     plotting, sources, steps)
from s2s_jax.hypotheses import Hypothesis
from s2s_jax.models import Seq2Seq, make_model
from s2s_jax.options import OPTIONS, SearchOptions

logger = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("model",))
def _teacher_forced(model: Seq2Seq, params, src, src_len, tgt_in):
    """src [B, S], src_len [B], tgt_in [B, T] -> (log_probs [B, T, V], attention [B, T, S])."""
    out = model.apply({"params": params}, src, src_len, tgt_in, fast_path_only=True)
    return jax.nn.log_softmax(out["logits"]), out["attention"]


class Translator:
    """A trained model (or an ensemble: tuples of models and params) with its tokenizers, ready to
    translate. It decodes on a mesh over this process's devices, each batch split over them, with
    the params replicated on it."""

    def __init__(self, config, model: Seq2Seq | tuple[Seq2Seq, ...], params, src_tokenizer, tgt_tokenizer,
                 workdir: str | None = None):
        mesh = parallel.local_mesh()
        self.config, self.model = config, model
        self.params = jax.device_put(params, parallel.replicated(mesh))
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.workdir = workdir
        self.decoder = inference.CorpusDecoder(model, src_tokenizer, tgt_tokenizer,
                                               boundaries=config.data.bucket_boundaries,
                                               max_source_len=config.data.max_len,
                                               max_decode_len=config.eval.max_decode_len, mesh=mesh)
        self.boundaries = self.decoder.boundaries
        self.max_source_len = self.decoder.max_source_len

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_workdir(cls, workdir: str) -> Translator:
        """Loads config.json, the tokenizers and the best checkpoint (else the latest) of a workdir.

        Raises configuration.ConfigError if `workdir` has no config.json, data.DataError for a
        missing tokenizer and checkpoints.CheckpointError if it holds no checkpoint.
        """
        run = open_workdir(workdir)
        store = checkpoints.Checkpoints.reader(workdir, tokenizers=run.fingerprint)
        try:
            state, meta = store.restore_best_or_latest(run.target)
        finally:
            store.close()
        logger.info("loaded %s step %s", workdir, meta.get("step"))
        return cls(run.config, run.model, steps.inference_params(state), run.src_tokenizer, run.tgt_tokenizer,
                   workdir)

    @classmethod
    def from_workdirs(cls, workdirs: Sequence[str]) -> Translator:
        """An ensemble of the workdirs' models (one workdir: that model), decoded with the first
        workdir's config and tokenizers. Raises ValueError unless all share their tokenizers."""
        if isinstance(workdirs, str) or not workdirs:
            raise ValueError(f"from_workdirs takes a non-empty list of workdirs, got {workdirs!r}")
        if not all(workdirs):
            raise ValueError(f"empty workdir (e.g. a stray comma) in {list(workdirs)}: name each workdir")
        loaded = [cls.from_workdir(w) for w in workdirs]
        first = loaded[0]
        for other in loaded[1:]:
            if _tokenizer_key(other) != _tokenizer_key(first):
                raise ValueError(
                    f"cannot ensemble {first.workdir} (vocabularies: source {first.src_tokenizer.vocab_size}, "
                    f"target {first.tgt_tokenizer.vocab_size}) with {other.workdir} (source "
                    f"{other.src_tokenizer.vocab_size}, target {other.tgt_tokenizer.vocab_size}): the members "
                    "must share their source and target tokenizers")
        if len(loaded) == 1:
            return first
        return cls(first.config, tuple(t.model for t in loaded), tuple(t.params for t in loaded),
                   first.src_tokenizer, first.tgt_tokenizer, ",".join(workdirs))

    def options(self, **overrides) -> SearchOptions:
        """Search options: the workdir's config.eval (beam size, alpha, length rule) under `overrides`
        (a None override keeps the default)."""
        options = SearchOptions.from_eval_config(self.config.eval, "beam").updated(overrides)
        self.decoder.check(options)
        return options

    # ------------------------------------------------------------------------------ translation
    def translate(self, sentences: Sequence[str], **options) -> list[str]:
        """The best translation of each sentence, in input order ("" for a blank sentence).

        options: any `options.SearchOptions` field except n_best; unset ones come from the
        workdir's config.eval. `prefixes`: see `hypotheses`.
        """
        if "n_best" in options:
            raise TypeError("translate returns the best hypothesis only; use hypotheses(..., n_best=N)")
        return [hyps[0].text for hyps in self.hypotheses(sentences, **options)]

    def hypotheses(self, sentences: Sequence[str], prefixes: Sequence[str | None] | None = None,
                   return_attention: bool = False, first_line: int = 1, **options) -> list[list[Hypothesis]]:
        """Per sentence, up to n_best Hypothesis(text, ids, score), best first (search="sample":
        n_best samples, by score). `prefixes`: per sentence a target text (or None) that every
        hypothesis must start with (interactive translation, forced tags). `return_attention`: each
        hypothesis also gets the attention weights the search recorded for it, [T, S]
        (see `hypotheses.Hypothesis`). `first_line`: the first sentence's line number in messages."""
        return self.decoder(self.params, sentences, self.options(**options), prefixes, return_attention, first_line)

    # ------------------------------------------------------------------------------ attention
    def attention(self, sentence: str, output: str | Sequence[int]):
        """Teacher-forced attention of the model reading `sentence` and writing `output`.

        output: target text, or target ids (up to the first EOS, e.g. `Hypothesis.ids`).
        Returns (weights float32[T, S], src_pieces [S], out_pieces [T]): row t is the attention
        while the decoder emits out_pieces[t]; both piece lists end with "</s>" (the EOS). An
        ensemble's weights are the mean of its members'.
        """
        src = self._source_with_eos(sentence)
        if isinstance(output, str):
            out = self.tgt_tokenizer.encode([output])[0] if output.strip() else []
        else:
            out = []
            for t in output:
                if int(t) == EOS_ID:
                    break
                out.append(int(t))
        bad = [t for t in out if not 0 <= t < self.tgt_tokenizer.vocab_size]
        if bad:
            raise ValueError(f"output ids {bad} outside the target vocabulary [0, {self.tgt_tokenizer.vocab_size})")
        tgt_in = [BOS_ID] + out                                     # T = len(out) + 1 decoder steps
        s_pad, t_pad = (data.padded_length(len(src), self.boundaries),
                        data.padded_length(len(tgt_in), self.boundaries))
        src_arr = np.zeros((1, s_pad), np.int32)
        src_arr[0, :len(src)] = src
        tgt_arr = np.zeros((1, t_pad), np.int32)
        tgt_arr[0, :len(tgt_in)] = tgt_in
        weights = np.mean([np.asarray(_teacher_forced(model, params, jnp.asarray(src_arr),
                                                      jnp.asarray([len(src)], jnp.int32), jnp.asarray(tgt_arr))[1])
                           for model, params in zip(*inference.members(self.model, self.params))], axis=0)
        weights = np.asarray(weights[0, :len(tgt_in), :len(src)], np.float32)  # [T, S]
        return weights, _pieces(self.src_tokenizer, src), _pieces(self.tgt_tokenizer, out + [EOS_ID])

    def _source_with_eos(self, sentence: str) -> list[int]:
        """The piece ids the model reads for `sentence` (truncated like a decoded one), EOS included."""
        return sources.source_ids(self.src_tokenizer, sentence, 0, self.max_source_len, "truncate") + [EOS_ID]

    def plot_attention(self, sentence: str, output: str | Sequence[int], path: str, title: str | None = None) -> None:
        """Writes the attention heat map of (sentence, output) to `path` (e.g. a .png)."""
        weights, src_pieces, out_pieces = self.attention(sentence, output)
        plotting.plot_attention(weights, src_pieces, out_pieces, path, title=title)

    def plot_hypothesis(self, sentence: str, hypothesis: Hypothesis, path: str, title: str | None = None) -> None:
        """Writes the heat map of the attention the search recorded for `hypothesis` (from
        `hypotheses(..., return_attention=True)`) while translating `sentence`."""
        if hypothesis.attention is None:
            raise ValueError("the hypothesis has no attention: use hypotheses(..., return_attention=True)")
        weights = hypothesis.attention                              # [T, S]
        src = self._source_with_eos(sentence)
        out = (hypothesis.ids + [EOS_ID])[:len(weights)]             # no EOS row if cut at the limit
        plotting.plot_attention(weights, _pieces(self.src_tokenizer, src), _pieces(self.tgt_tokenizer, out),
                                path, title=title)


class Workdir(NamedTuple):
    """A training workdir's model, before any checkpoint is read."""
    config: ml_collections.ConfigDict
    src_tokenizer: data.Tokenizer | data.IdTokenizer
    tgt_tokenizer: data.Tokenizer | data.IdTokenizer
    model: Seq2Seq
    target: steps.TrainState  # shapes only (jax.eval_shape): the train state its checkpoints hold
    fingerprint: str  # checkpoints.tokenizers_fingerprint of the tokenizers


def open_workdir(workdir: str) -> Workdir:
    """config.json, the tokenizers and the model of a workdir that holds checkpoints; nothing is
    initialised. configuration.ConfigError without config.json, data.DataError for a missing
    tokenizer, checkpoints.CheckpointError without checkpoints."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise configuration.ConfigError(f"workdir {workdir} is not a directory: give a training workdir")
    config = configuration.load(workdir)
    if not _has_steps(os.path.join(workdir, "checkpoints")):
        # Checked before opening the store, which would create empty directories.
        raise checkpoints.CheckpointError(
            f"no checkpoint in workdir {workdir} (looked in checkpoints/): train a model there first")
    if config.data.task == "files":
        src_tok, tgt_tok = (data.Tokenizer.load(os.path.join(workdir, "tokenizers", f"{side}.model"))
                            for side in ("src", "tgt"))
    else:
        src_tok = tgt_tok = data.IdTokenizer(config.data.synthetic_vocab_size)
    model = make_model(config.model, src_tok.vocab_size, tgt_tok.vocab_size)
    target = jax.eval_shape(lambda: steps.init_state(model, config.optimizer, config.num_train_steps, config.seed))
    return Workdir(config, src_tok, tgt_tok, model, target, checkpoints.tokenizers_fingerprint(src_tok, tgt_tok))


def _tokenizer_key(translator: Translator) -> tuple:
    """What must be equal for two models to form an ensemble: both tokenizers."""
    return tuple(tok.model_proto() if isinstance(tok, data.Tokenizer) else tok.vocab_size
                 for tok in (translator.src_tokenizer, translator.tgt_tokenizer))


def _has_steps(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable token strings for plot labels."""
    if isinstance(tokenizer, data.Tokenizer):
        return [tokenizer.sp.id_to_piece(int(i)) for i in ids]
    return ["</s>" if i == EOS_ID else str(i) for i in ids]


# ---------------------------------------------------------------------------------- command line
OPTION_FLAGS = [option.name for option in OPTIONS]


def _define_flags() -> None:
    """The command's flags; every search flag maps onto one `options.SearchOptions` field."""
    from absl import flags
    cli.define_workdir_flag("decode as")
    flags.DEFINE_string("input", None, "Source text, one sentence per line (strict UTF-8); default stdin.")
    flags.DEFINE_string("output", None, "Where to write one translation per line (its directory is created); "
                        "default stdout.")
    flags.DEFINE_string("prefixes", None, "Optional file of target prefixes, one line per input line (empty "
                        "= none): every hypothesis starts with its line's prefix.")
    cli.define_option_flags(OPTION_FLAGS)
    flags.DEFINE_string("attention_dir", None, "Write one attention heat map per sentence here, "
                        "{line:05d}.png: the attention the search recorded for the best hypothesis "
                        "(none for empty lines).")


def _make_parent(path: str) -> None:
    """Creates the directory `path` goes into; a one-line SystemExit if it cannot be."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"translate: cannot create the directory of {path}: {error.strerror or error}") from None
    if os.path.isdir(path):
        raise SystemExit(f"translate: --output={path} is a directory; give a file name")


CHUNK_LINES = 4096  # lines decoded per call: bounds memory, and enough to fill the length buckets


def _with_prefixes(lines: Iterator[str], prefixes: Iterator[str], path: str) -> Iterator[tuple[str, str | None]]:
    """(line, its prefix or None if blank), read in lockstep; DataError naming `path` when one of
    the two ends before the other."""
    for count, (line, prefix) in enumerate(itertools.zip_longest(lines, prefixes), start=1):
        if prefix is None:
            raise data.DataError(f"{path}: {count - 1} prefix lines, but the input has more lines")
        if line is None:
            raise data.DataError(f"{path}: more prefix lines than the {count - 1} input lines")
        yield line, prefix if prefix.strip() else None


def _lines(path: str) -> Iterator[str]:
    """The lines of `path`, read as a stream (`data.iter_lines`); opened now, to fail early."""
    lines = data.iter_lines(path)
    first = next(lines, None)
    return itertools.chain([] if first is None else [first[1]], (text for _, text, _ in lines))


def _sources(path: str, prefix_path: str | None) -> Iterator[tuple[str, str | None]]:
    """(line, its prefix or None) of the input file and the optional prefix file, read lazily."""
    lines = _lines(path)
    if prefix_path is None:
        return ((line, None) for line in lines)
    return _with_prefixes(lines, _lines(prefix_path), prefix_path)


_END = object()


def _chunks(items: Iterator, size: int) -> Iterator[tuple[list, bool]]:
    """(the next `size` items or fewer, whether they are the last); reads one item ahead."""
    ahead = next(items, _END)
    while ahead is not _END:
        chunk = [ahead, *itertools.islice(items, size - 1)]
        ahead = next(items, _END)
        yield chunk, ahead is _END


def _translate_chunk(translator: Translator, chunk: list[tuple[str, str | None]], first_line: int, out: TextIO,
                     options: dict, attention_dir: str | None) -> None:
    """Translates the (line, prefix) pairs of input lines first_line.. and writes their outputs
    to `out` (flushed) and their attention maps to `attention_dir`."""
    sentences, prefixes = [s for s, _ in chunk], [p for _, p in chunk]
    results = translator.hypotheses(sentences, prefixes, return_attention=bool(attention_dir),
                                    first_line=first_line, **options)
    out.write("".join("\t".join(h.text for h in hyps) + "\n" for hyps in results))
    out.flush()
    if attention_dir:
        os.makedirs(attention_dir, exist_ok=True)
        for line, (sentence, hyps) in enumerate(zip(sentences, results), start=first_line):
            if sentence.strip():
                translator.plot_hypothesis(sentence, hyps[0], os.path.join(attention_dir, f"{line:05d}.png"),
                                           title=f"line {line}")


def _translate_stream(translator: Translator, pairs: Iterator[tuple[str, str | None]], out: TextIO, options: dict,
                      attention_dir: str | None, progress: TextIO) -> None:
    """Translates (line, prefix) pairs CHUNK_LINES at a time, writing each chunk's outputs in
    input order before reading the next, and a progress line after each chunk when there is more
    than one."""
    start, done = time.monotonic(), 0
    for number, (chunk, last) in enumerate(_chunks(pairs, CHUNK_LINES)):
        _translate_chunk(translator, chunk, done + 1, out, options, attention_dir)
        done += len(chunk)
        if number or not last:
            rate = done / max(time.monotonic() - start, 1e-9)
            print(f"translate: {done} lines done, {rate:.1f} sentences/s", file=progress, flush=True)


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    """Where the translations go: stdout, or `path`, written as a temporary file of this run
    (unique, in the same directory) and renamed onto `path` once complete, so a failed run leaves
    no file and two runs writing the same path never mix: the last to finish wins. A link
    (/dev/stdout) or a special file is written in place: renaming would replace it. OSError
    naming `path` if it cannot be written."""
    if path is None:
        yield sys.stdout
    elif os.path.islink(path) or os.path.exists(path) and not os.path.isfile(path):
        with _opened(path, lambda: open(path, "w", encoding="utf-8", newline="\n")) as out:
            yield out
    else:
        with _opened(path, lambda: _temporary(path)) as out:
            try:
                yield out
                out.close()
                os.replace(out.name, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(out.name)


@contextlib.contextmanager
def _opened(path: str, opener) -> Iterator[TextIO]:
    """The file `opener()` opens for writing `path`, closed on exit; an OSError naming `path`
    if it cannot be opened."""
    try:
        out = opener()
    except OSError as error:
        raise OSError(error.errno, f"--output cannot be written there ({error.strerror or error}); "
                      "choose another path", path) from None
    with out:
        yield out


def _temporary(path: str) -> TextIO:
    """A new text file next to `path`, unique to this run (`export.new_file_next_to`)."""
    return open(export.new_file_next_to(path), "w", encoding="utf-8", newline="\n")  # its name: the path


def _check_attention_dir(path: str) -> None:
    """Creates --attention_dir and checks that a file can be written there, before decoding;
    an OSError naming it if not."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise OSError(error.errno, f"--attention_dir cannot be written ({error.strerror or error}); "
                      "give a writable directory", path) from None


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (`_stop_on_signals`); not an Exception, so nothing swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread (once: later ones are ignored, so
    the cleanup runs to its end)."""
    def handler(signum, frame):
        del frame
        for name in (signal.SIGINT, signal.SIGTERM):
            signal.signal(name, signal.SIG_IGN)
        raise Interrupted(signum)

    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, handler)


def _fail(message: str, status: int = 1) -> SystemExit:
    """The exit of a failed run: `message` as one line on stderr, then `status`."""
    print(message, file=sys.stderr, flush=True)
    return SystemExit(status)


def _translate_main(f) -> None:
    """The command's work: checks the output places, loads the model, translates the input."""
    if f.output:
        _make_parent(f.output)
    if f.attention_dir:
        _check_attention_dir(f.attention_dir)
    with _output(f.output) as out:  # opened before loading: an unwritable --output fails at once
        pairs = _sources(f.input or "/dev/stdin", f.prefixes)
        translator = Translator.from_workdirs(f.workdir.split(","))
        options = cli.option_values(f, OPTION_FLAGS)
        translator.options(**options)  # bad options fail before any output, even on empty input
        _translate_stream(translator, pairs, out, options, f.attention_dir, sys.stderr)


def main(argv) -> None:
    f = cli.parsed_flags("translate", argv, "; use --input=FILE")
    try:
        _stop_on_signals()
        _translate_main(f)
    except Interrupted as stop:
        raise _fail(f"translate: stopped by {signal.Signals(stop.signum).name}", 128 + stop.signum) from None
    except (ValueError, checkpoints.CheckpointError) as error:  # DataError, ConfigError are ValueErrors
        raise _fail(f"translate: {error}") from None
    except OSError as error:
        raise _fail(f"translate: {_os_error_line(error, f.output or 'stdout')}") from None


def _os_error_line(error: OSError, output: str) -> str:
    """An OSError in one line: its file, else (a failed write: disk full) the output."""
    if error.filename:
        return f"{error.filename}: {error.strerror or error}"
    return f"cannot write {output}: {error.strerror or error}; free some space or choose another --output"


def run() -> None:
    from absl import app
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
