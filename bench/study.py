"""Ablation study: a grid of model variants trained with one budget (same steps, same batches) on
the bundled es->en corpus, each evaluated on dev.

    python bench/study.py --preset=cpu --out=runs/study-cpu
    python bench/study.py --preset=gpu --out=runs/study-gpu
    python bench/study.py --preset=tiny --out=/tmp/study --only=attn_general,ss_parallel   # tests

Variants (VARIANTS) are config overrides on top of configs/demo.py: the attention score (none, dot,
general = the reference, concat, scaled_dot), no input feeding, a reversed source (without and with
attention), scheduled sampling (inverse sigmoid from 1 to 0, k sized to the run; sequential or
parallel), and the reference with seeds 1 and 2 (it has seed 42) to show the seed-to-seed spread.
Every preset evaluates once, at the end, with greedy and beam-5 search.

Presets:
  cpu   2,000 steps per variant: about 1 h 30 min for all twelve on 2 CPU cores (measured:
        docs/study, 3-9 minutes per variant).
  gpu   6,000 steps per variant: roughly 30 minutes for all twelve on one H100 (a guess).
  tiny  configs/tiny.py's synthetic reverse task, 30 steps: about 20 s per variant, mostly compiling
        (measured on 2 busy CPU cores; tests/test_study.py).

Each variant trains in its own workdir, OUT/runs/NAME, one after another in this process: a finished
one is not retrained and an unfinished one resumes from its last checkpoint (every 500 steps on cpu
and gpu), so rerunning the command continues an interrupted study. A workdir made with another
preset is refused (training.train_and_evaluate checks the config): use another --out.

Writes in OUT:
  results.json        one row per variant: name, overrides, dev_bleu_greedy, dev_bleu_beam5, chrf
                      (greedy), dev_loss (teacher-forced), train_tokens_per_s (median over the
                      progress rows of metrics.jsonl), parameters, steps, wall_s (the last session's),
                      bleu_by_length, and for EXPOSURE_VARIANTS dev_loss_free_running; plus
                      preset, machine, signature (sacrebleu's) and reference (mean and spread of
                      BLEU over REFERENCE_SEEDS, null unless all three ran).
  results.md          the same as tables.
  bleu_by_length.png  greedy dev BLEU (whitespace tokens) per source length in words, a line per variant.
  exposure_gap.png    teacher-forced vs free-running dev loss of EXPOSURE_VARIANTS.
  attention/NAME_iK.png  attention of dev sentence K (the first ATTENTION_SENTENCES dev sentences of
                      ATTENTION_WORDS words) and its greedy translation, for variants with attention.
The free-running dev loss is the loss of the gold targets when the decoder reads its own previous
argmax prediction instead of the gold prefix (teacher-forcing ratio 0); its distance from the
teacher-forced loss measures exposure bias.
"""
import argparse
import functools
import json
import logging
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is not an installed package

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import logging as absl_logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from configs import demo, tiny
from s2s_jax import checkpoints, configuration, data, files, logbook, metrics, steps, training
from s2s_jax.translate import Translator

# Every preset: one base config module and its overrides. eval_every_steps is set to
# num_train_steps (one evaluation, at the end) and the evaluation to greedy + beam 5 (see make_config).
# The cpu and gpu presets keep the demo's recipe of when docs/study was run: a constant learning rate
# of 1e-3 after warmup, no label smoothing (the demo now cools down at its end, "wsd", at 2e-3 with
# smoothing 0.1); every variant then sees the same rate at every step.
_CONSTANT_LR = {"optimizer.decay": "constant", "optimizer.learning_rate": 1e-3, "optimizer.label_smoothing": 0.0}
PRESETS = {
    "cpu": (demo, {"num_train_steps": 2000, "checkpoint_every_steps": 500, **_CONSTANT_LR}),
    "gpu": (demo, {"num_train_steps": 6000, "checkpoint_every_steps": 500, **_CONSTANT_LR}),
    "tiny": (tiny, {"num_train_steps": 30, "checkpoint_every_steps": 30, "log_every_steps": 10,
                    "optimizer.warmup_steps": 10, "data.synthetic_train_size": 1000,
                    "data.synthetic_dev_size": 64,
                    # One batch shape (sequences of 2..10 symbols + EOS): one compilation per function.
                    "data.bucket_boundaries": (12,)}),
}
BEAM_SIZE = 5

# Overrides of the preset's config (demo: general attention, input feeding, seed 42).
_SCHEDULED_SAMPLING = {"teacher_forcing.schedule": "inverse_sigmoid", "teacher_forcing.start": 1.0,
                       "teacher_forcing.end": 0.0, "teacher_forcing.k": 0.0}  # k 0: sized to the run
VARIANTS = {
    "attn_none": {"model.attention": "none"},
    "attn_dot": {"model.attention": "dot"},
    "attn_general": {"model.attention": "general"},  # the reference
    "attn_concat": {"model.attention": "concat"},
    "attn_scaled_dot": {"model.attention": "scaled_dot"},
    "no_feeding": {"model.input_feeding": False},
    "reverse_none": {"model.attention": "none", "model.reverse_source": True},
    "reverse_general": {"model.reverse_source": True},
    "ss_sequential": {**_SCHEDULED_SAMPLING, "teacher_forcing.mode": "sequential"},
    "ss_parallel": {**_SCHEDULED_SAMPLING, "teacher_forcing.mode": "parallel", "teacher_forcing.passes": 1},
    "seed_1": {"seed": 1},
    "seed_2": {"seed": 2},
}
REFERENCE_SEEDS = ("attn_general", "seed_1", "seed_2")
EXPOSURE_VARIANTS = ("attn_general", "ss_sequential", "ss_parallel")
LENGTH_BUCKETS = (10, 20, 30, 40, math.inf)  # source words, inclusive upper bounds
ATTENTION_WORDS = (8, 20)  # attention maps for dev sentences of this many source words ...
ATTENTION_SENTENCES = 3  # ... the first this many of them


# ----------------------------------------------------------------------------- training
def make_config(preset: str, overrides: dict) -> ml_collections.ConfigDict:
    """The preset's config under a variant's overrides; data paths made absolute (any cwd works)."""
    base, preset_overrides = PRESETS[preset]
    config = base.get_config()
    config.update_from_flattened_dict({**preset_overrides, **overrides})
    config.eval_every_steps = config.num_train_steps
    config.eval.search = "beam"
    config.eval.beam_size = BEAM_SIZE
    config.data.train_prefix = os.path.join(REPO, config.data.train_prefix)
    config.data.dev_prefix = os.path.join(REPO, config.data.dev_prefix)
    return config


def train_variant(preset: str, name: str, workdir: str) -> dict:
    """Trains (or resumes, or just reads back) one variant; returns its summary."""
    print(f"=== {name}: {_overrides_text(VARIANTS[name])} -> {workdir}", flush=True)
    return training.train_and_evaluate(make_config(preset, VARIANTS[name]), workdir)


def median_tokens_per_s(workdir: str) -> float:
    """Median target tokens per second over the progress rows of workdir/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return statistics.median(row["tokens_per_s"] for row in rows if "tokens_per_s" in row)


# ----------------------------------------------------------------------------- dev analyses
@functools.partial(jax.jit, static_argnames=("model", "tf_ratio"))
def _loss_sums(model, params, batch: data.Batch, tf_ratio: float):
    """(nll_sum, tokens) of the gold targets when each decoder input is the gold previous token with
    probability `tf_ratio`, else the model's own previous argmax prediction (fixed coins)."""
    out = model.apply({"params": params}, batch.src, batch.src_len, batch.tgt_in, tf_ratio=tf_ratio,
                      sampling_rng=jax.random.PRNGKey(0))
    nll_sum, _, tokens = steps.cross_entropy(out["logits"], batch.tgt_out)
    return nll_sum, tokens


def dev_loss(translator: Translator, corpus: data.Corpus, tf_ratio: float) -> float:
    """Dev loss per target token (tf_ratio 1: teacher-forced, as evaluation.Evaluator; 0: free-running)."""
    config = translator.config
    loss_sum = tokens = 0.0
    for batch in data.eval_batches(corpus.dev_src, corpus.dev_tgt, batch_size=config.eval.batch_size,
                                   boundaries=config.data.bucket_boundaries):
        s, n = _loss_sums(translator.model, translator.params, batch, tf_ratio)
        loss_sum, tokens = loss_sum + float(s), tokens + float(n)
    return loss_sum / tokens


def bleu_by_length(hyps: Sequence[str], refs: Sequence[str], sources: Sequence[str]) -> list[dict]:
    """Corpus BLEU on whitespace tokens per LENGTH_BUCKETS bucket of source words (None if empty)."""
    buckets = metrics.bleu_by_length([h.split() for h in hyps], [[r.split() for r in refs]],
                                     [len(s.split()) for s in sources], LENGTH_BUCKETS)
    return [dict(bucket=label, sentences=n, bleu=score.score if n else None) for label, n, score in buckets]


def attention_indices(sources: Sequence[str]) -> list[int]:
    """The first ATTENTION_SENTENCES dev sentences with ATTENTION_WORDS source words."""
    low, high = ATTENTION_WORDS
    return [i for i, s in enumerate(sources) if low <= len(s.split()) <= high][:ATTENTION_SENTENCES]


def plot_attention_maps(name: str, translator: Translator, sources: Sequence[str], hyps: Sequence[str],
                        folder: str) -> None:
    """folder/NAME_iK.png: attention while writing the greedy translation of dev sentence K."""
    os.makedirs(folder, exist_ok=True)
    for i in attention_indices(sources):
        translator.plot_attention(sources[i], hyps[i], os.path.join(folder, f"{name}_i{i}.png"),
                                  title=f"{name}: dev sentence {i}")


def analyse(name: str, workdir: str, out: str) -> dict:
    """bleu_by_length (greedy), dev_loss_free_running for EXPOSURE_VARIANTS; attention maps into
    out/attention/ for a variant with attention."""
    translator = Translator.from_workdir(workdir)
    corpus = data.load_corpus(translator.config.data, workdir)
    sources = corpus.dev_src_text
    hyps = translator.translate(sources, search="greedy")
    result = dict(bleu_by_length=bleu_by_length(hyps, corpus.dev_tgt_text, sources))
    if translator.config.model.attention != "none":
        plot_attention_maps(name, translator, sources, hyps, os.path.join(out, "attention"))
    if name in EXPOSURE_VARIANTS:
        result["dev_loss_free_running"] = dev_loss(translator, corpus, tf_ratio=0.0)
    return result


# ----------------------------------------------------------------------------- results
def result_row(name: str, summary: dict, workdir: str, analysis: dict) -> dict:
    return dict(name=name, overrides=VARIANTS[name], dev_bleu_greedy=summary["dev_bleu"],
                dev_bleu_beam5=summary["dev_bleu_beam"], chrf=summary["dev_chrf"], dev_loss=summary["dev_loss"],
                train_tokens_per_s=median_tokens_per_s(workdir), parameters=summary["parameters"],
                steps=summary["steps"], wall_s=summary["wall_s"], **analysis)


def reference_stats(rows: Sequence[dict]) -> dict | None:
    """Mean and spread (max - min) of greedy and beam BLEU over REFERENCE_SEEDS; None unless all ran."""
    by_name = {row["name"]: row for row in rows}
    if not all(name in by_name for name in REFERENCE_SEEDS):
        return None
    stats = {}
    for key in ("dev_bleu_greedy", "dev_bleu_beam5"):
        values = [by_name[name][key] for name in REFERENCE_SEEDS]
        stats[key] = dict(mean=statistics.fmean(values), spread=max(values) - min(values))
    return stats


def machine() -> dict:
    device = jax.devices()[0]
    return dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                device=f"{device.platform} ({device.device_kind})", devices=jax.device_count())


def _overrides_text(overrides: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


# (header, row -> cell) of the main table in results.md
COLUMNS = (
    ("variant", lambda r: r["name"]),
    ("overrides", lambda r: _overrides_text(r["overrides"])),
    ("greedy BLEU", lambda r: f"{r['dev_bleu_greedy']:.2f}"),
    (f"beam {BEAM_SIZE} BLEU", lambda r: f"{r['dev_bleu_beam5']:.2f}"),
    ("chrF", lambda r: f"{r['chrf']:.1f}"),
    ("dev loss", lambda r: f"{r['dev_loss']:.3f}"),
    ("train tokens/s", lambda r: f"{r['train_tokens_per_s']:,.0f}"),
    ("parameters", lambda r: f"{r['parameters']:,}"),
    ("steps", lambda r: str(r["steps"])),
    ("wall", lambda r: logbook.duration(r["wall_s"])),
)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def write_markdown(results: dict, path: str) -> None:
    rows, machine_info = results["variants"], results["machine"]
    lines = [f"# Study, preset {results['preset']}", "",
             (f"Machine: {machine_info['platform']}, {machine_info['device']}. "
              f"Dev BLEU: sacrebleu {results['signature']}."), ""]
    lines += markdown_table([h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in rows])
    reference = results["reference"]
    if reference:
        greedy, beam = reference["dev_bleu_greedy"], reference["dev_bleu_beam5"]
        lines += ["", (f"reference over 3 seeds: greedy mean {greedy['mean']:.2f} (spread {greedy['spread']:.2f}), "
                       f"beam mean {beam['mean']:.2f} (spread {beam['spread']:.2f})")]
    else:
        lines += ["", f"reference over 3 seeds: not run (needs {', '.join(REFERENCE_SEEDS)})"]
    exposure = [r for r in rows if "dev_loss_free_running" in r]
    lines += ["", "## Exposure gap", "",
              ("Dev loss when the decoder reads the gold prefix (teacher-forced) and when it reads its own "
               "previous argmax predictions (free-running)."), ""]
    lines += markdown_table(
        ["variant", "teacher-forced", "free-running", "gap"],
        [[r["name"], f"{r['dev_loss']:.3f}", f"{r['dev_loss_free_running']:.3f}",
          f"{r['dev_loss_free_running'] - r['dev_loss']:.3f}"] for r in exposure])
    files.write_atomic(path, "\n".join(lines) + "\n")


def _new_figure(width: float, height: float):
    """An off-screen figure and its axes (Agg canvas, never pyplot)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_bleu_by_length(rows: Sequence[dict], path: str) -> None:
    """Greedy BLEU per source-length bucket, a line per variant; empty buckets are left out."""
    fig, ax = _new_figure(9.0, 5.0)
    colours = matplotlib.colormaps["tab20"]  # dark shades of its 10 hues first, then the light ones
    buckets = rows[0]["bleu_by_length"]
    for i, row in enumerate(rows):
        bleu = [np.nan if b["bleu"] is None else b["bleu"] for b in row["bleu_by_length"]]
        ax.plot(range(len(buckets)), bleu, marker="o", color=colours((2 * i) % 20 + (i // 10) % 2),
                label=row["name"])
    ax.set_xticks(range(len(buckets)), labels=[f"{b['bucket']}\n({b['sentences']} sent.)" for b in buckets])
    ax.set_xlabel("source length (words)")
    ax.set_ylabel("greedy dev BLEU (whitespace tokens)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_exposure_gap(rows: Sequence[dict], path: str) -> None:
    """Grouped bars: teacher-forced and free-running dev loss of each EXPOSURE_VARIANTS row."""
    rows = [r for r in rows if "dev_loss_free_running" in r]
    fig, ax = _new_figure(max(4.0, 1.6 * len(rows) + 2.0), 4.0)
    x, width = np.arange(len(rows)), 0.38
    for offset, key, label in ((-width / 2, "dev_loss", "teacher-forced"),
                               (width / 2, "dev_loss_free_running", "free-running")):
        bars = ax.bar(x + offset, [r[key] for r in rows], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(x, labels=[r["name"] for r in rows])
    ax.set_ylabel("dev loss (nats per target token)")
    ax.margins(y=0.1)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- the study
def run_study(preset: str, out: str, names: Sequence[str]) -> dict:
    """Trains (or resumes) every variant in `names`, analyses each and writes the outputs into
    `out`; returns what results.json holds."""
    workdirs = {name: os.path.join(out, "runs", name) for name in names}
    summaries = {name: train_variant(preset, name, workdirs[name]) for name in names}
    rows = [result_row(name, summaries[name], workdirs[name], analyse(name, workdirs[name], out))
            for name in names]
    results = dict(preset=preset, machine=machine(), signature=summaries[names[0]]["bleu_signature"],
                   reference=reference_stats(rows), variants=rows)
    files.write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    write_markdown(results, os.path.join(out, "results.md"))
    plot_bleu_by_length(rows, os.path.join(out, "bleu_by_length.png"))
    plot_exposure_gap(rows, os.path.join(out, "exposure_gap.png"))
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="study directory (runs/, results.*, plots)")
    parser.add_argument("--only", default=",".join(VARIANTS),
                        help=f"comma-separated variants, in this order (default all: {','.join(VARIANTS)})")
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    unknown = [name for name in args.only if name not in VARIANTS]
    if unknown or not args.only:
        parser.error(f"--only: unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("s2s_jax").setLevel(logging.INFO)
    try:
        results = run_study(args.preset, args.out, args.only)
    except (configuration.ConfigError, data.DataError, checkpoints.CheckpointError, training.TrainingError) as error:
        raise SystemExit(f"study: {error}") from None
    print(f"wrote {args.out}/results.json, results.md, bleu_by_length.png, exposure_gap.png, attention/ "
          f"({len(results['variants'])} variants)", flush=True)


if __name__ == "__main__":
    main()
