"""Decoding speed of this checkout against other commits, side by side in one process.

    python bench/decode_compare.py --against c1ff071            # the JoeyNMT-sized bench, greedy and beam 5
    python bench/decode_compare.py --against 8d96058,c1ff071 --repeats 5

Each commit's `s2s_jax` package is read with `git archive` into a temporary directory, renamed
(`s2s_jax_<commit>`, its imports rewritten) and imported next to this checkout's, so all variants
run in one process on the same sources: bench/decode_speed.py's `--model` setup (random init,
batch 64, every source padded to one length). Where a commit's parameter tree has this checkout's
names and shapes, it decodes with this checkout's parameters and its outputs are compared with
this checkout's (identical sequences and scores, or how many rows differ); otherwise it decodes with
its own initialisation from the same seed. Each variant compiles once per search; then `--repeats`
rounds time one pass over all batches of every variant in turn (interleaved, so a change of load
hits all alike; each round starts with the next variant). Printed: the fastest pass's output
tokens/s per variant and its ratio to this checkout's; the load average goes with every figure.
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_speed  # noqa: E402  (the model sizes and source batches)

import s2s_jax  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def import_commit(commit: str, directory: str):
    """Commit's s2s_jax package, imported as `s2s_jax_<commit>` from a copy under `directory`."""
    alias = f"s2s_jax_{commit}"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "s2s_jax"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    os.rename(os.path.join(directory, "s2s_jax"), os.path.join(directory, alias))
    for path in Path(directory, alias).glob("*.py"):
        path.write_text(re.sub(r"\bs2s_jax\b", alias, path.read_text()))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    for module in ("models", "inference"):
        importlib.import_module(f"{alias}.{module}")
    return sys.modules[alias]


def variant_params(package, sizes: dict, params, seed: int, source_len: int):
    """(model, params, shared): this checkout's params if the package's model has their tree, else
    its own initialisation from `seed`."""
    model = package.models.Seq2Seq(**sizes)
    dummy = jax.numpy.ones((1, source_len), jax.numpy.int32)
    init = lambda: model.init(jax.random.PRNGKey(seed), dummy, jax.numpy.ones((1,), jax.numpy.int32), dummy,  # noqa: E731
                              fast_path_only=True)["params"]
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    if shapes(jax.eval_shape(init)) == shapes(params):
        return model, params, True
    return model, init(), False


def compiled_decoder(package, model, params, work, max_len: int, beam: int):
    """The package's decode_batch compiled for one batch shape: a function of (src, src_len)."""
    options = dict(search="beam", beam_size=beam, max_len=max_len, alpha=0.6, n_best=1)
    compiled = package.inference.decode_batch.lower(model, params, work[0][0], work[0][1], **options).compile()
    return lambda src, src_len: compiled(params, src, src_len)


def one_pass(decode, work) -> tuple[float, int, list]:
    """(seconds, output tokens, outputs) of one pass over the batches."""
    tokens, outputs = 0, []
    start = time.perf_counter()
    for src, src_len, real in work:
        beams = decode(src, src_len)
        lengths = np.asarray(beams.lengths)                              # [batch, 1], blocks
        tokens += int(lengths[:real, 0].sum())
        outputs.append((np.asarray(beams.sequences[:real]), np.asarray(beams.scores[:real])))
    return time.perf_counter() - start, tokens, outputs


def differing_rows(outputs, reference) -> int:
    """Rows whose sequences or scores differ from the reference's."""
    return sum(int(np.sum(np.any(s != rs, axis=(1, 2)) | np.any(c != rc, axis=1)))
               for (s, c), (rs, rc) in zip(outputs, reference))


def compare(variants: dict, work, max_len: int, beam: int, repeats: int) -> None:
    """Times every variant `repeats` times, interleaved; prints tokens/s, ratios and output checks."""
    decoders = {name: compiled_decoder(pkg, model, params, work, max_len, beam)
                for name, (pkg, model, params, _) in variants.items()}
    for decode in decoders.values():
        one_pass(decode, work[:1])                                       # warm-up, untimed
    best, outputs, loads, names = {}, {}, [], list(decoders)
    for round_ in range(repeats):
        loads.append(os.getloadavg()[0])
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each round starts with the next
            seconds, tokens, outputs[name] = one_pass(decoders[name], work)
            best[name] = max(best.get(name, 0.0), tokens / seconds)
    label = "greedy" if beam == 1 else f"beam {beam}"
    here = next(iter(variants))
    print(f"{label}: load average {min(loads):.1f}-{max(loads):.1f} during the {repeats} rounds")
    for name, (_, _, _, shared) in variants.items():
        check = (f"{differing_rows(outputs[name], outputs[here])} rows differ" if shared and name != here
                 else "own params" if not shared else "")
        print(f"  {name:18s} {best[name]:9,.0f} tokens/s  {best[name] / best[here]:6.3f}x this checkout's  {check}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="c1ff071", help="commits, comma-separated")
    parser.add_argument("--model", choices=sorted(decode_speed.MODELS), default="joeynmt")
    parser.add_argument("--beams", default="1,5")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=617)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup = argparse.Namespace(model=args.model, seed=0, sentences=args.sentences, max_len=0, decode_dtype="float32")
    model, params, src_ids, source_len, max_len, description = decode_speed.random_setup(setup)
    work = decode_speed.batches(src_ids, args.batch, source_len)
    sizes = decode_speed.MODELS[args.model][0]
    print(f"{description}\n{args.sentences} sentences, batch {args.batch}, source length {source_len}, "
          f"output limit {max_len}")
    with tempfile.TemporaryDirectory() as directory:
        variants = {"this checkout": (s2s_jax, model, params, True)}
        for commit in args.against.split(","):
            package = import_commit(commit, directory)
            variants[commit] = (package, *variant_params(package, sizes, params, 0, source_len))
        for beam in (int(b) for b in args.beams.split(",")):
            compare(variants, work, max_len, beam, args.repeats)


if __name__ == "__main__":
    main()
