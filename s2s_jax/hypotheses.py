"""Search results as text: `Hypothesis`, and `unpack`, which turns one sentence's arrays from a
decoding call into its hypotheses."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from s2s_jax import EOS_ID


class Hypothesis(NamedTuple):
    """One output of the search."""
    text: str          # detokenized
    ids: list[int]     # target ids, EOS excluded
    score: float       # beam: GNMT length-penalised log-prob (+ coverage penalty); greedy, sample: summed log-prob
    # With return_attention: float32[T, S], row t the weights over the S source pieces (EOS included)
    # while emitting piece t; T = len(ids) + 1 (the EOS step), or len(ids) if cut at the output limit.
    attention: np.ndarray | None = None


BLANK = Hypothesis("", [], 0.0)  # the one result of a blank sentence (it is not decoded)


def unpack(tokenizer, sequences: np.ndarray, scores: np.ndarray, lengths: np.ndarray,
           attention: np.ndarray | None = None) -> list[Hypothesis]:
    """One sentence's search result slots [N, L], [N], [N] (and attention [N, L, S] or None) ->
    detokenized hypotheses; empty slots (length 0) are dropped."""
    hyps = [Hypothesis("", [int(t) for t in sequences[k, :lengths[k]] if t != EOS_ID], float(scores[k]),
                       None if attention is None else attention[k, :lengths[k]])
            for k in range(len(lengths)) if lengths[k] > 0]
    texts = tokenizer.decode([h.ids for h in hyps])
    return [h._replace(text=t) for h, t in zip(hyps, texts)]
