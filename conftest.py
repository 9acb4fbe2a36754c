"""Fixtures shared by every test file: the proxy module, a fake Infinity, and the proxy under test.

The fake stands in for infinity_emb 0.0.78's HTTP API as measured (docs/how-it-works.md, "What the proxy relies on from Infinity"): labels
sorted by score, inputs whitespace-stripped, 422 for more than 2048 inputs or an input over
122,880 characters, FastAPI's {"detail"} shapes. It is a real aiohttp server on 127.0.0.1, and a
test can replace any answer with `fake.fault`, an async function of the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent

# Hypothesis: under CI (the CI environment variable set, as .ci/run does) every run draws the same
# examples, so a red CI run is red again when rerun, and no example database is read or written; a
# developer's run draws new examples each time and keeps the failing ones in .hypothesis/ to replay
# first. Both print the @reproduce_failure blob of a failure. No deadline and no too_slow check: how
# long an example takes depends on the machine's load, and the tests bound what matters themselves.
_UNTIMED = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "print_blob": True}
settings.register_profile("ci", derandomize=True, database=None, **_UNTIMED)
settings.register_profile("dev", **_UNTIMED)
settings.load_profile("dev" if os.environ.get("CI", "").lower() in ("", "0", "false") else "ci")

_spec = importlib.util.spec_from_file_location("proxy_classifier", ROOT / "proxy-classifier.py")
proxy = importlib.util.module_from_spec(_spec)
sys.modules["proxy_classifier"] = proxy
_spec.loader.exec_module(proxy)

SERVED_MODEL = "michaelfeil/mxbai-rerank-base-v2-seq"
MAX_INPUTS = 2048
MAX_INPUT_CHARS = 122_880


PAD = "<|endoftext|>"  # the pad token of Qwen's tokenizers, which the fake's model skips


def document_in(sent: str) -> str:
    """The document part of an input the proxy sent (the prompt, then the pad anchor)."""
    _, _, rest = sent.partition("\ndocument: ")
    return rest.removesuffix(PAD).removesuffix(proxy.DEFAULT_TEMPLATE.tail) if rest else sent


def hashed_probability(prompt: str) -> float:
    """A deterministic, well-spread probability for any prompt."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()[:4], "big") / 2**32


class FakeInfinity:
    """infinity_emb's HTTP surface, as measured, with knobs for the tests."""

    def __init__(self) -> None:
        self.score: Callable[[str], float] = hashed_probability  # what the model reads -> p("1")
        # Like a *ForSequenceClassification model: it reads the stripped input up to its last token that is
        # not this pad token (None: a model without one reads every token).
        self.pad_token: str | None = PAD
        self.probe_bodies: list[dict[str, Any]] = []  # the proxy's self-checks
        self.probe_status = 200  # another status: the self-check's calls fail with it
        self.models_status = 200  # another status: the proxy's own model lookups fail with it
        self.model_lookups = 0
        self.cross_encoders: set[str] = set()  # models listed with the "rerank" capability
        self.rerank_bodies: list[dict[str, Any]] = []
        self.fault: Callable[[web.Request], Awaitable[web.StreamResponse | None]] | None = None
        self.delay = 0.0  # seconds per /classify call, standing in for inference
        self.api_key: str | None = None
        self.models = [SERVED_MODEL]
        self.classify_bodies: list[dict[str, Any]] = []
        self.classify_headers: list[dict[str, str]] = []
        self.forwarded: list[tuple[str, str, bytes, dict[str, str]]] = []
        self.empty_inputs = 0  # what kills the real Infinity's batch worker
        self.in_flight = 0
        self.most_in_flight = 0
        self.url = ""  # set by the fixture: base URL with the /v1 prefix

    @property
    def inputs(self) -> list[str]:
        return [text for body in self.classify_bodies for text in body["input"]]

    def labels(self, p1: float) -> list[dict[str, Any]]:
        labels = [{"label": "1", "score": p1}, {"label": "0", "score": 1.0 - p1}]
        return sorted(labels, key=lambda label: -label["score"])  # Infinity sorts by score

    def app(self) -> web.Application:
        @web.middleware
        async def auth_and_faults(request: web.Request, handler: Any) -> web.StreamResponse:
            if self.api_key and request.path != "/health" and request.headers.get(
                    "Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"detail": "Unauthorized"}, status=401)
            if request.headers.get("User-Agent", "").startswith("rerank-proxy/"):  # the proxy's own calls
                return await (self.answer_probe(request) if request.path.endswith("/classify") else handler(request))
            if self.fault is not None and request.path != "/health":
                answer = await self.fault(request)
                if answer is not None:
                    return answer
            return await handler(request)

        app = web.Application(middlewares=[auth_and_faults], client_max_size=1024**3)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/classify", self.classify)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/rerank", self.rerank)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"unix": time.time()})

    async def list_models(self, request: web.Request) -> web.Response:
        if request.headers.get("User-Agent", "").startswith("rerank-proxy/"):
            self.model_lookups += 1
            if self.models_status != 200:
                return web.json_response({"detail": "refused"}, status=self.models_status)
        else:
            self.forwarded.append((request.method, request.path_qs, b"", dict(request.headers)))
        return web.json_response({"data": [{"id": m, "object": "model", "capabilities": [
            "rerank" if m in self.cross_encoders else "classify"]} for m in self.models], "object": "list"})

    async def rerank(self, request: web.Request) -> web.Response:
        """Infinity's own /rerank, for a cross-encoder: its score is the document's hashed with the query."""
        body = await request.json()
        self.rerank_bodies.append(body)
        p = [hashed_probability(body["query"] + "\0" + document.strip()) for document in body["documents"]]
        scores = [math.log(x) - math.log1p(-x) if body.get("raw_scores") else x for x in p]
        results = sorted(({"relevance_score": s, "index": i} for i, s in enumerate(scores)),
                         key=lambda r: -r["relevance_score"])
        return web.json_response({"object": "rerank", "results": results, "model": body.get("model"),
                                  "usage": {"prompt_tokens": 7, "total_tokens": 7}, "id": "r", "created": 0})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.forwarded.append((request.method, request.path_qs, body, dict(request.headers)))
        return web.Response(status=200, body=b'{"object":"list","echo":' + body + b"}",
                            content_type="application/json")

    def model_reads(self, sent: str) -> str:
        text = sent.strip()  # Infinity strips every input
        while self.pad_token and text.endswith(self.pad_token):
            text = text.removesuffix(self.pad_token)
        return text

    async def answer_probe(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.probe_bodies.append(body)
        if self.probe_status != 200:
            return web.json_response({"error": {"message": "probe refused"}}, status=self.probe_status)
        scores = [self.score(self.model_reads(text)) for text in body["input"]]
        return web.json_response({"object": "classify", "data": [self.labels(p) for p in scores],
                                  "usage": {"prompt_tokens": 0, "total_tokens": 0}})

    async def classify(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.classify_bodies.append(body)
        self.classify_headers.append(dict(request.headers))
        inputs = body.get("input")
        if len(self.models) > 1 and body.get("model") not in self.models:
            return web.json_response({"error": {"message": f"Invalid model: {body.get('model')}", "type": "BadRequest",
                                                "param": None, "code": 400}}, status=400)
        if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS or any(len(s) > MAX_INPUT_CHARS for s in inputs):
            return web.json_response({"detail": [{"type": "too_long", "loc": ["body", "input"],
                                                  "msg": "List should have at most 2048 items"}]}, status=422)
        stripped = [s.strip() for s in inputs]
        self.empty_inputs += sum(1 for s in stripped if not s)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        tokens = sum(len(s) for s in stripped)  # Infinity counts characters by default
        return web.json_response({"object": "classify", "data": [self.labels(self.score(self.model_reads(s)))
                                                                 for s in inputs],
                                  "model": body.get("model"), "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                                  "id": "infinity-fake", "created": int(time.time())})


@pytest.fixture
async def fake_infinity(aiohttp_server: Any) -> FakeInfinity:
    fake = FakeInfinity()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.url = str(server.make_url("/v1"))
    return fake


@pytest.fixture
def make_proxy(aiohttp_client: Any, fake_infinity: FakeInfinity) -> Callable[..., Awaitable[Any]]:
    """A test client for the proxy app, served as main() serves it (`server_options`: no request body is
    ever decoded), pointed at the fake Infinity unless told otherwise."""

    async def make(**overrides: Any) -> Any:
        overrides.setdefault("infinity_url", fake_infinity.url)
        config = proxy.Config(**overrides)
        config.check()
        server = TestServer(proxy.make_app(config))
        await server.start_server(**proxy.server_options(config))
        return await aiohttp_client(server)

    return make


@pytest.fixture
async def client(make_proxy: Callable[..., Awaitable[Any]]) -> Any:
    return await make_proxy()


# A fast test that bounds a wall-clock time (a 504 at --timeout, a probe's own 0.8 s) allows this much
# on top: a loaded machine (a CI runner, two cores shared with other builds) can stall an event loop
# for seconds. What such a test checks is which timer fired (the status, the message) and that one did
# at all: the upstream there never answers, so without the timer no answer would come.
LOADED_MACHINE_SLACK = 10.0


def free_port() -> int:
    """A port free a moment ago: another process may take it before it is used. For a port where
    connections must be refused use `unlistened_socket`; a server started on it must check it got it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tcp_connections(process: psutil.Process) -> list[Any]:
    # psutil 6 renamed connections() to net_connections(); requirements-dev.txt allows 5.9 too.
    return (process.net_connections if hasattr(process, "net_connections") else process.connections)("tcp")


def listens_on(pid: int, port: int) -> bool:
    """Whether the process, or one it started, listens on the port: a server started on a port from
    free_port() may find it taken, and another program answering there is not that server."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return any(connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
                   for process in family for connection in tcp_connections(process))
    except psutil.Error:  # it has just exited
        return False


def peak_rss(pid: int) -> int:
    """The process's resident memory high-water mark (VmHWM), in bytes: a true peak, not a sample."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def unlistened_socket() -> Iterator[socket.socket]:
    """A socket bound to a port on 127.0.0.1 that does not listen: a connection there is refused, and
    no other process can take the port while the test runs. A test may start a server on it later
    (web.SockSite), with no moment where the port is free."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy


def logged_until_now(base_url: str, log_path: Path, start: int = 0) -> str:
    """A running proxy's log from byte `start` to now. The proxy writes a request's line just after its
    answer, so a client holding its answer may not find the line yet: a marker request is sent and its
    line awaited, and by then the line of every request answered before it is in the log."""
    request_id = f"marker-{time.monotonic_ns()}"
    LOCAL_HTTP.open(urllib.request.Request(base_url + "/health", headers={"X-Request-ID": request_id}),
                    timeout=30).read()
    marker = f"request_id={request_id} "
    deadline = time.monotonic() + 30  # a generous bound: the line is normally there at once
    while marker not in (text := log_path.read_bytes()[start:].decode("utf-8", "replace")):
        assert time.monotonic() < deadline, f"the proxy at {base_url} never logged the marker request"
        time.sleep(0.02)
    return text[: text.index(marker)]


def strict_environment() -> bool:
    """CI sets this so that a tier whose packages are missing fails instead of skipping."""
    return os.environ.get("PROXY_TESTS_REQUIRE_ALL") == "1"


def missing_tier(message: str) -> None:
    """Skip a tier whose packages are missing, saying how to install them; fail instead where CI demands
    every tier."""
    if strict_environment():
        pytest.fail(f"{message}; PROXY_TESTS_REQUIRE_ALL=1 does not allow skipping it")
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------
# The end-to-end world (the tiny model, one real Infinity, the proxy in front of it), shared by the
# modules that run the real chain. tests/helpers.py uses what is defined above, so it is imported here.
# ---------------------------------------------------------------------------------------------

from tests import helpers  # noqa: E402


@pytest.fixture(scope="session")
def e2e_world() -> Iterator[None]:
    """The end-to-end tier's packages and offline environment (its modules use it: pytestmark)."""
    yield from helpers.offline_tier("the end-to-end tier", helpers.MISSING_PACKAGES,
                                    " (or pip install -r requirements-e2e.txt)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.build_tiny_mxbai_model(tmp_path_factory.mktemp("tiny-mxbai") / "model")


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def infinity(tiny_model: Path, logs: Path) -> Iterator[helpers.Server]:
    yield from helpers.running_infinity([(tiny_model, None)], logs, "infinity", "--batch-size", "8")


@pytest.fixture(scope="session")
def served_model(infinity: helpers.Server) -> str:
    """The name Infinity serves the tiny model under: without --served-model-name, the last two parts
    of its directory path."""
    status, answer = helpers.http_json("GET", infinity.url + "/models")
    assert status == 200, answer
    (name,) = [model["id"] for model in answer["data"]]
    return name


@pytest.fixture(scope="session")
def proxy_server(infinity: helpers.Server, served_model: str, logs: Path) -> Iterator[helpers.Server]:
    yield from helpers.running_proxy(infinity.url, logs, "proxy", "--model", served_model)


@pytest.fixture(scope="session")
def logit_margin(tiny_model: Path) -> Callable[[str], float]:
    return helpers.model_logit_margin(tiny_model)


# The fake Infinity with a fault installed, and the proxy as a process (the reliability and overload tiers).


@pytest.fixture
def upstream(fake_infinity: FakeInfinity) -> helpers.Upstream:
    return helpers.Upstream(fake_infinity)


@pytest.fixture
async def spawn_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[helpers.ProxyProcess]]]:
    """Start `python proxy-classifier.py` as a user does; stop it (SIGTERM, then SIGKILL) afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    async def start(infinity_url: str, flags: tuple[str, ...]) -> helpers.ProxyProcess:
        port = free_port()
        log = tmp_path / f"proxy-{port}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, str(helpers.PROXY_SCRIPT), "--host", "127.0.0.1", "--port", str(port),
                 "--infinity-url", infinity_url, *flags], stdout=sink, stderr=subprocess.STDOUT)
        started.append(process)
        running = helpers.ProxyProcess(f"http://127.0.0.1:{port}", port, process, log)
        if not await helpers.eventually(lambda: process.poll() is not None or listens_on(process.pid, port), within=20):
            pytest.fail(f"the proxy did not listen within 20 s:\n{log.read_text()}")
        return running

    async def spawn(infinity_url: str, *flags: str) -> helpers.ProxyProcess:
        for _ in range(5):  # a port found free can be taken by another program before the proxy binds it
            running = await start(infinity_url, flags)
            if running.process.poll() is None:
                return running
            if "address already in use" not in running.log.read_text().lower():
                break
        pytest.fail(f"the proxy exited at start:\n{running.log.read_text()}")

    yield spawn
    for process in started:
        await helpers.terminated(process)
