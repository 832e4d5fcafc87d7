"""Batches by sentences against batches by tokens (data.max_tokens): padding and throughput.

For a config and a corpus (the bundled Bible corpus, or bench/data_scale.py's generated one with
--pairs pairs), prints, for data.batch_size sentences per batch and for data.max_tokens:
- the epoch plan (exact, from `data.TrainBatches`): batch shapes, batches per epoch, real target
  tokens per batch (mean, min, max over the epoch's batches), and the share of padded target
  positions (PAD in tgt_out over rows x bucket length) and of padded source positions;
- real target tokens/s of train.py itself over --steps steps (the mean of its progress rows after
  the first, which exclude compilation), run --repeats times alternately.
`--max_tokens=auto` takes batch_size x the mean bucket length of the sentence plan's batches: the
same padded positions per step on average, so both runs see about as many tokens per update.

  python bench/token_batches.py [--config=demo] [--corpus=bundled|data_scale] [--pairs=50000]
                                [--max_tokens=auto] [--steps=200 (0: plans only)] [--repeats=1] [--out=/tmp/token_batches]
                                [--boundaries=8,12,16,24,32,48,65]
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from s2s_jax import data  # noqa: E402


def corpus_flags(args) -> list[str]:
    """train.py flags of the corpus: none for the bundled one; data_scale's generated corpus else."""
    if args.corpus == "bundled":
        return []
    import data_scale
    folder = data_scale.ensure_corpus(args.out, args.pairs, 30_000, 0)
    return [f"--config.data.train_prefix={folder}/train", f"--config.data.dev_prefix={folder}/dev",
            "--config.data.src_lang=src", "--config.data.tgt_lang=tgt"]


def load_config(args, flags: list[str]):
    """The config module's config with the corpus flags applied."""
    config = importlib.import_module(f"configs.{args.config}").get_config()
    for flag in flags:
        key, value = flag.removeprefix("--config.").split("=", 1)
        group, name = key.split(".")
        config[group][name] = tuple(int(b) for b in value.strip("(,)").split(",")) if name == "bucket_boundaries" else value
    return config


def plan_figures(batches: data.TrainBatches) -> dict:
    """Padding and tokens per batch over epoch 0 of a plan."""
    real, src_real, positions, rows = [], 0, 0, 0
    for number in range(batches.batches_per_epoch):
        batch = batches.batch(number)
        real.append(int((batch.tgt_out != data.PAD_ID).sum()))  # target pieces + EOS
        src_real += int(batch.src_len.sum())
        positions += batch.tgt_out.size
        rows += len(batch.tgt_out)
    return dict(shapes=batches.shapes, batches_per_epoch=batches.batches_per_epoch,
                target_tokens_per_batch=[round(float(np.mean(real)), 1), min(real), max(real)],
                padded_target_share=round(1 - sum(real) / positions, 4),
                padded_source_share=round(1 - src_real / positions, 4), mean_bucket_length=positions / rows)


def train_tokens_per_s(flags: list[str], args, workdir: str) -> float:
    """Mean tokens/s of train.py's progress rows after the first, over --steps steps."""
    subprocess.run(["rm", "-rf", workdir], check=True)
    log_every = max(args.steps // 5, 1)
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/{args.config}.py",
               f"--workdir={workdir}", *flags, f"--config.num_train_steps={args.steps}",
               f"--config.log_every_steps={log_every}", f"--config.eval_every_steps={args.steps}",
               f"--config.checkpoint_every_steps={args.steps}", "--config.data.max_dev_pairs=16",
               "--config.eval.max_decode_len=16", "--config.optimizer.decay=constant"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"token_batches: {' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rates = [row["tokens_per_s"] for row in map(json.loads, f) if "tokens_per_s" in row]
    return float(np.mean(rates[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--corpus", default="bundled", choices=("bundled", "data_scale"))
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--max_tokens", default="auto")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="/tmp/token_batches")
    parser.add_argument("--boundaries", default="", help="other data.bucket_boundaries, e.g. 8,12,16,24,32,48,65")
    args = parser.parse_args()
    flags = corpus_flags(args) + ([f"--config.data.bucket_boundaries=({args.boundaries},)"] if args.boundaries else [])
    config = load_config(args, flags)
    corpus = data.load_corpus(config.data, os.path.join(args.out, f"plan_{args.config}_{args.corpus}"))

    def plan(max_tokens: int) -> data.TrainBatches:
        return data.TrainBatches(corpus.train_src, corpus.train_tgt, batch_size=config.data.batch_size,
                                 boundaries=config.data.bucket_boundaries, seed=config.seed, max_tokens=max_tokens)

    before = plan_figures(plan(0))
    max_tokens = (round(config.data.batch_size * before["mean_bucket_length"]) if args.max_tokens == "auto"
                  else int(args.max_tokens))
    after = plan_figures(plan(max_tokens))
    settings = {f"batch_size={config.data.batch_size}": (before, []),
                f"max_tokens={max_tokens}": (after, [f"--config.data.max_tokens={max_tokens}"])}
    rates = {name: [] for name in settings}
    for repeat in range(args.repeats if args.steps else 0):  # --steps=0: the plans only
        for name, (_, extra) in settings.items():
            started = time.time()
            rates[name].append(train_tokens_per_s(flags + extra, args, os.path.join(args.out, "run")))
            print(f"{name} run {repeat + 1}: {rates[name][-1]:,.0f} tokens/s ({time.time() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    print(f"{args.config} config, {args.corpus} corpus ({len(corpus.train_tgt):,} training pairs), {args.steps} steps")
    for name, (figures, _) in settings.items():
        print(json.dumps(dict(setting=name, **figures, real_target_tokens_per_s=[round(r) for r in rates[name]])))


if __name__ == "__main__":
    main()
