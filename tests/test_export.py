"""s2s_jax.export: the artifact, loaded in a fresh process without the model code, translates
exactly as `Translator` does (texts, n-best ids and scores, attention)."""
import json
import os
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
