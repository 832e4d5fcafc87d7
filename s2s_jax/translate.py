"""Translate text with a trained workdir: a Python API (`Translator`) and a command line.

    python -m s2s_jax.translate --workdir=runs/demo --input=data/bible-es-en/test.es --output=hyp.en
    python -m s2s_jax.translate --workdir=runs/a,runs/b ...      # an ensemble of two runs
    python -m s2s_jax.translate --workdir=runs/demo < big.es > big.en   # any size: streamed

The command streams: it reads CHUNK_LINES (4096) lines, translates them, writes their output lines
(in input order) and reads on, so memory stays constant; above one chunk it prints a progress line
per chunk on stderr. From a pipe or a terminal it also translates (and flushes) as soon as no
further line is waiting, so a line typed or written into a pipe held open is answered at once:

    python -m s2s_jax.translate --workdir=runs/demo --search=greedy      # type a line, read its translation

--output is written as a temporary file unique to the run, next to it, renamed onto it when
complete: a failed or stopped run leaves no file, and two runs writing the same --output never mix
(the last to finish wins). Every place it writes to is checked before decoding. SIGINT and
SIGTERM stop it promptly (status 130, 143) with one line; errors are one line, status 1.

Python:
    translator = Translator.from_workdir("runs/demo")
    translator.translate(["Y dijo Dios: Sea la luz."], beam_size=5)          # -> ["..."]
    translator.hypotheses(sentences, n_best=3)                               # -> [[Hypothesis, ...], ...]
    translator.hypotheses(sentences, return_attention=True)                  # Hypothesis.attention [T, S]
    weights, src_pieces, out_pieces = translator.attention(sentence, output)  # [T, S], any output
    translator.score(sentences, targets)        # -> [Score(log_prob, pieces)]: given translations
    Translator.from_workdirs(["runs/a", "runs/b"])                            # an ensemble

Ensembles (`from_workdirs`) average the members' probabilities (`decoding.ensemble_step_fn`). The
members must share their source and target tokenizers (identical sentencepiece models, or the same
synthetic vocabulary size); the first workdir's config gives the buckets and the default options.
`from_workdir(s)(..., decoding={"decode_buckets": (65,), "decode_rows": 64})` sets the call shapes
(config.eval.decode_buckets / decode_rows) instead of the workdir's.
An ensemble's attention is the mean of its members'.

Decoding is `inference.CorpusDecoder` through the decode driver (`s2s_jax.driver`), the same code
that computes dev BLEU during training: sentences are grouped into length buckets by source length
(config.eval.decode_buckets, else the training buckets), decoded config.eval.decode_rows rows per
call (each call split over this process's devices), and returned in input order. Options (`s2s_jax.options`) default to the workdir's
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
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import (BOS_ID, EOS_ID, checkpoints, cli, configuration, data, driver, export, inference, parallel,
                     plotting, scoring, sources, trained)
from s2s_jax.hypotheses import Hypothesis
from s2s_jax.models import Seq2Seq
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
        self.config = config
        self.params = jax.device_put(params, parallel.replicated(mesh))
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.workdir = workdir
        self.decoder = inference.CorpusDecoder.from_config(model, src_tokenizer, tgt_tokenizer, config.eval,
                                                           config.data, mesh)
        self.model = self.decoder.model  # in config.eval.decode_dtype: decoding, scoring, attention, export
        self.boundaries = self.decoder.boundaries
        self.max_source_len = self.decoder.max_source_len
        self.steps: tuple[int, ...] = ()  # the checkpoint step of each member (from_workdir(s))

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_workdir(cls, workdir: str, step: int = 0, decoding: dict | None = None) -> Translator:
        """Loads config.json, the tokenizers and the best checkpoint (by the workdir's
        eval.best_metric; else the latest) of a workdir, or checkpoint `step`. decoding: call shapes
        instead of the workdir's (configuration.DECODING_KEYS, e.g. {"decode_buckets": (65,)}).

        Raises configuration.ConfigError if `workdir` has no config.json, data.DataError for a
        missing tokenizer and checkpoints.CheckpointError if it holds no checkpoint.
        """
        loaded = trained.load(workdir, step)
        logger.info("loaded %s step %s", workdir, loaded.step)
        translator = cls(configuration.with_decoding(loaded.config, decoding), loaded.model, loaded.params,
                         loaded.src_tokenizer, loaded.tgt_tokenizer, workdir)
        translator.steps = (loaded.step,)
        return translator

    @classmethod
    def from_workdirs(cls, workdirs: Sequence[str], decoding: dict | None = None) -> Translator:
        """An ensemble of the workdirs' models (one workdir: that model), decoded with the first
        workdir's config (and `decoding`: see from_workdir) and tokenizers. Raises ValueError unless
        all share their tokenizers."""
        if isinstance(workdirs, str) or not workdirs:
            raise ValueError(f"from_workdirs takes a non-empty list of workdirs, got {workdirs!r}")
        if not all(workdirs):
            raise ValueError(f"empty workdir (e.g. a stray comma) in {list(workdirs)}: name each workdir")
        first = cls.from_workdir(workdirs[0], decoding=decoding)
        # The members' models come in the first workdir's decode dtype, whatever their own configs say.
        same_dtype = dict(decoding or {}, decode_dtype=first.config.eval.decode_dtype)
        loaded = [first] + [cls.from_workdir(w, decoding=same_dtype) for w in workdirs[1:]]
        for other in loaded[1:]:
            if _tokenizer_key(other) != _tokenizer_key(first):
                raise ValueError(
                    f"cannot ensemble {first.workdir} (vocabularies: source {first.src_tokenizer.vocab_size}, "
                    f"target {first.tgt_tokenizer.vocab_size}) with {other.workdir} (source "
                    f"{other.src_tokenizer.vocab_size}, target {other.tgt_tokenizer.vocab_size}): the members "
                    "must share their source and target tokenizers")
        if len(loaded) == 1:
            return first
        ensemble = cls(first.config, tuple(t.model for t in loaded), tuple(t.params for t in loaded),
                       first.src_tokenizer, first.tgt_tokenizer, ",".join(workdirs))
        ensemble.steps = tuple(step for t in loaded for step in t.steps)
        return ensemble

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

    # ------------------------------------------------------------------------------ scoring
    def score(self, sentences: Sequence[str], targets: Sequence, on_long: str = "truncate",
              first_line: int = 1) -> list[scoring.Score]:
        """Per (sentence, target) pair, in input order, the model's (an ensemble's: the mean
        probability's) Score(log_prob, pieces) of the target given the sentence: the summed
        log-probability of its pieces and EOS, teacher-forced. targets: texts, or piece ids (up
        to the first EOS, e.g. `Hypothesis.ids`: a hypothesis's log_prob is then the raw score the
        search gave it). Sources follow translation's rules (data.max_len, `on_long`). ValueError
        naming the line for a target of ids outside the vocabulary or a count that differs."""
        mesh, model, params = self.decoder.mesh, self.model, self.params

        def score(batch):
            batch = parallel.shard_batch(batch, mesh)
            return scoring.score_batch(model, params, batch.src, batch.src_len, batch.tgt_in, batch.tgt_out)

        rows = self.decoder.rows_per_call()
        pairs = driver.score_pairs(score, self.src_tokenizer, self.tgt_tokenizer, sentences, targets,
                                   boundaries=self.boundaries, max_source_len=self.max_source_len, rows=rows,
                                   on_long=on_long, first_line=first_line)
        return [scoring.Score(log_prob, pieces) for log_prob, pieces in pairs]

    # ------------------------------------------------------------------------------ attention
    def attention(self, sentence: str, output: str | Sequence[int]):
        """Teacher-forced attention of the model reading `sentence` and writing `output`.

        output: target text, or target ids (up to the first EOS, e.g. `Hypothesis.ids`).
        Returns (weights float32[T, S], src_pieces [S], out_pieces [T]): row t is the attention
        while the decoder emits out_pieces[t]; both piece lists end with "</s>" (the EOS). An
        ensemble's weights are the mean of its members'.
        """
        src = self._source_with_eos(sentence)
        out = sources.target_ids(self.tgt_tokenizer, output, 0)
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
        src_pieces, out_pieces = attention_labels(self.src_tokenizer, self.tgt_tokenizer, self.max_source_len,
                                                  sentence, hypothesis)
        plotting.plot_attention(hypothesis.attention, src_pieces, out_pieces, path, title=title)


def attention_labels(src_tokenizer, tgt_tokenizer, max_source_len: int, sentence: str,
                     hypothesis: Hypothesis) -> tuple[list[str], list[str]]:
    """The labels of `hypothesis.attention` [T, S] (from hypotheses(..., return_attention=True)
    on `sentence`): the S source pieces the model read (truncated as decoded, EOS included) and the
    T output pieces (its EOS included, unless cut at the output limit)."""
    if hypothesis.attention is None:
        raise ValueError("the hypothesis has no attention: use hypotheses(..., return_attention=True)")
    src = sources.source_ids(src_tokenizer, sentence, 0, max_source_len, "truncate") + [EOS_ID]
    out = (hypothesis.ids + [EOS_ID])[:len(hypothesis.attention)]  # no EOS row if cut at the limit
    return _pieces(src_tokenizer, src), _pieces(tgt_tokenizer, out)


def _tokenizer_key(translator: Translator) -> tuple:
    """What must be equal for two models to form an ensemble: both tokenizers."""
    return tuple(tok.model_proto() if isinstance(tok, data.Tokenizer) else tok.vocab_size
                 for tok in (translator.src_tokenizer, translator.tgt_tokenizer))


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
    cli.define_compilation_cache_flag()
    flags.DEFINE_string("input", None, "Source text, one sentence per line (strict UTF-8); default stdin.")
    flags.DEFINE_string("output", None, "Where to write one translation per line (its directory is created); "
                        "default stdout.")
    flags.DEFINE_string("prefixes", None, "Optional file of target prefixes, one line per input line (empty "
                        "= none): every hypothesis starts with its line's prefix.")
    cli.define_option_flags(OPTION_FLAGS)
    cli.define_decoding_flags()
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


_END, _NOT_YET = object(), object()


def _chunks(items: Iterator, size: int, arrived: Callable[[], int] | None = None) -> Iterator[tuple[list, bool]]:
    """(the next items, whether no further item is waiting): a chunk ends after `size` items, at
    the end, or when the next item has not arrived yet. arrived(): how many items a stream has
    received so far (reading one more would wait for it); None: the items are a file's, all there."""
    taken = 0

    def waiting():
        """The next item if it can be read without waiting, else _NOT_YET (or _END at the end)."""
        nonlocal taken
        if arrived is not None and arrived() <= taken:
            return _NOT_YET
        item = next(items, _END)
        taken += item is not _END
        return item

    ahead = _NOT_YET
    while True:
        if ahead is _NOT_YET:  # wait for the next line
            ahead = next(items, _END)
            taken += ahead is not _END
        if ahead is _END:
            return
        chunk, ahead = [ahead], waiting()
        while len(chunk) < size and ahead is not _END and ahead is not _NOT_YET:
            chunk.append(ahead)
            ahead = waiting()
        yield chunk, ahead is _END or ahead is _NOT_YET


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
                      attention_dir: str | None, progress: TextIO, arrived: Callable[[], int] | None = None) -> None:
    """Translates (line, prefix) pairs CHUNK_LINES at a time, or fewer when no further line is
    waiting (`_chunks`; arrived: for a stream), writing each chunk's outputs in input order before
    reading the next, and a progress line after each chunk when more lines wait, or when one was
    printed before."""
    start, done, printed = time.monotonic(), 0, False
    for chunk, last in _chunks(pairs, CHUNK_LINES, arrived):
        _translate_chunk(translator, chunk, done + 1, out, options, attention_dir)
        done += len(chunk)
        if printed or not last:
            rate = done / max(time.monotonic() - start, 1e-9)
            print(f"translate: {done} lines done, {rate:.1f} sentences/s", file=progress, flush=True)
            printed = True


class _Arrivals:
    """A stream (a pipe, a terminal) relayed by a thread into a pipe of its own, counting the lines
    that have arrived, so that the reader knows whether one more can be read without waiting:
    `path` reads the relayed stream, `lines` counts its complete lines (and a last one without
    "\\n" once the stream ends), `error` is a read error that ended the stream early."""

    def __init__(self, path: str):
        source = os.open(path, os.O_RDONLY)
        read_end, write_end = os.pipe()
        self.path, self.lines, self.error = f"/dev/fd/{read_end}", 0, None
        threading.Thread(target=self._relay, args=(source, write_end), daemon=True).start()

    def _relay(self, source: int, write_end: int) -> None:
        whole = True  # the stream so far ends with a complete line
        with open(write_end, "wb") as sink:
            try:
                while block := os.read(source, 1 << 16):
                    sink.write(block)
                    sink.flush()  # the bytes are in the pipe before they are counted
                    self.lines += block.count(b"\n")
                    whole = block.endswith(b"\n")
            except OSError as error:
                self.error = error
            self.lines += not whole


def _is_stream(path: str) -> bool:
    """Whether `path` is a pipe, a terminal or another stream rather than a regular file."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # missing: the reader names it
        return False


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
    """The command's work: checks the output places, loads the model, translates the input (a
    file: in chunks of CHUNK_LINES lines; a stream: each line as soon as no further line waits)."""
    if f.output:
        _make_parent(f.output)
    if f.attention_dir:
        _check_attention_dir(f.attention_dir)
    path = f.input or "/dev/stdin"
    with _output(f.output) as out:  # opened before loading: an unwritable --output fails at once
        stream = _Arrivals(path) if _is_stream(path) else None
        pairs = None if stream else _sources(path, f.prefixes)  # a file is opened now, to fail early
        translator = Translator.from_workdirs(f.workdir.split(","), cli.decoding_values(f))
        options = cli.option_values(f, OPTION_FLAGS)
        translator.options(**options)  # bad options fail before any output, even on empty input
        if stream:  # read once the model is there: its first line may be typed only now
            pairs = _sources(stream.path, f.prefixes)
        _translate_stream(translator, pairs, out, options, f.attention_dir, sys.stderr,
                          stream and (lambda: stream.lines))
        if stream and stream.error:
            raise OSError(stream.error.errno, stream.error.strerror, path)


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
