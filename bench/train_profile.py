"""Where a train step's time goes, from XLA's own per-op timings (issue 22 item 2).

    python bench/train_profile.py                  # bench/train_speed.py's small config, fused output layer
    python bench/train_profile.py --calls 5 --output-chunk 0

Method (bench/decode_profile.py's): `steps.train_step` on bench/train_speed.py's model and batch is
compiled ahead of time, run once untimed, `--calls` times timed, then `--calls` times under
`jax.profiler`. Every HLO instruction the thunk executor ran is put in the first category of
`CATEGORIES` whose function is in its Python call stack (the scans: by the op_name, `SCANS`), and
in the forward or the backward pass
(backward: its op_name holds `transpose(`, JAX's name for the reverse-mode part). Inside the
backward scans, an instruction whose result has the shape of a weight matrix (not of any
[batch, ...] array) is the per-step weight-gradient accumulation and gets its own row. Printed: ms
per step of thunk time per row and its share; the untraced step time; executor gaps (wall time no
thunk covered). The profiler's own cost per thunk inflates the rows of many small thunks (the
scans).
"""
import argparse
import collections
import os
import re
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_profile  # noqa: E402
import reference_loops  # noqa: E402
import train_speed  # noqa: E402

CATEGORIES = (
    ("optimizer (Adam, norm, finite checks)", ("_update",)),
    ("output layer + loss (fused)", ("output_layer.cross_entropy", "_fused", "_fused_fwd", "_fused_bwd",
                                     "steps.cross_entropy", "Decoder.logits")),
    ("encoder outside the scan (embeddings, input projections)", ("Encoder.__call__",)),
    ("decoder outside the scan (embeddings, keys, bridge)", ("Decoder.embed_gates", "Decoder.memory",
                                                            "Decoder.initial_state", "Seq2Seq.encode",
                                                            "Decoder.teacher_forced")),
)
OTHER = "other (gradient plumbing, copies, loop bookkeeping)"
# The scans, by the op_name of their instructions (JAX's name stack): a custom VJP's backward
# instructions carry the call stack of the primal call, not the backward function's.
SCANS = (("encoder scan", "/encoder/", "/while"), ("decoder scan", "decoder.teacher_forced/while", ""))


def instruction_facts(hlo_text: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HLO instruction name -> (its op_name metadata, its result shape; () when not one array)."""
    facts = {}
    for name, rest in re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M):
        shape = re.match(r"f32\[([\d,]*)\]", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        facts[name] = (op_name.group(1) if op_name else "",
                       tuple(int(d) for d in shape.group(1).split(",") if d) if shape else ())
    return facts


def row(name: str, stacks, facts, weight_shapes: set) -> str:
    """The table row of one instruction: category, pass, weight-gradient accumulation."""
    op_name, shape = facts.get(name, ("", ()))
    scans = [scan for scan, *parts in SCANS if all(part in op_name for part in parts)]
    where = scans[0] if scans else decode_profile.category(stacks.get(name, []), CATEGORIES, OTHER)
    backward = "transpose(" in op_name
    if scans and backward and shape in weight_shapes:
        return f"{where}, backward: weight-gradient accumulation"
    return f"{where}, {'backward' if backward else 'forward'}" if where != OTHER else where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=sorted(reference_loops.CONFIGS))
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--output-chunk", type=int, default=512)
    args = parser.parse_args()
    step, state, batch = train_speed.setup_ours(reference_loops.CONFIGS[args.config], "float32", args.output_chunk)
    compiled = jax.jit(step).lower(state, batch).compile()
    stacks, facts = decode_profile.stack_functions(compiled.as_text()), instruction_facts(compiled.as_text())
    weight_shapes = {tuple(p.shape) for p in jax.tree.leaves(state.params) if p.ndim == 2}
    events, untraced_ms = decode_profile.profile(compiled, (state, batch), args.calls)
    totals = collections.Counter()
    for event in events:
        name = event["args"]["hlo_op"]
        if not re.match(r"(while|call|conditional)(\.\d+)?$", name):
            totals[row(name, stacks, facts, weight_shapes)] += event["dur"] / 1000 / args.calls
    summed = sum(totals.values())
    print(f"config {args.config}, output chunk {args.output_chunk}, load average {os.getloadavg()[0]:.1f}; "
          f"untraced step {untraced_ms:.1f} ms, summed thunks {summed:.1f} ms/step")
    for name, ms in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {name:72s} {ms:7.1f} ms  {100 * ms / summed:5.1f}%")


if __name__ == "__main__":
    main()
