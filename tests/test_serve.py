"""Tests for the translation server (s2s_jax.serve, s2s_jax.batcher) and its attention page.

The server runs in this process (uvicorn in a thread) on the session's real es->en model, or as a
command for the signal test (the tiny model). References are independent of the server: each
request translated alone by `Translator`.
"""
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

# The server on the real-text session fixture (a model trained for ~80 s): the extended suite.
pytestmark = pytest.mark.slow

pytest.importorskip("starlette", reason="the server's extra is missing: pip install -e '.[serve]'")
import uvicorn  # noqa: E402

from s2s_jax import batcher, inference, serve  # noqa: E402
from s2s_jax.translate import Translator  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def translator(text_workdir):
    return Translator.from_workdir(text_workdir)


@pytest.fixture(scope="module")
def dev_sentences(text_workdir):
    """The text model's dev sources: every source bucket."""
    with open(os.path.join(text_workdir, "data", "dev.es"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f][:24]


class Recording(serve.WorkdirModel):
    """The server's model, recording how many sentences each decoding call of the worker gets."""

    def __init__(self, translator):
        super().__init__(translator)
        self.calls, self.searches = [], []  # sentences per call; (options, return_attention) per call

    def hypotheses(self, sentences, options, prefixes, return_attention):
        self.calls.append(len(sentences))
        self.searches.append((options, return_attention))
        return super().hypotheses(sentences, options, prefixes, return_attention)


class Running:
    """A Service served by uvicorn in a thread of this process on a free port."""

    def __init__(self, model, **limits):
        self.service = serve.Service(model, serve.Limits(**limits))
        self.server = uvicorn.Server(uvicorn.Config(self.service.app(), host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def request(self, method: str, path: str, body=None):
        return call(self.port, method, path, body)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def call(port: int, method: str, path: str, body=None):
    """(status, decoded JSON or text, headers) of one HTTP request on a connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode("utf-8")
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(text) if kind.startswith("application/json") else text, response.headers
    finally:
        connection.close()


@pytest.fixture(scope="module")
def server(translator):
    """The server on the text model, greedy compiled at start."""
    model = Recording(translator)
    serve.warm_up(model, ["greedy"])
    running = Running(model)
    yield running
    running.stop()


# ----------------------------------------------------------------------------- contracts
def test_concurrent_requests_share_calls_and_get_what_they_get_alone(server, translator, dev_sentences):
    """8 clients at once, two sets of options; the worker waits for 16 sentences (or 10 s), so it
    decodes each set's sentences in one call (8 sentences: 4 requests). Every answer equals
    Translator.translate of that request alone, and nothing is compiled (warmed up at start)."""
    model = server.service.model
    batching = Running(model, max_wait_ms=10_000, max_batch=16)
    requests = [{"sentences": dev_sentences[2 * i:2 * i + 2], "search": "greedy",
                 **({"max_len_a": 1.0, "max_len_b": 4} if i % 2 else {})} for i in range(8)]
    compiled = inference.cached_decode_batch(translator.decoder.mesh).size()
    model.calls.clear()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body: batching.request("POST", "/v1/translate", body), requests))
    finally:
        batching.stop()
    assert sorted(model.calls) == [8, 8]
    assert inference.cached_decode_batch(translator.decoder.mesh).size() == compiled
    for body, (status, answer, _) in zip(requests, answers):
        options = {k: v for k, v in body.items() if k != "sentences"}
        assert status == 200 and answer == {"translations": translator.translate(body["sentences"], **options)}


def test_one_decode_bucket_decodes_a_round_of_any_lengths_in_one_call(text_workdir, dev_sentences, monkeypatch):
    """serve --decode_buckets=<the last boundary>: 8 concurrent requests of sentences from every
    source bucket are one decoding call, and each answer equals that request translated alone with
    the same call shapes."""
    last = Translator.from_workdir(text_workdir).config.data.bucket_boundaries[-1]
    model = Recording(serve.load_model(text_workdir, None, {"decode_buckets": [last]}).translator)
    decoder, shapes = model.translator.decoder, []
    decode_batch = decoder.decode_batch
    monkeypatch.setattr(decoder, "decode_batch", lambda *a, **k: shapes.append(k["src"].shape) or decode_batch(*a, **k))
    serve.warm_up(model, ["greedy"])
    shapes.clear()
    batching = Running(model, max_wait_ms=10_000, max_batch=16)
    requests = [{"sentences": dev_sentences[2 * i:2 * i + 2], "search": "greedy"} for i in range(8)]
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body: batching.request("POST", "/v1/translate", body), requests))
    finally:
        batching.stop()
    assert model.calls[-1:] == [16] and shapes == [(32, last)]
    for body, (status, answer, _) in zip(requests, answers):
        assert status == 200 and answer == {"translations": model.translator.translate(body["sentences"], search="greedy")}
    with pytest.raises(ValueError, match="an exported artifact keeps the settings it was exported with"):
        serve.load_model(None, "model.zip", {"decode_rows": 8})


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, r"^the body is not JSON"),
    (b"[1, 2]", 422, r"^the body must be a JSON object"),
    ({"text": ["Dios"]}, 422, r"^sentences: required"),
    ({"sentences": "Dios"}, 422, r"one sentence: pass a list"),
    ({"sentences": ["Dios", 3]}, 422, r"sentence 2 is a int"),
    ({"sentences": []}, 422, r"^sentences is empty"),
    ({"sentences": ["Dios"] * 65}, 413, r"65 sentences, more than the limit of 64 .*--max_sentences"),
    ({"sentences": ["Dios " * 500]}, 413, r"sentence 1 has 2500 characters, more than the limit of 2000"),
    ({"sentences": ["Dios"], "bogus": 1}, 422, r"unknown search option\(s\) \['bogus'\]"),
    ({"sentences": ["Dios"], "beam_size": "5"}, 422, r"^beam_size must be an integer >= 1, got '5'$"),
    ({"sentences": ["Dios"], "search": "greedy", "n_best": 2}, 422, r"^greedy search returns one hypothesis"),
    ({"sentences": ["Dios"], "return_attention": "yes"}, 422, r"^return_attention must be true or false"),
    ({"sentences": ["Dios"], "prefixes": ["a", "b"]}, 422, r"^prefixes must be a list of 1 strings"),
    ({"sentences": ["Dios " * 40], "search": "greedy", "on_long": "error"}, 422, r"^line 1: .*source pieces"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, translator, body, status, message):
    got, answer, _ = server.request("POST", "/v1/translate", body)
    assert got == status and re.search(message, answer["error"]), answer
    status, answer, _ = server.request("POST", "/v1/translate", {"sentences": ["Dios"], "search": "greedy"})
    assert status == 200 and answer["translations"] == translator.translate(["Dios"], search="greedy")


def test_n_best_with_scores_and_attention_labelled_by_pieces(server, translator, dev_sentences):
    sentence = dev_sentences[0]
    status, answer, _ = server.request("POST", "/v1/translate", {"sentences": [sentence, ""], "search": "greedy",
                                                                  "return_attention": True})
    [hyp] = translator.hypotheses([sentence], search="greedy", return_attention=True)[0]
    listed = answer["hypotheses"][0]
    assert status == 200 and answer["translations"] == [hyp.text, ""] and answer["hypotheses"][1]["nbest"][0]["text"] == ""
    [item] = listed["nbest"]
    assert item["text"] == hyp.text and item["score"] == pytest.approx(hyp.score, abs=1e-6)
    weights, src_pieces, out_pieces = translator.attention(sentence, hyp.ids)  # teacher-forced, independent
    assert listed["source_pieces"] == src_pieces and item["target_pieces"] == out_pieces
    np.testing.assert_allclose(np.array(item["attention"]), weights, atol=2e-3)


def test_health_info_and_page(server, translator):
    assert server.request("GET", "/v1/health")[:2] == (200, {"status": "ok", "queued_sentences": 0})
    status, info, _ = server.request("GET", "/v1/info")
    assert status == 200 and info["kind"] == "workdir" and info["model"] == translator.workdir
    assert info["vocab_sizes"] == {"source": translator.src_tokenizer.vocab_size,
                                   "target": translator.tgt_tokenizer.vocab_size}
    assert info["defaults"] == translator.options()._asdict() and info["limits"]["max_sentences"] == 64
    assert info["config"]["data"]["bucket_boundaries"] == list(translator.config.data.bucket_boundaries)
    status, page, headers = server.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and 'id="translate"' in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must not fetch anything from elsewhere"


def test_full_queue_gets_503_with_retry_after_and_a_late_answer_504(translator):
    """The worker waits 2 s for more sentences: the first request fills the queue of 2, the next is
    refused; a request with a 0.3 s timeout is answered 504 and dropped, never decoded."""
    running = Running(serve.WorkdirModel(translator), max_wait_ms=2000, max_queue=2)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(running.request, "POST", "/v1/translate", {"sentences": ["Dios", "luz"], "search": "greedy"})
            while running.service.batcher.queued < 2:
                time.sleep(0.01)
            status, answer, headers = running.request("POST", "/v1/translate", {"sentences": ["agua"]})
            assert status == 503 and headers["Retry-After"] == "1" and "limit 2" in answer["error"], answer
            assert first.result()[:2] == (200, {"translations": translator.translate(["Dios", "luz"], search="greedy")})
    finally:
        running.stop()
    model = Recording(translator)
    running = Running(model, max_wait_ms=1000, timeout_s=0.3)
    try:
        status, answer, _ = running.request("POST", "/v1/translate", {"sentences": ["Dios"]})
        assert status == 504 and "0.3 s (--timeout_s)" in answer["error"]
    finally:
        running.stop()
    assert model.calls == []


def test_an_exported_artifact_is_served_with_its_fixed_options(tiny_workdir, tmp_path):
    from s2s_jax import export
    path = str(tmp_path / "tiny.s2s.zip")
    export.export(tiny_workdir, path, n_best=[1], attention=False, beam_size=2)
    exported = export.load(path)
    model = serve.ExportModel(exported, path)
    serve.warm_up(model, ["greedy", "beam", "beam+attention"])  # what it has: beam without attention
    running = Running(model)
    try:
        sentences = ["4 5 6", "", "7 8 9 10 11"]
        status, answer, _ = running.request("POST", "/v1/translate", {"sentences": sentences, "on_long": "error"})
        assert status == 200 and answer == {"translations": exported.translate(sentences)}
        status, answer, _ = running.request("POST", "/v1/translate", {"sentences": ["4 5"], "beam_size": 3})
        assert status == 422 and answer["error"].startswith("beam_size: fixed when the artifact was exported")
        status, answer, _ = running.request("POST", "/v1/translate", {"sentences": ["4 5"], "n_best": 2})
        assert status == 422 and answer["error"] == "n_best must be one of the exported sizes [1], got 2"
        status, info, _ = running.request("GET", "/v1/info")
        assert info["kind"] == "export" and info["defaults"]["beam_size"] == 2 and info["config"]["n_best"] == [1]
    finally:
        running.stop()


# ----------------------------------------------------------------------------- the batcher
def test_a_failing_group_is_decoded_job_by_job_and_close_finishes_the_queue():
    def decode(sentences):
        if "bad" in sentences:
            raise ValueError("a bad sentence")
        return [s.upper() for s in sentences]

    worker = batcher.Batcher(max_wait_s=10, max_queue=100, max_batch=5)  # waits for 5 sentences
    futures = [worker.submit(s, decode, "same") for s in (["a", "b"], ["bad"], ["c", "d"])]
    assert futures[0].result(30).results == ["A", "B"] and futures[2].result(30).results == ["C", "D"]
    with pytest.raises(ValueError, match="a bad sentence"):
        futures[1].result(30)
    queued = [worker.submit([s], decode, None) for s in "xyz"]  # the worker waits up to 10 s for more
    worker.close(timeout=30)
    assert [f.result(0).results for f in queued] == [["X"], ["Y"], ["Z"]]
    with pytest.raises(batcher.Closed):
        worker.submit(["w"], decode, None)


# ----------------------------------------------------------------------------- the command
def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(tiny_workdir):
    """12 requests queued (the worker would wait a minute for more); SIGTERM: the worker stops
    waiting, each request is answered, the server exits 0, and a new connection is refused."""
    bodies = [{"sentences": [" ".join(str(4 + (i + k) % 9) for k in range(2 + i % 7))] * 4, "search": "greedy"}
              for i in range(12)]
    alone = Translator.from_workdir(tiny_workdir).translate([body["sentences"][0] for body in bodies], search="greedy")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, "-m", "s2s_jax.serve", f"--workdir={tiny_workdir}", "--port=0",
                                "--warmup=greedy", "--max_wait_ms=60000", "--max_batch=1000"],
                               cwd=REPO, env=env, text=True, stderr=subprocess.PIPE)
    try:
        port = _listening_port(process)
        with ThreadPoolExecutor(12) as pool:
            answers = [pool.submit(call, port, "POST", "/v1/translate", body) for body in bodies]
            while call(port, "GET", "/v1/health")[1]["queued_sentences"] < 48:
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            for translation, answer in zip(alone, answers):  # what the model gives each sentence alone
                assert answer.result(60)[:2] == (200, {"translations": [translation] * 4})
        stderr = process.stderr.read()
        assert process.wait(timeout=60) == 0, stderr
        assert stderr.count("POST /v1/translate 4 sentences") == 12 and "Traceback" not in stderr, stderr
        with pytest.raises(ConnectionRefusedError):
            call(port, "GET", "/v1/health")
    finally:
        process.kill()


def _listening_port(process: subprocess.Popen) -> int:
    for line in process.stderr:
        if found := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
            return int(found.group(1))
    raise AssertionError(f"the server did not start (status {process.wait()})")


# ----------------------------------------------------------------------------- the page
def test_page_in_headless_chromium(server, translator, dev_sentences, tmp_path):
    """Type a sentence, click Translate with the page's defaults (a search the default warm-up
    compiles), then with n-best 3: read the translation and the n-best list from the page, hover a
    target piece and see its source pieces lit; saves a screenshot."""
    sentence = dev_sentences[3]
    screenshot = tmp_path / "page.png"
    server.service.model.searches.clear()
    first, shown = drive_page(f"http://127.0.0.1:{server.port}/", sentence, str(screenshot), n_best=3)
    (options, attention), _ = server.service.model.searches
    default_search = translator.options().search
    assert f"{default_search}+attention" in serve.DEFAULT_WARMUP
    assert (options, attention) == (server.service.model.warmup_options(default_search, True), True)
    assert first["translation"] == translator.hypotheses([sentence], return_attention=True)[0][0].text
    expected = translator.hypotheses([sentence], n_best=3, return_attention=True)[0]
    assert shown["translation"] == expected[0].text
    assert shown["nbest"] == [h.text for h in expected]
    assert shown["rows"] == len(expected[0].attention) and shown["lit"] >= 1
    assert screenshot.read_bytes().startswith(b"\x89PNG")


def drive_page(url: str, sentence: str, screenshot: str, n_best: int) -> tuple[dict, dict]:
    """Drives the page in the distribution's headless Chromium (skipping the test, naming what is
    missing, without it): what the page shows for `sentence` with its defaults, then with `n_best`."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    try:
        from selenium import webdriver
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        pytest.skip(f"the page test needs {', '.join(missing)} (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))  # no Selenium Manager
    browser = webdriver.Chrome(service=service, options=options)
    try:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: "vocabularies" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "sentences").send_keys(sentence)
        first = click_translate(browser)
        browser.find_element(By.ID, "n_best").clear()
        browser.find_element(By.ID, "n_best").send_keys(str(n_best))
        click_translate(browser)
        rows = browser.find_elements(By.CSS_SELECTOR, "table.heatmap tbody tr")
        ActionChains(browser).move_to_element(rows[0].find_element(By.TAG_NAME, "th")).perform()
        shown = {"translation": browser.find_element(By.CSS_SELECTOR, ".result .translation").text,
                 "nbest": browser.execute_script(
                     "return [...document.querySelectorAll('.nbest li')].map(li => li.firstChild.textContent)"),
                 "rows": len(rows), "lit": len(browser.find_elements(By.CSS_SELECTOR, "table.heatmap thead th.lit"))}
        browser.save_screenshot(screenshot)
        return first, shown
    finally:
        browser.quit()


def click_translate(browser) -> dict:
    """Clicks Translate and waits for the answer: what the page shows of the first result."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.execute_script("document.getElementById('results').replaceChildren()")
    browser.find_element(By.ID, "translate").click()
    WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result .translation"))
    return {"translation": browser.find_element(By.CSS_SELECTOR, ".result .translation").text}
