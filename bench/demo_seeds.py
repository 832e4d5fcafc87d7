"""The demo over seeds, and what weight averaging gives: configs/demo.py trained once per seed with
a moving average of the weights kept (`--ema_decay`, default 0.999), then each run's dev set
scored greedy and beam 5 with four models of the same run:

  raw      the final step's raw parameters (what the demo, which keeps no average, gives: the
           average lives beside the parameters and never feeds back into them);
  ema      the final step's moving average (what a run with optimizer.ema_decay gives);
  avg2     the mean of the raw parameters of the last two checkpoints (python -m s2s_jax.average
           --last=2 --raw);
  ema_avg2 the mean of their moving averages (--last=2).

    python bench/demo_seeds.py --workdir=runs/seeds --seeds=42,1,2,3,4 [--jobs=1] [--out=F.json]

Each seed trains in its own `python train.py` process (--jobs of them at once: 1 on a 2-core CPU,
more on an accelerator); a seed whose workdir already holds a finished run (summary.json) is not
trained again. The scoring runs in this process, so every model of one shape shares its compiled
functions. Prints one table (per seed, and the mean and spread of each column) and writes JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = ("raw", "ema", "avg2", "ema_avg2")
SEARCHES = {"greedy": "dev_bleu", "beam": "dev_bleu_beam"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a folder for the runs (one workdir per seed)")
    parser.add_argument("--seeds", default="42,1,2,3,4")
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--jobs", type=int, default=1, help="training processes at once")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead of the demo's "
                        "(a try-out: checkpoints at half and at the end)")
    parser.add_argument("--dev", default=os.path.join(REPO, "data/bible-es-en/dev"), help="dev prefix")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    return parser.parse_args()


def train(args, seed: int) -> str:
    """The seed's finished run (trained now unless its summary.json exists)."""
    workdir = os.path.join(args.workdir, f"seed{seed}")
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        os.makedirs(args.workdir, exist_ok=True)
        steps = [f"--config.num_train_steps={args.steps}", f"--config.eval_every_steps={args.steps}",
                 f"--config.checkpoint_every_steps={args.steps // 2}"] if args.steps else []
        with open(f"{workdir}.log", "w", encoding="utf-8") as log:
            subprocess.run([sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={workdir}",
                            f"--config.seed={seed}", f"--config.optimizer.ema_decay={args.ema_decay}", *steps],
                           cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return workdir


def models(workdir: str) -> dict[str, str]:
    """{model name: its workdir}: the run itself (ema) and the averages written beside it."""
    from s2s_jax.average import average
    written = {"ema": workdir}
    for name, last, raw in (("raw", 1, True), ("avg2", 2, True), ("ema_avg2", 2, False)):
        written[name] = f"{workdir}-{name}"
        if not os.path.exists(written[name]):
            average(workdir, last=last, output=written[name], raw=raw)
    return written


def scores(workdir: str, dev: str) -> dict[str, float]:
    """Greedy and beam dev BLEU of a model (its config's beam size and alpha)."""
    from s2s_jax.evaluate import evaluate
    from s2s_jax.translate import Translator
    result = evaluate(Translator.from_workdir(workdir), dev, "dev", {})
    return {search: result[key] for search, key in SEARCHES.items()}


def table(results: dict[int, dict]) -> list[str]:
    """The printed table: a row per seed, then the mean and the spread (max - min) per column."""
    columns = [(model, search) for model in MODELS for search in SEARCHES]
    lines = ["seed  " + " ".join(f"{model + ' ' + search:>15}" for model, search in columns)]
    for seed, row in results.items():
        lines.append(f"{seed:<5} " + " ".join(f"{row[model][search]:15.2f}" for model, search in columns))
    for name, summary in (("mean", statistics.mean), ("spread", lambda v: max(v) - min(v))):
        values = [summary([row[model][search] for row in results.values()]) for model, search in columns]
        lines.append(f"{name:<5} " + " ".join(f"{value:15.2f}" for value in values))
    return lines


def main() -> None:
    args = parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip(seeds, pool.map(lambda seed: train(args, seed), seeds)))
    results = {seed: {name: scores(path, args.dev) for name, path in models(run).items()} for seed, run in runs.items()}
    print("\n".join(table(results)))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"ema_decay": args.ema_decay, "dev": args.dev, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
