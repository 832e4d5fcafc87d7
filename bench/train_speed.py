"""Training-step throughput: s2s_jax's jitted train_step beside the anchor implementations.

Runs, in one process and on the same random full-length batch shape, our `steps.train_step`
(the Seq2Seq model configured like the anchor: bidirectional encoder H/2 per direction, decoder H,
Luong general attention, input feeding, Adam) and the anchor's plain-JAX and PyTorch steps from
`../shared/anchors/rnn_bench.py` (PyTorch only if it is installed). Speeds are only comparable as
ratios within one run.

  python bench/train_speed.py [--configs small,large] [--steps 10] [--anchors jax,torch]

Prints a table and writes bench/results/train_speed.json.
"""
import argparse
import functools
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from s2s_jax import data, schedules, steps
from s2s_jax.models import Seq2Seq

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHOR = os.path.join(HERE, "..", "..", "shared", "anchors", "rnn_bench.py")


def load_anchor(path: str):
    spec = importlib.util.spec_from_file_location("rnn_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_ours(cfg: dict, num_steps: int, dtype: str) -> dict:
    """Seconds per step and compile seconds of s2s_jax's train_step on the anchor's shapes."""
    B, S, T, E, H, V = (cfg[k] for k in "BSTEHV")
    model = Seq2Seq(V, V, embed_dim=E, encoder_hidden=H // 2, decoder_hidden=H, attention="general",
                    dropout_rate=0.0, dtype=jnp.dtype(dtype))
    opt = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=1, decay="constant", b1=0.9,
                                         b2=0.999, clip_norm=0.0, label_smoothing=0.0))
    config = ml_collections.ConfigDict(dict(seed=0, num_train_steps=1000, optimizer=opt,
                                            data=dict(bucket_boundaries=(S,))))
    state = steps.init_state(config, model)
    rng = np.random.default_rng(0)
    tgt = rng.integers(4, V, (B, T + 1)).astype(np.int32)
    batch = data.Batch(src=jnp.asarray(rng.integers(4, V, (B, S)), jnp.int32),
                       src_len=jnp.full((B,), S, jnp.int32), tgt_in=jnp.asarray(tgt[:, :-1]),
                       tgt_out=jnp.asarray(tgt[:, 1:]), index=jnp.arange(B, dtype=jnp.int32))
    step = jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=schedules.make_schedule("constant"),
        fast_path_only=True, label_smoothing=0.0, base_rng=jax.random.PRNGKey(0)), donate_argnums=0)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(num_steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / num_steps
    return dict(step_s=seconds, compile_s=compile_s, loss=float(metrics["loss_sum"] / metrics["tokens"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--anchors", default="jax,torch")
    ap.add_argument("--anchor", default=ANCHOR, help="path of the anchors' rnn_bench.py")
    ap.add_argument("--dtype", default="float32", help="our matmul dtype (bfloat16 on accelerators)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "train_speed.json"))
    args = ap.parse_args()
    anchor = load_anchor(args.anchor)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    rows = []
    for name in args.configs.split(","):
        cfg = anchor.CONFIGS[name]
        tokens = cfg["B"] * cfg["T"]
        ours = bench_ours(cfg, args.steps, args.dtype)
        rows.append(dict(config=name, impl=f"s2s_jax ({args.dtype})", **ours))
        for impl in args.anchors.split(","):
            if impl == "torch" and importlib.util.find_spec("torch") is None:
                print("# PyTorch anchor skipped: torch is not installed", file=sys.stderr)
                continue
            if impl == "jax":
                seconds, loss, compile_s = anchor.bench_jax(cfg, args.steps, device)
                rows.append(dict(config=name, impl="anchor plain JAX", step_s=seconds, compile_s=compile_s, loss=loss))
            else:
                seconds, loss = anchor.bench_torch(cfg, args.steps, device)
                rows.append(dict(config=name, impl="anchor PyTorch loop", step_s=seconds, compile_s=None, loss=loss))
        for row in rows:
            if row["config"] == name:
                row["tokens_per_s"] = tokens / row["step_s"]
                row["ours_vs_this"] = row["step_s"] / ours["step_s"]
    print(f"device: {jax.devices()[0].device_kind} ({device}); jax {jax.__version__}")
    print(f"{'config':8} {'implementation':24} {'step s':>8} {'tokens/s':>11} {'compile s':>9} {'ours is x faster':>16}")
    for row in rows:
        compile_s = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
        print(f"{row['config']:8} {row['impl']:24} {row['step_s']:8.4f} {row['tokens_per_s']:11,.0f} "
              f"{compile_s:>9} {row['ours_vs_this']:16.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
