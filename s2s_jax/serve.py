"""A translation server: JSON over HTTP, concurrent requests batched exactly, and an attention page.

    python -m s2s_jax.serve --workdir=runs/demo --host=127.0.0.1 --port=8000
    python -m s2s_jax.serve --workdir=runs/a,runs/b ...          # an ensemble
    python -m s2s_jax.serve --export=demo.s2s.zip ...            # an exported artifact

Needs the optional extra `serve` (Starlette on uvicorn): pip install -e ".[serve]".

    POST /v1/translate  {"sentences": [...], "prefixes": [...], "return_attention": false, ...options}
                        -> {"translations": [...]} (+ "hypotheses" when n_best or return_attention
                        is given: per sentence its n best with scores, and with return_attention
                        each one's attention [T, S] and the pieces labelling it)
    GET  /v1/health     -> {"status": "ok", "queued_sentences": n}
    GET  /v1/info       -> the model, its vocabularies, config (or manifest), default options, limits
    GET  /              -> the attention page (s2s_jax/static/index.html)

Search options are those of `Translator.hypotheses` (`s2s_jax.options`), checked by the same code
with the same messages as the command line; an exported artifact takes n_best and on_long only.
Requests go through `s2s_jax.batcher`: a worker decodes the sentences of concurrent requests in
shared calls of the decode driver and answers each request exactly what it would get alone. The
compiled searches of --warmup are compiled before the server listens.

Errors are JSON {"error": message}: 400 (not JSON), 413 (over --max_sentences or --max_chars),
422 (bad field or option), 503 with Retry-After (queue full, or stopping), 504 (over --timeout_s).
SIGINT / SIGTERM: stop accepting, finish the accepted requests, exit 0. One log line per request.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route
except ImportError as missing:
    raise ImportError(f"s2s_jax.serve needs the optional extra 'serve' (pip install -e '.[serve]'): {missing}") from None

from s2s_jax import UNK_ID, cli, sources
from s2s_jax.batcher import Batcher, Closed, QueueFull
from s2s_jax.hypotheses import Hypothesis
from s2s_jax.options import SearchOptions

logger = logging.getLogger(__name__)


class Limits(NamedTuple):
    """What one request may ask and how long the worker may wait (the --flags of the same names)."""
    max_sentences: int = 64   # sentences per request
    max_chars: int = 2000     # characters per sentence
    max_queue: int = 1024     # sentences waiting for the worker
    timeout_s: float = 60.0   # per request, queue wait included
    max_wait_ms: float = 5.0  # how long the worker waits for more requests to batch with one
    max_batch: int = 256      # sentences decoded per worker round


# ---------------------------------------------------------------------------------- the models
class WorkdirModel:
    """A `translate.Translator` (a workdir or an ensemble) behind the server."""

    def __init__(self, translator):
        self.translator = translator
        self.src_tokenizer, self.tgt_tokenizer = translator.src_tokenizer, translator.tgt_tokenizer
        self.max_source_len = translator.max_source_len

    def options(self, given: dict, prefixed: bool) -> SearchOptions:
        """The request's options, checked as the command line checks them (TypeError, ValueError)."""
        del prefixed  # a workdir's search takes prefixes
        return self.translator.options(**given)

    def hypotheses(self, sentences: list[str], options: SearchOptions, prefixes, return_attention: bool):
        return self.translator.hypotheses(sentences, prefixes, return_attention, **options._asdict())

    def driver(self, options: SearchOptions, return_attention: bool):
        return self.translator.decoder.driver(self.translator.params, options, return_attention)

    def warmup_options(self, search: str, attention: bool) -> SearchOptions:
        del attention  # every search can return attention
        return self.options({"search": search}, False)

    def info(self) -> dict:
        from s2s_jax import configuration
        return {"model": self.translator.workdir, "kind": "workdir",
                "config": configuration.to_json(self.translator.config)}


class ExportModel:
    """An exported artifact (`export.ExportedTranslator`): its options are fixed but n_best (one of
    the exported sizes) and on_long."""
    ADJUSTABLE = ("n_best", "on_long")

    def __init__(self, exported, path: str):
        self.exported, self.path = exported, path
        self.src_tokenizer, self.tgt_tokenizer = exported.src_tokenizer, exported.tgt_tokenizer
        self.max_source_len = exported.manifest["max_source_len"]

    def options(self, given: dict, prefixed: bool) -> SearchOptions:
        options = self.exported.options._replace(n_best=1).updated(given)  # TypeError naming unknown options
        fixed = [name for name in given if name not in self.ADJUSTABLE
                 and given[name] is not None and given[name] != getattr(self.exported.options, name)]
        if fixed or prefixed:
            raise ValueError(f"{', '.join(fixed) or 'prefixes'}: fixed when the artifact was exported; "
                             f"a request may set {' and '.join(self.ADJUSTABLE)} only")
        self.exported.hypotheses([], options.n_best, on_long=options.on_long)  # its checks
        return options

    def hypotheses(self, sentences: list[str], options: SearchOptions, prefixes, return_attention: bool):
        del prefixes  # refused by `options`
        return self.exported.hypotheses(sentences, options.n_best, return_attention=return_attention,
                                        on_long=options.on_long)

    def driver(self, options: SearchOptions, return_attention: bool):
        return self.exported.driver(options.n_best, return_attention)

    def warmup_options(self, search: str, attention: bool) -> SearchOptions | None:
        """The exported options for n_best 1, or None if the artifact has no such search."""
        if search != self.exported.options.search or attention and not self.exported.manifest["attention"]:
            return None
        return self.exported.options._replace(n_best=1)

    def info(self) -> dict:
        return {"model": self.path, "kind": "export", "config": self.exported.manifest}


def load_model(workdirs: str | None, export_path: str | None, decoding: dict | None = None):
    """The model of --workdir (a workdir, or several: an ensemble; `decoding`: its call shapes,
    `Translator.from_workdir`) or --export (whose call shapes were fixed when it was exported)."""
    if bool(workdirs) == bool(export_path):
        raise ValueError("give either --workdir (one or more, comma-separated) or --export")
    if export_path and decoding:
        raise ValueError("--decode_buckets / --decode_rows / --decode_dtype apply to --workdir; an exported "
                         "artifact keeps the settings it was exported with (export --decode_buckets)")
    if export_path:
        from s2s_jax import export
        return ExportModel(export.load(export_path), export_path)
    from s2s_jax.translate import Translator
    return WorkdirModel(Translator.from_workdirs(workdirs.split(","), decoding))


# The searches with the server's default options, plain and with attention: the page's first
# request (the default search, beam size and n-best, with attention) is among them.
DEFAULT_WARMUP = ["greedy", "beam", "greedy+attention", "beam+attention"]


class _PieceCounts:
    """A warm-up source tokenizer: the sentence "n" is n pieces, so there is one for every bucket."""

    @staticmethod
    def encode(lines: list[str]) -> list[list[int]]:
        return [[UNK_ID] * int(line) for line in lines]


def warm_up(model, specs: Sequence[str]) -> float:
    """Compiles the search of every spec ("greedy", "beam", "sample", "+attention" appended: with
    attention) for every source bucket by decoding one sentence per bucket through the decode
    driver (an exported artifact: the specs it has); returns the seconds it took."""
    start = time.monotonic()
    for spec in specs:
        search, _, extra = spec.partition("+")
        if extra not in ("", "attention"):
            raise ValueError(f"--warmup: {spec!r} is not a search with an optional '+attention'")
        options = model.warmup_options(search, bool(extra))
        if options is None:
            continue
        driver = model.driver(options, bool(extra))
        counts = [str(min(length - 1, driver.max_source_len)) for length in driver.output_limits]
        driver._replace(src_tokenizer=_PieceCounts())(counts, options)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------- requests
class RequestError(Exception):
    """A request that gets an error response: its HTTP status and one-line message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Request(NamedTuple):
    """A checked translation request."""
    sentences: list[str]
    prefixes: list[str | None] | None
    options: SearchOptions
    return_attention: bool
    listed: bool  # the response lists the hypotheses (n_best or return_attention was given)

    def key(self):
        """Requests with equal keys may be decoded in shared calls; None: alone (sampling keys
        follow the line, and prefixes change the call's shape)."""
        if self.prefixes is not None or self.options.search == "sample":
            return None
        return self.options, self.return_attention


def parse_request(body: bytes, model, limits: Limits) -> Request:
    """The request of a POST /v1/translate body; RequestError (400, 413, 422) naming what is wrong."""
    try:
        fields = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError included
        raise RequestError(400, f"the body is not JSON ({error})") from None
    if not isinstance(fields, dict):
        raise RequestError(422, 'the body must be a JSON object: {"sentences": [...], ...search options}')
    sentences = _sentences(fields.pop("sentences", None), limits)
    prefixes = _prefixes(fields.pop("prefixes", None), len(sentences))
    return_attention = fields.pop("return_attention", False)
    if not isinstance(return_attention, bool):
        raise RequestError(422, f"return_attention must be true or false, got {return_attention!r}")
    try:
        options = model.options(fields, prefixes is not None)
    except (TypeError, ValueError) as error:
        raise RequestError(422, str(error)) from None
    return Request(sentences, prefixes, options, return_attention, "n_best" in fields or return_attention)


def _sentences(value, limits: Limits) -> list[str]:
    """The sentences field, checked: a non-empty list of strings within the limits."""
    if value is None:
        raise RequestError(422, 'sentences: required, a list of strings ({"sentences": ["..."]})')
    try:
        sentences = sources.sentence_list(value)
    except TypeError as error:
        raise RequestError(422, str(error)) from None
    if not sentences:
        raise RequestError(422, "sentences is empty: give at least one sentence")
    if len(sentences) > limits.max_sentences:
        raise RequestError(413, f"{len(sentences)} sentences, more than the limit of {limits.max_sentences} "
                                "per request (--max_sentences); split the request")
    for number, sentence in enumerate(sentences, start=1):
        if len(sentence) > limits.max_chars:
            raise RequestError(413, f"sentence {number} has {len(sentence)} characters, more than the limit of "
                                    f"{limits.max_chars} (--max_chars)")
    return sentences


def _prefixes(value, count: int) -> list[str | None] | None:
    """The prefixes field, checked: absent, or one string (or null) per sentence."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count or not all(p is None or isinstance(p, str) for p in value):
        raise RequestError(422, f"prefixes must be a list of {count} strings or nulls, one per sentence")
    return value


def response_body(model, request: Request, results: list[list[Hypothesis]]) -> dict:
    """{"translations": [...]} and, when listed, "hypotheses": per sentence its n best (with
    return_attention: the weights and their labels)."""
    body: dict[str, Any] = {"translations": [hyps[0].text for hyps in results]}
    if request.listed:
        body["hypotheses"] = [_listed(model, sentence, hyps) for sentence, hyps in zip(request.sentences, results)]
    return body


def _listed(model, sentence: str, hyps: list[Hypothesis]) -> dict:
    """One sentence's hypotheses as JSON: text, score (and target_pieces, attention [T][S] rounded
    to 4 decimals, with the source_pieces of the sentence)."""
    from s2s_jax.translate import attention_labels
    entry: dict[str, Any] = {"nbest": []}
    for hyp in hyps:
        item = {"text": hyp.text, "score": round(float(hyp.score), 6)}
        if hyp.attention is not None:
            entry["source_pieces"], item["target_pieces"] = attention_labels(
                model.src_tokenizer, model.tgt_tokenizer, model.max_source_len, sentence, hyp)
            item["attention"] = [[round(float(w), 4) for w in row] for row in hyp.attention]
        entry["nbest"].append(item)
    return entry


# ---------------------------------------------------------------------------------- the app
class Service:
    """The model, the limits and the batcher behind the routes; `app()` is the ASGI application."""

    def __init__(self, model, limits: Limits = Limits()):
        self.model, self.limits = model, limits
        self.batcher = Batcher(limits.max_wait_ms / 1000, limits.max_queue, limits.max_batch)

    def app(self):
        return Starlette(routes=[Route("/", self.page), Route("/v1/health", self.health),
                                 Route("/v1/info", self.info), Route("/v1/translate", self.translate, methods=["POST"])],
                         lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        """At shutdown (after the server stopped accepting and answered what it had accepted):
        the worker finishes what is queued and stops."""
        del app
        yield
        await asyncio.to_thread(self.batcher.close)

    async def page(self, http):
        return HTMLResponse(_page())

    async def health(self, http):
        return JSONResponse({"status": "ok", "queued_sentences": self.batcher.queued})

    async def info(self, http):
        model = self.model
        return JSONResponse({**model.info(), "vocab_sizes": {"source": model.src_tokenizer.vocab_size,
                                                              "target": model.tgt_tokenizer.vocab_size},
                             "defaults": model.options({}, False)._asdict(), "limits": self.limits._asdict()})

    async def translate(self, http):
        """POST /v1/translate; logs one line: method, sentences, queue wait, decode time, status."""
        start, sentences, wait_s, decode_s = time.monotonic(), 0, 0.0, 0.0
        try:
            request = parse_request(await http.body(), self.model, self.limits)
            sentences = len(request.sentences)
            done = await self._decoded(request)
            wait_s, decode_s = done.wait_s, done.decode_s
            response = JSONResponse(response_body(self.model, request, done.results))
        except RequestError as error:
            response = JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)
        logger.info("POST /v1/translate %d sentences | queue %.1f ms | decode %.1f ms | total %.1f ms | status %d",
                    sentences, 1000 * wait_s, 1000 * decode_s, 1000 * (time.monotonic() - start),
                    response.status_code)
        return response

    async def _decoded(self, request: Request):
        """The batcher's Done for the request; RequestError for a full queue, a stopping server, a
        timeout or a decoding error."""
        decode = functools.partial(self.model.hypotheses, options=request.options, prefixes=request.prefixes,
                                   return_attention=request.return_attention)
        try:
            future = self.batcher.submit(request.sentences, decode, request.key())
        except QueueFull as error:
            raise RequestError(503, f"{error}; retry later", {"Retry-After": "1"}) from None
        except Closed as error:
            raise RequestError(503, str(error), {"Retry-After": "5"}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.limits.timeout_s)
        except TimeoutError:
            raise RequestError(504, f"no answer within {self.limits.timeout_s:g} s (--timeout_s)") from None
        except (TypeError, ValueError) as error:  # a sentence the search refuses (on_long="error", a prefix)
            raise RequestError(422, str(error)) from None
        except Exception as error:  # noqa: BLE001 - answered, and logged with its traceback
            logger.exception("decoding failed")
            raise RequestError(500, f"decoding failed: {type(error).__name__}: {error}") from None


@functools.cache
def _page() -> str:
    return importlib.resources.files("s2s_jax").joinpath("static/index.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------- command line
def _define_flags() -> None:
    from absl import flags

    from s2s_jax import cli
    cli.define_compilation_cache_flag()
    flags.DEFINE_string("workdir", None, "Training workdir to serve; several, comma-separated, serve an ensemble.")
    flags.DEFINE_string("export", None, "An exported artifact (python -m s2s_jax.export) to serve instead.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, named in the log).")
    flags.DEFINE_list("warmup", DEFAULT_WARMUP, "Searches compiled for every source bucket before listening "
                      "('+attention': the search that returns attention, as the page asks for).")
    cli.define_decoding_flags()
    for name, value in Limits()._asdict().items():
        define = flags.DEFINE_integer if isinstance(value, int) else flags.DEFINE_float
        define(name, value, _LIMIT_HELP[name], lower_bound=0 if name == "max_wait_ms" else 1)


_LIMIT_HELP = {"max_sentences": "Most sentences per request (413 above).",
               "max_chars": "Most characters per sentence (413 above).",
               "max_queue": "Most sentences waiting to be decoded (503 with Retry-After above).",
               "timeout_s": "Seconds a request may take, queue included (504 after).",
               "max_wait_ms": "Milliseconds the worker waits for more requests to decode with one.",
               "max_batch": "Most sentences decoded per worker round."}


def _log_to_stderr() -> None:
    """This module's lines (one per request) on stderr; absl keeps the rest at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s serve: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv) -> None:
    from s2s_jax import checkpoints
    f = cli.parsed_flags("serve", argv)
    _log_to_stderr()
    limits = Limits(**{name: f[name].value for name in Limits._fields})
    try:
        model = load_model(f.workdir, f.export, cli.decoding_values(f))
        logger.info("warm-up: %s compiled in %.1f s", ",".join(f.warmup), warm_up(model, f.warmup))
    except (ValueError, checkpoints.CheckpointError) as error:  # DataError, ConfigError, ExportError: ValueErrors
        raise SystemExit(f"serve: {error}") from None
    except OSError as error:
        raise SystemExit(f"serve: {error.filename or ''}: {error.strerror or error}") from None
    service = Service(model, limits)
    config = uvicorn.Config(service.app(), host=f.host, port=f.port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=None)
    # uvicorn takes SIGINT / SIGTERM while serving (stop accepting, answer what was accepted, shut
    # down) and raises the signal again afterwards under the handler found before: ignored, so the
    # exit status is 0.
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, signal.SIG_IGN)
    _Server(config, service.batcher).run()


class _Server(uvicorn.Server):
    """uvicorn's server, whose signal handler also tells the worker to stop waiting for more requests."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher):
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig, frame):
        self.batcher.stop_waiting()
        super().handle_exit(sig, frame)


def run() -> None:
    from absl import app
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
