"""Training speed by process layout: one process with two devices against two processes with one
device each (jax.distributed on localhost, gloo collectives), same config, same global batches.

Each layout trains `configs/demo.py` for --steps steps from scratch in its own workdir, one layout
after the other (never side by side), on CPU with virtual devices
(--xla_force_host_platform_device_count). Reports, per layout, the median training tokens/s of the
progress windows after the first (metrics.jsonl; compilation and evaluation excluded), the median
wall seconds per step of those windows, and the tokens/s ratio to the one-process layout.

  python bench/multiprocess_speed.py [--steps 60] [--out /tmp/multiprocess_speed]
                                     [--json bench/results/multiprocess_speed.json]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_EVERY = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train(workdir: str, steps: int, processes: int, devices_per_process: int) -> list[dict]:
    """Trains one layout to the end; its metrics.jsonl rows."""
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={workdir}",
               f"--config.num_train_steps={steps}", f"--config.log_every_steps={LOG_EVERY}",
               f"--config.eval_every_steps={steps}", f"--config.checkpoint_every_steps={steps}",
               "--config.data.max_dev_pairs=64", "--config.eval.max_decode_len=16", "--compilation_cache=off"]
    if processes > 1:
        address = f"localhost:{free_port()}"
        command += [f"--config.distributed.coordinator_address={address}",
                    f"--config.distributed.num_processes={processes}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    runs = [subprocess.Popen(command + ([f"--config.distributed.process_id={i}"] if processes > 1 else []),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]
    outputs = [run.communicate()[0] for run in runs]
    for run, output in zip(runs, outputs):
        if run.returncode:
            raise SystemExit(f"multiprocess_speed: a process failed:\n{output[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="/tmp/multiprocess_speed")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "multiprocess_speed.json"))
    args = parser.parse_args()
    results = []
    for processes, devices in ((1, 2), (2, 1)):
        rows = train(os.path.join(args.out, f"{processes}x{devices}"), args.steps, processes, devices)
        progress = [row for row in rows if "tokens_per_s" in row]
        windows = [row["tokens_per_s"] for row in progress][1:]
        step_s = [(b["elapsed_s"] - a["elapsed_s"]) / LOG_EVERY for a, b in zip(progress, progress[1:])]
        results.append(dict(layout=f"{processes} process(es) x {devices} device(s)", processes=processes,
                            devices_per_process=devices, steps=args.steps, windows=len(windows),
                            tokens_per_s=statistics.median(windows), step_s=statistics.median(step_s)))
    print(f"{'layout':32} {'tokens/s':>9} {'s/step':>7} {'ratio':>6}")
    for row in results:
        row["ratio_to_one_process"] = row["tokens_per_s"] / results[0]["tokens_per_s"]
        print(f"{row['layout']:32} {row['tokens_per_s']:9,.0f} {row['step_s']:7.3f} {row['ratio_to_one_process']:6.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
