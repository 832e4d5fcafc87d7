"""What batch invariance and returned attention cost: `CorpusDecoder` on a trained workdir's dev
sources with its rows per call (config.eval.decode_rows, 32) against larger calls, and with
`return_attention` on and off. Each variant is compiled first, then timed over `--repeats` runs.

    python bench/decode_invariance.py --workdir=runs/demo --input=data/bible-es-en/dev.es --json=out.json
"""
import argparse
import json
import time

from s2s_jax import data
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
    sentences = data.read_lines(args.input)[:args.sentences]
    rows = []
    for search in ("greedy", "beam"):
        for decode_rows in (32, 128):
            translator = Translator.from_workdir(args.workdir, decoding={"decode_rows": decode_rows})
            for attention in (False, True):
                seconds = timed(translator, sentences, args.repeats, search=search, return_attention=attention)
                rows.append(dict(search=search, rows=decode_rows, attention=attention, seconds=seconds,
                                 sentences_per_s=len(sentences) / seconds))
                print(f"{search:6s} rows {decode_rows:4d} attention {attention!s:5s} "
                      f"{seconds:7.2f} s  {len(sentences) / seconds:7.1f} sentences/s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
