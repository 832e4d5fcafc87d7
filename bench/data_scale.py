"""Training memory against corpus size: a generated corpus of N pairs, a short training run, peak RSS.

For each size in --pairs, writes a corpus of random Zipfian "words" (source and target drawn from
two vocabularies of --words types, lengths 5-40 words, the target a noisy function of the source so
the model has something to learn) under --out, then runs `train.py --config=configs/default.py`
for --steps steps on it in a child process and reports that child's peak resident memory
(preparation included: reading, sentencepiece training, tokenization), the preparation seconds
(from the start of the child to train.py's `data:` line), the rate of the tokenization into
workdir/corpus/ (its last progress line) and the training tokens/s of its last progress line
(every 10 steps).
Generated corpora are reused when present (generation is deterministic in --seed); nothing here is
committed.

  python bench/data_scale.py [--pairs 1000000,2000000] [--steps 50] [--out /tmp/data_scale]
                             [--json bench/results/data_scale.json]

Issue 9's goal: the 2M-pair run peaks at no more than 1.1x the resident memory of the 1M-pair run.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py's log: the line after the corpus is read and tokenized, and a progress line.
PREPARED = re.compile(r" data: \{'train_pairs_read'")
PROGRESS = re.compile(r"step (\d+)/\d+ \| loss [\d.]+ \| ([\d,]+) tok/s")
TOKENIZED = re.compile(r"corpus: tokenized [\d,]+ pairs.*, ([\d,]+) pairs/s")
LOG_EVERY = 10


def zipf_words(rng: np.random.Generator, types: int, count: int) -> np.ndarray:
    """`count` word ids in [0, types) with Zipf-like frequencies (rank r has weight 1 / (r + 2.7))."""
    weights = 1.0 / (np.arange(types) + 2.7)
    return rng.choice(types, size=count, p=weights / weights.sum())


def write_corpus(prefix: str, pairs: int, words: int, seed: int) -> None:
    """{prefix}.src / {prefix}.tgt: `pairs` lines each; the target maps each source word through a
    fixed permutation of the vocabulary, drops ~10% of words and reverses every third sentence."""
    rng = np.random.default_rng(seed)
    mapping = rng.permutation(words)
    src_names = [f"s{w}" for w in range(words)]
    tgt_names = [f"t{w}" for w in range(words)]
    chunk = 100_000
    with open(f"{prefix}.src", "w", encoding="utf-8") as src_file, \
            open(f"{prefix}.tgt", "w", encoding="utf-8") as tgt_file:
        for start in range(0, pairs, chunk):
            rows = min(chunk, pairs - start)
            lengths = rng.integers(5, 41, size=rows)
            ids = zipf_words(rng, words, int(lengths.sum()))
            keep = rng.random(ids.shape[0]) > 0.1
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for row in range(rows):
                sentence = ids[offsets[row]:offsets[row + 1]]
                target = mapping[sentence[keep[offsets[row]:offsets[row + 1]]]]
                if (start + row) % 3 == 0:
                    target = target[::-1]
                src_file.write(" ".join(src_names[w] for w in sentence) + "\n")
                tgt_file.write(" ".join(tgt_names[w] for w in target) + "\n")


def ensure_corpus(out: str, pairs: int, words: int, seed: int) -> str:
    """The train/dev prefix directory for `pairs` pairs, generated once."""
    directory = os.path.join(out, f"pairs{pairs}")
    done = os.path.join(directory, "DONE")
    if not os.path.exists(done):
        os.makedirs(directory, exist_ok=True)
        started = time.perf_counter()
        write_corpus(os.path.join(directory, "train"), pairs, words, seed)
        write_corpus(os.path.join(directory, "dev"), 500, words, seed + 1)
        print(f"generated {pairs:,} pairs in {time.perf_counter() - started:.0f} s -> {directory}",
              file=sys.stderr, flush=True)
        open(done, "w").close()
    return directory


def run_training(corpus: str, workdir: str, steps: int) -> dict:
    """Trains configs/default.py for `steps` steps on `corpus` in a child; its peak RSS and timings."""
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/default.py",
               f"--workdir={workdir}", f"--config.data.train_prefix={corpus}/train",
               f"--config.data.dev_prefix={corpus}/dev", "--config.data.src_lang=src",
               "--config.data.tgt_lang=tgt", f"--config.num_train_steps={steps}",
               f"--config.log_every_steps={LOG_EVERY}", f"--config.eval_every_steps={steps}",
               f"--config.checkpoint_every_steps={steps}", "--config.eval.max_decode_len=16"]
    shutil.rmtree(workdir, ignore_errors=True)  # a finished workdir would not train again
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    prepare_s, tokens_per_s, tokenize_rate, log = None, None, None, []
    for line in child.stdout:
        log.append(line)
        if prepare_s is None and PREPARED.search(line):
            prepare_s = time.perf_counter() - started
        match = PROGRESS.search(line)
        if match:
            tokens_per_s = float(match.group(2).replace(",", ""))
        match = TOKENIZED.search(line)
        if match:  # the last one: the rate over the whole tokenization
            tokenize_rate = float(match.group(1).replace(",", ""))
    _, status, usage = os.wait4(child.pid, 0)                  # this child's own peak RSS (KiB)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"data_scale: training on {corpus} failed:\n{''.join(log[-20:])}")
    return dict(peak_rss_mb=usage.ru_maxrss / 1024, wall_s=time.perf_counter() - started,
                prepare_s=prepare_s, tokenize_pairs_per_s=tokenize_rate, tokens_per_s=tokens_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="1000000,2000000")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--words", type=int, default=30_000, help="word types per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/data_scale")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "data_scale.json"))
    args = parser.parse_args()
    rows = []
    for pairs in (int(p) for p in args.pairs.split(",")):
        corpus = ensure_corpus(args.out, pairs, args.words, args.seed)
        rows.append(dict(pairs=pairs, steps=args.steps,
                         **run_training(corpus, os.path.join(args.out, f"workdir{pairs}"), args.steps)))
    print(f"{'pairs':>10} {'peak RSS MiB':>13} {'prepare s':>10} {'tokenized pairs/s':>18} {'tokens/s':>9} "
          f"{'wall s':>7}")
    for row in rows:
        print(f"{row['pairs']:>10,} {row['peak_rss_mb']:>13,.0f} {row['prepare_s']:>10.1f} "
              f"{row['tokenize_pairs_per_s']:>18,.0f} {row['tokens_per_s']:>9,.0f} {row['wall_s']:>7.1f}")
    for row in rows[1:]:
        print(f"peak RSS {row['pairs']:,} / {rows[0]['pairs']:,} pairs: {row['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
