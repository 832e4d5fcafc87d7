"""Score given translations with a trained workdir (or an ensemble): how likely the model finds
each target given its source, teacher-forced (`Translator.score`).

    python -m s2s_jax.score --workdir=runs/demo --source=test.es --target=test.hyp.en
    python -m s2s_jax.score --workdir=runs/a,runs/b --source=test.es --nbest=test.nbest.en

--source/--target: one line out per line pair, tab-separated: the summed log-probability of the
target's pieces and EOS, the number of pieces (EOS included), and the NLL per piece.
--nbest: the translate command's n-best output (`--n_best=N`: tab-separated hypotheses per source
line) reranked by this model, best first (--rank_by: the summed log-probability, or the NLL per
piece); one line out per source line, tab-separated, as translate writes them.
Errors (a line count that differs, a missing file, bad UTF-8) are one line naming the file, status 1.
"""
from __future__ import annotations

import sys

from s2s_jax import checkpoints, cli, data
from s2s_jax.translate import Translator

RANKS = ("log_prob", "nll_per_piece")


def _define_flags() -> None:
    from absl import flags
    cli.define_workdir_flag("score with")
    cli.define_compilation_cache_flag()
    flags.DEFINE_string("source", None, "Source text, one sentence per line.", required=True)
    flags.DEFINE_string("target", None, "Targets to score, one per source line.")
    flags.DEFINE_string("nbest", None, "Tab-separated hypotheses per source line (translate --n_best=N) "
                        "to rerank.")
    flags.DEFINE_enum("rank_by", "log_prob", list(RANKS), "--nbest: rank by the summed log-probability "
                      "(higher first) or the NLL per piece (lower first).")
    flags.DEFINE_string("output", None, "Where to write the output; default stdout.")
    cli.define_decoding_flags()


def _paired_lines(source: str, other: str, flag: str) -> tuple[list[str], list[str]]:
    """The lines of both files; DataError naming `other` when the counts differ."""
    sources, others = data.read_lines(source), data.read_lines(other)
    if len(sources) != len(others):
        raise data.DataError(f"{other}: {len(others)} lines, but --source={source} has {len(sources)}: "
                             f"give one {flag} line per source line")
    return sources, others


def score_lines(translator: Translator, sources: list[str], targets: list[str]) -> list[str]:
    """One output line per pair: log_prob, pieces, NLL per piece (tab-separated)."""
    return [f"{s.log_prob:.6f}\t{s.pieces}\t{s.nll_per_piece:.6f}" for s in translator.score(sources, targets)]


def rerank_lines(translator: Translator, sources: list[str], lists: list[str], rank_by: str) -> list[str]:
    """One output line per source line: its tab-separated hypotheses, best first by `rank_by`."""
    hypotheses = [line.split("\t") for line in lists]
    pairs = [(s, h) for s, hyps in zip(sources, hypotheses) for h in hyps]
    scores = iter(translator.score([s for s, _ in pairs], [h for _, h in pairs]))
    lines = []
    for hyps in hypotheses:
        scored = [(next(scores), h) for h in hyps]
        key = (lambda item: -item[0].log_prob) if rank_by == "log_prob" else (lambda item: item[0].nll_per_piece)
        lines.append("\t".join(h for _, h in sorted(scored, key=key)))  # stable: ties keep their order
    return lines


def main(argv) -> None:
    f = cli.parsed_flags("score", argv)
    if (f.target is None) == (f.nbest is None):
        raise SystemExit("score: give one of --target (score it) or --nbest (rerank it)")
    try:
        sources, others = _paired_lines(f.source, f.target or f.nbest, "--target" if f.target else "--nbest")
        translator = Translator.from_workdirs(f.workdir.split(","), cli.decoding_values(f))
        lines = (score_lines(translator, sources, others) if f.target
                 else rerank_lines(translator, sources, others, f.rank_by))
        text = "".join(line + "\n" for line in lines)
        if f.output:
            with open(f.output, "w", encoding="utf-8") as out:
                out.write(text)
        else:
            sys.stdout.write(text)
    except (ValueError, checkpoints.CheckpointError) as error:  # DataError, ConfigError are ValueErrors
        raise SystemExit(f"score: {error}") from None
    except OSError as error:
        raise SystemExit(f"score: {error.filename or f.output}: {error.strerror or error}") from None


def run() -> None:
    from absl import app
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
