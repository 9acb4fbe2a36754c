#!/usr/bin/env python3
"""A lean fake Infinity for the benchmark: `/health` and `{prefix}/classify`, nothing else.

Unlike the test suite's fake (conftest.py), which checks every request the way Infinity 0.0.78
does, this one is built not to be the bottleneck: it never parses the body and its answers are
precomputed, so nearly all of its time per call is the `--delay-ms` (plus `--per-input-ms` for each
input) that stands in for inference. Run it as its own process:

    python bench/fake_infinity.py --port 7997 --delay-ms 20

`GET /bench/stats` reports the calls and inputs seen so far and `POST /bench/reset` zeroes them, so
the harness can count the upstream calls one rerank request made.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

# Two items of the answer. Infinity sorts each item's labels by score, so the positive label is
# first in one and second in the other: the proxy's lookup by name is exercised both ways. The
# scores have all the digits a float32 probability has once written as a double, as Infinity's
# are: a short 0.75 would make the proxy's float parsing and formatting look cheaper than it is.
RELEVANT = b'[{"label":"1","score":0.7310585975646973},{"label":"0","score":0.2689414322376251}]'
NOT_RELEVANT = b'[{"label":"0","score":0.6224593520164490},{"label":"1","score":0.3775406181812286}]'


def inputs_in(body: bytes) -> int:
    """How many strings the body's "input" list holds, without parsing the JSON.

    Inside a JSON string every quote is escaped (`\\"`), so an unescaped `","` or `", "` (what
    json.dumps writes by default) only ever separates two items of a list of strings. This counts
    those after `"input":`, which every sender here (the proxy, the harness, the naive baseline)
    writes as the body's last field. A wrong count would make the proxy answer 502, which the
    harness checks before it measures anything.
    """
    start = body.find(b'"input":')
    if start < 0:
        raise ValueError("no 'input' field")
    items = body[body.index(b"[", start) + 1 : body.rindex(b"]")].strip()
    if not items:
        return 0
    return 1 + items.count(b'","') + items.count(b'", "')


class FakeInfinity:
    def __init__(self, delay_ms: float, per_input_ms: float, serial: bool) -> None:
        self.fixed_seconds = delay_ms / 1000
        self.per_input_seconds = per_input_ms / 1000
        # One device: calls take turns, as batches do on a single GPU.
        self.device = asyncio.Lock() if serial else None
        self.items_for: dict[int, bytes] = {}  # n -> the precomputed "data" list of n items
        self.calls = 0
        self.inputs = 0
        self.in_flight = 0
        self.most_in_flight = 0

    def data(self, n: int) -> bytes:
        items = self.items_for.get(n)
        if items is None:
            pair = RELEVANT + b"," + NOT_RELEVANT
            items = b",".join([pair] * (n // 2) + ([RELEVANT] if n % 2 else []))
            self.items_for[n] = items
        return items

    async def inference(self, n: int) -> None:
        seconds = self.fixed_seconds + n * self.per_input_seconds
        if not seconds:
            return
        if self.device is None:
            await asyncio.sleep(seconds)
        else:
            async with self.device:
                await asyncio.sleep(seconds)

    async def classify(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("User-Agent", "").startswith("rerank-proxy/"):
            # The proxy's self-check: a model that skips the pad anchor scores both inputs alike. Not counted.
            return web.Response(body=b'{"object":"classify","data":[' + b",".join([self.data(1)] * inputs_in(body))
                                + b'],"usage":{"prompt_tokens":0,"total_tokens":0}}', content_type="application/json")
        try:
            n = inputs_in(body)
        except ValueError as exc:
            return web.json_response({"detail": str(exc)}, status=422)
        self.calls += 1
        self.inputs += n
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.inference(n)
        finally:
            self.in_flight -= 1
        # Infinity counts characters unless told to tokenize; the body's length is near enough.
        answer = (b'{"object":"classify","data":[' + self.data(n) + b'],"model":"fake","usage":{"prompt_tokens":'
                  + str(len(body)).encode() + b',"total_tokens":' + str(len(body)).encode()
                  + b'},"id":"infinity-fake","created":' + str(int(time.time())).encode() + b"}")
        return web.Response(body=answer, content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"unix": time.time()})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls, "inputs": self.inputs, "most_in_flight": self.most_in_flight})

    async def reset(self, request: web.Request) -> web.Response:
        self.calls = self.inputs = self.most_in_flight = 0
        return web.json_response({"reset": True})

    def app(self, prefix: str) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/health", self.health)
        app.router.add_post(prefix + "/classify", self.classify)
        app.router.add_get("/bench/stats", self.stats)
        app.router.add_post("/bench/reset", self.reset)
        return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="/v1", help="Infinity's --url-prefix")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time per /classify call")
    parser.add_argument("--per-input-ms", type=float, default=0.0, help="time per input, added to --delay-ms")
    parser.add_argument("--serial", action="store_true", help="one device: calls wait for each other")
    args = parser.parse_args(argv)
    loop = fast_event_loop()
    asyncio.set_event_loop(loop)
    fake = FakeInfinity(args.delay_ms, args.per_input_ms, args.serial)
    web.run_app(fake.app(args.prefix.rstrip("/")), host=args.host, port=args.port, access_log=None, print=None,
                loop=loop)


def fast_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (uvicorn[standard] brings it): the fake stays lean. Else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    main()
