"""Training-step cost of scheduled sampling: teacher forcing, sequential and parallel sampling.

Times s2s_jax's jitted `steps.train_step` on bench/reference_loops.py's shapes (its `--config`,
default small: B=64, S=T=40, V=8000, E=256, H=256 with a bidirectional encoder of H/2 per
direction) for teacher forcing (ratio 1, fast path), sequential scheduled sampling and parallel
scheduled sampling with 1 and 2 passes (ratio `--ratio`, default 0.5). All variants live in one
process and are timed in interleaved rounds (the order rotates each round), so a machine shared
with other jobs slows them alike; compare the ratios, not the seconds. Each step is timed by the
wall clock and by this process's CPU time (all threads): on shared cores, the CPU-time ratio is
the steadier one.

  python bench/sampling_speed.py [--config small] [--rounds 5] [--steps 3] [--ratio 0.5]
                                 [--output-chunk 512] [--json PATH]

Prints a table and writes --json (default bench/results/sampling_speed.json): one row per variant
with variant, mode, passes, tf_ratio, step_s and cpu_s (medians over rounds of wall and CPU
seconds per step), ratio_to_teacher_forcing and cpu_ratio_to_teacher_forcing (medians of the
per-round ratios), round_step_s, round_cpu_s, compile_s, loss, and the run's config, device,
output_chunk and load averages (os.getloadavg) before and after.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # configs/ is not an installed package

from configs import default  # noqa: E402
from reference_loops import CONFIGS  # noqa: E402
from s2s_jax import data, schedules, steps  # noqa: E402
from s2s_jax.models import Seq2Seq  # noqa: E402

# name: (teacher-forcing ratio or None for --ratio, train_step's tf_mode, tf_passes)
VARIANTS = {
    "teacher_forcing": (1.0, "sequential", 1),
    "sequential": (None, "sequential", 1),
    "parallel_1": (None, "parallel", 1),
    "parallel_2": (None, "parallel", 2),
}


def setup(cfg: dict, output_chunk: int, dropout: float):
    """(model, fresh-state function, batch) on the reference loops' shapes, all tokens real."""
    B, S, T, E, H, V = (cfg[k] for k in "BSTEHV")
    model = Seq2Seq(V, V, embed_dim=E, encoder_hidden=H // 2, decoder_hidden=H, attention="general",
                    dropout_rate=dropout, output_chunk=output_chunk)
    opt = default.get_config().optimizer  # every optimizer key, so the bench follows the config
    opt.update(dict(learning_rate=1e-3, warmup_steps=1, decay="constant", clip_norm=1.0, label_smoothing=0.0))
    config = ml_collections.ConfigDict(dict(seed=0, num_train_steps=1000, optimizer=opt,
                                            data=dict(bucket_boundaries=(S,))))
    rng = np.random.default_rng(0)
    tgt = rng.integers(4, V, (B, T + 1)).astype(np.int32)
    batch = data.Batch(src=jnp.asarray(rng.integers(4, V, (B, S)), jnp.int32),
                       src_len=jnp.full((B,), S, jnp.int32), tgt_in=jnp.asarray(tgt[:, :-1]),
                       tgt_out=jnp.asarray(tgt[:, 1:]), index=jnp.arange(B, dtype=jnp.int32))
    return model, functools.partial(steps.init_state, model, config.optimizer, config.num_train_steps, config.seed), batch


def make_step(model, ratio: float, mode: str, passes: int):
    return jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=schedules.make_schedule("constant", start=ratio),
        fast_path_only=ratio >= 1.0, label_smoothing=0.0, base_rng=jax.random.PRNGKey(0),
        tf_mode=mode, tf_passes=passes), donate_argnums=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS), help="reference_loops.CONFIGS' shapes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    ap.add_argument("--ratio", type=float, default=0.5, help="teacher-forcing ratio of the sampled variants")
    ap.add_argument("--output-chunk", type=int, default=512, help="model.output_chunk (0 = plain logits)")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "sampling_speed.json"))
    args = ap.parse_args()

    cfg = CONFIGS[args.config]
    model, fresh_state, batch = setup(cfg, args.output_chunk, args.dropout)
    load_before = os.getloadavg()
    runs = {}
    for name, (tf_ratio, mode, passes) in VARIANTS.items():
        tf_ratio = args.ratio if tf_ratio is None else tf_ratio
        step = make_step(model, tf_ratio, mode, passes)
        t0 = time.perf_counter()
        state, metrics = step(fresh_state(), batch)
        jax.block_until_ready(metrics)
        runs[name] = dict(step=step, state=state, metrics=metrics, ratio=tf_ratio, mode=mode, passes=passes,
                          compile_s=time.perf_counter() - t0, wall=[], cpu=[])
    names = list(VARIANTS)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            run = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                run["state"], run["metrics"] = run["step"](run["state"], batch)
            jax.block_until_ready(run["metrics"])
            run["wall"].append((time.perf_counter() - t0) / args.steps)
            run["cpu"].append((time.process_time() - c0) / args.steps)
    load_after = os.getloadavg()

    base = runs["teacher_forcing"]

    def ratio(run, clock):
        """Median over rounds of this variant's seconds over teacher forcing's, by `clock`."""
        return statistics.median(t / b for t, b in zip(run[clock], base[clock]))

    rows = [dict(variant=name, mode=run["mode"], passes=run["passes"], tf_ratio=run["ratio"],
                 step_s=statistics.median(run["wall"]), cpu_s=statistics.median(run["cpu"]),
                 ratio_to_teacher_forcing=ratio(run, "wall"), cpu_ratio_to_teacher_forcing=ratio(run, "cpu"),
                 round_step_s=run["wall"], round_cpu_s=run["cpu"], compile_s=run["compile_s"],
                 loss=float(run["metrics"]["loss_sum"] / run["metrics"]["tokens"]),
                 config=args.config, device=jax.default_backend(), output_chunk=args.output_chunk,
                 load_before=load_before, load_after=load_after)
            for name, run in runs.items()]
    print(f"# {args.config} {cfg} on {jax.default_backend()}, output_chunk={args.output_chunk}, "
          f"{args.rounds} rounds x {args.steps} steps; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}")
    print(f"{'variant':16} {'ratio':>5} {'step s':>8} {'x tf (wall)':>11} {'cpu s':>8} {'x tf (cpu)':>10} "
          f"{'compile s':>9}")
    for row in rows:
        print(f"{row['variant']:16} {row['tf_ratio']:5.2f} {row['step_s']:8.4f} "
              f"{row['ratio_to_teacher_forcing']:11.2f} {row['cpu_s']:8.4f} "
              f"{row['cpu_ratio_to_teacher_forcing']:10.2f} {row['compile_s']:9.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
