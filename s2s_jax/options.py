"""Search options: one table (`OPTIONS`) that defines each option once (its name, kind, default,
help and check), and what is built from it: `SearchOptions` and its `check` here, the command-line
flags of translate and export in `s2s_jax.cli`.

Which search reads what: beam: beam_size, alpha, no_repeat_ngram_size, coverage; sample:
temperature, top_k, top_p, seed (n_best = number of samples); all: n_best, min_len, max_len_a,
max_len_b, max_len, on_long.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from s2s_jax.validate import is_int, is_number

SEARCHES = ("beam", "greedy", "sample")
ON_LONG = ("truncate", "error")
MAX_SAMPLES = 1024  # n_best of a sampling search


class Limits(NamedTuple):
    """What the model allows; some checks compare an option with these."""
    vocab_size: int      # target vocabulary
    max_output_len: int  # largest compiled output limit (inference.CorpusDecoder.max_output_len)


# check(name, value, limits): raises ValueError naming the option.
Check = Callable[[str, Any, Limits], None]


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(name, value, limits):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return check


def _integer(minimum: int, at_most_vocab: bool = False) -> Check:
    """An integer >= minimum (and at most the target vocabulary size)."""
    def check(name, value, limits):
        if not is_int(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if at_most_vocab and value > limits.vocab_size:
            raise ValueError(f"{name} must be <= the target vocabulary size {limits.vocab_size}, got {value}")
    return check


def _number(test: Callable[[float], bool], requirement: str) -> Check:
    """A finite number for which test(value) holds; `requirement` says which."""
    def check(name, value, limits):
        if not is_number(value) or not test(value):
            raise ValueError(f"{name} {requirement}, got {value!r}")
    return check


def _check_min_len(name, value, limits):
    _integer(0)(name, value, limits)
    if value > limits.max_output_len:
        raise ValueError(f"{name} must be <= {limits.max_output_len}, got {value}")


def _check_max_len(name, value, limits):
    if value is not None and (not is_int(value) or not 1 <= value <= limits.max_output_len):
        raise ValueError(f"{name} must be an integer in [1, {limits.max_output_len}] (4x the longest training "
                         f"sentence, or eval.max_decode_len), or None for the default rule; got {value!r}")


_AT_LEAST_ZERO = _number(lambda v: v >= 0, "must be a finite number in [0, inf)")


class Option(NamedTuple):
    """One search option; `help` is its flag's help."""
    name: str
    kind: type | tuple[str, ...]  # int, float, or the allowed strings
    default: Any
    help: str
    check: Check


OPTIONS = (
    Option("search", SEARCHES, "beam", "Decoding: beam, greedy or sample.", _one_of(SEARCHES)),
    Option("beam_size", int, 5, "Beam size (beam; at most the target vocabulary); default: the workdir's "
           "eval.beam_size.", _integer(1, at_most_vocab=True)),
    Option("alpha", float, 0.6, "GNMT length-penalty exponent (beam; 0 = raw log-prob); default: the "
           "workdir's eval.alpha.", _AT_LEAST_ZERO),
    Option("n_best", int, 1, "Hypotheses per sentence (sample: samples); > 1 writes them tab-separated, "
           "best first.", _integer(1)),
    Option("min_len", int, 0, "Forbid EOS before this many pieces (EOS included).", _check_min_len),
    Option("no_repeat_ngram_size", int, 0, "Beam: never repeat an n-gram of this size (0 = off).", _integer(0)),
    Option("coverage", float, 0.0, "Beam: GNMT coverage penalty beta (0 = off).", _AT_LEAST_ZERO),
    Option("temperature", float, 1.0, "Sample: softmax temperature (> 0).",
           _number(lambda v: v > 0, "must be a finite number > 0")),
    Option("top_k", int, 0, "Sample: only among the k most likely pieces (0 = all).",
           _integer(0, at_most_vocab=True)),
    Option("top_p", float, 1.0, "Sample: only among the smallest set of pieces with this much probability "
           "(nucleus; 1 = all).", _number(lambda v: 0 < v <= 1, "must lie in (0, 1]")),
    Option("seed", int, 0, "Sample: random seed.", _integer(0)),
    Option("max_len_a", float, 2.0, "Per-sentence output limit a * source pieces + b (capped by the compiled "
           "limit); default: the workdir's eval.max_len_a.", _AT_LEAST_ZERO),
    Option("max_len_b", int, 10, "See --max_len_a; default: the workdir's eval.max_len_b.", _integer(0)),
    Option("max_len", int, None, "Compiled output limit in pieces incl. EOS (at most 4x data.max_len + 4); "
           "default: min(eval.max_decode_len, 2 * source bucket length + 10).", _check_max_len),
    Option("on_long", ON_LONG, "truncate", "A source longer than data.max_len pieces: truncate (with a "
           "warning) or error.", _one_of(ON_LONG)),
)
BY_NAME = {option.name: option for option in OPTIONS}


def check_option(name: str, value, limits: Limits | None = None) -> None:
    """ValueError unless `value` is a valid value of option `name` (limits: needed by the checks
    of beam_size, top_k, min_len and max_len)."""
    BY_NAME[name].check(name, value, limits)


class SearchOptions(collections.namedtuple("SearchOptions", [o.name for o in OPTIONS],
                                           defaults=[o.default for o in OPTIONS])):
    """How to decode: one value per option of `OPTIONS` (see the module docstring)."""
    __slots__ = ()

    @classmethod
    def from_eval_config(cls, eval_cfg, search: str) -> SearchOptions:
        """The options of dev BLEU during training (config.eval) for `search`."""
        return cls(search=search, beam_size=int(eval_cfg.beam_size), alpha=float(eval_cfg.alpha),
                   max_len_a=float(eval_cfg.max_len_a), max_len_b=int(eval_cfg.max_len_b))

    def updated(self, overrides: Mapping[str, Any]) -> SearchOptions:
        """These options under `overrides` (a None override keeps the value, except for max_len,
        where None is the default rule); TypeError naming unknown options. Not checked."""
        unknown = sorted(set(overrides) - set(self._fields))
        if unknown:
            raise TypeError(f"unknown search option(s) {unknown}; expected some of {list(self._fields)}")
        return self._replace(**{k: v for k, v in overrides.items() if v is not None or k == "max_len"})

    def check(self, limits: Limits) -> None:
        """Raises ValueError naming the first bad option; sizes are capped by what the model allows."""
        for option in OPTIONS:
            option.check(option.name, getattr(self, option.name), limits)
        if self.search == "beam" and self.n_best > self.beam_size:
            raise ValueError(f"n_best must be <= beam_size, got n_best={self.n_best} > beam_size={self.beam_size}")
        if self.search == "greedy" and self.n_best != 1:
            raise ValueError(f"greedy search returns one hypothesis; got n_best={self.n_best}")
        if self.search == "sample" and self.n_best > MAX_SAMPLES:
            raise ValueError(f"n_best (samples per sentence) must be <= {MAX_SAMPLES}, got {self.n_best}")
        if self.coverage and self.search != "beam":
            raise ValueError(f"coverage (penalty {self.coverage}) applies to beam search only, "
                             f"got search={self.search!r}")

    def static(self) -> dict:
        """inference.decode_batch's static arguments; options a search does not read are
        normalised away, so they never cost a compilation."""
        beam, sample = self.search == "beam", self.search == "sample"
        return dict(search=self.search, beam_size=self.beam_size if beam else 1,
                    alpha=float(self.alpha) if beam else 0.0, n_best=self.n_best if beam or sample else None,
                    min_len=self.min_len, no_repeat_ngram_size=self.no_repeat_ngram_size if beam else 0,
                    coverage=float(self.coverage) if beam else 0.0,
                    temperature=float(self.temperature) if sample else 1.0, top_k=self.top_k if sample else 0,
                    top_p=float(self.top_p) if sample else 1.0)
