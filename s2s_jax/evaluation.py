"""Dev evaluation during training: teacher-forced loss / perplexity, and dev BLEU + chrF of the
decoded dev sources (sacrebleu on detokenized text).

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

import jax
import numpy as np

from s2s_jax import data, inference, metrics, parallel, sources, steps
from s2s_jax.models import Seq2Seq
from s2s_jax.options import SearchOptions

logger = logging.getLogger(__name__)


class Evaluator:
    """`evaluator(params)` -> dict(dev_loss, dev_ppl, dev_bleu, dev_chrf[, dev_bleu_beam, dev_chrf_beam])."""

    def __init__(self, eval_cfg, data_cfg, corpus: data.Corpus, model: Seq2Seq, mesh):
        """eval_cfg, data_cfg: the run's config.eval and config.data."""
        self.eval_cfg, self.corpus, self.mesh = eval_cfg, corpus, mesh
        self.loss_batches = data.eval_batches(corpus.dev_src, corpus.dev_tgt, batch_size=eval_cfg.batch_size,
                                              boundaries=data_cfg.bucket_boundaries)
        self.eval_step = jax.jit(functools.partial(steps.eval_step, model=model))
        self.decoder = inference.CorpusDecoder(model, corpus.src_tokenizer, corpus.tgt_tokenizer,
                                               boundaries=data_cfg.bucket_boundaries,
                                               max_source_len=data_cfg.max_len,
                                               max_decode_len=eval_cfg.max_decode_len, mesh=mesh)
        self.searches = ["greedy"] + (["beam"] if eval_cfg.search == "beam" else [])
        self.signature: str | None = None  # sacrebleu's, logged at the first evaluation
        self.warned_long: set[int] = set()  # dev sources longer than data.max_len: warned about once a run

    def __call__(self, params) -> dict:
        loss_sum = tokens = 0.0
        for batch in self.loss_batches:
            s, n = self.eval_step(params, parallel.shard_batch(batch, self.mesh))
            loss_sum, tokens = loss_sum + float(s), tokens + float(n)
        result = dict(dev_loss=loss_sum / tokens, dev_ppl=float(np.exp(loss_sum / tokens)))
        for search in self.searches:
            hyps = self.translate(params, search)
            bleu, signature = metrics.sacrebleu_score(hyps, self.corpus.dev_tgt_text)
            suffix = "" if search == "greedy" else "_beam"
            result[f"dev_bleu{suffix}"] = bleu
            result[f"dev_chrf{suffix}"] = metrics.chrf_score(hyps, self.corpus.dev_tgt_text)
            if self.signature is None:
                logger.info("dev BLEU: sacrebleu %s", signature)
                self.signature = signature
        return result

    def translate(self, params, search: str) -> list[str]:
        """Detokenized translations of the dev source text, in corpus order."""
        options = SearchOptions.from_eval_config(self.eval_cfg, search)
        with sources.warn_long_once(self.warned_long):
            return [hyps[0].text for hyps in self.decoder(params, self.corpus.dev_src_text, options)]
