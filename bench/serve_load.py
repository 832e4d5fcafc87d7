"""The translation server under load: 1, 4, 16 and 64 concurrent clients sending single dev
sentences (localhost, bounded in requests and time), against one client at a time and against
calling `Translator` directly; every answer is checked against the sentence translated alone.

    python bench/serve_load.py --workdir=runs/demo --out=bench/results/serve_load.json
    python bench/serve_load.py --workdir=runs/demo --decode_buckets=65   # one call per worker round

Starts `python -m s2s_jax.serve` on a free port (greedy compiled at start), then per level runs
that many client threads, each with its own keep-alive connection, each sending one sentence and
waiting for its answer before sending the next, until --requests answers (or --seconds) per level.
Reports sentences/s, p50 / p99 latency, the ratios to one client, and the server's peak memory.
--decode_buckets sets the server's (and the direct Translator's) call shapes (serve --decode_buckets).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir")
    parser.add_argument("--dev", default=os.path.join(REPO, "data/bible-es-en/dev.es"), help="source sentences")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=256, help="answers per level (at most)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time per level (at most)")
    parser.add_argument("--search", default="greedy", choices=("greedy", "beam"))
    parser.add_argument("--max_wait_ms", type=float, default=5.0, help="the server's batching wait")
    parser.add_argument("--decode_buckets", default="", help="the server's --decode_buckets (default: the workdir's)")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    return parser.parse_args()


def start_server(args) -> tuple[subprocess.Popen, int]:
    """The server command on a free port, once it listens (its warm-up done)."""
    command = [sys.executable, "-m", "s2s_jax.serve", f"--workdir={args.workdir}", "--port=0",
               f"--warmup={args.search}", f"--max_wait_ms={args.max_wait_ms}", "--max_queue=4096"]
    if args.decode_buckets:
        command.append(f"--decode_buckets={args.decode_buckets}")
    process = subprocess.Popen(command, cwd=REPO, text=True, stderr=subprocess.PIPE)
    for line in process.stderr:
        if found := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
            threading.Thread(target=process.stderr.read, daemon=True).start()  # drain the request log
            return process, int(found.group(1))
        print(line, end="", file=sys.stderr)
    raise SystemExit(f"the server did not start (status {process.wait()})")


def client(port: int, sentences: list[str], search: str, queue: list, lock: threading.Lock, deadline: float,
           results: list) -> None:
    """One client: takes the next sentence index, sends it, waits for the answer; until none is left."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while time.monotonic() < deadline:
        with lock:
            if not queue:
                break
            index = queue.pop()
        body = json.dumps({"sentences": [sentences[index]], "search": search})
        start = time.monotonic()
        connection.request("POST", "/v1/translate", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        results.append((index, time.monotonic() - start, response.status, answer.get("translations", [None])[0]))
    connection.close()


def level(port: int, clients: int, sentences: list[str], args) -> list[tuple]:
    """Runs `clients` concurrent clients over args.requests sentences (cycled); their results."""
    queue = [i % len(sentences) for i in range(args.requests)][::-1]
    lock, results = threading.Lock(), []
    deadline = time.monotonic() + args.seconds
    threads = [threading.Thread(target=client, args=(port, sentences, args.search, queue, lock, deadline, results))
               for _ in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.monotonic() - start


def row(name: str, latencies: list[float], seconds: float, identical: bool) -> dict:
    return {"clients": name, "answers": len(latencies), "seconds": round(seconds, 2),
            "sentences_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1), "identical": identical}


def direct(args, sentences: list[str]) -> tuple[dict, list[str]]:
    """Translator called directly, one sentence at a time: its row and the references."""
    from s2s_jax.translate import Translator
    decoding = {"decode_buckets": [int(b) for b in args.decode_buckets.split(",")]} if args.decode_buckets else None
    translator = Translator.from_workdir(args.workdir, decoding=decoding)
    translator.translate(sentences, search=args.search)  # compiles every bucket they use
    references, latencies = [], []
    start = time.monotonic()
    for sentence in sentences:
        begin = time.monotonic()
        references.append(translator.translate([sentence], search=args.search)[0])
        latencies.append(time.monotonic() - begin)
    return row("Translator, direct", latencies, time.monotonic() - start, True), references


def peak_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


def main() -> None:
    args = parse_args()
    with open(args.dev, encoding="utf-8") as f:
        sentences = [line.rstrip("\n") for line in f if line.strip()][:args.requests]
    load_before = os.getloadavg()
    process, port = start_server(args)
    rows = []
    try:
        for clients in [int(n) for n in args.levels.split(",")]:
            results, seconds = level(port, clients, sentences, args)
            rows.append((clients, results, seconds))
        server_peak = peak_mib(process.pid)
    finally:
        process.terminate()
        status = process.wait(timeout=120)
    direct_row, references = direct(args, sentences)
    table = [direct_row]
    for clients, results, seconds in rows:
        identical = all(code == 200 and text == references[index] for index, _, code, text in results)
        table.append(row(str(clients), [latency for _, latency, _, _ in results], seconds, identical))
    single = table[1]
    for entry in table[1:]:
        entry["speedup_vs_1"] = round(entry["sentences_per_s"] / single["sentences_per_s"], 2)
        entry["p99_vs_1_p50"] = round(entry["p99_ms"] / single["p50_ms"], 2)
        entry["p99_vs_1_p99"] = round(entry["p99_ms"] / single["p99_ms"], 2)
    report = {"workdir": args.workdir, "search": args.search, "max_wait_ms": args.max_wait_ms,
              "decode_buckets": args.decode_buckets or "the workdir's",
              "server_peak_mib": round(server_peak, 1), "server_exit_status": status,
              "bench_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "rows": table}
    print(f"{'clients':>20} {'answers':>8} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'x one':>6} {'p99/p50(1)':>10} "
          f"{'p99/p99(1)':>10} identical")
    for entry in table:
        print(f"{entry['clients']:>20} {entry['answers']:>8} {entry['sentences_per_s']:>8} {entry['p50_ms']:>8} "
              f"{entry['p99_ms']:>8} {entry.get('speedup_vs_1', ''):>6} {entry.get('p99_vs_1_p50', ''):>10} "
              f"{entry.get('p99_vs_1_p99', ''):>10} {entry['identical']}")
    print(f"server peak memory {server_peak:.0f} MiB, exit status {status}; load {load_before} -> {os.getloadavg()}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
