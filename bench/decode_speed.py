"""Decoding speed of s2s_jax.inference.decode_batch: beam 1, 5, 10 at batch 1, 32, 128.

    python bench/decode_speed.py                      # random-init demo-sized model (~3 min, 2 CPU cores)
    python bench/decode_speed.py --workdir=runs/demo  # a trained model on its dev sentences
    python bench/decode_speed.py --model=joeynmt      # the JoeyNMT anchor's size, against its figures
    python bench/decode_speed.py --model=joeynmt --decode_dtype=bfloat16  # bfloat16 matmuls, float32 sums

Per configuration: compile time (jit lower + XLA compile, ahead of time), then one untimed warm-up
batch, then sentences/s and output tokens/s (best hypothesis, EOS counted) over the timed batches
(the fastest of --repeats passes), and the achieved GFLOP/s: the matmul FLOPs of each call
(`call_flops`: the encoder once, then per step the LSTM gates, attention and output projection,
for the longest best hypothesis's steps) over the time, against two dense matmuls in --decode_dtype
(float32 sums) measured in the same run before and after the rows (`matmul_ceilings`).
All sources are padded to one length so each configuration compiles exactly once.

Without --workdir the model is NOT trained: embed 128, bidirectional LSTM encoder 128 per
direction, LSTM decoder 256, general attention, input feeding, V = 4000 on both sides, random
sources of 10..30 ids, and a fixed output limit (--max_len, default 40). Such a model rarely emits
EOS, so nearly every search runs all max_len steps: a worst case for the loop length.

`--model=joeynmt`: the same, at the JoeyNMT anchor's size (configs/default.py: embed 256,
bidirectional LSTM encoder 256 per direction, decoder 256, V = 8000) and its decoding run: 617
sentences in batches of 64, output limit 34 (JoeyNMT's mean output length on dev, so a model that
never stops writes as many tokens as JoeyNMT did), sources of 15..55 ids (dev's length range in
8000-piece units), beam 1 (greedy) and 5; each speed is also given as a multiple of JoeyNMT's
measured 2,252 and 475 target tokens/s (greedy and beam 5; JOEYNMT_TOKENS_PER_S below).

Writes bench/results/decode_speed.json next to this file.
"""
import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import EOS_ID, data, driver, inference
from s2s_jax.models import Seq2Seq

# The models of configs/demo.py (its spm vocabulary of 4000 pieces per side) and configs/default.py
# (the JoeyNMT anchor's), written out here so the bench does not change when a config is tuned:
# (model, source lengths low..high, padded source length, default output limit).
MODELS = {
    "demo": (dict(src_vocab_size=4000, tgt_vocab_size=4000, embed_dim=128, encoder_hidden=128, bidirectional=True,
                  decoder_hidden=256, attention="general", attention_dim=128, input_feeding=True), (10, 30), 32, 40),
    "joeynmt": (dict(src_vocab_size=8000, tgt_vocab_size=8000, embed_dim=256, encoder_hidden=256, bidirectional=True,
                     decoder_hidden=256, attention="general", attention_dim=256, input_feeding=True), (15, 55), 56, 34),
}
# JoeyNMT 2.3.0 (this RNN, trained 30 minutes on data/bible-es-en) decoding the 617 dev sentences in
# batches of 64, measured on this project's 2-core x86-64 CPU machine type (AVX-512), idle: greedy
# 67 sentences/s = 2,252 target pieces/s, beam 5 without length penalty 16.3 sentences/s = 475 pieces/s.
# Target tokens/s by beam:
JOEYNMT_TOKENS_PER_S = {1: 2252, 5: 475}


def random_setup(args):
    """A randomly initialised model of --model's size and random sources padded to one length."""
    sizes, (low, high), source_len, max_len = MODELS[args.model]
    model = Seq2Seq(**sizes, dtype=jnp.dtype(args.decode_dtype))
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(low, high + 1, size=args.sentences)          # source pieces, EOS excluded
    src_ids = [rng.integers(4, sizes["src_vocab_size"], size=n).tolist() for n in lengths]
    dummy = jnp.ones((1, source_len), jnp.int32)
    params = model.init(jax.random.PRNGKey(args.seed), dummy, jnp.ones((1,), jnp.int32), dummy,
                        fast_path_only=True)["params"]
    description = (f"random-init {args.model}-sized model (NOT trained; outputs are meaningless): "
                   + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return model, params, src_ids, source_len, args.max_len or max_len, description


def workdir_setup(args):
    """A trained workdir and its dev sentences (or data/bible-es-en/dev.es)."""
    from s2s_jax.translate import Translator
    translator = Translator.from_workdir(args.workdir, decoding={"decode_dtype": args.decode_dtype})
    cfg = translator.config.data
    if cfg.task == "files":
        path = f"{cfg.dev_prefix}.{cfg.src_lang}"
        if not os.path.exists(path):
            path = "data/bible-es-en/dev.es"
        lines = [line for line in data.read_lines(path) if line.strip()]
        src_ids = translator.src_tokenizer.encode(lines)
        origin = path
    else:
        src_ids, _ = data.synthetic_task(cfg.task, args.sentences, cfg.synthetic_vocab_size, cfg.synthetic_min_len,
                                         cfg.synthetic_max_len, cfg.synthetic_seed + 1)
        origin = f"synthetic {cfg.task} dev set"
    src_ids = [ids[:translator.max_source_len] for ids in src_ids]
    src_ids = (src_ids * (-(-args.sentences // len(src_ids))))[:args.sentences]  # repeat if too few
    longest = max(len(ids) for ids in src_ids) + 1
    source_len = data.padded_length(longest, translator.boundaries)
    max_len = args.max_len or driver.output_limit(source_len, int(translator.config.eval.max_decode_len))
    description = f"trained model from {args.workdir} (best checkpoint, else latest), sources: {origin}"
    return translator.model, translator.params, src_ids, source_len, max_len, description


def batches(src_ids, batch_size: int, source_len: int):
    """Fixed-shape (src [batch, S], src_len [batch]) batches; the last is filled with short rows."""
    out = []
    for start in range(0, len(src_ids), batch_size):
        chunk = src_ids[start:start + batch_size]
        src = np.zeros((batch_size, source_len), np.int32)
        src[:, 0] = EOS_ID
        src_len = np.ones(batch_size, np.int32)
        for row, ids in enumerate(chunk):
            src[row, :len(ids)] = ids
            src[row, len(ids)] = EOS_ID
            src_len[row] = len(ids) + 1
        out.append((jnp.asarray(src), jnp.asarray(src_len), len(chunk)))
    return out


def encoder_flops(model, rows: int, source_len: int) -> float:
    """Matmul FLOPs of encoding `rows` sources of `source_len` positions: every (bi)LSTM layer's
    input projection and recurrence, the bridge and the attention keys (2 FLOPs per multiply-add)."""
    directions = 2 if model.bidirectional else 1
    flops, width = 0.0, model.embed_dim
    for _ in range(model.encoder_layers):
        flops += directions * 2 * rows * source_len * (width + model.encoder_hidden) * 4 * model.encoder_hidden
        width = directions * model.encoder_hidden
    flops += 2 * rows * width * 2 * model.decoder_layers * model.decoder_hidden              # bridge
    keys = {"general": model.decoder_hidden, "concat": model.attention_dim}.get(model.attention, 0)
    return flops + 2 * rows * source_len * width * keys


def step_flops(model, rows: int, source_len: int) -> float:
    """Matmul FLOPs of one decoder step for `rows` hypotheses: the LSTM gates, attention (scores,
    context, combine) and the output projection."""
    hidden, memory = model.decoder_hidden, model.encoder_hidden * (2 if model.bidirectional else 1)
    feeds = model.input_feeding and model.attention != "none"
    flops = 2 * rows * (model.embed_dim + hidden * feeds + hidden) * 4 * hidden
    flops += (model.decoder_layers - 1) * 2 * rows * 2 * hidden * 4 * hidden
    if model.attention != "none":
        score = model.attention_dim if model.attention == "concat" else hidden
        flops += 2 * rows * source_len * (score + memory) + 2 * rows * (memory + hidden) * hidden
        flops += 2 * rows * hidden * model.attention_dim if model.attention == "concat" else 0
    return flops + 2 * rows * hidden * model.tgt_vocab_size


def call_flops(model, batch: int, beam: int, source_len: int, steps: int) -> float:
    """Matmul FLOPs of one decode call: the encoder once, then `steps` steps of batch x beam rows."""
    return encoder_flops(model, batch, source_len) + steps * step_flops(model, batch * beam, source_len)


def matmul_ceilings(model, batch: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of two dense matmuls in the model's dtype (float32 sums) measured now: the output
    projection's shape at `batch` rows ([batch, H] x [H, V]) and a large square one ([2048, 2048] x
    [2048, 2048]); the fastest of `repeats` runs."""
    shapes = {f"[{batch},{model.decoder_hidden}]x[{model.decoder_hidden},{model.tgt_vocab_size}]":
              (batch, model.decoder_hidden, model.tgt_vocab_size), "[2048,2048]x[2048,2048]": (2048, 2048, 2048)}
    ceilings = {}
    for name, (m, k, n) in shapes.items():
        a, b = jnp.ones((m, k), model.dtype), jnp.full((k, n), 0.5, model.dtype)
        product = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
        jax.block_until_ready(product(a, b))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(product(a, b))
            best = min(best, time.perf_counter() - start)
        ceilings[name] = 2 * m * k * n / best / 1e9
    return ceilings


def report_gflops(rows: list[dict], before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Prints each row's achieved GFLOP/s as a share of the dense matmuls measured before and after
    the rows (the faster of the two counts); returns those ceilings."""
    ceilings = {name: max(gflops, after[name]) for name, gflops in before.items()}
    print("achieved matmul GFLOP/s (encoder once + per step gates, attention, projection) against dense "
          "matmuls measured in this run:")
    for row in rows:
        shares = "  ".join(f"{100 * row['gflop_per_s'] / gflops:5.1f}% of {name} ({gflops:.0f})"
                           for name, gflops in ceilings.items())
        print(f"  beam {row['beam']:2d} batch {row['batch']:3d}: {row['gflop_per_s']:6.1f} GFLOP/s = {shares}")
    return ceilings


def measure(model, params, src_ids, source_len, max_len, beam: int, batch_size: int, n: int, alpha: float,
            repeats: int):
    work = batches(src_ids[:n], batch_size, source_len)
    options = dict(search="beam", beam_size=beam, max_len=max_len, alpha=alpha, n_best=1)
    start = time.perf_counter()
    compiled = inference.decode_batch.lower(model, params, work[0][0], work[0][1], **options).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, work[0][0], work[0][1]))  # warm-up, untimed
    times = []
    for _ in range(repeats):  # the fastest pass: other processes share the CPU cores
        sentences = tokens = flops = 0
        start = time.perf_counter()
        for src, src_len, real in work:
            lengths = np.asarray(compiled(params, src, src_len).lengths)   # [batch, 1], blocks
            sentences += real
            tokens += int(lengths[:real, 0].sum())
            # The loop ran at least as many steps as the longest best hypothesis (filler rows too).
            flops += call_flops(model, batch_size, beam, source_len, int(lengths[:, 0].max()))
        times.append(time.perf_counter() - start)
    seconds = min(times)
    return dict(beam=beam, batch=batch_size, sentences=sentences, output_tokens=tokens,
                mean_output_len=tokens / sentences, compile_s=compile_s, decode_s=seconds,
                sentences_per_s=sentences / seconds, tokens_per_s=tokens / seconds,
                ms_per_sentence=1000 * seconds / sentences, matmul_gflop=flops / 1e9,
                gflop_per_s=flops / seconds / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="trained workdir; default: a random-init model of --model's size")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo",
                        help="random-init model size; joeynmt also sets the anchor's beams, batch and sentences")
    parser.add_argument("--beams", default="1,5,10")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--sentences", type=int, default=256, help="sentences per configuration (batch > 1)")
    parser.add_argument("--sentences_batch1", type=int, default=32, help="sentences at batch 1")
    parser.add_argument("--max_len", type=int, default=0, help="output limit; 0: 40 (random) or the inference rule")
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per configuration; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode_dtype", choices=("float32", "bfloat16"), default="float32",
                        help="matmul dtype of the decoding calls (config.eval.decode_dtype); sums stay float32")
    args = parser.parse_args()
    if args.model == "joeynmt" and not args.workdir:
        args.beams, args.batches, args.sentences = "1,5", "64", 617
    beams = [int(b) for b in args.beams.split(",")]
    batch_sizes = [int(b) for b in args.batches.split(",")]

    started = time.perf_counter()
    setup = workdir_setup if args.workdir else random_setup
    model, params, src_ids, source_len, max_len, description = setup(args)
    print(f"model: {description}")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}; source length {source_len} (padded), output limit "
          f"{max_len}, alpha {args.alpha}, matmuls in {args.decode_dtype}")

    ceilings = matmul_ceilings(model, max(batch_sizes))
    rows = []
    print(f"{'beam':>4} {'batch':>5} {'sents':>5} {'compile s':>9} {'decode s':>8} {'sent/s':>8} "
          f"{'tok/s':>8} {'ms/sent':>8} {'out len':>7} {'GFLOP/s':>8}")
    for beam in beams:
        for batch_size in batch_sizes:
            n = args.sentences_batch1 if batch_size == 1 else args.sentences
            row = measure(model, params, src_ids, source_len, max_len, beam, batch_size, n, args.alpha, args.repeats)
            rows.append(row)
            print(f"{beam:4d} {batch_size:5d} {row['sentences']:5d} {row['compile_s']:9.2f} {row['decode_s']:8.2f} "
                  f"{row['sentences_per_s']:8.1f} {row['tokens_per_s']:8.0f} {row['ms_per_sentence']:8.2f} "
                  f"{row['mean_output_len']:7.1f} {row['gflop_per_s']:8.1f}", flush=True)

    ceilings = report_gflops(rows, ceilings, matmul_ceilings(model, max(batch_sizes)))
    ratios = {}
    smallest, largest = min(batch_sizes), max(batch_sizes)
    print(f"per-sentence cost, batch {smallest} / batch {largest} (> 1: batching pays):")
    for beam in beams:
        cost = {r["batch"]: r["ms_per_sentence"] for r in rows if r["beam"] == beam}
        ratios[f"beam{beam}"] = {f"batch{b}": cost[smallest] / cost[b] for b in batch_sizes}
        steps = "  ".join(f"batch {b}: {cost[smallest] / cost[b]:6.1f}x" for b in batch_sizes)
        print(f"  beam {beam:2d}: {steps}")
    against_joeynmt = {}
    if args.model == "joeynmt" and not args.workdir:
        print("target tokens/s against the JoeyNMT anchor's (goal: >= 10x):")
        for row in rows:
            anchor = JOEYNMT_TOKENS_PER_S[row["beam"]]
            against_joeynmt[f"beam{row['beam']}"] = ratio = row["tokens_per_s"] / anchor
            print(f"  beam {row['beam']}: {row['tokens_per_s']:,.0f} / {anchor:,} = {ratio:.1f}x")
    total_s = time.perf_counter() - started
    print(f"total {total_s:.0f} s")

    result = dict(command=" ".join([Path(sys.executable).name] + sys.argv), model=description,
                  mode="workdir" if args.workdir else "random-init", source_len=source_len, max_len=max_len,
                  alpha=args.alpha, decode_dtype=args.decode_dtype, repeats=args.repeats, rows=rows,
                  per_sentence_cost_ratio_vs_smallest_batch=ratios,
                  joeynmt_tokens_per_s=JOEYNMT_TOKENS_PER_S if against_joeynmt else None,
                  ratio_vs_joeynmt=against_joeynmt or None, matmul_ceilings_gflop_per_s=ceilings,
                  total_s=total_s, device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                  cpu_count=os.cpu_count(), load_average_1min=os.getloadavg()[0], jax_version=jax.__version__,
                  python=platform.python_version(), machine=platform.machine())
    out = Path(__file__).parent / "results" / ("decode_speed_joeynmt.json" if against_joeynmt else "decode_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
