"""Dev evaluation during training: teacher-forced loss / perplexity, and dev BLEU + chrF of the
decoded dev sources (sacrebleu on detokenized text); the same for each eval.extra_sets entry (a
test set), at every evaluation.

Dev BLEU decodes the dev source text with the same `inference.CorpusDecoder` as
`python -m s2s_jax.translate`, with the options of `config.eval`: it depends on the sources only
and equals what translate gives for the same model, options and dev file.

The dev loss and the decoding run on the training mesh with its replicated parameters: each
process feeds its rows of each batch, and the decoded hypotheses come back to every process,
identical in all (process 0 logs the result). A dev source longer than data.max_len is truncated
with a warning at the first evaluation only.
"""
import functools
import logging
from typing import NamedTuple

import numpy as np

from s2s_jax import compiled, configuration, data, inference, metrics, parallel, sources, steps
from s2s_jax.models import Seq2Seq
from s2s_jax.options import SearchOptions

logger = logging.getLogger(__name__)


class EvalSet(NamedTuple):
    """A scored parallel set: "dev" (the first: it ranks checkpoints and drives early stopping) or
    an eval.extra_sets entry; its name prefixes its metrics (dev_loss, test_bleu, ...)."""
    name: str
    src_ids: data.IdSeqs
    tgt_ids: data.IdSeqs
    src_text: list[str]
    tgt_text: list[str]


def dev_set(corpus: data.Corpus) -> EvalSet:
    return EvalSet("dev", corpus.dev_src, corpus.dev_tgt, corpus.dev_src_text, corpus.dev_tgt_text)


def eval_sets(eval_cfg, data_cfg, corpus: data.Corpus) -> list[EvalSet]:
    """The dev set, then each eval.extra_sets entry read from its files (data.on_empty applies);
    DataError naming a missing or malformed file."""
    sets = [dev_set(corpus)]
    for name, prefix in configuration.extra_sets(eval_cfg.extra_sets):
        src, tgt, _ = data.read_parallel(f"{prefix}.{data_cfg.src_lang}", f"{prefix}.{data_cfg.tgt_lang}",
                                         on_empty=data_cfg.on_empty)
        sets.append(EvalSet(name, corpus.src_tokenizer.encode(src), corpus.tgt_tokenizer.encode(tgt), src, tgt))
    return sets


class Evaluator:
    """`evaluator(params)` -> per set S ("dev" first, then eval.extra_sets): S_loss, S_ppl, S_bleu,
    S_chrf[, S_bleu_beam, S_chrf_beam]."""

    def __init__(self, eval_cfg, data_cfg, corpus: data.Corpus, model: Seq2Seq, mesh,
                 sets: list[EvalSet] | None = None):
        """eval_cfg, data_cfg: the run's config.eval and config.data; sets: what to score (default:
        the corpus's dev set)."""
        self.eval_cfg, self.mesh = eval_cfg, mesh
        self.sets = sets or [dev_set(corpus)]
        self.loss_batches = {s.name: data.eval_batches(s.src_ids, s.tgt_ids, batch_size=eval_cfg.batch_size,
                                                       boundaries=data_cfg.bucket_boundaries) for s in self.sets}
        self.eval_step = compiled.jit(functools.partial(steps.eval_step, model=model))
        self.decoder = inference.CorpusDecoder.from_config(model, corpus.src_tokenizer, corpus.tgt_tokenizer,
                                                           eval_cfg, data_cfg, mesh)
        self.searches = ["greedy"] + (["beam"] if eval_cfg.search == "beam" else [])
        self.signature: str | None = None  # sacrebleu's, logged at the first evaluation
        # Sources longer than data.max_len: warned about once a run, per set.
        self.warned_long: dict[str, set[int]] = {s.name: set() for s in self.sets}

    def __call__(self, params) -> dict:
        result = {}
        for eval_set in self.sets:
            result.update(self._scores(params, eval_set))
        return result

    def _scores(self, params, eval_set: EvalSet) -> dict:
        """One set's loss, perplexity, BLEU and chrF, named after the set."""
        loss_sum = tokens = 0.0
        for batch in self.loss_batches[eval_set.name]:
            s, n = self.eval_step(params, parallel.shard_batch(batch, self.mesh))
            loss_sum, tokens = loss_sum + float(s), tokens + float(n)
        name = eval_set.name
        result = {f"{name}_loss": loss_sum / tokens, f"{name}_ppl": float(np.exp(loss_sum / tokens))}
        for search in self.searches:
            hyps = self.translate(params, search, eval_set)
            bleu, signature = metrics.sacrebleu_score(hyps, eval_set.tgt_text)
            suffix = "" if search == "greedy" else "_beam"
            result[f"{name}_bleu{suffix}"] = bleu
            result[f"{name}_chrf{suffix}"] = metrics.chrf_score(hyps, eval_set.tgt_text)
            if self.signature is None:
                logger.info("dev BLEU: sacrebleu %s", signature)
                self.signature = signature
        return result

    def translate(self, params, search: str, eval_set: EvalSet | None = None) -> list[str]:
        """Detokenized translations of a set's source text (default: dev), in corpus order."""
        eval_set = eval_set or self.sets[0]
        options = SearchOptions.from_eval_config(self.eval_cfg, search)
        with sources.warn_long_once(self.warned_long[eval_set.name]):
            return [hyps[0].text for hyps in self.decoder(params, eval_set.src_text, options)]
