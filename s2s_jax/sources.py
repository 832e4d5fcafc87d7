"""The input side of translation and scoring: sentences, forced prefixes and given targets checked
and turned into piece ids.
Sources longer than the model was trained on are truncated with a warning (once per sentence
inside `warn_long_once`) or refused, naming their line."""
from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterable, Sequence

from s2s_jax import EOS_ID

logger = logging.getLogger(__name__)

# The indices of the long sentences warned about already, inside warn_long_once; None outside.
_WARNED_LONG: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("warned_long", default=None)


def sentence_list(sentences) -> list[str]:
    """`sentences` as a list, or TypeError saying that a list of strings is expected."""
    if isinstance(sentences, str) or not isinstance(sentences, Iterable):
        raise TypeError(f"sentences must be a list of strings, got {type(sentences).__name__}"
                        f"{' (one sentence: pass a list of sentences)' if isinstance(sentences, str) else ''}")
    sentences = list(sentences)
    for number, sentence in enumerate(sentences, start=1):
        if not isinstance(sentence, str):
            raise TypeError(f"sentences must be a list of strings, but sentence {number} is a "
                            f"{type(sentence).__name__}")
    return sentences


@contextlib.contextmanager
def warn_long_once(warned: set[int]):
    """Inside, source_ids warns about a long sentence only if its index is not in `warned` (and
    adds it): a caller decoding the same sentences again and again keeps one set for all."""
    token = _WARNED_LONG.set(warned)
    try:
        yield
    finally:
        _WARNED_LONG.reset(token)


def source_ids(tokenizer, sentence: str, index: int, max_len: int, on_long: str) -> list[int]:
    """Piece ids of sentence number `index` (0-based; EOS excluded) for translation, at most
    `max_len` of them; [] for a blank sentence. A longer source is cut with a warning
    (on_long="truncate"; see warn_long_once) or refused with a ValueError naming its line
    (on_long="error")."""
    if not isinstance(sentence, str):
        raise TypeError(f"sentence {index + 1} is a {type(sentence).__name__}, not a string")
    if not sentence.strip():
        return []
    shown = repr(sentence if len(sentence) <= 60 else sentence[:60] + "...")
    try:
        ids = tokenizer.encode([sentence])[0]
    except ValueError as error:
        raise ValueError(f"line {index + 1}: cannot tokenize {shown}: {error}") from None
    if len(ids) > max_len:
        message = f"{len(ids)} source pieces, more than the {max_len} the model was trained on (data.max_len)"
        if on_long == "error":
            raise ValueError(f"line {index + 1}: {message}: {shown}; shorten it or use on_long='truncate'")
        warned = _WARNED_LONG.get()
        if warned is None or index not in warned:
            logger.warning("sentence %d (line %d): %s; truncated to the first %d", index, index + 1, message, max_len)
        if warned is not None:
            warned.add(index)
        ids = ids[:max_len]
    return ids


def prefix_ids(tokenizer, prefixes: Sequence[str | None] | None, count: int) -> list[list[int]]:
    """Target piece ids of each of `count` sentences' forced prefix ([] for none)."""
    if prefixes is None:
        return [[] for _ in range(count)]
    if isinstance(prefixes, str) or len(prefixes) != count:
        raise ValueError(f"prefixes must be a list with one entry (text or None) per sentence: "
                         f"{count} sentences")
    ids = []
    for index, prefix in enumerate(prefixes):
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix {index + 1} is a {type(prefix).__name__}, not a string or None")
        ids.append(tokenizer.encode([prefix])[0] if prefix and prefix.strip() else [])
    return ids


def target_ids(tokenizer, target: str | Sequence[int], index: int) -> list[int]:
    """Piece ids of target number `index` (0-based; EOS excluded): a text (blank: []), or ids up to
    the first EOS (e.g. `Hypothesis.ids`); ValueError naming its line for ids outside the vocabulary."""
    if isinstance(target, str):
        return tokenizer.encode([target])[0] if target.strip() else []
    ids = []
    for t in target:
        if int(t) == EOS_ID:
            break
        ids.append(int(t))
    bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"line {index + 1}: target ids {bad} outside the target vocabulary [0, {tokenizer.vocab_size})")
    return ids
