"""Training-step throughput: s2s_jax's jitted train_step beside the reference training loops.

Runs, in one invocation and on the same random full-length batch shape, our `steps.train_step`
(the Seq2Seq model configured like the references: bidirectional encoder H/2 per direction, decoder
H, Luong general attention, input feeding, Adam) once per `--output-chunks` value (0 = plain output
layer, > 0 = fused, s2s_jax.output_layer), and the plain-JAX and PyTorch steps of
bench/reference_loops.py (PyTorch only if it is installed: `pip install -e '.[bench]'`). Each
system runs in its own child process, so that its peak memory is its own. Speeds are only
comparable as ratios within one run.

  python bench/train_speed.py [--configs small,large] [--steps 10] [--references jax,torch]
                              [--output-chunks 512,0] [--rounds 1] [--json PATH]

`--rounds R` runs every system R times, the order rotated each round, because this machine's speed
comes in phases of tens of seconds (a step took ~430 or ~500 ms for runs of steps, 2026-12-05): a
row's figures come from its median step time over the rounds, and the ratios printed below the
table are the medians of per-round ratios, each between two systems of one round.

Prints a table and writes --json (default bench/results/train_speed.json): one row per system and
config with config, system (s2s_jax | jax_reference | pytorch_loop), device, tokens_per_s,
achieved_gflops (reference_loops.flops_per_step / step time), ceiling_gflops (a dense matmul of
the same framework, measured in the same child), compile_s, peak_mem_mb (device peak on GPU; peak
resident memory of the child process on CPU), and step_s, loss, output_chunk.
"""
import argparse
import functools
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import reference_loops

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = {"jax": "jax_reference", "torch": "pytorch_loop"}


def setup_ours(cfg: dict, dtype: str, output_chunk: int):
    """(train step with its static arguments bound, fresh state, batch): s2s_jax's `steps.train_step`
    on the references' model and random full-length batch shape."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from s2s_jax import data, schedules, steps
    from s2s_jax.models import Seq2Seq

    B, S, T, E, H, V = (cfg[k] for k in "BSTEHV")
    model = Seq2Seq(V, V, embed_dim=E, encoder_hidden=H // 2, decoder_hidden=H, attention="general",
                    dropout_rate=0.0, dtype=jnp.dtype(dtype), output_chunk=output_chunk)
    opt = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=1, decay="constant", b1=0.9,
                                         b2=0.999, clip_norm=0.0, label_smoothing=0.0,
                                         plateau_factor=0.0, ema_decay=0.0))
    state = steps.init_state(model, opt, 1000, 0)
    rng = np.random.default_rng(0)
    tgt = rng.integers(4, V, (B, T + 1)).astype(np.int32)
    batch = data.Batch(src=jnp.asarray(rng.integers(4, V, (B, S)), jnp.int32),
                       src_len=jnp.full((B,), S, jnp.int32), tgt_in=jnp.asarray(tgt[:, :-1]),
                       tgt_out=jnp.asarray(tgt[:, 1:]), index=jnp.arange(B, dtype=jnp.int32))
    step = functools.partial(steps.train_step, model=model, tf_schedule=schedules.make_schedule("constant"),
                             fast_path_only=True, label_smoothing=0.0, base_rng=jax.random.PRNGKey(0))
    return step, state, batch


def bench_ours(cfg: dict, num_steps: int, dtype: str, output_chunk: int) -> tuple[float, float, float]:
    """(seconds per step, loss, compile seconds) of s2s_jax's train_step on the references' shapes."""
    import jax

    step, state, batch = setup_ours(cfg, dtype, output_chunk)
    step = jax.jit(step, donate_argnums=0)
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
    return seconds, float(metrics["loss_sum"] / metrics["tokens"]), compile_s


def peak_mem_mb(framework: str, device: str) -> float:
    """Peak device memory on GPU, else the peak resident memory of this process, in MiB."""
    if device == "cuda" and framework == "torch":
        import torch
        return torch.cuda.max_memory_allocated() / 2 ** 20
    if device == "cuda":
        import jax
        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args) -> dict:
    """One system in this process (the child's side): its JSON row."""
    cfg = reference_loops.CONFIGS[args.config]
    framework = "torch" if args.system == "pytorch_loop" else "jax"
    if framework == "jax":
        import jax
        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    else:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.system == "s2s_jax":
        step_s, loss, compile_s = bench_ours(cfg, args.steps, args.dtype, args.output_chunk)
    elif args.system == "jax_reference":
        step_s, loss, compile_s = reference_loops.bench_jax(cfg, args.steps)
    else:
        step_s, loss, compile_s = reference_loops.bench_torch(cfg, args.steps, device)
    peak = peak_mem_mb(framework, device)
    return dict(config=args.config, system=args.system, device=device,
                tokens_per_s=cfg["B"] * cfg["T"] / step_s,
                achieved_gflops=reference_loops.flops_per_step(**cfg) / step_s / 1e9,
                ceiling_gflops=reference_loops.matmul_ceiling(framework, device), compile_s=compile_s,
                peak_mem_mb=peak, step_s=step_s, loss=loss,
                output_chunk=args.output_chunk if args.system == "s2s_jax" else None)


def run_child(args, config: str, system: str, output_chunk: int = 0) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", system, "--configs", config,
               "--steps", str(args.steps), "--dtype", args.dtype,
               "--output-chunk", str(output_chunk)]
    child = subprocess.run(command, check=False, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"{system} on {config} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def systems(args) -> list[tuple[str, int]]:
    """(system, output chunk) of every row of one config: ours per chunk, then the references."""
    chosen = [("s2s_jax", int(chunk)) for chunk in args.output_chunks.split(",")]
    for impl in args.references.split(","):
        if impl == "torch" and importlib.util.find_spec("torch") is None:
            print("# PyTorch reference skipped: torch is not installed (pip install -e '.[bench]')",
                  file=sys.stderr)
            continue
        chosen.append((SYSTEMS[impl], 0))
    return chosen


def run_rounds(args, config: str, chosen: list[tuple[str, int]]) -> list[dict]:
    """One row per system: `args.rounds` child runs each, round r starting at system r (mod n); the
    row of the median step time (the lower one for an even count), with every round's step time in
    `round_step_s`."""
    runs = {choice: [] for choice in chosen}
    for r in range(args.rounds):
        for system, chunk in chosen[r % len(chosen):] + chosen[:r % len(chosen)]:
            runs[(system, chunk)].append(run_child(args, config, system, chunk))
    rows = []
    for row_runs in runs.values():
        row = sorted(row_runs, key=lambda run: run["step_s"])[(len(row_runs) - 1) // 2]
        rows.append(dict(row, round_step_s=[run["step_s"] for run in row_runs]))
    return rows


def print_ratios(rows: list[dict]) -> None:
    """Per config: the first s2s_jax row against every other row, as the median of per-round
    ratios of tokens/s (reference step time / ours, within each round)."""
    for config in dict.fromkeys(row["config"] for row in rows):
        ours, *others = [row for row in rows if row["config"] == config]
        for other in others:
            # ours in tokens/s over theirs = their step time over ours, round by round
            ratios = sorted(b / a for a, b in zip(ours["round_step_s"], other["round_step_s"]))
            print(f"# {config}: s2s_jax (chunk {ours['output_chunk']}) / {other['system']}"
                  f"{'' if other['output_chunk'] is None else ' chunk ' + str(other['output_chunk'])}: "
                  f"median {statistics.median(ratios):.3f}x, rounds {' '.join(f'{r:.3f}' for r in ratios)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--references", default="jax,torch", help="reference loops to run: jax, torch")
    ap.add_argument("--dtype", default="float32", help="our matmul dtype (bfloat16 on accelerators)")
    ap.add_argument("--output-chunks", default="512,0",
                    help="s2s_jax rows, one per model.output_chunk (0 = plain output layer)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per system, the order rotated each round")
    ap.add_argument("--json", "--out", dest="json", default=os.path.join(HERE, "results", "train_speed.json"))
    ap.add_argument("--child", choices=("s2s_jax",) + tuple(SYSTEMS.values()), help=argparse.SUPPRESS)
    ap.add_argument("--output-chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.system, args.config = args.child, args.configs
        print(json.dumps(measure(args)), flush=True)
        return
    rows = []
    for config in args.configs.split(","):
        rows += run_rounds(args, config, systems(args))
    print(f"{'config':8} {'system':14} {'chunk':>5} {'device':6} {'step s':>8} {'tokens/s':>10} "
          f"{'GFLOP/s':>8} {'ceiling':>8} {'compile s':>9} {'peak MiB':>9}")
    for row in rows:
        compile_s = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
        chunk = "" if row["output_chunk"] is None else row["output_chunk"]
        print(f"{row['config']:8} {row['system']:14} {chunk:>5} {row['device']:6} {row['step_s']:8.4f} "
              f"{row['tokens_per_s']:10,.0f} {row['achieved_gflops']:8.1f} {row['ceiling_gflops']:8.1f} "
              f"{compile_s:>9} {row['peak_mem_mb']:9.0f}")
    if args.rounds > 1:
        print_ratios(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
