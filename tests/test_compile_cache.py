"""The compilation caches: JAX's persistent cache and `s2s_jax.compiled`'s executables. A second
identical run, or a second `translate` of a workdir, loads what the first compiled; a loaded
executable gives the same bits; a damaged entry is compiled again."""
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import cli, compiled, logbook
from tests.conftest import REPO


@pytest.fixture
def cache_dir(tmp_path):
    """`compiled` keeps executables in a fresh folder for the test, in this process only."""
    directory = tmp_path / "executables"
    compiled.configure(str(directory))
    yield directory
    compiled.configure(None)


def _affine(x, y, *, scale: float = 2.0):
    """x [N], y [N] -> (x * scale + y, sum)."""
    return {"out": x * scale + y, "sum": jnp.sum(x)}


def _entries(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(compiled.SUFFIX))


def test_a_loaded_executable_gives_the_same_bits_and_compiles_nothing(cache_dir):
    x = jnp.asarray(np.random.default_rng(0).normal(size=7), jnp.float32)
    y = jnp.linspace(-1.0, 1.0, 7, dtype=jnp.float32)
    miss = compiled.jit(_affine, static_argnames=("scale",))(x, y, scale=3.0)
    assert len(_entries(cache_dir)) == 1
    stats = logbook.CompileStats()
    hit = compiled.jit(_affine, static_argnames=("scale",))(x, y, scale=3.0)  # a new function: from disk
    assert stats.count == 0
    np.testing.assert_array_equal(hit["out"], miss["out"])
    np.testing.assert_array_equal(hit["sum"], miss["sum"])


def test_a_corrupted_entry_is_compiled_again_with_a_warning(cache_dir, caplog):
    x = jnp.arange(5, dtype=jnp.float32)
    want = compiled.jit(_affine)(x, x)
    (entry,) = _entries(cache_dir)
    with open(cache_dir / entry, "r+b") as f:  # damage the middle of the entry
        f.seek(os.path.getsize(cache_dir / entry) // 2)
        f.write(b"\0garbage\0" * 64)
    with caplog.at_level(logging.WARNING, logger="s2s_jax"):
        got = compiled.jit(_affine)(x, x)
    assert any("unreadable" in r.getMessage() and entry in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(got["out"], want["out"])
    caplog.clear()
    stats = logbook.CompileStats()
    compiled.jit(_affine)(x, x)  # rewritten: loads again, silently
    assert stats.count == 0 and not caplog.records


def test_an_empty_entry_is_a_miss(cache_dir):
    x = jnp.arange(3, dtype=jnp.float32)
    compiled.jit(_affine)(x, x)
    (entry,) = _entries(cache_dir)
    (cache_dir / entry).write_bytes(b"")
    np.testing.assert_array_equal(compiled.jit(_affine)(x, x)["out"], x * 3)


def test_shapes_dtypes_static_args_and_bound_values_are_different_keys(cache_dir):
    f = compiled.jit(_affine, static_argnames=("scale",))
    x3, x4 = jnp.ones(3), jnp.ones(4)
    f(x3, x3)
    f(x3, x3)  # the same signature: nothing new
    assert len(_entries(cache_dir)) == 1
    f(x4, x4)  # another shape
    f(x3, x3, scale=5.0)  # another static argument
    f(x3.astype(jnp.bfloat16), x3.astype(jnp.bfloat16))  # another dtype
    f(x3, {"nested": x3}["nested"])  # same structure and avals: the same key
    assert len(_entries(cache_dir)) == 4 and f.size() == 4
    compiled.jit(functools.partial(_affine, scale=7.0))(x3, x3)  # a bound value
    compiled.jit(functools.partial(_affine, scale=8.0))(x3, x3)
    assert len(_entries(cache_dir)) == 6
    compiled.jit(_affine, static_argnames=("scale",), context="other")(x3, x3)  # the caller's context
    assert len(_entries(cache_dir)) == 7


def test_donation_is_kept(cache_dir):
    def step(state, batch):
        return jax.tree.map(lambda v: v + batch.sum(), state)

    for _ in range(2):  # compiled, then loaded
        state = {"w": jnp.ones((4, 4))}
        compiled.jit(step, donate_argnums=0)(state, jnp.ones(3))
        assert state["w"].is_deleted()


def test_unstable_values_stay_in_this_process(cache_dir, caplog):
    class Opaque:  # known only by its address: no stable key
        def __call__(self, x):
            return x + 1

    opaque = Opaque()
    with caplog.at_level(logging.WARNING, logger="s2s_jax"):
        out = compiled.jit(lambda x: opaque(x))(jnp.ones(2))
    np.testing.assert_array_equal(out, [2.0, 2.0])
    assert not os.path.exists(cache_dir) and "this process only" in caplog.text


def test_inside_a_trace_it_is_plain_jit(cache_dir):
    f = compiled.jit(_affine)
    assert float(jax.jit(lambda x: f(x, x)["sum"])(jnp.ones(3))) == 3.0
    assert not os.path.exists(cache_dir)


def test_off_turns_both_caches_off():
    before = jax.config.jax_compilation_cache_dir
    cli.use_compilation_cache("off")
    assert compiled.directory() is None and jax.config.jax_compilation_cache_dir == before


def test_over_the_cap_the_least_recently_used_entries_go(cache_dir):
    """A load makes an entry recent; a write over the cap removes the oldest others, never itself."""
    f = compiled.jit(_affine)
    arrays = {n: jnp.ones(n, jnp.float32) for n in (3, 4, 5, 6)}
    names = {}  # length -> its entry
    cache_dir.mkdir()
    for n in (3, 4, 5):
        before = set(_entries(cache_dir))
        f(arrays[n], arrays[n])
        (names[n],) = set(_entries(cache_dir)) - before
    now = time.time()
    for age, n in zip((300, 200, 100), (3, 4, 5)):  # written long ago, 3 first
        os.utime(cache_dir / names[n], (now - age, now - age))
    compiled.jit(_affine)(arrays[3], arrays[3])  # a new process would load 3 from disk: now the most recent
    largest = max(os.path.getsize(cache_dir / name) for name in names.values())
    compiled.configure(str(cache_dir), max_bytes=int(2.5 * largest))
    stats = logbook.CompileStats()
    compiled.jit(_affine)(arrays[6], arrays[6])  # compiled and written: four entries, room for two
    kept = set(_entries(cache_dir))
    assert stats.count == 1 and len(kept) == 2
    assert names[3] in kept and names[4] not in kept and names[5] not in kept


def test_the_cap_flag_reaches_both_caches(tmp_path):
    settings = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_compilation_cache_max_size")
    before = {name: getattr(jax.config, name) for name in settings}
    cli.use_compilation_cache(str(tmp_path), max_gb=0.5)
    try:
        assert compiled.directory() == str(tmp_path / "executables")
        assert compiled._STATE["max_bytes"] == 3 * 2**27 and jax.config.jax_compilation_cache_max_size == 2**27
    finally:
        compiled.configure(None)
        for name, value in before.items():
            jax.config.update(name, value)


JAX_CACHE_CAP = """
import sys, jax, jax.numpy as jnp
from s2s_jax import cli
cli.use_compilation_cache(sys.argv[1], max_gb=float(sys.argv[2]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
for n in range(1, 9):
    jax.jit(lambda x, n=n: jnp.sin(x) * n)(jnp.ones(n)).block_until_ready()
"""


def test_jax_cache_keeps_to_its_quarter_of_the_cap(tmp_path):
    """JAX's own cache holds at most a quarter of --compilation_cache_max_gb, least recently used
    out first; entries of an uncapped cache (no access-time files, as earlier versions wrote them)
    are dated by their modification time, so they count and go first."""
    share = 64_000
    old = [tmp_path / f"jit_old{i}-{i:064x}-cache" for i in range(2)]
    for path in old:
        path.write_bytes(b"x" * 30_000)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    run = subprocess.run([sys.executable, "-c", JAX_CACHE_CAP, str(tmp_path), str(4 * share / 2**30)],
                         check=False, cwd=REPO, env=_env(), capture_output=True, text=True)
    assert run.returncode == 0 and "Error writing persistent compilation cache" not in run.stderr, run.stderr[-2000:]
    entries = [p for p in tmp_path.iterdir() if p.name.endswith("-cache")]
    assert not any(path.exists() for path in old)
    assert len(entries) >= 2 and sum(p.stat().st_size for p in entries) <= share
    assert all(p.with_name(p.name.removesuffix("-cache") + "-atime").exists() for p in entries)


def test_the_key_changes_with_the_source_and_the_libraries(cache_dir, monkeypatch):
    """Another s2s_jax source or another jax / flax / optax version never loads this executable."""
    assert len(compiled.source_hash()) == 64 and "flax" in compiled.library_versions()
    x = jnp.ones(3, jnp.float32)
    compiled.jit(_affine)(x, x)
    monkeypatch.setattr(compiled, "source_hash", lambda: "edited source")
    compiled.jit(_affine)(x, x)
    monkeypatch.setattr(compiled, "library_versions", lambda: "jax 0, jaxlib 0, flax 0, optax 0")
    compiled.jit(_affine)(x, x)
    assert len(_entries(cache_dir)) == 3
    assert compiled.describe(functools.partial(_affine, scale=1.0)) != compiled.describe(
        functools.partial(_affine, scale=1.5))


# ----------------------------------------------------------------------------- across processes
def _env() -> dict:
    return {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}


def run_tiny(workdir, cache_dir):
    """A 2-step configs/tiny.py run in a fresh process; returns its summary.json."""
    run = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                          f"--compilation_cache={cache_dir}", "--config.num_train_steps=2",
                          "--config.eval_every_steps=2", "--config.data.synthetic_train_size=64",
                          "--config.data.synthetic_dev_size=8"],
                         check=False, cwd=REPO, env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def _train_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if "loss" in k or "bleu" in k or "norm" in k} for row in rows]


@pytest.mark.slow
def test_second_run_compiles_far_less_and_trains_the_same_bits(tmp_path):
    """The train step, eval step and dev decoding loaded from the cache give the first run's
    numbers exactly (parameter initialisation too: one cached call). What is left compiling in the
    repeat is the optimizer state's eager ops (zeros, copies; ~1 s of ~14 s on this tiny run, the
    demo: BUILD_NOTES.md)."""
    cache_dir = tmp_path / "cache"
    first = run_tiny(tmp_path / "first", cache_dir)
    assert _entries(cache_dir / "executables")
    second = run_tiny(tmp_path / "second", cache_dir)
    assert second["compile_s"] <= 0.3 * first["compile_s"], (first["compile_s"], second["compile_s"])
    for key in ("dev_loss", "dev_bleu", "dev_chrf"):
        assert second[key] == first[key], key
    assert _train_rows(tmp_path / "second") == _train_rows(tmp_path / "first")


TRANSLATE_WITH_STATS = """
import atexit, sys
from s2s_jax import logbook, translate
stats = logbook.CompileStats()
atexit.register(lambda: print(f"compile_s={stats.seconds} compilations={stats.count}", file=sys.stderr))
sys.argv = ["translate"] + sys.argv[1:]
translate.run()
"""


def _translate(workdir, cache_dir, source, output) -> float:
    """`python -m s2s_jax.translate` (beam 3, 2-best) in a fresh process; its compile seconds."""
    run = subprocess.run([sys.executable, "-c", TRANSLATE_WITH_STATS, f"--workdir={workdir}", f"--input={source}",
                          f"--output={output}", f"--compilation_cache={cache_dir}", "--search=beam",
                          "--beam_size=3", "--n_best=2"],
                         check=False, cwd=REPO, env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    line = [line for line in run.stderr.splitlines() if line.startswith("compile_s=")][-1]
    return float(line.split()[0].split("=")[1])


@pytest.mark.slow
def test_second_translate_compiles_a_tenth_and_gives_the_same_bits(tiny_workdir, tmp_path):
    source = tmp_path / "in.txt"
    rng = np.random.default_rng(0)
    source.write_text("".join(" ".join(map(str, rng.integers(3, 16, rng.integers(2, 10)))) + "\n"
                              for _ in range(40)))
    first = _translate(tiny_workdir, tmp_path / "cache", source, tmp_path / "first.txt")
    second = _translate(tiny_workdir, tmp_path / "cache", source, tmp_path / "second.txt")
    assert second <= 0.1 * first, (first, second)
    output = (tmp_path / "first.txt").read_text()
    assert output.strip() and (tmp_path / "second.txt").read_text() == output


HYPOTHESES = """
import json, sys
import numpy as np
from s2s_jax import cli, logbook
from s2s_jax.translate import Translator
cli.use_compilation_cache(sys.argv[2])
import jax
jax.jit(lambda x: x + 1)(np.ones(3))  # JAX settles whether its cache is used at the first compilation
translator = Translator.from_workdir(sys.argv[1])
stats = logbook.CompileStats()
hyps = translator.hypotheses(["4 5 6 7", "9 3 12", "5 5 8 10 11 3"], search="beam", beam_size=3, n_best=2,
                             return_attention=True)
print(json.dumps(dict(compilations=stats.count, hypotheses=[
    [(h.ids, float(h.score).hex(), np.asarray(h.attention).tobytes().hex()) for h in row] for row in hyps])))
"""


@pytest.mark.slow
def test_a_hit_in_a_fresh_process_gives_the_bits_of_the_miss(tiny_workdir, tmp_path):
    """Translator's beam search with attention: ids, scores and attention weights, compiled in one
    process and loaded in another; also when the miss found its XLA binary in JAX's persistent
    cache (such an executable, serialised as it was loaded, lacked its kernels' code)."""
    def decode() -> dict:
        run = subprocess.run([sys.executable, "-c", HYPOTHESES, tiny_workdir, str(tmp_path / "cache")],
                             check=False, cwd=REPO, env=_env(), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.splitlines()[-1])

    miss, hit = decode(), decode()
    assert miss["compilations"] > 0 and hit["compilations"] == 0
    assert hit["hypotheses"] == miss["hypotheses"]
    shutil.rmtree(tmp_path / "cache" / "executables")  # JAX's cache stays warm
    assert decode()["hypotheses"] == miss["hypotheses"]
    hit = decode()
    assert hit["compilations"] == 0 and hit["hypotheses"] == miss["hypotheses"]


QR_THEN_LOWER = """
import sys
import jax, jax.numpy as jnp, numpy as np
from s2s_jax import compiled, logbook
compiled.configure(sys.argv[1])
stats = logbook.CompileStats()
q = compiled.jit(lambda x: jnp.linalg.qr(jnp.outer(x, x) + jnp.eye(3))[0])(np.arange(3, dtype=np.float32))
after = jax.jit(lambda x: x * 2 + 1)(q)  # a lowering after the load
print(stats.count, np.asarray(q).tobytes().hex(), np.asarray(after).tobytes().hex())
"""


def test_an_executable_calling_lapack_loads_in_a_fresh_process(tmp_path):
    """The QR's executable, loaded from disk in a process that lowered no LAPACK call itself, runs
    and gives the miss's bits (without preparing LAPACK first, the call crashed the process)."""
    def run() -> list[str]:
        done = subprocess.run([sys.executable, "-c", QR_THEN_LOWER, str(tmp_path / "executables")],
                              check=False, cwd=REPO, env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        return done.stdout.split()

    miss, hit = run(), run()
    assert len(_entries(tmp_path / "executables")) == 1
    assert int(hit[0]) < int(miss[0]) and hit[1:] == miss[1:]
