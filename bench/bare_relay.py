#!/usr/bin/env python3
"""The floor under the proxy's figures: one aiohttp hop and nothing else.

Forwards `POST {prefix}/classify` bodies to Infinity verbatim and returns Infinity's answer verbatim,
through one shared ClientSession, as the proxy does, but with no JSON work, no prompts, no checks
and no log line. Whatever this costs on a machine, any aiohttp proxy costs at least that there:
bench/bench.py measures it beside the proxy so that "added latency" splits into the hop and the
proxy's own work.

    python bench/bare_relay.py --port 8004 --infinity-url http://127.0.0.1:7997/v1 [--loop uvloop]

`--loop uvloop` runs it on uvloop, the loop the proxy uses when its speedups are installed: the
floor under the proxy on that loop.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from aiohttp import ClientSession, TCPConnector, web

SESSION = web.AppKey("session", ClientSession)
JSON = {"Content-Type": "application/json"}


def make_app(infinity_url: str) -> web.Application:
    classify_url = infinity_url.rstrip("/") + "/classify"

    async def classify(request: web.Request) -> web.Response:
        body = await request.read()
        async with request.app[SESSION].post(classify_url, data=body, headers=JSON) as answer:
            return web.Response(status=answer.status, body=await answer.read(), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = ClientSession(connector=TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app = web.Application(client_max_size=1024**3)
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/classify", classify)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="one aiohttp hop: the floor under the proxy's figures")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--infinity-url", required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop to run on")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(make_app(args.infinity_url), host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
