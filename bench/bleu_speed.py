"""Time s2s_jax.metrics.corpus_bleu against sacrebleu.corpus_bleu(tokenize="none") on token ids.

    python bench/bleu_speed.py [--n 100000] [--repeats 1]

Writes bench/results/bleu_speed.json next to this file.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import sacrebleu

from s2s_jax.metrics import corpus_bleu


def synthetic_corpus(n: int, vocab: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """References of 5..50 ids; hypotheses are noisy copies (substitute, delete, insert)."""
    rng = np.random.default_rng(seed)
    refs, hyps = [], []
    for length in rng.integers(5, 51, size=n):
        ref = rng.integers(4, vocab, size=length)
        hyp = np.where(rng.random(length) < 0.2, rng.integers(4, vocab, size=length), ref)
        hyp = hyp[rng.random(length) >= 0.05]
        n_ins = rng.binomial(len(hyp), 0.05)
        where = rng.integers(0, len(hyp) + 1, size=n_ins)
        hyp = np.insert(hyp, where, rng.integers(4, vocab, size=n_ins))
        refs.append(ref.tolist())
        hyps.append(hyp.tolist())
    return hyps, refs


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Fastest wall time of `repeats` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="sentence pairs")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    hyps, refs = synthetic_corpus(args.n, args.vocab, args.seed)
    ours_s, ours = best_time(lambda: corpus_bleu(hyps, [refs]), args.repeats)
    # sacrebleu needs strings: time the joining separately from its scoring.
    join_s, (hyp_texts, ref_texts) = best_time(
        lambda: ([" ".join(map(str, h)) for h in hyps], [" ".join(map(str, r)) for r in refs]),
        args.repeats,
    )
    score_s, sacre = best_time(
        lambda: sacrebleu.corpus_bleu(hyp_texts, [ref_texts], tokenize="none"), args.repeats
    )
    sacre_s = join_s + score_s
    agree = abs(ours.score - sacre.score) < 1e-6

    result = {
        "n_sentences": args.n,
        "vocab": args.vocab,
        "seed": args.seed,
        "repeats": args.repeats,
        "tokens_hyp": sum(map(len, hyps)),
        "tokens_ref": sum(map(len, refs)),
        "ours_s": ours_s,
        "sacrebleu_s": sacre_s,
        "sacrebleu_join_s": join_s,
        "sacrebleu_score_s": score_s,
        "speedup": sacre_s / ours_s,
        "ours_bleu": ours.score,
        "sacrebleu_bleu": sacre.score,
        "scores_agree": agree,
        "sacrebleu_version": sacrebleu.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"{args.n} sentence pairs, vocab {args.vocab}, best of {args.repeats}")
    header = f"{'ours s':>8} {'sacrebleu s (join + score)':>26} {'speedup':>8}"
    print(f"{header}  BLEU (ours / sacrebleu)")
    print(f"{ours_s:8.3f} {sacre_s:10.3f} ({join_s:.3f} + {score_s:.3f}) {sacre_s / ours_s:7.1f}x  "
          f"{ours.score:.6f} / {sacre.score:.6f} {'agree' if agree else 'DIFFER'}")

    out = Path(__file__).parent / "results" / "bleu_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
