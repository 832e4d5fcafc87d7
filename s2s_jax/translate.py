"""Translate text with a trained workdir: a Python API (`Translator`) and a command line.

    python -m s2s_jax.translate --workdir=runs/demo --input=data/bible-es-en/test.es --output=hyp.en

Python:
    translator = Translator.from_workdir("runs/demo")
    translator.translate(["Y dijo Dios: Sea la luz."], beam_size=5)          # -> ["..."]
    weights, src_pieces, out_pieces = translator.attention(sentence, output)  # [T, S]

Sentences are tokenized, grouped into the config's length buckets (`data.eval_batches`, so jit
compiles one shape per bucket and batch size), decoded with `inference.decode_batch`, and returned
in input order. A source may hold at most `config.data.max_len` pieces (plus EOS): the model was
trained on nothing longer, and the bucket boundaries end there. Longer sources are truncated with a
warning (on_long="truncate") or rejected (on_long="error").
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import BOS_ID, EOS_ID, checkpoints, configuration, data, inference, plotting, training
from s2s_jax.models import Seq2Seq, make_model

logger = logging.getLogger(__name__)

SEARCHES = ("beam", "greedy")
ON_LONG = ("truncate", "error")


class Hypothesis(NamedTuple):
    """One output of the search."""
    text: str          # detokenized
    ids: list[int]     # target ids, EOS excluded
    score: float       # beam: GNMT length-penalised log-prob; greedy: summed log-prob


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_options(*, search: str = "beam", beam_size: int = 5, alpha: float = 0.6, n_best: int = 1,
                  max_len: int | None = None, batch_size: int = 64, on_long: str = "truncate") -> None:
    """Raises ValueError naming the first bad option (before anything is loaded or compiled)."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    for name, value in (("beam_size", beam_size), ("n_best", n_best), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_len is not None and (not _is_int(max_len) or max_len < 1):
        raise ValueError(f"max_len must be an integer >= 1 (or None for the default rule), got {max_len!r}")
    if search == "beam" and n_best > beam_size:
        raise ValueError(f"n_best must be <= beam_size, got n_best={n_best} > beam_size={beam_size}")
    if search == "greedy" and n_best != 1:
        raise ValueError(f"greedy search returns one hypothesis; got n_best={n_best}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _padded_length(length: int, boundaries: Sequence[int]) -> int:
    """The smallest bucket boundary >= length, else length rounded up to a multiple of 16."""
    bucket = data.bucket_for(length, boundaries)
    return int(boundaries[bucket]) if bucket >= 0 else -(-length // 16) * 16


@functools.partial(jax.jit, static_argnames=("model",))
def _teacher_forced(model: Seq2Seq, params, src, src_len, tgt_in):
    """src [B, S], src_len [B], tgt_in [B, T] -> (log_probs [B, T, V], attention [B, T, S])."""
    out = model.apply({"params": params}, src, src_len, tgt_in, fast_path_only=True)
    return jax.nn.log_softmax(out["logits"]), out["attention"]


class Translator:
    """A trained model with its tokenizers, ready to translate."""

    def __init__(self, config, model: Seq2Seq, params, src_tokenizer, tgt_tokenizer, workdir: str | None = None):
        self.config, self.model, self.params = config, model, params
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.workdir = workdir
        self.boundaries = [int(b) for b in config.data.bucket_boundaries]
        # Longest source in pieces (EOS excluded): what the model was trained on; fits the last bucket.
        self.max_source_len = int(config.data.max_len)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_workdir(cls, workdir: str) -> Translator:
        """Loads config.json, the tokenizers and the best checkpoint (else the latest) of a workdir.

        Raises configuration.ConfigError if `workdir` has no config.json, data.DataError for a
        missing tokenizer and checkpoints.CheckpointError if it holds no checkpoint.
        """
        config = configuration.load(workdir)
        if not any(_has_steps(os.path.join(workdir, d)) for d in ("best", "checkpoints")):
            # Checked before opening the store, which would create empty directories.
            raise checkpoints.CheckpointError(
                f"no checkpoint in workdir {workdir} (looked in best/ and checkpoints/): "
                "train a model there first")
        if config.data.task == "files":
            src_tok, tgt_tok = (data.Tokenizer.load(os.path.join(workdir, "tokenizers", f"{side}.model"))
                                for side in ("src", "tgt"))
        else:
            src_tok = tgt_tok = data.IdTokenizer(config.data.synthetic_vocab_size)
        model = make_model(config.model, src_tok.vocab_size, tgt_tok.vocab_size)
        # The train-state layout is what checkpoints hold; shapes only, nothing is initialised.
        target = jax.eval_shape(lambda: training.init_state(config, model))
        store = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
        try:
            state, meta = store.restore_best_or_latest(target)
        finally:
            store.close()
        logger.info("loaded %s step %s", workdir, meta.get("step"))
        return cls(config, model, state.params, src_tok, tgt_tok, workdir)

    # ------------------------------------------------------------------------------ translation
    def translate(self, sentences: Sequence[str], *, search: str = "beam", beam_size: int = 5,
                  alpha: float = 0.6, n_best: int = 1, max_len: int | None = None, batch_size: int = 64,
                  on_long: str = "truncate") -> list[str] | list[list[str]]:
        """Translations in input order: a string per sentence, or with n_best > 1 a list of up to
        n_best strings, best first. An empty (or whitespace-only) sentence gives "" (or [""]).

        max_len: output limit in pieces, EOS included; None = inference.max_decode_len of the
        source bucket, capped at config.eval.max_decode_len.
        """
        results = self.hypotheses(sentences, search=search, beam_size=beam_size, alpha=alpha, n_best=n_best,
                                  max_len=max_len, batch_size=batch_size, on_long=on_long)
        if n_best == 1:
            return [hyps[0].text for hyps in results]
        return [[h.text for h in hyps] for hyps in results]

    def hypotheses(self, sentences: Sequence[str], *, search: str = "beam", beam_size: int = 5,
                   alpha: float = 0.6, n_best: int = 1, max_len: int | None = None, batch_size: int = 64,
                   on_long: str = "truncate") -> list[list[Hypothesis]]:
        """Like `translate`, with ids and scores: per sentence a list of Hypothesis, best first."""
        check_options(search=search, beam_size=beam_size, alpha=alpha, n_best=n_best, max_len=max_len,
                      batch_size=batch_size, on_long=on_long)
        if isinstance(sentences, str):
            raise TypeError("translate takes a list of sentences, not one string")
        sentences = list(sentences)
        src_ids = [self._source_ids(s, i, on_long) for i, s in enumerate(sentences)]
        todo = [i for i, ids in enumerate(src_ids) if ids]  # empty lines are not decoded
        results: list[list[Hypothesis]] = [[Hypothesis("", [], 0.0)] for _ in sentences]
        if not todo:
            return results
        if search == "greedy":  # one static signature for greedy, whatever the beam options say
            beam_size, alpha, n_best_arg = 1, 0.0, None
        else:
            alpha, n_best_arg = float(alpha), n_best
        rows = min(batch_size, _pow2_at_least(len(todo)))
        batches = data.eval_batches([src_ids[i] for i in todo], [[] for _ in todo], batch_size=rows,
                                    boundaries=self.boundaries)
        for batch in batches:
            real = int(np.sum(batch.index >= 0))
            keep = _pow2_at_least(real)  # drop most filler rows; powers of two bound the jit shapes
            src, src_len = batch.src[:keep], batch.src_len[:keep]
            limit = max_len or inference.max_decode_len(src.shape[1], int(self.config.eval.max_decode_len))
            beams = inference.decode_batch(self.model, self.params, src, src_len, search=search,
                                           beam_size=beam_size, max_len=limit, alpha=alpha, n_best=n_best_arg)
            sequences, scores, lengths = (np.asarray(x) for x in beams)  # [b, N, L], [b, N], [b, N]
            for row in range(real):
                hyps = []
                for k in range(sequences.shape[1]):
                    if lengths[row, k] == 0:  # an empty result slot (fewer distinct sequences than N)
                        continue
                    ids = [int(t) for t in sequences[row, k, :lengths[row, k]] if t != EOS_ID]
                    hyps.append(Hypothesis("", ids, float(scores[row, k])))
                texts = self.tgt_tokenizer.decode([h.ids for h in hyps])
                results[todo[batch.index[row]]] = [h._replace(text=t) for h, t in zip(hyps, texts)]
        return results

    def _source_ids(self, sentence: str, index: int, on_long: str) -> list[int]:
        """Piece ids of one sentence (EOS excluded), at most max_source_len of them."""
        if not isinstance(sentence, str):
            raise TypeError(f"sentence {index + 1} is a {type(sentence).__name__}, not a string")
        if not sentence.strip():
            return []
        try:
            ids = self.src_tokenizer.encode([sentence])[0]
        except ValueError as error:
            raise ValueError(f"line {index + 1}: cannot tokenize {_preview(sentence)}: {error}") from None
        limit = self.max_source_len
        if len(ids) > limit:
            message = (f"{len(ids)} source pieces, more than the {limit} the model was trained on "
                       f"(data.max_len)")
            if on_long == "error":
                raise ValueError(f"line {index + 1}: {message}: {_preview(sentence)}; shorten it or use "
                                 "on_long='truncate'")
            logger.warning("sentence %d (line %d): %s; truncated to the first %d", index, index + 1, message, limit)
            ids = ids[:limit]
        return ids

    # ------------------------------------------------------------------------------ attention
    def attention(self, sentence: str, output: str | Sequence[int]):
        """Teacher-forced attention of the model reading `sentence` and writing `output`.

        output: target text, or target ids (up to the first EOS, e.g. `Hypothesis.ids`).
        Returns (weights float32[T, S], src_pieces [S], out_pieces [T]): row t is the attention
        while the decoder emits out_pieces[t]; both piece lists end with "</s>" (the EOS).
        """
        src = self._source_ids(sentence, 0, "truncate") + [EOS_ID]
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
        s_pad, t_pad = _padded_length(len(src), self.boundaries), _padded_length(len(tgt_in), self.boundaries)
        src_arr = np.zeros((1, s_pad), np.int32)
        src_arr[0, :len(src)] = src
        tgt_arr = np.zeros((1, t_pad), np.int32)
        tgt_arr[0, :len(tgt_in)] = tgt_in
        _, weights = _teacher_forced(self.model, self.params, jnp.asarray(src_arr),
                                     jnp.asarray([len(src)], jnp.int32), jnp.asarray(tgt_arr))
        weights = np.asarray(weights[0, :len(tgt_in), :len(src)], np.float32)  # [T, S]
        return weights, _pieces(self.src_tokenizer, src), _pieces(self.tgt_tokenizer, out + [EOS_ID])

    def plot_attention(self, sentence: str, output: str | Sequence[int], path: str, title: str | None = None) -> None:
        """Writes the attention heat map of (sentence, output) to `path` (e.g. a .png)."""
        weights, src_pieces, out_pieces = self.attention(sentence, output)
        plotting.plot_attention(weights, src_pieces, out_pieces, path, title=title)


def _has_steps(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _preview(sentence: str, width: int = 60) -> str:
    return repr(sentence if len(sentence) <= width else sentence[:width] + "...")


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable token strings for plot labels."""
    if isinstance(tokenizer, data.Tokenizer):
        return [tokenizer.sp.id_to_piece(int(i)) for i in ids]
    return ["</s>" if i == EOS_ID else str(i) for i in ids]


# ---------------------------------------------------------------------------------- command line
def _define_flags() -> None:
    """Flags are defined only when run as a program, so importing this module defines none."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizers/, checkpoints).", required=True)
    flags.DEFINE_string("input", None, "Source text, one sentence per line (strict UTF-8); default stdin.")
    flags.DEFINE_string("output", None, "Where to write one translation per line; default stdout.")
    flags.DEFINE_enum("search", "beam", list(SEARCHES), "Decoding: beam or greedy.")
    flags.DEFINE_integer("beam_size", 5, "Beam size (beam search).")
    flags.DEFINE_float("alpha", 0.6, "GNMT length-penalty exponent (beam search; 0 = raw log-prob).")
    flags.DEFINE_integer("n_best", 1, "Hypotheses per sentence; > 1 writes them tab-separated, best first.")
    flags.DEFINE_integer("max_len", 0, "Output limit in pieces incl. EOS; 0 = min(eval.max_decode_len, "
                         "2 * source bucket length + 10).")
    flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.")
    flags.DEFINE_enum("on_long", "truncate", list(ON_LONG),
                      "A source longer than data.max_len pieces: truncate (with a warning) or error.")
    flags.DEFINE_string("attention_dir", None, "Write one attention heat map per sentence here, "
                        "{line:05d}.png (best hypothesis; none for empty lines).")


def main(argv) -> None:
    from absl import flags
    from absl import logging as absl_logging
    if len(argv) > 1:
        raise SystemExit(f"translate: unexpected arguments {argv[1:]}; use --input=FILE")
    f = flags.FLAGS
    if not f["verbosity"].present:  # keep stderr to warnings and errors (orbax logs a lot at INFO)
        absl_logging.set_verbosity(absl_logging.WARNING)
    options = dict(search=f.search, beam_size=f.beam_size, alpha=f.alpha, n_best=f.n_best,
                   max_len=f.max_len or None, batch_size=f.batch_size, on_long=f.on_long)
    try:
        check_options(**options)
        lines = data.read_lines(f.input if f.input else "/dev/stdin")
        translator = Translator.from_workdir(f.workdir)
        results = translator.hypotheses(lines, **options)
    except (ValueError, checkpoints.CheckpointError) as error:  # DataError, ConfigError are ValueErrors
        raise SystemExit(f"translate: {error}") from None
    text = "".join("\t".join(h.text for h in hyps[:f.n_best]) + "\n" for hyps in results)
    if f.output:
        with open(f.output, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if f.attention_dir:
        os.makedirs(f.attention_dir, exist_ok=True)
        for line, (sentence, hyps) in enumerate(zip(lines, results), start=1):
            if sentence.strip():
                translator.plot_attention(sentence, hyps[0].ids, os.path.join(f.attention_dir, f"{line:05d}.png"),
                                          title=f"line {line}")


def run() -> None:
    from absl import app
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
