"""The reliability tier: the proxy keeps its contract under upstream faults, hostile input, load,
an Infinity restart and a shutdown signal, and loses no request silently.

The upstream is conftest's fake Infinity (a real aiohttp server on 127.0.0.1); a fault is its
`fault` hook, installed through the `upstream` fixture, which also counts the calls that reach the
hook and those still running there. A hook that never answers is cancelled when the proxy hangs up
(aiohttp's test server cancels handlers on disconnect), so "still running" means "the proxy has not
let go". Load, restart, client disconnect and shutdown run the proxy as a user does: a subprocess,
`python proxy-classifier.py --host 127.0.0.1 --port <free> --infinity-url ...`, so that its RSS,
its signals and its exit code are real. Everything talks to 127.0.0.1 only, and every loop is
bounded by a request count and a deadline. The load test writes its figures to LOAD_FIGURES.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gzip
import json
import math
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import ClientError, ClientSession, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from conftest import (
    LOADED_MACHINE_SLACK,
    FakeInfinity,
    hashed_probability,
    peak_rss,
    proxy,
    tcp_connections,
)
from tests.helpers import (
    GOOD,
    Answer,
    FaultHook,
    ProxyProcess,
    Upstream,
    answers,
    assert_error,
    assert_ranked,
    classify_answer,
    costliest_accepted_body,
    eventually,
    expected_scores,
    post,
)

# Asked after a fault: a different query, so an answer left over from the fault would not match.
QUERY, DOCUMENTS = GOOD["query"], GOOD["documents"]
NEXT = {"query": "Where does the Elbe end?", "documents": ["At Cuxhaven, in the North Sea.", "In Dresden."]}

LOAD_FIGURES = Path("/tmp/proxy-reliability-load.json")


@pytest.fixture(autouse=True)
def hard_time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    """No test here can hang the suite: past its limit the process prints every thread's stack and
    exits (pytest-timeout is not a dependency; the proxies these tests start bound their requests with
    --timeout, so this only fires on a real hang)."""
    faulthandler.dump_traceback_later(180 if request.node.get_closest_marker("slow") else 60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------
# Asking and checking
# ---------------------------------------------------------------------------------------------


def tasks_running_proxy_code() -> list[asyncio.Task[Any]]:
    """Tasks whose coroutine is the proxy's own (the classify calls of a multi-call request)."""
    return [task for task in asyncio.all_tasks() if not task.done()
            and getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", None) == proxy.__file__]


def port_of(url: str) -> int:
    return URL(url).port  # type: ignore[return-value]


def connections_to(port: int, pid: int | None = None) -> int:
    """Established TCP connections of a process (this one by default) to a port on 127.0.0.1."""
    return sum(1 for connection in tcp_connections(psutil.Process(pid))
               if connection.raddr and connection.raddr.port == port and connection.status == psutil.CONN_ESTABLISHED)


# ---------------------------------------------------------------------------------------------
# What a failing Infinity does: hooks for the fake's `fault`
# ---------------------------------------------------------------------------------------------


def never_answers() -> FaultHook:
    async def hook(request: web.Request) -> None:
        await asyncio.Event().wait()  # until the proxy hangs up and the server cancels this

    return hook


def closes_without_answering() -> FaultHook:
    async def hook(request: web.Request) -> None:
        await request.read()
        request.transport.close()
        await asyncio.Event().wait()

    return hook


def closes_mid_answer() -> FaultHook:
    async def hook(request: web.Request) -> None:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1000  # promised, never delivered
        await response.prepare(request)
        await response.write(b'{"object":"classify","data":[[{"label":"1","sco')
        request.transport.close()
        await asyncio.Event().wait()

    return hook


def answers_late(seconds: float) -> FaultHook:
    async def hook(request: web.Request) -> None:
        await asyncio.sleep(seconds)  # then the fake's normal answer, if anyone still listens

    return hook


def waits_for(gate: asyncio.Event) -> FaultHook:
    async def hook(request: web.Request) -> None:
        await gate.wait()  # then the fake's normal answer: the test decides when, whatever the machine's load

    return hook


def closes_connections_it_answered_on_before() -> FaultHook:
    """Infinity (uvicorn) closing an idle keep-alive connection just as the proxy reuses it: the
    request on a connection that has carried one before is dropped unanswered."""
    used: set[Any] = set()

    async def hook(request: web.Request) -> None:
        if request.transport in used:
            request.transport.close()
            await asyncio.Event().wait()
        used.add(request.transport)

    return hook


def closes_every_connection_after_the_first_answer() -> FaultHook:
    answered = False

    async def hook(request: web.Request) -> None:
        nonlocal answered
        if answered:
            request.transport.close()
            await asyncio.Event().wait()
        answered = True

    return hook


def gzip_bomb(wire_bytes: int) -> bytes:
    """Gzip members of 64 MiB of zeros each, back to back (a valid gzip stream): about a thousand times its size
    once decoded."""
    member = gzip.compress(bytes(64 << 20), 9)
    return member * max(1, wire_bytes // len(member))


def streams_endlessly(declared: int | None = None, pause: float = 0.0) -> FaultHook:
    """An answer that begins like a classify answer and never ends: chunked, or promising `declared` bytes."""
    async def hook(request: web.Request) -> None:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = declared
        await response.prepare(request)
        await response.write(b'{"object":"classify","data":[')
        piece = b" " * (64 * 1024 if not pause else 1)
        while True:  # until the proxy hangs up: then the write fails, or the server cancels this
            await response.write(piece)
            await asyncio.sleep(pause)

    return hook


def answers_a_gzip_bomb() -> FaultHook:
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=gzip_bomb(8 << 20), headers={"Content-Type": "application/json",
                                                              "Content-Encoding": "gzip"})

    return hook


# ---------------------------------------------------------------------------------------------
# The fault matrix
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    status: int  # what the client gets
    error_type: str
    says: tuple[str, ...]  # in the message; "{url}" is the classify URL, "{origin}" Infinity's origin
    hook: Callable[[], FaultHook] | None = None  # None: no fake listens ("nothing listening", "full accept queue")
    within: float = 0.0  # seconds the proxy's own timer waits before it answers (plus LOADED_MACHINE_SLACK)
    timeout: float = 5.0  # the proxy's --timeout
    retry_after: str | None = None
    param: str | None = None
    upstream: str = "fake"

    def __str__(self) -> str:
        return self.name


TOO_FEW = classify_answer('[[{"label":"1","score":0.9},{"label":"0","score":0.1}]]')  # one item for two inputs
NO_LABEL_1 = classify_answer('[[{"label":"LABEL_1","score":0.9},{"label":"LABEL_0","score":0.1}],'
                             '[{"label":"LABEL_0","score":0.8},{"label":"LABEL_1","score":0.2}]]')
NAN_SCORE = classify_answer('[[{"label":"1","score":NaN},{"label":"0","score":NaN}],'
                            '[{"label":"1","score":0.5},{"label":"0","score":0.5}]]')
FASTAPI_422 = '{"detail":[{"type":"too_long","loc":["body","input"],"msg":"List should have at most 2048 items"}]}'
INFINITY_400 = '{"error":{"message":"Invalid model: m","type":"BadRequest","param":null,"code":400}}'
HTML = "<html><body><h1>502 Bad Gateway</h1></body></html>"

FAULTS = [
    Fault("connection refused", 502, "upstream_error", ("cannot reach", "{url}"), upstream="nothing listening"),
    # CONNECT_TIMEOUT_SECONDS is lowered to 0.5 s for this case; --timeout stays 5 s.
    Fault("connect timeout", 502, "upstream_error", ("could not connect", "{url}", "0.5 s"), within=0.5,
          upstream="full accept queue"),
    Fault("accepts and never answers", 504, "timeout_error", ("--timeout (1 s)",), never_answers, within=1.0,
          timeout=1.0),
    Fault("closes mid-answer", 502, "upstream_error", ("{url}", "closed the connection"), closes_mid_answer),
    Fault("closes without answering", 502, "upstream_error", ("{url}", "closed the connection", "disconnected"),
          closes_without_answering),
    Fault("500", 502, "upstream_error", ("500", "CUDA out of memory"),
          partial(answers, 500, '{"error":{"message":"CUDA out of memory","type":"InternalError","code":500}}')),
    Fault("502 in HTML", 502, "upstream_error", ("502", "Bad Gateway"), partial(answers, 502, HTML, "text/html")),
    Fault("503", 502, "upstream_error", ("503", "Service Unavailable"),
          partial(answers, 503, '{"detail":"Service Unavailable"}')),
    Fault("429 with Retry-After", 429, "rate_limit_error", ("429", "queue is full", "retry later"),
          partial(answers, 429, '{"detail":"queue is full"}', headers={"Retry-After": "3"}), retry_after="3"),
    Fault("429 without Retry-After", 429, "rate_limit_error", ("429", "queue is full"),
          partial(answers, 429, '{"detail":"queue is full"}')),
    Fault("422 with FastAPI's detail", 502, "upstream_error", ("422", "at most 2048 items", "--batch-size"),
          partial(answers, 422, FASTAPI_422)),
    Fault("400 with Infinity's error", 400, "invalid_request_error", ("Invalid model: m",),
          partial(answers, 400, INFINITY_400), param="model"),
    Fault("HTML instead of JSON", 502, "upstream_error", ("not JSON", "Bad Gateway"),
          partial(answers, 200, HTML, "text/html")),
    Fault("too few items", 502, "upstream_error", ("1 classifications for 2 inputs",), partial(answers, 200, TOO_FEW)),
    Fault("no label 1", 502, "upstream_error", ("no label '1'", "--positive-label"),
          partial(answers, 200, NO_LABEL_1)),
    Fault("a NaN score", 502, "upstream_error", ("not a probability", "nan"), partial(answers, 200, NAN_SCORE)),
    Fault("an answer after the proxy gave up", 504, "timeout_error", ("--timeout (0.5 s)",),
          partial(answers_late, 2.0), within=0.5, timeout=0.5),
    # Hostile answers: read only up to what the call justifies, never decoded.
    Fault("a 512 MiB answer", 502, "upstream_error", ("{url}", "passed 67584 bytes"),
          partial(streams_endlessly, 512 << 20)),
    Fault("an endless chunked answer", 502, "upstream_error", ("{url}", "passed 67584 bytes"), streams_endlessly),
    Fault("an endless trickle", 504, "timeout_error", ("--timeout (1 s)",), partial(streams_endlessly, None, 0.05),
          within=1.0, timeout=1.0),
    Fault("a gzip bomb", 502, "upstream_error", ("{url}", "compressed", "gzip"), answers_a_gzip_bomb),
]
HOOK_FAULTS = [fault for fault in FAULTS if fault.hook is not None]


@dataclass
class FaultyWorld:
    """A proxy (in-process) in front of an Infinity that fails as the fault says, and the way back."""

    client: Any
    upstream: Upstream
    infinity_url: str
    heal: Callable[[], Awaitable[None]]

    @property
    def proxy_upstream(self) -> Any:
        return self.client.server.app[proxy.INFINITY]

    def message_words(self, fault: Fault) -> list[str]:
        origin = self.infinity_url.removesuffix("/v1")
        return [word.format(url=self.infinity_url + "/classify", origin=origin) for word in fault.says]

    def leftovers(self) -> dict[str, int]:
        """Everything a fault could leave behind; after one good request: nothing but one idle
        keep-alive connection (or none, if the proxy's 4 s keep-alive ran out on a slow machine)."""
        return {"proxy calls in flight": self.proxy_upstream.in_flight,
                "fake calls in flight": self.upstream.fake.in_flight + self.upstream.running,
                "tasks running proxy code": len(tasks_running_proxy_code()),
                "connections to Infinity beyond one": max(0, connections_to(port_of(self.infinity_url)) - 1)}


NOTHING_LEFT = {"proxy calls in flight": 0, "fake calls in flight": 0, "tasks running proxy code": 0,
                "connections to Infinity beyond one": 0}


@pytest.fixture
def full_accept_queue() -> Iterator[Callable[[], tuple[socket.socket, Callable[[], None]]]]:
    """A port whose listener never accepts and whose accept queue is full: Linux drops the SYN of a
    new connection there, so connecting times out (a stand-in for a host that does not answer).
    Releasing it empties the queue; the listener stays, for a server to take over."""
    sockets: list[socket.socket] = []

    def make() -> tuple[socket.socket, Callable[[], None]]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        sockets.append(listener)
        fillers = []
        for _ in range(3):  # fill the queue
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        sockets.extend(fillers)

        def release() -> None:
            for filler in fillers:
                filler.close()

        return listener, release

    yield make
    for sock in sockets:
        sock.close()


@pytest.fixture
async def break_upstream(make_proxy: Callable[..., Awaitable[Any]], upstream: Upstream, fake_infinity: FakeInfinity,
                         unlistened_socket: socket.socket, monkeypatch: pytest.MonkeyPatch,
                         full_accept_queue: Callable[[], tuple[socket.socket, Callable[[], None]]],
                         ) -> AsyncIterator[Callable[[Fault], Awaitable[FaultyWorld]]]:
    runners: list[web.AppRunner] = []

    async def make(fault: Fault) -> FaultyWorld:
        if fault.upstream == "fake":
            assert fault.hook is not None
            upstream.fail_with(fault.hook())
            client = await make_proxy(timeout=fault.timeout)

            async def heal() -> None:
                upstream.heal()

            return FaultyWorld(client, upstream, fake_infinity.url, heal)
        if fault.upstream == "nothing listening":
            held, release = unlistened_socket, lambda: None
        else:
            monkeypatch.setattr(proxy, "CONNECT_TIMEOUT_SECONDS", 0.5)
            held, release = full_accept_queue()
        url = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        client = await make_proxy(infinity_url=url, timeout=fault.timeout)
        fake = FakeInfinity()

        async def start_infinity_there() -> None:
            release()
            # On the socket held all along: no moment where another process could take the port.
            runner = web.AppRunner(fake.app())
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, held).start()

        return FaultyWorld(client, Upstream(fake), url, start_infinity_there)

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("fault", FAULTS, ids=str)
async def test_each_upstream_fault_answers_the_contracts_error_in_time(
        fault: Fault, break_upstream: Callable[[Fault], Awaitable[FaultyWorld]]) -> None:
    world = await break_upstream(fault)
    answer = await post(world.client, GOOD)
    assert_error(answer, fault.status, fault.error_type, *world.message_words(fault), param=fault.param)
    assert answer.headers.get("Retry-After") == fault.retry_after
    assert answer.seconds < fault.within + LOADED_MACHINE_SLACK


@pytest.mark.parametrize("fault", FAULTS, ids=str)
async def test_after_each_upstream_fault_the_next_request_succeeds_and_nothing_is_left_behind(
        fault: Fault, break_upstream: Callable[[Fault], Awaitable[FaultyWorld]]) -> None:
    world = await break_upstream(fault)
    await post(world.client, GOOD)
    await world.heal()
    answer = await post(world.client, NEXT)
    assert_ranked(answer, NEXT)
    await eventually(lambda: world.leftovers() == NOTHING_LEFT)  # closed sockets take a turn of the loop
    assert world.leftovers() == NOTHING_LEFT


@pytest.mark.parametrize("fault", HOOK_FAULTS, ids=str)
async def test_a_failed_call_on_a_fresh_connection_is_not_retried(
        fault: Fault, break_upstream: Callable[[Fault], Awaitable[FaultyWorld]]) -> None:
    world = await break_upstream(fault)  # a new proxy: its first call opens a new connection
    await post(world.client, GOOD)
    assert world.upstream.calls == 1


async def test_the_proxy_asks_infinity_for_uncompressed_answers(client: Any, fake_infinity: FakeInfinity) -> None:
    assert_ranked(await post(client, GOOD), GOOD)
    assert fake_infinity.classify_headers[0]["Accept-Encoding"] == "identity"


def answers_forwarded(size: int) -> FaultHook:
    """A forwarded route's answer of `size` bytes, sent in 1 MiB pieces."""
    async def hook(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for start in range(0, size, 1 << 20):
            await response.write(bytes([start >> 20 & 255]) * min(1 << 20, size - start))
        await response.write_eof()
        return response

    return hook


async def test_a_large_forwarded_answer_is_streamed_through_whole(client: Any, upstream: Upstream) -> None:
    upstream.fail_with(answers_forwarded(24 << 20))
    async with client.post("/v1/embeddings", json={"model": "m", "input": ["a"]}) as response:
        assert response.status == 200 and "X-Request-ID" in response.headers
        received = [len(piece) async for piece in response.content.iter_chunked(1 << 20)]
    assert sum(received) == 24 << 20
    upstream.heal()
    assert_ranked(await post(client, NEXT), NEXT)


async def test_an_endless_forwarded_answer_is_cut_off_at_the_timeout_and_the_next_request_served(
        make_proxy: Callable[..., Awaitable[Any]], upstream: Upstream) -> None:
    client = await make_proxy(timeout=1.0)
    upstream.fail_with(streams_endlessly(None, 0.01))
    started = time.monotonic()
    async with client.post("/v1/embeddings", json={"model": "m", "input": ["a"]}) as response:
        assert response.status == 200  # the answer had begun: it can only be cut short
        with pytest.raises(ClientError):
            await response.read()
    assert time.monotonic() - started < 1.0 + LOADED_MACHINE_SLACK
    upstream.heal()
    assert_ranked(await post(client, NEXT), NEXT)
    assert await eventually(lambda: upstream.running == 0)


async def test_forwarded_answers_streaming_at_once_never_take_the_connections_reranks_need(
        make_proxy: Callable[..., Awaitable[Any]], upstream: Upstream) -> None:
    client = await make_proxy(max_concurrency=2, timeout=3.0)
    trickle = streams_endlessly(None, 0.05)

    async def embeddings_trickle(request: web.Request) -> web.StreamResponse | None:
        return await trickle(request) if request.path.endswith("/embeddings") else None

    async def stream() -> None:
        async with client.post("/v1/embeddings", json={"model": "m", "input": ["a"]}) as response:
            await response.read()  # never ends: the stream holds its connections until cancelled

    upstream.fail_with(embeddings_trickle)
    streams = [asyncio.create_task(stream()) for _ in range(20)]  # more than the scoring pool's 2 and any spare
    try:
        assert await eventually(lambda: client.server.app[proxy.ADMISSION].requests == 20)
        assert_ranked(await post(client, GOOD), GOOD)
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)


async def test_a_model_list_over_its_stated_size_is_502(client: Any, upstream: Upstream) -> None:
    upstream.fail_with(answers_forwarded(proxy.MODELS_ANSWER_BYTES + 1))
    async with client.get("/v1/models") as response:
        answer = Answer(response.status, dict(response.headers), await response.json(), 0.0)
    assert_error(answer, 502, "upstream_error", f"passed {proxy.MODELS_ANSWER_BYTES} bytes")
    upstream.heal()
    assert (await client.get("/v1/models")).status == 200


async def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(
        client: Any, upstream: Upstream, fake_infinity: FakeInfinity) -> None:
    upstream.fail_with(closes_connections_it_answered_on_before())
    assert_ranked(await post(client, GOOD), GOOD)
    answer = await post(client, NEXT)  # goes out on the kept-alive connection, which the fake drops
    assert_ranked(answer, NEXT)
    assert upstream.calls == 3  # GOOD once; NEXT on the stale connection, then on a new one
    assert len(fake_infinity.classify_bodies) == 2


async def test_a_stale_connection_whose_retry_fails_too_gives_502_after_two_attempts(
        client: Any, upstream: Upstream, fake_infinity: FakeInfinity) -> None:
    upstream.fail_with(closes_every_connection_after_the_first_answer())
    assert_ranked(await post(client, GOOD), GOOD)
    answer = await post(client, NEXT)
    assert_error(answer, 502, "upstream_error", f"{fake_infinity.url}/classify")
    assert upstream.calls == 3  # never a third attempt for one call


async def test_a_stalled_forwarded_call_gives_504_within_the_timeout(make_proxy: Any, upstream: Upstream) -> None:
    client = await make_proxy(timeout=1.0)
    upstream.fail_with(never_answers())
    answer = await post(client, {"model": "m", "input": ["a"]}, "/v1/embeddings")
    assert_error(answer, 504, "timeout_error", "--timeout (1 s)")
    assert answer.seconds < 1.0 + LOADED_MACHINE_SLACK


# ---------------------------------------------------------------------------------------------
# One request, several calls: all or nothing
# ---------------------------------------------------------------------------------------------


def fails_one_call_once_the_others_hang(upstream: Upstream, poison: str, answer: FaultHook, calls: int) -> FaultHook:
    """The call carrying `poison` fails, but only once the request's other calls are running at the
    fake, which never answers them: so they must be cancelled, not merely never started."""

    async def hook(request: web.Request) -> web.StreamResponse | None:
        if poison.encode() in await request.read():
            await eventually(lambda: upstream.running == calls)
            return await answer(request)
        await asyncio.Event().wait()
        return None

    return hook


@pytest.mark.parametrize(("failure", "status", "error_type", "retry_after"), [
    (answers(500, '{"detail":"worker died"}'), 502, "upstream_error", None),
    (answers(429, '{"detail":"queue is full"}', headers={"Retry-After": "2"}), 429, "rate_limit_error", "2"),
], ids=["500", "429"])
async def test_one_failed_call_fails_the_whole_request_and_cancels_the_others(
        make_proxy: Any, upstream: Upstream, failure: FaultHook, status: int, error_type: str,
        retry_after: str | None) -> None:
    # One call per document; a --timeout far beyond the test: a 504 would mean it waited for the hung calls.
    client = await make_proxy(batch_size=1, timeout=50.0)
    upstream.fail_with(fails_one_call_once_the_others_hang(upstream, "poison", failure, calls=3))
    answer = await post(client, {"query": QUERY, "documents": ["fine one", "poison", "fine two"]})
    assert_error(answer, status, error_type)
    assert answer.headers.get("Retry-After") == retry_after
    assert client.server.app[proxy.INFINITY].in_flight == 0  # let go before answering
    assert tasks_running_proxy_code() == []
    assert await eventually(lambda: upstream.running == 0)


# ---------------------------------------------------------------------------------------------
# --max-concurrency: a bound, not a drop
# ---------------------------------------------------------------------------------------------


async def test_upstream_calls_in_flight_never_exceed_max_concurrency(
        make_proxy: Any, upstream: Upstream, fake_infinity: FakeInfinity) -> None:
    client = await make_proxy(max_concurrency=3, batch_size=1)
    gate = asyncio.Event()
    upstream.fail_with(waits_for(gate))  # the calls stay in flight until the gate opens
    bodies = [{"query": f"query {i}", "documents": [f"document {i}.{j}" for j in range(4)]} for i in range(4)]
    asking = asyncio.gather(*(post(client, body) for body in bodies))
    assert await eventually(lambda: upstream.running == 3)
    await asyncio.sleep(0.2)  # time for a fourth call to arrive, were the bound broken
    assert upstream.running == 3
    gate.set()
    for answer, body in zip(await asking, bodies, strict=True):
        assert_ranked(answer, body)
    assert upstream.calls == 16
    assert fake_infinity.most_in_flight <= 3


async def test_requests_beyond_max_concurrency_wait_and_all_succeed(
        make_proxy: Any, fake_infinity: FakeInfinity) -> None:
    client = await make_proxy(max_concurrency=1, timeout=50.0)  # waiting in line must not cost a 504 here
    fake_infinity.delay = 0.05
    bodies = [{"query": f"query {i}", "documents": [f"document {i}"]} for i in range(12)]
    started = time.monotonic()
    answers_ = await asyncio.gather(*(post(client, body) for body in bodies))
    for answer, body in zip(answers_, bodies, strict=True):
        assert_ranked(answer, body)
    assert time.monotonic() - started >= 12 * 0.05  # they queued: one call at a time
    assert fake_infinity.most_in_flight == 1


async def test_a_request_queued_behind_max_concurrency_gives_504_at_the_timeout(
        make_proxy: Any, fake_infinity: FakeInfinity) -> None:
    client = await make_proxy(max_concurrency=1, timeout=0.6)
    # The test takes the only slot itself and keeps it past the request's --timeout: a request in
    # flight would give it up at its own timeout, and whether the queued one then made it in time
    # would depend on the machine's speed.
    slots = client.server.app[proxy.INFINITY].slots
    await slots.acquire()
    try:
        answer = await post(client, GOOD)
    finally:
        slots.release()
    assert_error(answer, 504, "timeout_error", "--timeout (0.6 s)")
    assert 0.6 <= answer.seconds < 0.6 + LOADED_MACHINE_SLACK  # timed from its arrival, queueing included
    assert fake_infinity.classify_bodies == []
    assert client.server.app[proxy.INFINITY].in_flight == 0
    assert_ranked(await post(client, NEXT), NEXT)  # the slot it waited for was not lost


# ---------------------------------------------------------------------------------------------
# Hostile input: every answer a JSON 4xx or a correct 200, never a 500, never over a CPU second
# ---------------------------------------------------------------------------------------------

RERANK_PATHS = ["/rerank", "/v1/rerank", "/v2/rerank"]


def json_values_of(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


# Text as clients send it, lone surrogates ("\ud800", which JSON can carry) and NUL included.
texts = st.text(st.characters(exclude_categories=()), max_size=30)
# Anything json.dumps writes: NaN and Infinity (which are not JSON: a 400), any integer, any text.
json_values = json_values_of(st.none() | st.booleans() | st.integers() | st.floats() | texts)
# Only what the contract accepts as JSON: finite floats, integers JSON carries exactly (RFC 8259's
# interoperable range), text without lone surrogates (st.text() draws none); st.recursive with 12
# leaves nests 4 levels deep at most, far from any nesting limit.
valid_json_values = json_values_of(st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1)
                                   | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly a valid one, sometimes null, sometimes any JSON at all."""
    return st.integers(0, 9).flatmap(lambda k: valid if k < 8 else st.none() if k == 8 else json_values)


def names_no_template(model: str) -> bool:
    """A model name that leaves the default template in charge: the expected scores here are mxbai-rerank-v2's."""
    return not any(part in model.lower() for t in proxy.TEMPLATES.values() for part in t.models)


rerank_bodies = st.fixed_dictionaries({
    "query": maybe(st.text(st.characters(exclude_categories=()), min_size=1, max_size=30)),
    "documents": maybe(st.lists(texts | st.fixed_dictionaries({"text": texts}), max_size=6)),
}, optional={
    "top_n": maybe(st.integers(-2, 8)),
    "return_documents": maybe(st.booleans()),
    "raw_scores": maybe(st.booleans()),
    "instruction": maybe(texts),
    "model": maybe(texts.filter(names_no_template)),
    "max_tokens_per_doc": maybe(st.integers(1, 12)),
    "max_chunks_per_doc": maybe(st.integers(1, 3)),
    "rank_fields": maybe(st.lists(st.sampled_from(["text", "title"]), max_size=2)),
    "extra": json_values,
})


def as_json_text(value: Any) -> str:
    """A rank field's value in its line: a string as is, anything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def two_label_log_odds(p1: float) -> float:
    """The log-odds the proxy reads from the fake's two labels, p1 and 1 - p1: ln(p1) - ln(1 - p1)."""
    return math.log(p1) - math.log(1.0 - p1) if 0 < p1 and 0 < 1.0 - p1 < 1 else proxy.log_odds(p1)


def expected_results(body: dict[str, Any], config: Any) -> list[tuple[int, float]]:
    """The contract's answer for a body the proxy accepted, for the short texts generated here."""
    instruction = body.get("instruction") or ""
    rank_fields = list(dict.fromkeys(body.get("rank_fields") or []))  # a field named twice is scored once
    scores = []
    for document in body["documents"]:
        if isinstance(document, str):
            text = document
        elif rank_fields:
            text = "\n".join(f"{name}: {as_json_text(document[name])}" for name in rank_fields if name in document)
        else:
            text = document["text"]
        if body.get("max_tokens_per_doc") is not None:
            text = text[: 3 * body["max_tokens_per_doc"]]
        p1 = hashed_probability(proxy.prompt_for(body["query"][: config.max_query_chars], text, instruction))
        scores.append(two_label_log_odds(p1) if body.get("raw_scores") else p1)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    top_n = body.get("top_n")
    return [(i, scores[i]) for i in (order[:top_n] if top_n and top_n > 0 else order)]


def assert_json_4xx(answer: Answer) -> None:
    assert 400 <= answer.status < 500, (answer.status, answer.body)
    assert answer.headers["Content-Type"].startswith("application/json")
    assert set(answer.body["error"]) == {"message", "type", "param", "code"}
    assert answer.body["error"]["code"] == answer.status


def assert_correct_200(answer: Answer, body: dict[str, Any], client: Any, fake: FakeInfinity | None = None) -> None:
    assert answer.status == 200, answer.body
    config = client.server.app[proxy.CONFIG]
    assert [(r["index"], r["relevance_score"]) for r in answer.body["results"]] == expected_results(body, config)
    if fake is not None:
        assert fake.empty_inputs == 0


# On top of conftest.py's profile, which sets no deadline: post_hostile bounds each request's CPU time
# instead. The client fixture is shared by an example and the next, as a proxy serves one request and the next.
HOSTILE = settings(max_examples=200,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HOSTILE_CPU_SECONDS = 1.0


async def post_hostile(client: Any, body: Any, path: str = "/v1/rerank",
                       cpu_seconds: float = HOSTILE_CPU_SECONDS) -> Answer:
    """POST to the in-process proxy, and check what the answer cost in CPU time: a pathological input
    (a quadratic parse, a blown-up plan) shows there, while the wall clock also counts every other
    process on a loaded machine."""
    cpu = time.process_time()
    answer = await post(client, body, path)
    assert time.process_time() - cpu < cpu_seconds
    return answer


@HOSTILE
@given(body=rerank_bodies, path=st.sampled_from(RERANK_PATHS))
async def test_any_rerank_shaped_body_gets_a_json_4xx_or_the_correct_200(
        client: Any, fake_infinity: FakeInfinity, body: dict[str, Any], path: str) -> None:
    answer = await post_hostile(client, body, path)
    if answer.status != 200:
        assert_json_4xx(answer)
        return
    assert_correct_200(answer, body, client, fake_infinity)


# Valid text: any character but an unpaired surrogate (which no UTF-8 text can hold).
valid_texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
RANK_FIELD_NAMES = ("text", "title", "body")


def ranked_by(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """rank_fields and documents that suit them: strings, and objects that hold at least the first field."""
    objects = st.fixed_dictionaries({fields[0]: valid_json_values},
                                    optional={name: valid_json_values for name in RANK_FIELD_NAMES if name != fields[0]})
    return st.fixed_dictionaries({"rank_fields": st.just(fields), "documents": st.lists(valid_texts | objects, max_size=6)})


with_rank_fields = st.none() | st.just({"rank_fields": []}) | st.lists(
    st.sampled_from(RANK_FIELD_NAMES), min_size=1, max_size=3).flatmap(ranked_by)
valid_bodies_without_rank_fields = st.fixed_dictionaries({
    "query": valid_texts.filter(lambda query: query.strip() != ""),
    "documents": st.lists(valid_texts | st.fixed_dictionaries({"text": valid_texts}), max_size=6),
}, optional={
    "top_n": st.none() | st.integers(-2, 8),
    "return_documents": st.none() | st.booleans(),
    "raw_scores": st.none() | st.booleans(),
    "instruction": st.none() | valid_texts,
    "model": st.none() | valid_texts.filter(names_no_template),
    "max_tokens_per_doc": st.none() | st.integers(1, 12),
    "max_chunks_per_doc": st.none() | st.integers(1, 3),
    "extra": valid_json_values,
})
valid_bodies = st.tuples(valid_bodies_without_rank_fields, with_rank_fields).map(
    lambda pair: {**pair[0], **(pair[1] or {})})


@HOSTILE
@given(body=valid_bodies, path=st.sampled_from(RERANK_PATHS))
async def test_any_valid_body_gets_the_correct_200(
        client: Any, fake_infinity: FakeInfinity, body: dict[str, Any], path: str) -> None:
    # The tests above accept any 4xx; this one makes sure valid bodies are never among them.
    answer = await post_hostile(client, body, path)
    assert_correct_200(answer, body, client, fake_infinity)


@HOSTILE
@given(body=json_values, path=st.sampled_from(RERANK_PATHS))
async def test_any_json_body_gets_a_json_4xx_or_the_correct_200(client: Any, body: Any, path: str) -> None:
    answer = await post_hostile(client, json.dumps(body).encode(), path)
    if answer.status != 200:
        assert_json_4xx(answer)
        return
    assert_correct_200(answer, body, client)


GOOD_BYTES = json.dumps(GOOD).encode()  # any proper prefix of it is cut short: never JSON


@HOSTILE
@given(raw=st.binary(max_size=400) | st.integers(0, len(GOOD_BYTES) - 1).map(lambda cut: GOOD_BYTES[:cut]),
       path=st.sampled_from(RERANK_PATHS))
async def test_any_bytes_get_a_json_4xx(client: Any, raw: bytes, path: str) -> None:
    answer = await post_hostile(client, raw, path)
    assert_json_4xx(answer)


async def test_a_body_over_max_body_size_is_refused_413_while_it_is_read(client: Any, fake_infinity: FakeInfinity
                                                                         ) -> None:
    limit = proxy.Config().max_body_size  # the default, 32 MiB
    huge = json.dumps({"query": QUERY, "documents": ["x" * (limit + 1)]}).encode()
    answer = await post_hostile(client, huge, cpu_seconds=5.0)
    assert_error(answer, 413, "request_too_large", "--max-body-size", str(limit))
    assert fake_infinity.classify_bodies == []
    assert_ranked(await post(client, GOOD), GOOD)


async def test_a_huge_query_and_document_cost_bounded_upstream_work(client: Any, fake_infinity: FakeInfinity
                                                                       ) -> None:
    config = client.server.app[proxy.CONFIG]
    long_text = " ".join(str(n) for n in range(1_500_000))  # about 10 MB, no two chunks alike
    answer = await post_hostile(client, {"query": "q" * 1_000_000, "documents": [long_text]}, cpu_seconds=5.0)
    assert answer.status == 200, answer.body
    assert len(fake_infinity.inputs) == config.max_chunks_per_doc
    longest_prompt = proxy.template_overhead_chars(proxy.DEFAULT_TEMPLATE) + config.max_query_chars + config.max_doc_chars
    assert max(len(prompt) for prompt in fake_infinity.inputs) <= longest_prompt


async def test_more_than_max_documents_is_400_before_any_upstream_call(client: Any, fake_infinity: FakeInfinity
                                                                        ) -> None:
    answer = await post(client, {"query": QUERY, "documents": ["d"] * 10_001})
    assert_error(answer, 400, "invalid_request_error", "10001", "10000", param="documents")
    assert fake_infinity.classify_bodies == []


async def test_a_deeply_nested_body_is_400_at_once(client: Any) -> None:
    answer = await post_hostile(client, b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert_error(answer, 400, "invalid_request_error", "nested too deeply")


def padded_with(junk: bytes, size: int = 4 << 20) -> bytes:
    """A good rerank body with an ignored field of `junk` repeated to about `size` bytes."""
    return b'{"query": "q", "documents": ["a", "b"], "junk": [' + junk * (size // len(junk)) + b'0]}'


@pytest.mark.parametrize("junk", [b"[],", b"{},", b'"ab",', b"1.5,", b'{"a":1},'], ids=bytes.decode)
async def test_a_body_of_far_more_json_values_than_its_bytes_justify_is_400_before_it_is_parsed(
        client: Any, fake_infinity: FakeInfinity, junk: bytes) -> None:
    answer = await post_hostile(client, padded_with(junk))  # parsed, it would take 10 to 20 times its size
    assert_error(answer, 400, "invalid_request_error", "JSON values", "leave out what the proxy does not need")
    assert fake_infinity.classify_bodies == []
    assert_ranked(await post(client, NEXT), NEXT)


@pytest.mark.parametrize("text", ["[{,", '{"a": [1, 2], "b": {"c": "d"}},', 'a,b,c,\\"[{,'], ids=repr)
async def test_commas_and_brackets_inside_text_do_not_count_as_json_values(client: Any, text: str) -> None:
    # Over 4 MB of text dense with them, in documents short enough to be scored whole.
    documents = [text * (7_000 // len(text)) + f" {i}" for i in range(4_000_000 // 7_000 + 1)]
    body = {"query": QUERY, "documents": documents}
    assert_ranked(await post_hostile(client, json.dumps(body).encode(), cpu_seconds=5.0), body)


def test_values_outside_strings_are_counted_exactly() -> None:
    for value, expected in [([[], [[]], {}], 7), ({"a": "x,[{", "b": ["\\", '"', 1]}, 5), ("a,[{", 0)]:
        assert proxy.values_outside_strings(json.dumps(value).encode()) == expected


def deepest_json_parsed_here() -> int:
    """The deepest list nesting json.loads accepts at this depth of the stack."""
    low, high = 1, 100_000
    while low < high:
        middle = (low + high + 1) // 2
        try:
            json.loads("[" * middle + "]" * middle)
            low = middle
        except RecursionError:
            high = middle - 1
    return low


@pytest.mark.parametrize("shape", ["rank_fields", "return_documents"])
async def test_a_document_nested_near_the_parsers_limit_is_never_a_500(client: Any, shape: str) -> None:
    # The proxy re-encodes object documents (rank_fields lines, echoed documents) deeper in the stack
    # than it parsed them: a nesting the parser just accepted must not overflow there.
    deepest = deepest_json_parsed_here()
    statuses = set()
    for depth in range(deepest - 60, deepest + 5):
        nested = "[" * depth + '"x"' + "]" * depth
        extra = '"rank_fields":["title"]' if shape == "rank_fields" else '"return_documents":true'
        body = '{"query":"q","documents":[{"text":"t","title":' + nested + "}]," + extra + "}"
        answer = await post(client, body.encode(), "/v2/rerank")
        statuses.add(answer.status)
        assert answer.status in (200, 400), (depth, answer.body)
    assert 400 in statuses


WRONG_VALUES = {"a string": "3", "an integer": 3, "a float": 3.0, "a boolean": True, "a list": ["3"],
                "an object": {"text": "3"}}
FIELD_KINDS = {"query": "a string", "documents": "a list", "top_n": "an integer", "return_documents": "a boolean",
               "raw_scores": "a boolean", "model": "a string", "instruction": "a string", "rank_fields": "a list",
               "max_chunks_per_doc": "an integer", "max_tokens_per_doc": "an integer"}


@pytest.mark.parametrize(("field_name", "value"), [
    (name, value) for name, kind in FIELD_KINDS.items() for label, value in WRONG_VALUES.items() if label != kind
], ids=lambda value: json.dumps(value) if not isinstance(value, str) or value == "3" else value)
async def test_a_field_of_the_wrong_type_is_400_naming_it(
        client: Any, fake_infinity: FakeInfinity, field_name: str, value: Any) -> None:
    answer = await post(client, {**GOOD, field_name: value})
    assert_error(answer, 400, "invalid_request_error", field_name, param=field_name)
    assert fake_infinity.classify_bodies == []


@pytest.mark.parametrize("element", [3, 3.0, True, None, ["x"], {"title": "no text"}], ids=json.dumps)
async def test_a_document_of_the_wrong_type_is_400_naming_its_index(client: Any, element: Any) -> None:
    answer = await post(client, {"query": QUERY, "documents": ["fine", element]})
    assert_error(answer, 400, "invalid_request_error", "documents[1]", param="documents[1]")


async def test_unicode_and_nul_characters_reach_infinity_verbatim_and_are_scored(
        client: Any, fake_infinity: FakeInfinity) -> None:
    body = {"query": "na\u00efve \x00 query \u6f22\u5b57 \U0001f980",
            "documents": ["nul \x00 inside", "\u05e2\u05d1\u05e8\u05d9\u05ea RTL \u202e override", "e\u0301 combining",
                          "line\u2028separator", "emoji \U0001f3f3\ufe0f\u200d\U0001f308 zwj", "\ufeffbom"]}
    answer = await post(client, body)
    assert_ranked(answer, body)
    assert fake_infinity.inputs == [proxy.classify_input(body["query"], d) for d in body["documents"]]


@pytest.mark.parametrize("query", [" ", "   ", "\t\n ", "  \n\t", "\u3000", ""], ids=repr)
async def test_a_query_of_only_whitespace_is_400(client: Any, fake_infinity: FakeInfinity, query: str) -> None:
    answer = await post(client, {"query": query, "documents": DOCUMENTS})
    assert_error(answer, 400, "invalid_request_error", "empty or only whitespace", param="query")
    assert fake_infinity.classify_bodies == []


async def test_documents_of_only_whitespace_are_scored_and_never_reach_infinity_empty(
        client: Any, fake_infinity: FakeInfinity) -> None:
    body = {"query": QUERY, "documents": ["", " ", "   ", "    ", "\n", "\t\n", "\u3000", "\n\n\n"]}
    answer = await post(client, body)
    assert_ranked(answer, body)
    assert fake_infinity.empty_inputs == 0
    assert all(text.strip() for text in fake_infinity.inputs)


# ---------------------------------------------------------------------------------------------
# Hostile bodies: compressed bodies refused from their headers, refusing is free
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: Any
    closed_after: bool  # whether the proxy closed the connection after the answer


async def answer_to_headers_alone(port: int, head: str) -> RawAnswer:
    """Send a request's headers and none of the body they announce; read the answer and whether the proxy then
    closes the connection. Only an answer that needs no body can come at all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        status_line = await asyncio.wait_for(reader.readline(), LOADED_MACHINE_SLACK)
        assert status_line, "closed without an answer"
        headers = {}
        while (line := await asyncio.wait_for(reader.readline(), LOADED_MACHINE_SLACK)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        closed = await asyncio.wait_for(reader.read(1), LOADED_MACHINE_SLACK) == b""
        return RawAnswer(int(status_line.split()[1]), headers, body, closed)
    finally:
        writer.close()


ENCODINGS = ["gzip", "deflate", "br", "zstd", "bogus", "gzip, identity"]


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_compressed_body_is_415_naming_content_encoding_before_any_of_it_is_read(
        client: Any, fake_infinity: FakeInfinity, encoding: str) -> None:
    head = f"POST /v1/rerank HTTP/1.1\nHost: x\nContent-Length: 8000000\nContent-Encoding: {encoding}\n"
    answer = await answer_to_headers_alone(client.server.port, head)
    assert answer.status == 415, answer.body
    assert answer.body["error"]["type"] == "unsupported_media_type" and "Content-Encoding" in answer.body["error"][
        "message"]
    assert (answer.headers["connection"], answer.closed_after) == ("close", True)
    assert fake_infinity.classify_bodies == []
    assert_ranked(await post(client, NEXT), NEXT)


@pytest.mark.parametrize(("encoding", "body"), [("gzip", b"\x1f\x8b\x08 not gzip at all"), ("bogus", b"{}"),
                                                  ("gzip", gzip.compress(json.dumps(GOOD).encode()))],
                         ids=["corrupt gzip", "unknown", "valid gzip"])
async def test_an_encoded_body_corrupt_unknown_or_valid_is_a_json_415_never_a_500_or_200(
        client: Any, encoding: str, body: bytes) -> None:
    async with client.post("/v1/rerank", data=body, headers={"Content-Encoding": encoding}) as response:
        answer = Answer(response.status, dict(response.headers), await response.json(), 0.0)
    assert_error(answer, 415, "unsupported_media_type", "Content-Encoding", repr(encoding))
    assert_ranked(await post(client, NEXT), NEXT)


async def test_content_encoding_identity_is_an_uncompressed_body(client: Any) -> None:
    async with client.post("/v1/rerank", data=json.dumps(GOOD), headers={"Content-Encoding": "identity"}) as response:
        assert_ranked(Answer(response.status, {}, await response.json(), 0.0), GOOD)


REFUSED_FROM_HEADERS = {  # the first lines of a request the proxy answers from its headers alone
    "401": (401, {"api_key": "k"}, "POST /v1/rerank"),
    "404": (404, {}, "POST /nowhere"),
    "405": (405, {}, "PUT /v1/rerank"),
    "413 by Content-Length": (413, {"max_body_size": 1_000_000}, "POST /v1/rerank"),
    "415": (415, {}, "POST /v1/rerank"),
}


@pytest.mark.parametrize("case", REFUSED_FROM_HEADERS)
async def test_a_refusal_is_answered_without_the_body_and_the_connection_closed_not_drained(
        make_proxy: Callable[..., Awaitable[Any]], case: str) -> None:
    status, flags, request_line = REFUSED_FROM_HEADERS[case]
    client = await make_proxy(**flags)
    encoding = "Content-Encoding: gzip\n" if status == 415 else ""
    answer = await answer_to_headers_alone(client.server.port,
                                           f"{request_line} HTTP/1.1\nHost: x\nContent-Length: 8000000\n{encoding}")
    assert answer.status == status, answer.body
    assert answer.body["error"]["code"] == status
    assert (answer.headers["connection"], answer.closed_after) == ("close", True)
    headers = {"Authorization": "Bearer k"} if "api_key" in flags else {}
    async with client.post("/v1/rerank", data=json.dumps(NEXT), headers=headers) as response:
        assert_ranked(Answer(response.status, {}, await response.json(), 0.0), NEXT)


async def test_a_refused_gzip_bomb_is_never_decoded(make_proxy: Callable[..., Awaitable[Any]]) -> None:
    client = await make_proxy(api_key="k")
    bomb = gzip_bomb(2 << 20)  # 2 MB on the wire, 2 GiB decoded
    for headers in ({"Content-Encoding": "gzip"}, {"Content-Encoding": "gzip", "Authorization": "Bearer k"}):
        cpu = time.process_time()
        async with client.post("/v1/rerank", data=bomb, headers=headers) as response:
            assert response.status in (401, 415) and response.headers["Connection"] == "close"
        assert time.process_time() - cpu < HOSTILE_CPU_SECONDS  # decoding 2 GiB would take several seconds


# ---------------------------------------------------------------------------------------------
# The proxy as a process: client disconnect, graceful shutdown
# ---------------------------------------------------------------------------------------------


async def test_a_client_that_disconnects_cancels_its_upstream_calls(
        spawn_proxy: Callable[..., Awaitable[ProxyProcess]], upstream: Upstream) -> None:
    # The calls never answer and --timeout is far away: only the proxy letting go ends them.
    running = await spawn_proxy(upstream.fake.url, "--batch-size", "1", "--timeout", "50")
    upstream.fail_with(never_answers())
    async with running.session() as session:
        request = asyncio.create_task(post(session, {"query": QUERY, "documents": ["a", "b", "c"]}))
        assert await eventually(lambda: upstream.running == 3)
        request.cancel()  # the client goes away: its connection is closed
        with pytest.raises(asyncio.CancelledError):
            await request
    assert await eventually(lambda: upstream.running == 0)
    assert await eventually(lambda: connections_to(port_of(upstream.fake.url), running.process.pid) == 0)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_on_a_shutdown_signal_the_request_in_flight_completes_and_the_proxy_exits_0(
        spawn_proxy: Callable[..., Awaitable[ProxyProcess]], fake_infinity: FakeInfinity,
        signal_number: signal.Signals) -> None:
    running = await spawn_proxy(fake_infinity.url, "--timeout", "10")
    fake_infinity.delay = 0.8
    async with running.session() as session:
        request = asyncio.create_task(post(session, GOOD))
        assert await eventually(lambda: fake_infinity.in_flight == 1)
        running.process.send_signal(signal_number)
        answer = await request
    assert_ranked(answer, GOOD)
    assert await running.exit_code(within=LOADED_MACHINE_SLACK) == 0
    log = running.log.read_text()
    assert "Traceback" not in log and "Unclosed" not in log  # the session was closed, nothing failed


async def test_on_a_shutdown_signal_new_connections_are_refused_at_once(
        spawn_proxy: Callable[..., Awaitable[ProxyProcess]], upstream: Upstream) -> None:
    running = await spawn_proxy(upstream.fake.url, "--timeout", "50")
    gate = asyncio.Event()
    upstream.fail_with(waits_for(gate))  # the request stays in flight until the test has looked
    async with running.session() as session:
        request = asyncio.create_task(post(session, GOOD))
        assert await eventually(lambda: upstream.running == 1)
        running.process.send_signal(signal.SIGTERM)
        assert await eventually(lambda: not running.accepts_connections())
        assert not request.done()  # refused while the request in flight still runs
        gate.set()
        assert_ranked(await request, GOOD)


async def test_shutdown_waits_no_longer_than_the_timeout_for_a_hung_infinity(
        spawn_proxy: Callable[..., Awaitable[ProxyProcess]], fake_infinity: FakeInfinity, upstream: Upstream) -> None:
    running = await spawn_proxy(fake_infinity.url, "--timeout", "1")
    upstream.fail_with(never_answers())
    async with running.session() as session:
        request = asyncio.create_task(post(session, GOOD))
        assert await eventually(lambda: upstream.running == 1)
        signalled = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        answer = await request
        assert_error(answer, 504, "timeout_error", "--timeout (1 s)")
    assert await running.exit_code(within=LOADED_MACHINE_SLACK) == 0
    # Not aiohttp's 60 s default shutdown_timeout, nor forever: --timeout, on a machine that may be loaded.
    assert time.monotonic() - signalled < 1.0 + LOADED_MACHINE_SLACK


# ---------------------------------------------------------------------------------------------
# Load and restart (slow)
# ---------------------------------------------------------------------------------------------

LOAD_CLIENTS = 200  # concurrent client connections
LOAD_REQUESTS = 4000
LOAD_DEADLINE = 60.0  # seconds: the loop stops here whatever happens
UPSTREAM_LATENCY = 0.02  # seconds per /classify call: a small GPU batch
RSS_GROWTH_BOUND = 4 * 2**20  # bytes the proxy's RSS may grow after its first thousand requests


def load_body(i: int) -> dict[str, Any]:
    """Request i's own query and documents: its expected scores differ from every other request's."""
    return {"query": f"load query {i}", "documents": [f"passage {i}.{j} " + "word " * (i % 13 + j) for j in range(1 + i % 6)],
            "top_n": 1 + i % 6 if i % 3 == 0 else None}


def assert_load_answer(answer: Answer, body: dict[str, Any]) -> None:
    assert answer.status == 200, answer.body
    scores = expected_scores(body["query"], body["documents"])
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: body["top_n"]]
    assert [(r["index"], r["relevance_score"]) for r in answer.body["results"]] == [(i, scores[i]) for i in order]


@dataclass
class LoadRun:
    """Many clients sharing one request counter, each checking its own answers."""

    requests: int
    deadline: float
    ask: Callable[[int], Awaitable[None]]
    after_each: Callable[[int], None] = lambda done: None
    done: int = 0
    failures: list[str] = field(default_factory=list)
    _next: int = 0

    async def client(self) -> None:
        while self._next < self.requests and time.monotonic() < self.deadline:
            i = self._next
            self._next += 1
            try:
                await self.ask(i)
            except (AssertionError, ClientError, asyncio.TimeoutError) as exc:
                self.failures.append(f"request {i}: {exc!r}"[:300])
            self.done += 1
            self.after_each(self.done)

    async def run(self, clients: int) -> None:
        await asyncio.gather(*(self.client() for _ in range(clients)))


@pytest.mark.slow
async def test_under_load_every_answer_is_its_own_and_memory_stays_flat(
        spawn_proxy: Callable[..., Awaitable[ProxyProcess]], fake_infinity: FakeInfinity) -> None:
    fake_infinity.delay = UPSTREAM_LATENCY
    running = await spawn_proxy(fake_infinity.url)  # the defaults a user runs, INFO log line per request included
    process = psutil.Process(running.process.pid)
    cpu_before = sum(process.cpu_times()[:2])
    rss = {0: running.rss}  # requests answered -> the proxy's RSS then
    client_connections = 0

    def sample(done: int) -> None:
        nonlocal client_connections
        if done % 500 == 0:
            rss[done] = running.rss
        if done == 1000:
            client_connections = sum(1 for c in tcp_connections(process)
                                     if c.laddr.port == running.port and c.status == psutil.CONN_ESTABLISHED)

    latencies: list[float] = []
    async with running.session(connections=LOAD_CLIENTS) as session:
        async def ask(i: int) -> None:
            body = load_body(i)
            answer = await post(session, body, RERANK_PATHS[i % 3])
            latencies.append(answer.seconds)
            assert_load_answer(answer, body)

        started = time.monotonic()
        load = LoadRun(LOAD_REQUESTS, started + LOAD_DEADLINE, ask, sample)
        await asyncio.wait_for(load.run(LOAD_CLIENTS), LOAD_DEADLINE + 35)  # + the clients' own 30 s timeout
        seconds = time.monotonic() - started
    latencies.sort()
    first_thousand, last = rss.get(1000, 0), rss.get(LOAD_REQUESTS, 0)
    growth = max(value for done, value in rss.items() if done >= 1000) - first_thousand if first_thousand else 0
    figures = {
        "requests": load.done, "concurrent_clients": LOAD_CLIENTS, "client_connections_open": client_connections,
        "errors": len(load.failures), "seconds": round(seconds, 2), "requests_per_second": round(load.done / seconds),
        "latency_ms_p50": round(1000 * latencies[len(latencies) // 2], 1),
        "latency_ms_p99": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
        "proxy_cpu_seconds": round(sum(process.cpu_times()[:2]) - cpu_before, 2),
        "upstream_latency_ms": 1000 * UPSTREAM_LATENCY, "upstream_calls": len(fake_infinity.classify_bodies),
        "most_upstream_calls_in_flight": fake_infinity.most_in_flight,
        "max_concurrency": proxy.Config().max_concurrency,
        "rss_mib_at_start": round(rss[0] / 2**20, 1), "rss_mib_after_first_1000": round(first_thousand / 2**20, 1),
        "rss_mib_after_last_1000": round(last / 2**20, 1), "rss_mib_most_growth_after_first_1000": round(growth / 2**20, 1),
        "rss_growth_bound_mib": RSS_GROWTH_BOUND / 2**20,
        "command": "python -m pytest test_reliability.py -m slow -k under_load -s",
    }
    LOAD_FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nload figures (also in {LOAD_FIGURES}): {json.dumps(figures)}")
    assert load.failures == []
    assert load.done == LOAD_REQUESTS, f"only {load.done} requests within {LOAD_DEADLINE} s"
    assert fake_infinity.most_in_flight <= proxy.Config().max_concurrency
    assert fake_infinity.empty_inputs == 0
    assert growth < RSS_GROWTH_BOUND, figures


# ---------------------------------------------------------------------------------------------
# Hostile bodies and answers against the proxy as a user starts it: statuses, the next request, peak memory (slow)
# ---------------------------------------------------------------------------------------------

HOSTILE_FIGURES = Path("/tmp/proxy-hostile-figures.json")
HOSTILE_RSS_BOUND = (768 if proxy.orjson is not None else 896) * 2**20  # docs/operations.md's, as test_overload's
MOST = proxy.Config().max_body_size - 1000  # bytes: the largest hostile bodies, just inside --max-body-size


HOSTILE_BODIES: list[tuple[str, Callable[[], bytes], int]] = [
    ("32 MiB of '[],' in an ignored field", lambda: padded_with(b"[],", MOST), 400),
    ("32 MiB of two-letter strings in an ignored field", lambda: padded_with(b'"ab",', MOST), 400),
    ("rank_fields naming one field 400 times, a 1 MB document", lambda: json.dumps(
        {"query": "q", "rank_fields": ["t"] * 400, "documents": [{"t": "x " * 500_000}]}).encode(), 400),
    ("an 8 MiB model, 10,000 documents", lambda: json.dumps(
        {"query": "q", "model": "m" * (8 << 20), "documents": [f"d{i}" for i in range(10_000)]}).encode(), 400),
    ("a 4,000-character query and instruction, 10,000 documents", lambda: json.dumps(
        {"query": "q" * 4000, "instruction": "i" * 4000, "documents": [f"d{i}" for i in range(10_000)]}).encode(), 200),
    ("the costliest body accepted", costliest_accepted_body, 200),
]
HOSTILE_ANSWERS: list[tuple[str, Callable[[], FaultHook], str, int]] = [
    ("a 512 MiB classify answer", partial(streams_endlessly, 512 << 20), "/v1/rerank", 502),
    ("an endless chunked classify answer", streams_endlessly, "/v1/rerank", 502),
    ("a gzip bomb from Infinity", answers_a_gzip_bomb, "/v1/rerank", 502),
    ("a 512 MiB /v1/models answer", partial(answers_forwarded, 512 << 20), "/v1/models", 502),
    ("a 256 MiB /v1/embeddings answer, streamed", partial(answers_forwarded, 256 << 20), "/v1/embeddings", 200),
]


async def ask(session: ClientSession, path: str, data: bytes, headers: dict[str, str] | None = None
              ) -> tuple[int, int, float]:
    """Status, bytes of the answer (read in pieces: a streamed answer is never held whole here) and seconds."""
    started = time.monotonic()
    method = "GET" if path == "/v1/models" else "POST"
    async with session.request(method, path, data=data or None, headers=headers) as response:
        size = sum([len(piece) async for piece in response.content.iter_chunked(1 << 20)])
        return response.status, size, time.monotonic() - started


async def next_request_seconds(session: ClientSession) -> float:
    answer = await post(session, NEXT)
    assert_ranked(answer, NEXT)
    return answer.seconds


@pytest.mark.slow
async def test_hostile_bodies_and_answers_are_refused_cheaply_and_keep_peak_memory_bounded(
        spawn_proxy: Callable[..., Awaitable[ProxyProcess]], upstream: Upstream) -> None:
    running = await spawn_proxy(upstream.fake.url)  # the defaults a user runs
    figures: dict[str, Any] = {"rss_mib_at_start": round(running.rss / 2**20, 1)}
    async with running.session(timeout=120) as session:
        figures["next_request_ms_before"] = round(1000 * await next_request_seconds(session), 1)
        bomb = gzip_bomb(8 << 20)  # 8 MB on the wire, 8 GiB decoded
        for _ in range(30):
            status, _, _ = await ask(session, "/v1/rerank", bomb, {"Content-Encoding": "gzip"})
            assert status == 415
        figures["next_request_ms_after_30_gzip_bombs"] = round(1000 * await next_request_seconds(session), 1)
        figures["rss_mib_after_30_gzip_bombs"] = round(running.rss / 2**20, 1)
        for name, body, expected in HOSTILE_BODIES:
            status, _, seconds = await ask(session, "/v1/rerank", body())
            assert status == expected, name
            figures[f"{name}: seconds"] = round(seconds, 2)
            await next_request_seconds(session)
        for name, hook, path, expected in HOSTILE_ANSWERS:
            upstream.fail_with(hook())
            status, _, seconds = await ask(session, path, json.dumps(GOOD).encode() if path != "/v1/models" else b"")
            upstream.heal()
            assert status == expected, name
            figures[f"{name}: seconds"] = round(seconds, 2)
            await next_request_seconds(session)
    figures["peak_rss_mib"] = round(peak_rss(running.process.pid) / 2**20, 1)
    figures["command"] = "python -m pytest test_reliability.py -m slow -k hostile -s"
    HOSTILE_FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nhostile figures (also in {HOSTILE_FIGURES}): {json.dumps(figures)}")
    assert figures["next_request_ms_after_30_gzip_bombs"] < figures["next_request_ms_before"] + 1000
    assert figures["rss_mib_after_30_gzip_bombs"] < figures["rss_mib_at_start"] + 32
    assert peak_rss(running.process.pid) < HOSTILE_RSS_BOUND
    assert "Traceback" not in running.log.read_text()


@dataclass
class RestartableInfinity:
    """The fake Infinity on a fixed port that the test can stop and start again."""

    fake: FakeInfinity
    port: int = 0  # until the first start: then the system picks a free port, and every restart takes it again
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self.runner = web.AppRunner(self.fake.app(), shutdown_timeout=2.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def restartable_infinity() -> AsyncIterator[RestartableInfinity]:
    infinity = RestartableInfinity(FakeInfinity())
    await infinity.start()
    yield infinity
    await infinity.stop()


@pytest.mark.slow
async def test_while_infinity_restarts_the_proxy_answers_502_then_200_without_restarting(
        spawn_proxy: Callable[..., Awaitable[ProxyProcess]], restartable_infinity: RestartableInfinity) -> None:
    restartable_infinity.fake.delay = UPSTREAM_LATENCY
    running = await spawn_proxy(restartable_infinity.url)
    outcomes: list[tuple[float, float, Answer, int]] = []  # started, finished, answer, request number
    async with running.session(connections=50) as session:
        async def ask(i: int) -> None:
            started = time.monotonic()
            answer = await post(session, load_body(i))
            outcomes.append((started, time.monotonic(), answer, i))

        phase = 1.0  # seconds up, then down, then up again
        load = LoadRun(100_000, time.monotonic() + 3 * phase, ask)
        clients = asyncio.create_task(load.run(50))
        await asyncio.sleep(phase)
        await restartable_infinity.stop()
        went_away = time.monotonic()
        await asyncio.sleep(phase)
        await restartable_infinity.start()
        came_back = time.monotonic()
        await asyncio.wait_for(clients, timeout=30)
    while_away = [answer for started, finished, answer, _ in outcomes if started > went_away and finished < came_back]
    after = [(answer, i) for started, _, answer, i in outcomes if started > came_back]
    print(f"\nrestart figures: {len(outcomes)} requests, {len(while_away)} while Infinity was away "
          f"(slowest {max((a.seconds for a in while_away), default=0) * 1000:.0f} ms), {len(after)} after it came back")
    assert load.failures == []
    assert while_away and after
    for answer in while_away:
        assert_error(answer, 502, "upstream_error", f"{restartable_infinity.url}/classify")
        assert answer.seconds < 1.0
    for answer, i in after:
        assert_load_answer(answer, load_body(i))
    assert {answer.status for _, _, answer, _ in outcomes} <= {200, 502}
    assert running.process.poll() is None  # the same process throughout
