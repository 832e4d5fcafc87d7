"""Decoding on a mesh: `CorpusDecoder(mesh=...)` splits each batch's rows over the devices and
returns what the one-device decoder returns, and `Translator` (on this process's devices) translates
as with one device.

One subprocess with 2 virtual CPU devices decodes the session's trained tiny model both ways.
45 short sentences fill one length bucket (one compilation per search): a batch of 32 rows, then
one of 13 real rows and 19 filler rows (device 1 holds filler only).
"""
import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from s2s_jax import data
from s2s_jax.translate import Translator
from tests.conftest import REPO

RUN = """
import json, sys
from s2s_jax import inference
from s2s_jax.translate import Translator
translator = Translator.from_workdir(sys.argv[1])
sentences = json.loads(sys.argv[2])
sharded = translator.decoder  # on a mesh over both devices
single = inference.CorpusDecoder(translator.model, translator.src_tokenizer, translator.tgt_tokenizer,
                                 boundaries=sharded.boundaries, max_source_len=sharded.max_source_len,
                                 max_decode_len=sharded.max_decode_len, rows=sharded.rows)

def best(decoder, options):
    return [[hyps[0].text, hyps[0].score] for hyps in decoder(translator.params, sentences, options)]

result = dict(devices=sharded.mesh.size, translations=translator.translate(sentences))
for search in ("greedy", "beam", "sample"):
    options = translator.options(search=search, seed=3)
    result[search] = best(sharded, options), best(single, options)
inference.MAX_STEP_ELEMENTS = 3 * 5 * translator.tgt_tokenizer.vocab_size  # memory for 3 rows of beam 5
options = translator.options(search="beam", beam_size=5)
result["rows"] = sharded.rows_per_call(options), single.rows_per_call(options)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def sentences():
    """45 dev-like sources of 2..7 symbols (the first length bucket), and a blank line."""
    config = tiny.get_config().data
    src, _ = data.synthetic_task("reverse", 45, config.synthetic_vocab_size, config.synthetic_min_len,
                                 config.bucket_boundaries[0] - 1, seed=4321)
    lines = [" ".join(map(str, s)) for s in src]
    lines.insert(9, "")
    return lines


@pytest.fixture(scope="module")
def two_devices(tiny_workdir, sentences) -> dict:
    """What the subprocess on 2 virtual CPU devices decoded (see RUN)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run([sys.executable, "-c", RUN, tiny_workdir, json.dumps(sentences)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    return result


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])  # sample: each row's key travels with it
def test_mesh_decoding_equals_one_device(two_devices, search):
    sharded, single = two_devices[search]
    assert [text for text, _ in sharded] == [text for text, _ in single]
    assert [score for _, score in sharded] == pytest.approx([score for _, score in single], abs=1e-5)
    assert [i for i, (text, _) in enumerate(sharded) if not text] == [9]  # the blank line only


def test_rows_are_a_multiple_of_the_devices(two_devices):
    assert two_devices["rows"] == [4, 3]


def test_translator_on_two_devices_translates_as_on_one(tiny_workdir, sentences, two_devices):
    assert two_devices["translations"] == Translator.from_workdir(tiny_workdir).translate(sentences)
