"""What batch invariance and returned attention cost: `CorpusDecoder` on a trained workdir's dev
sources with its fixed rows per call (inference.ROWS_PER_CALL) against larger calls, and with
`return_attention` on and off. Each variant is compiled first, then timed over `--repeats` runs.

    python bench/decode_invariance.py --workdir=runs/demo --input=data/bible-es-en/dev.es --json=out.json
"""
import argparse
import json
import time

from s2s_jax import data, inference
from s2s_jax.translate import Translator


def timed(translator, sentences, repeats: int, **options) -> float:
    translator.hypotheses(sentences, **options)  # compiles
    started = time.perf_counter()
    for _ in range(repeats):
        translator.hypotheses(sentences, **options)
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    translator = Translator.from_workdir(args.workdir)
    sentences = data.read_lines(args.input)[:args.sentences]
    rows, invariant_rows = [], inference.ROWS_PER_CALL
    for search in ("greedy", "beam"):
        for decode_rows in (invariant_rows, 128):
            inference.ROWS_PER_CALL = decode_rows
            for attention in (False, True):
                seconds = timed(translator, sentences, args.repeats, search=search, return_attention=attention)
                rows.append(dict(search=search, rows=decode_rows, attention=attention, seconds=seconds,
                                 sentences_per_s=len(sentences) / seconds))
                print(f"{search:6s} rows {decode_rows:4d} attention {attention!s:5s} "
                      f"{seconds:7.2f} s  {len(sentences) / seconds:7.1f} sentences/s", flush=True)
        inference.ROWS_PER_CALL = invariant_rows
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
