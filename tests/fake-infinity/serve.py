"""The test suite's fake Infinity (conftest.FakeInfinity) as a server, for the container tier.

It takes Infinity's own command line (`v2 --model-id ID --port 7997 --url-prefix /v1`), so the compose file's
`command:` for the real Infinity is run, not replaced: the fake serves the model it names on the port it names.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from conftest import FakeInfinity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["v2"])
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--port", type=int, default=7997)
    parser.add_argument("--url-prefix", choices=["/v1"], default="/v1", help="the fake's routes are under /v1")
    args = parser.parse_args()
    fake = FakeInfinity()
    fake.models = [args.model_id]
    web.run_app(fake.app(), host="0.0.0.0", port=args.port, print=None)


if __name__ == "__main__":
    main()
