"""s2s_jax.export: the artifact, loaded in a fresh process without the model code, translates
exactly as `Translator` does (texts, n-best ids and scores, attention)."""
import json
import os
import stat
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from tests.conftest import REPO

# Reverse-task sources: both buckets (8, 12), more than one 32-row call in the first, sources
# longer than data.max_len = 11 (truncated), blank lines.
SENTENCES = [" ".join(str(t) for t in np.random.default_rng(i).integers(4, 20, size=1 + i % 13)) for i in range(45)]
SENTENCES[7:7] = ["", "   "]

# Runs in a fresh process: loads the artifact, checks that no model code was imported, prints JSON.
LOADER = """
import json, sys
from s2s_jax import export
translator = export.load(sys.argv[1])
sentences = json.loads(sys.stdin.read())
best = translator.translate(sentences)
five = translator.translate(sentences, n_best=5)
hyps = translator.hypotheses(sentences, n_best=5)
with_attention = translator.hypotheses(sentences, n_best=5, return_attention=True)
heavy = sorted(m for m in sys.modules if m == "flax" or m.startswith(("flax.", "s2s_jax.models", "optax", "orbax")))
print(json.dumps({"heavy": heavy, "best": best, "five": five,
                  "hyps": [[[h.text, h.ids, h.score] for h in hs] for hs in hyps],
                  "attention_hyps": [[[h.text, h.ids, h.score] for h in hs] for hs in with_attention],
                  "attention": [[None if h.attention is None else h.attention.tolist() for h in hs]
                                for hs in with_attention]}))
"""


def _run(*args, stdin=None):
    result = subprocess.run([sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def artifact(tiny_workdir, tmp_path_factory):
    """The tiny workdir exported by the command line: beam 5, n-best 1 and 5, with attention."""
    path = str(tmp_path_factory.mktemp("export") / "tiny.s2s.zip")
    out = _run("-m", "s2s_jax.export", f"--workdir={tiny_workdir}", f"--output={path}")
    assert "buckets [8, 12] x n_best [1, 5] (+ attention)" in out
    return path


@pytest.fixture(scope="module")
def translator(tiny_workdir):
    from s2s_jax.translate import Translator
    return Translator.from_workdir(tiny_workdir)


def _triples(results):
    return [[[h.text, h.ids, h.score] for h in hyps] for hyps in results]


@pytest.mark.slow
def test_fresh_process_without_model_code_translates_as_translator(artifact, translator):
    loaded = json.loads(_run("-c", LOADER, artifact, stdin=json.dumps(SENTENCES)))
    assert loaded["heavy"] == []
    assert loaded["best"] == translator.translate(SENTENCES)
    reference = translator.hypotheses(SENTENCES, n_best=5)
    assert loaded["hyps"] == _triples(reference)  # ids and float32 scores bit for bit
    assert loaded["five"] == [[h.text for h in hyps] for hyps in reference]
    assert len({len(hyps) for hyps in loaded["hyps"]}) == 2  # blank lines: one empty hypothesis
    reference = translator.hypotheses(SENTENCES, n_best=5, return_attention=True)
    assert loaded["attention_hyps"] == _triples(reference)
    for hyps, weights in zip(reference, loaded["attention"]):
        for hyp, weight in zip(hyps, weights):
            if hyp.attention is None:
                assert weight is None
            else:
                np.testing.assert_array_equal(np.asarray(weight, np.float32), hyp.attention)


def test_artifact_layout_symbolic_batch_and_options(artifact):
    with zipfile.ZipFile(artifact) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
        exported = jax.export.deserialize(bytearray(archive.read("decode/S12_N5_A.jax")))
    assert names == {"manifest.json", "params.npz"} | {
        f"decode/S{s}_N{n}{a}.jax" for s in (8, 12) for n in (1, 5) for a in ("", "_A")}  # ids task: no tokenizers
    assert manifest["rows"] == 32 and manifest["options"]["beam_size"] == 5
    assert [b["max_len"] for b in manifest["buckets"]] == [16, 16]  # min(eval.max_decode_len, 2 s + 10)
    src = exported.in_avals[-3]
    assert not isinstance(src.shape[0], int) and src.shape[1] == 12  # [b, 12], b symbolic
    assert [a.shape[1:] for a in exported.out_avals] == [(5, 16), (5,), (5,), (5, 16, 12)]


def test_loader_rejects_what_was_not_exported(artifact):
    from s2s_jax import export
    translator = export.load(artifact)
    with pytest.raises(ValueError, match=r"exported sizes \[1, 5\]"):
        translator.translate(["4 5 6"], n_best=3)
    with pytest.raises(ValueError, match="more than the 11"):
        translator.translate(["4 " * 12], on_long="error")
    with pytest.raises(TypeError, match="list of sentences"):
        translator.translate("4 5 6")


def test_export_errors_name_the_problem(tiny_workdir, tmp_path):
    from s2s_jax import export
    with pytest.raises(ValueError, match="n_best must be <= beam_size"):
        export.export(tiny_workdir, str(tmp_path / "a.zip"), n_best=[6])
    with pytest.raises(ValueError, match="sample"):
        export.export(tiny_workdir, str(tmp_path / "a.zip"), search="sample")
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_sentencepiece_model_exports_and_translates_as_translator(text_workdir, tmp_path):
    """Real text: the sentencepiece models travel in the artifact; three buckets (n-best: see above)."""
    from s2s_jax import data, export
    from s2s_jax.translate import Translator
    path = str(tmp_path / "text.s2s.zip")
    export.export(text_workdir, path, n_best=[1], attention=False)
    loaded = export.load(path)
    assert loaded.manifest["tokenizer"] == "sentencepiece" and [b["length"] for b in loaded.manifest["buckets"]] == [
        12, 20, 33]
    config = json.load(open(os.path.join(text_workdir, "config.json")))
    sentences = data.read_lines(config["data"]["dev_prefix"] + ".es")[:40] + ["", "y " * 40]
    translator = Translator.from_workdir(text_workdir)
    assert _triples(loaded.hypotheses(sentences)) == _triples(translator.hypotheses(sentences))
    assert loaded.translate(sentences) == translator.translate(sentences)


def _damaged(artifact: str, tmp_path, how: str) -> str:
    """A copy of the artifact truncated, with flipped bytes, without a member or with a bad manifest."""
    path = str(tmp_path / f"{how}.s2s.zip")
    blob = open(artifact, "rb").read()
    if how == "truncated":
        open(path, "wb").write(blob[:len(blob) // 2])
    elif how == "flipped":  # inside params.npz's deflated data: a zlib or CRC error
        with zipfile.ZipFile(artifact) as archive:
            info = archive.getinfo("params.npz")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
        open(path, "wb").write(blob[:start] + bytes(b ^ 0xFF for b in blob[start:start + 64]) + blob[start + 64:])
    else:
        with zipfile.ZipFile(artifact) as source, zipfile.ZipFile(path, "w") as target:
            for info in source.infolist():
                if how == "no_function" and info.filename == "decode/S8_N1.jax":
                    continue
                content = b"{not json" if how == "bad_manifest" and info.filename == "manifest.json" else source.read(info)
                target.writestr(info, content)
    return path


@pytest.mark.parametrize("how, what", [("truncated", "BadZipFile"), ("flipped", "(error|BadZipFile)"),
                                       ("no_function", "decode/S8_N1.jax"), ("bad_manifest", "JSON|Expecting")])
def test_damaged_artifact_raises_export_error_naming_the_file(artifact, tmp_path, how, what):
    from s2s_jax import export
    path = _damaged(artifact, tmp_path, how)
    with pytest.raises(export.ExportError, match=what) as raised:
        export.load(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "export it again" in message
    with pytest.raises(export.ExportError, match="No such file"):
        export.load(str(tmp_path / "missing.zip"))


def test_archive_is_written_under_a_name_of_its_own(tmp_path):
    """Another run's file in progress is never touched; a failed write leaves nothing."""
    from s2s_jax import export
    output = tmp_path / "a.s2s.zip"
    other = tmp_path / "a.s2s.zip.partial"
    other.write_bytes(b"another run's archive in progress")
    with export._archive(str(output)) as archive:
        archive.writestr("x", b"mine")
    assert other.read_bytes() == b"another run's archive in progress"
    assert zipfile.ZipFile(output).read("x") == b"mine"
    with pytest.raises(RuntimeError), export._archive(str(output)) as archive:
        archive.writestr("x", b"half")
        raise RuntimeError("failed midway")
    assert sorted(os.listdir(tmp_path)) == ["a.s2s.zip", "a.s2s.zip.partial"]
    assert zipfile.ZipFile(output).read("x") == b"mine"
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match=f"--output {pipe} is not a regular file"), export._archive(str(pipe)):
        pass
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


def _export_cli(*args):
    return subprocess.run([sys.executable, "-m", "s2s_jax.export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("flags, named", [
    (["--output={tmp}"], "is a directory"),
    (["--output=/proc/a.s2s.zip"], "/proc/a.s2s.zip: cannot be written there"),
    (["--output={tmp}/a.zip", "--platforms=bogus"], "--platforms: unknown platform(s) ['bogus']"),
    (["--output={tmp}/a.zip", "--n_best=a"], "--n_best must be comma-separated integers"),
])
def test_cli_refuses_bad_places_and_flags_up_front(tiny_workdir, tmp_path, flags, named):
    result = _export_cli(f"--workdir={tiny_workdir}", *(flag.format(tmp=tmp_path) for flag in flags))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines[-1].startswith("export: ") and named in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


def _functions(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist() if name.startswith("decode/")}


def test_a_second_export_reads_its_functions_from_the_cache(tiny_workdir, tmp_path, monkeypatch):
    """With a compilation cache, exporting the same workdir again lowers nothing and writes the same
    functions; another n-best size is lowered anew."""
    from s2s_jax import compiled, export
    lowered, export_function = [], jax.export.export
    monkeypatch.setattr(jax.export, "export", lambda *a, **k: lowered.append(1) or export_function(*a, **k))
    compiled.configure(str(tmp_path / "executables"))
    counts = []
    try:
        for name, n_best in (("a", 1), ("b", 1), ("c", 2)):
            before = len(lowered)
            export.export(tiny_workdir, str(tmp_path / f"{name}.zip"), n_best=[n_best], attention=False)
            counts.append(len(lowered) - before)
    finally:
        compiled.configure(None)
    assert counts[0] > 0 and counts == [counts[0], 0, counts[0]]
    first = _functions(tmp_path / "a.zip")
    assert _functions(tmp_path / "b.zip") == first
    assert set(_functions(tmp_path / "c.zip").values()).isdisjoint(first.values())
