#!/usr/bin/env python3
"""Flood the proxy with maximum-size requests against a slow fake Infinity, and report its peak memory.

    python bench/flood.py --kind wide --clients 64 --requests 128               # this proxy, its defaults
    python bench/flood.py --script /tmp/old-proxy.py --kind mixed --clients 48   # another version
    python bench/flood.py --kind tiny -- --max-pending-bytes 134217728           # flags after -- go to the proxy

Kinds: `big` (10,000 ASCII documents, a body just under 32 MiB), `wide` (the same with an emoji in each
document: Python holds such text at 4 bytes a character), `wide-echo` (`wide` with return_documents), `tiny`
(10,000 one-word documents: the most prompts per byte), `mixed` (`wide` and `tiny` in turn). `--clients` clients
send `--requests` requests in all, each its next as soon as the last is answered; every 200 is checked (10,000
results, the fake's scores), every other status counted. The peak is the proxy's VmHWM from /proc (Linux).
"""

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, TCPConnector

ROOT = Path(__file__).resolve().parent.parent

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc: Linux only")


async def wait_for_port(port: int, within: float = 20.0) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        await asyncio.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def body_for(kind: str, i: int) -> bytes:
    if kind == "mixed":
        return body_for("wide" if i % 2 else "tiny", i)
    if kind == "wide-echo":
        body = json.loads(body_for("wide", i))
        body["return_documents"] = True
        return json.dumps(body, ensure_ascii=False).encode()
    if kind == "big":
        documents = [f"{i:06d}-{j:05d} " + "lorem ipsum dolor sit amet " * 122 for j in range(10_000)]
    elif kind == "wide":
        documents = [f"{i:06d}-{j:05d} \U0001F600" + "lorem ipsum dolor sit amet " * 121 for j in range(10_000)]
    else:
        documents = [f"d{j}" for j in range(10_000)]
    return json.dumps({"query": f"flood query {i}", "documents": documents}, ensure_ascii=False).encode()


def check(status: int, answer: dict) -> None:
    """A 200 scores every document as the fake does: its items alternate relevant / not relevant."""
    if status == 200:
        results = answer["results"]
        assert len(results) == 10_000
        for result in results:
            assert (result["relevance_score"] > 0.5) == (result["index"] % 2 == 0), result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default=str(ROOT / "proxy-classifier.py"), help="the proxy to flood")
    parser.add_argument("--kind", default="wide", choices=["big", "wide", "wide-echo", "tiny", "mixed"])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--delay-ms", type=float, default=500, help="the fake Infinity's time per call")
    parser.add_argument("--deadline", type=float, default=120, help="seconds: no request starts after it")
    parser.add_argument("flags", nargs="*", help="passed to the proxy (after --)")
    args = parser.parse_args()
    fake_port, proxy_port = free_port(), free_port()
    fake = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_infinity.py"), "--port", str(fake_port),
                             "--delay-ms", str(args.delay_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([sys.executable, args.script, "--host", "127.0.0.1", "--port", str(proxy_port),
                              "--infinity-url", f"http://127.0.0.1:{fake_port}/v1", "--log-level", "WARNING",
                              *args.flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_for_port(fake_port)
        await wait_for_port(proxy_port)
        bodies = [body_for(args.kind, i) for i in range(4)]
        statuses: dict[str, int] = {}
        shed_ms: list[float] = []
        errors: list[str] = []
        sent = 0
        started = time.monotonic()

        async def client(session: ClientSession) -> None:
            nonlocal sent
            while sent < args.requests and time.monotonic() - started < args.deadline:
                i = sent
                sent += 1
                asked = time.monotonic()
                try:
                    async with session.post(f"http://127.0.0.1:{proxy_port}/v1/rerank", data=bodies[i % 4]) as r:
                        answer = await r.json()
                        if r.status == 429:
                            shed_ms.append(1000 * (time.monotonic() - asked))
                        check(r.status, answer)
                        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
                except Exception as exc:  # counted, not raised: the figures are the point
                    errors.append(repr(exc)[:200])

        async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=args.deadline)) as s:
            await asyncio.gather(*(client(s) for _ in range(args.clients)))
        shed_ms.sort()
        print(json.dumps({
            "script": Path(args.script).name, "kind": args.kind, "flags": args.flags, "clients": args.clients,
            "requests": sent, "statuses": statuses, "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(time.monotonic() - started, 1), "peak_rss_mib": round(peak_rss(proxy.pid) / 2**20, 1),
            "shed_ms_p50": round(shed_ms[len(shed_ms) // 2]) if shed_ms else None,
            "shed_ms_max": round(shed_ms[-1]) if shed_ms else None}))
    finally:
        for process in (proxy, fake):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    asyncio.run(main())
