"""Where a decode call's time goes, per decoder step, from XLA's own per-op timings.

    python bench/decode_profile.py                    # JoeyNMT-sized random-init model, greedy and beam 5
    python bench/decode_profile.py --beams 5 --calls 5
    python bench/decode_profile.py --decode_dtype=bfloat16   # bfloat16 matmuls, float32 sums

Method: `inference.decode_batch` is compiled ahead of time for one batch of bench/decode_speed.py's
`--model` sources (batch 64, output limit 34), run once untimed, `--calls` times timed, then
`--calls` times under `jax.profiler` (a perfetto trace in a temporary directory). XLA:CPU's thunk executor records one
trace event per executed HLO instruction (fusion, dot, sort, copy, while, ...), named by the
instruction. Each instruction of the compiled module carries the Python call stack that emitted it
(the module text's StackFrames); the first rule of `CATEGORIES` that names a function of that stack
gives its category. A fusion counts whole for the category of its root instruction.

Printed per search: each category's thunk time per decoder step (ms, and % of the steps' summed
thunk time), the loop's wall time per step (per call, first to last event of the loop body, over
the steps), the encoder's thunk time per call and the untraced call's time. Thunks may overlap
(the executor runs independent ones on both cores), so the summed thunk time can exceed the wall
time; "executor gaps" is the wall time no thunk covered (dispatch, and the other processes on a
loaded machine). The profiler's own cost per thunk inflates the categories of many small thunks.
"""
import argparse
import collections
import glob
import gzip
import json
import linecache
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_speed  # noqa: E402  (bench/decode_speed.py: the model sizes and source batches)

from s2s_jax import inference  # noqa: E402

# (category, members): an instruction belongs to the first category with a member anywhere in its
# call stack (`matches`).
CATEGORIES = (
    ("encoder (once per call)", ("Seq2Seq.encode",)),
    ("finished store, stop test", ("_merge_finished", "_split_finished", "_finished_scores", "_rows_done")),
    ("state / sequence gathers", ("_extend_hypotheses", "_take_extensions", "_gather_beams")),
    ("top-k (select)", ("select",)),
    ("search masks, log-prob clean-up", ("_model_log_probs", "_extensions", "_allowed_tokens", "_ngram_banned")),
    ("attention (scores, softmax, context, combine)", ("attend", "scores", "Decoder.cell:w_combine")),
    ("recurrence (gates, LSTM cell, state)", ("lstm_cell", "Decoder.cell", "Decoder.embed_gates")),
    # XLA fuses the projection's matmul with log-softmax's max and subtraction: one category.
    ("output projection + log-softmax", ("Decoder.logits", "Seq2Seq.decode_step")),
)
OTHER = "loop bookkeeping (carry, copies, cond, other)"


def stack_functions(hlo_text: str) -> dict[str, list[str]]:
    """HLO instruction name -> its call stack, innermost first: each frame as "function" and as
    "function:source line"."""
    sections = dict(re.findall(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n((?:\d+ .*\n)+)",
                               hlo_text, re.M))
    functions = dict(re.findall(r"^(\d+) \"(.*)\"$", sections.get("FunctionNames", ""), re.M))
    files = dict(re.findall(r"^(\d+) \"(.*)\"$", sections.get("FileNames", ""), re.M))
    locations = {i: (functions.get(f, "?"), files.get(path, ""), int(line)) for i, path, f, line in re.findall(
        r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", sections.get("FileLocations", ""), re.M)}
    # The text prints a frame's parent as its id + 1 (0: none).
    frames = {int(i): (loc, int(parent) - 1) for i, loc, parent in
              re.findall(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", sections.get("StackFrames", ""), re.M)}

    def stack(frame: int) -> list[str]:
        names = []
        while frame in frames and len(names) < 64:
            loc, parent = frames[frame]
            function, path, line = locations.get(loc, ("?", "", 0))
            names += [function, f"{function}:{linecache.getline(path, line).strip()}"]
            frame = parent
        return names

    stacks, operands = {}, {}
    for name, rest in re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M):
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        if frame:
            stacks[name] = stack(int(frame.group(1)))
        else:  # made by an XLA pass without metadata: the stack of its first operand that has one
            operands[name] = re.findall(r"%([\w.\-]+)", rest.split("metadata=")[0])
    for name, names in operands.items():
        stacks[name] = next((stacks[o] for o in names if o in stacks), [])
    return stacks


def matches(frame: str, member: str) -> bool:
    """Whether a stack entry ("function" or "function:source line") is a rule's member ("function",
    the last part of a nested function's name, or "function:text" with text in its source line)."""
    function, _, source = frame.partition(":")
    wanted, _, text = member.partition(":")
    names = (function, function.split(".<locals>.")[-1])
    return wanted in names and (not text or (bool(source) and text in source))


def category(functions: list[str], rules=CATEGORIES, other: str = OTHER) -> str:
    """The category of an instruction with this call stack: the first rule with a member in it."""
    for name, members in rules:
        if any(matches(frame, member) for frame in functions for member in members):
            return name
    return other


def trace_events(directory: str) -> list[dict]:
    """The complete ('X') events of the perfetto trace written under `directory`."""
    path = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def profile(compiled, args_in, calls: int) -> tuple[list[dict], float]:
    """Runs `compiled(*args_in)` once untimed, `calls` times timed (the fastest counts), then
    `calls` times traced; returns (the HLO events, the fastest untraced call in ms)."""
    jax.block_until_ready(compiled(*args_in))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args_in))
        times.append(1000 * (time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(calls):
            jax.block_until_ready(compiled(*args_in))
        jax.profiler.stop_trace()
        return trace_events(directory), min(times)


def attribute(events: list[dict], stacks: dict[str, list[str]]):
    """(microseconds per category, the loop's wall microseconds): the thunk time of every
    instruction but the containers (while, call, conditional); the loop's wall time is, per call
    (run_id), the span from the first to the last event of the search loop's body."""
    totals, spans = collections.Counter(), collections.defaultdict(list)
    for event in events:
        name = event["args"]["hlo_op"]
        if not re.match(r"(while|call|conditional)(\.\d+)?$", name):
            totals[category(stacks.get(name, []))] += event["dur"]
        if "_search.<locals>.body" in stacks.get(name, []):
            spans[event["args"].get("run_id")] += [event["ts"], event["ts"] + event["dur"]]
    return totals, sum(max(span) - min(span) for span in spans.values())


def loop_steps(events: list[dict], stacks: dict[str, list[str]]) -> int:
    """Iterations of the search loop in the trace: the most common number of runs of one
    instruction of its body (a few thunks record more than one event per run)."""
    runs = collections.Counter(e["args"]["hlo_op"] for e in events
                               if "_search.<locals>.body" in stacks.get(e["args"]["hlo_op"], []))
    return collections.Counter(runs.values()).most_common(1)[0][0]


def report(beam: int, totals, loop_wall: float, steps: int, calls: int, untraced_ms: float) -> None:
    """Prints one search's table: ms per decoder step by category."""
    per_step = {name: us / 1000 / steps for name, us in totals.items() if not name.startswith("encoder")}
    summed = sum(per_step.values())
    wall = loop_wall / 1000 / steps
    print(f"\n{'greedy' if beam == 1 else f'beam {beam}'}: {steps} steps, loop wall {wall:.3f} ms/step, summed thunks "
          f"{summed:.3f} ms/step, encoder {totals['encoder (once per call)'] / 1000 / calls:.2f} ms/call; "
          f"untraced call {untraced_ms:.1f} ms = {untraced_ms * calls / steps:.3f} ms/step")
    for name, ms in sorted(per_step.items(), key=lambda item: -item[1]):
        print(f"  {name:48s} {ms:7.3f} ms  {100 * ms / summed:5.1f}%")
    print(f"  {'executor gaps (wall not covered by a thunk)':48s} {max(wall - summed, 0.0):7.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(decode_speed.MODELS), default="joeynmt")
    parser.add_argument("--beams", default="1,5")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3, help="traced calls per search")
    parser.add_argument("--max_len", type=int, default=0, help="output limit; 0: the model's bench default")
    parser.add_argument("--decode_dtype", choices=("float32", "bfloat16"), default="float32",
                        help="matmul dtype (config.eval.decode_dtype); sums stay float32")
    args = parser.parse_args()
    setup = argparse.Namespace(model=args.model, seed=0, sentences=args.batch, max_len=args.max_len,
                               decode_dtype=args.decode_dtype)
    model, params, src_ids, source_len, max_len, description = decode_speed.random_setup(setup)
    src, src_len, _ = decode_speed.batches(src_ids, args.batch, source_len)[0]
    print(f"{description}\nbatch {args.batch}, source length {source_len}, output limit {max_len}, "
          f"matmuls in {args.decode_dtype}, "
          f"load average {os.getloadavg()[0]:.1f}, {args.calls} traced calls")
    for beam in (int(b) for b in args.beams.split(",")):
        compiled = inference.decode_batch.lower(model, params, src, src_len, search="beam", beam_size=beam,
                                                max_len=max_len, alpha=0.6, n_best=1).compile()
        stacks = stack_functions(compiled.as_text())
        events, untraced_ms = profile(compiled, (params, src, src_len), args.calls)
        totals, loop_wall = attribute(events, stacks)
        report(beam, totals, loop_wall, loop_steps(events, stacks), args.calls, untraced_ms)


if __name__ == "__main__":
    main()
