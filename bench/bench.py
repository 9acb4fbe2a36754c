#!/usr/bin/env python3
"""Benchmark: what the rerank proxy costs, against talking to Infinity directly.

One command starts everything it needs on 127.0.0.1 (a lean fake Infinity, the proxy as a user
starts it, a bare aiohttp relay as the floor under any aiohttp proxy, the naive baseline, and a real
infinity_emb on the end-to-end tier's tiny model), measures, stops everything, prints a table and
writes it as JSON:

    .venv/bin/python bench/bench.py                # the full run, about 11 minutes on 2 cores
    .venv/bin/python bench/bench.py --no-infinity  # without the real Infinity (no torch needed)
    .venv/bin/python bench/bench.py --smoke        # seconds, tiny counts: what CI runs

What it measures, side by side in one run so that machine noise cancels (every figure is the median
over rounds, with min and max; proxy and direct runs alternate within each round):
  1. latency     added latency: one client, sequential requests, proxy vs straight to /classify
  2. throughput  requests per second, many clients, upstream of 20 and 100 ms: proxy / direct
  3. naive       the same load through bench/naive_baseline.py: ours / naive
  4. infinity    real infinity_emb, 32 clients: proxy / direct
  5. scale       10,000 documents in one request; sweeps of --batch-size and --max-concurrency
  6. footprint   start-up time, resident memory idle and under load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PROXY_SCRIPT = ROOT / "proxy-classifier.py"
DEFAULT_OUT = BENCH / "results" / "latest.json"
MB = 1024 * 1024


def load_proxy_module() -> Any:
    """proxy-classifier.py as a module (its name has a dash): the prompts come from its prompt_for."""
    if "proxy_classifier" in sys.modules:
        return sys.modules["proxy_classifier"]
    spec = importlib.util.spec_from_file_location("proxy_classifier", PROXY_SCRIPT)
    module = sys.modules["proxy_classifier"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


proxy = load_proxy_module()
PROXY_DEFAULTS = proxy.Config()


# --------------------------------------------------------------------------------------------
# What to run: the full plan, and the smoke plan CI runs so that the harness cannot rot.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    # 1. latency: documents per request -> measured requests per round (p99 needs about 100)
    latency_requests: dict[int, int] = field(default_factory=lambda: {1: 300, 10: 300, 100: 200, 1000: 100})
    latency_warmup_requests: int = 10
    # 2. and 3. throughput
    throughput_documents: int = 50
    throughput_clients: tuple[int, ...] = (1, 8, 32, 128)
    upstream_ms: tuple[float, ...] = (20.0, 100.0)  # per /classify call, standing in for GPU inference
    naive_clients: tuple[int, ...] = (1, 32)  # more clients only queue longer behind its blocking call
    relay_clients: tuple[int, ...] = (32, 128)  # the floor: where the targets are
    window_seconds: float = 3.0
    warmup_seconds: float = 0.5
    # 4. real Infinity
    infinity: bool = True
    infinity_clients: int = 32
    infinity_documents: int = 10  # a tiny model on CPU manages about 100 documents a second
    infinity_window_seconds: float = 10.0
    # 5. one big request, and the sweeps behind the defaults
    big_documents: int = 10_000
    big_requests: int = 3  # per round and configuration
    sweep_fixed_ms: float = 5.0  # upstream time per call: fixed part ...
    sweep_per_input_ms: float = 0.05  # ... plus this per input
    sweep_clients: int = 32
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    max_concurrencies: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    concurrency_clients: int = 128  # many clients, slow upstream: where --max-concurrency binds
    concurrency_upstream_ms: float = 100.0
    # 7. speedups: the proxy with and without orjson and uvloop, beside the bare relay on either loop
    speedups_latency_requests: dict[int, int] = field(default_factory=lambda: {50: 300, 100: 200, 1000: 60})
    speedups_clients: int = 32
    # 6. footprint
    startups: int = 5
    # documents
    document_chars: int = 500


FULL = Plan()
SMOKE = Plan(  # every section and code path once, in about 20 seconds; the figures mean nothing
    rounds=1, latency_requests={1: 5, 10: 5}, latency_warmup_requests=2, throughput_documents=5,
    throughput_clients=(1, 4), naive_clients=(4,), relay_clients=(4,), window_seconds=0.3, warmup_seconds=0.1,
    infinity=False, big_documents=300, big_requests=1, batch_sizes=(64, 256), max_concurrencies=(2, 64),
    concurrency_clients=4, sweep_clients=4, startups=1, document_chars=100,
    speedups_latency_requests={5: 5}, speedups_clients=4,
)

SECTIONS = ("footprint", "latency", "throughput", "scale", "infinity", "speedups")  # "naive" rides on "throughput"


# --------------------------------------------------------------------------------------------
# The workload: deterministic documents, the rerank body the proxy gets, and the /classify body
# with the same prompts that the direct comparison sends.
# --------------------------------------------------------------------------------------------

QUERY = "how does the proxy turn one rerank request into batched classify calls?"
MODEL = PROXY_DEFAULTS.model
WORDS = (
    "the a of and to in is for on that with as by this from at be are was it an or which rerank "
    "query document relevance score model infinity proxy batch call upstream latency throughput "
    "request answer client server python asyncio memory prompt token label classifier search "
    "expert judgment semantic relationship between them careful analysis binary relevant not "
    "river mountain city weather garden library history music science market energy network"
).split()
NON_ASCII_WORDS = ("café", "naïve", "Köln", "Grüße", "“quoted”", "東京")
NON_ASCII_SHARE = 0.2  # of documents: English text is mostly ASCII, with some names and typography


def documents(count: int, chars: int, seed: int = 0) -> list[str]:
    """`count` different documents of about `chars` characters: the proxy sends identical prompts
    once, so repeated documents would flatter it. Some hold a newline or a quote (JSON escapes
    them) and some a word outside ASCII."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = [f"doc{i}:"]
        if rng.random() < NON_ASCII_SHARE:
            words.append(rng.choice(NON_ASCII_WORDS))
        length = sum(len(word) + 1 for word in words)
        while length < chars:
            words.append(rng.choice(WORDS))
            length += len(words[-1]) + 1
        text = " ".join(words)
        if i % 3 == 0:
            text = text.replace(" the ", '\n"the" ', 1)
        out.append(text)
    return out


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Workload:
    documents: int
    rerank_body: bytes  # what a client sends the proxy (or the naive baseline)
    classify_body: bytes  # the same prompts as one /classify call: "input" last (bench/fake_infinity.py)


def workload(count: int, chars: int) -> Workload:
    texts = documents(count, chars)
    prompts = [proxy.prompt_for(QUERY, text) for text in texts]
    return Workload(count, json_bytes({"query": QUERY, "documents": texts}),
                    json_bytes({"model": MODEL, "input": prompts}))


# --------------------------------------------------------------------------------------------
# Servers: each a subprocess on 127.0.0.1 with its output in a log file, always stopped.
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    """This environment without the proxy's own settings (a BATCH_SIZE in the shell would change
    what is measured), and without any HTTP proxy for local addresses."""
    settings = {proxy.env_name(flag) for flag, _, _ in proxy.OPTIONS}
    env = {name: value for name, value in os.environ.items() if name not in settings}
    # Every call is local: an HTTP proxy set for the machine must not see the baseline's requests.post.
    return {**env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


class Server:
    """A server subprocess and what the harness reads of it: readiness, CPU time, memory."""

    def __init__(self, name: str, command: list[str], port: int, logs: Path,
                 process: subprocess.Popen | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = logs / f"{name}.log"
        self.spawned = time.perf_counter()
        if process is None:
            with open(self.log_path, "wb") as log:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env={**server_env(), **(env or {})}, start_new_session=True)
        self.process = process
        self.ps = psutil.Process(process.pid)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 60.0, path: str = "/health") -> float:
        """Seconds from spawn until `path` answers 200. Polls every 5 ms, so the figure is that fine."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                async with session.get(self.url + path) as response:
                    await response.read()
                    if response.status == 200:
                        return time.perf_counter() - self.spawned
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.005)
        raise RuntimeError(f"{self.name} not ready within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def cpu_seconds(self) -> float:
        """CPU time of the server and its children (Infinity has workers): on Linux, the scheduler's
        nanosecond count over all threads (/proc/PID/task/*/schedstat), since the user and system
        times come in 10 ms ticks, too coarse for the CPU of one request; elsewhere those times."""
        total = 0.0
        for process in [self.ps, *self.ps.children(recursive=True)]:
            try:
                total += sum(int(stat.read_text().split()[0]) for stat in
                             Path(f"/proc/{process.pid}/task").glob("*/schedstat")) / 1e9
                continue
            except (OSError, ValueError, IndexError):
                pass
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue


class PeakRss:
    """A server's peak resident memory over a stretch of time. On Linux, the kernel's own
    high-water mark (VmHWM, reset by writing 5 to clear_refs): exact, and no sampling that would
    take CPU from what is measured. Elsewhere, RSS sampled every 10 ms."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.status = Path(f"/proc/{server.ps.pid}/status")
        self.sampled = 0
        self.sampler: asyncio.Task | None = None

    async def __aenter__(self) -> PeakRss:
        try:
            Path(f"/proc/{self.server.ps.pid}/clear_refs").write_text("5")
        except OSError:
            self.sampler = asyncio.ensure_future(self.sample())
        return self

    async def sample(self) -> None:
        while True:
            self.sampled = max(self.sampled, self.server.rss())
            await asyncio.sleep(0.01)

    async def __aexit__(self, *exc: object) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
            self.sampled = max(self.sampled, self.server.rss())

    @property
    def bytes(self) -> int:
        if self.sampler is None:
            for line in self.status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return self.sampled


class Servers:
    """Starts servers, in parallel where they can be, and stops every one of them on the way out."""

    def __init__(self, session: aiohttp.ClientSession, logs: Path, stack: contextlib.ExitStack,
                 proxy_script: Path = PROXY_SCRIPT) -> None:
        self.session = session
        self.proxy_script = proxy_script
        self.logs = logs
        self.stack = stack
        self.started: list[Server] = []

    def spawn(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        server = Server(f"{len(self.started) + 1:02d}-{name}", command, port, self.logs, env=env)
        self.stack.callback(server.stop)
        self.started.append(server)
        return server

    def fake(self, delay_ms: float = 0.0, per_input_ms: float = 0.0) -> Server:
        port = free_port()
        return self.spawn(f"fake-{delay_ms:g}ms", [sys.executable, str(BENCH / "fake_infinity.py"), "--port", str(port),
                                                  "--delay-ms", str(delay_ms), "--per-input-ms", str(per_input_ms)], port)

    def proxy(self, upstream: Server | str, *flags: str, speedups: bool = True) -> Server:
        """As a user starts it: python proxy-classifier.py --host --port --infinity-url [flags]; with its
        optional speedups when installed, or without them (PROXY_NO_SPEEDUPS=1)."""
        port = free_port()
        infinity_url = upstream if isinstance(upstream, str) else upstream.url + "/v1"
        name = "proxy" + "".join(flags).replace("--", "-") + ("" if speedups else "-stdlib")
        return self.spawn(name, [sys.executable, str(self.proxy_script), "--host", "127.0.0.1", "--port", str(port),
                                 "--infinity-url", infinity_url, *flags], port,
                          env={"PROXY_NO_SPEEDUPS": "" if speedups else "1"})  # whatever the shell says

    def relay(self, upstream: Server, loop: str = "asyncio") -> Server:
        port = free_port()
        return self.spawn(f"bare-relay-{loop}", [sys.executable, str(BENCH / "bare_relay.py"), "--port", str(port),
                                                 "--infinity-url", upstream.url + "/v1", "--loop", loop], port)

    def naive(self, upstream: Server) -> Server:
        port = free_port()
        return self.spawn("naive", [sys.executable, str(BENCH / "naive_baseline.py"), "--port", str(port),
                                    "--infinity-url", upstream.url + "/v1"], port)

    async def ready(self, *servers: Server, timeout: float = 60.0) -> list[float]:
        return list(await asyncio.gather(*(server.wait_ready(self.session, timeout) for server in servers)))


# --------------------------------------------------------------------------------------------
# Load generation: an asyncio client of our own. Bodies are built once; answers are read whole
# but not parsed (after one checked answer per target), so the client stays cheap.
# --------------------------------------------------------------------------------------------

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120)
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Target:
    """Where a workload is sent: the proxy's /rerank, the naive baseline's, or /classify directly."""

    name: str  # "proxy", "direct", "relay", "naive"
    server: Server
    path: str
    direct: bool  # sends the classify body rather than the rerank body

    def url(self) -> str:
        return self.server.url + self.path

    def body(self, load: Workload) -> bytes:
        return load.classify_body if self.direct else load.rerank_body


def proxy_target(server: Server) -> Target:
    return Target("proxy", server, "/rerank", direct=False)


def direct_target(upstream: Server) -> Target:
    return Target("direct", upstream, "/v1/classify", direct=True)


def relay_target(server: Server) -> Target:
    """The classify body through bench/bare_relay.py: one aiohttp hop, no work."""
    return Target("relay", server, "/v1/classify", direct=True)


def naive_target(server: Server) -> Target:
    return Target("naive", server, "/rerank", direct=False)


# Section 7's paths: each proxy beside the relay on the same event loop, so that the difference between
# the two is the proxy's own work.
SPEEDUP_PAIRS = {"speedups": ("proxy", "relay-uvloop"), "stdlib": ("proxy-stdlib", "relay-asyncio")}


async def checked_call(session: aiohttp.ClientSession, target: Target, load: Workload) -> None:
    """One call whose answer is parsed and checked: a broken path is an error, not a fast figure."""
    async with session.post(target.url(), data=target.body(load), headers=JSON, timeout=REQUEST_TIMEOUT) as response:
        raw = await response.read()
    if response.status != 200:
        raise RuntimeError(f"{target.name} {target.url()} answered {response.status}: {raw[:500]!r}\n"
                           f"{target.server.log_tail()}")
    answer = json.loads(raw)
    got = len(answer["data"] if target.direct else answer["results"])
    if got != load.documents:
        raise RuntimeError(f"{target.name} answered {got} items for {load.documents} documents")


@dataclass
class LoadResult:
    completed: int  # answered 200 within the window
    failed: int
    seconds: float  # the window
    latencies: list[float]
    client_cpu: float  # CPU seconds of this process (the load generator) per second of wall time
    machine_cpu: float  # all cores' busy time per second: the benchmark's processes and everyone else's
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.completed / self.seconds


async def one_call(session: aiohttp.ClientSession, url: str, body: bytes) -> str:
    """'' on a 200, else what went wrong."""
    try:
        async with session.post(url, data=body, headers=JSON, timeout=REQUEST_TIMEOUT) as response:
            await response.read()
            return "" if response.status == 200 else f"HTTP {response.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def clients_until(session: aiohttp.ClientSession, url: str, body: bytes, clients: int,
                        deadline: float) -> tuple[list[float], list[str]]:
    """`clients` clients, each sending its next request as soon as its last is answered, until the
    deadline. Only requests answered by the deadline count; each client has at most one in flight,
    so the wait after the deadline is bounded by one request."""
    latencies: list[float] = []
    errors: list[str] = []

    async def client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            error = await one_call(session, url, body)
            ended = time.perf_counter()
            if error:
                errors.append(error)
                await asyncio.sleep(0.01)  # a failing target must not turn into a busy loop
            elif ended <= deadline:
                latencies.append(ended - started)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (steal included: on a VM, time the
    hypervisor gave to other guests is time this one could not run)."""
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


async def closed_loop(target: Target, load: Workload, clients: int, seconds: float, warmup: float,
                      watched: Iterable[Server] = ()) -> tuple[LoadResult, dict[str, float]]:
    """Warm up, then measure requests per second; also the CPU share (cores) of each watched server."""
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await checked_call(session, target, load)
        url, body = target.url(), target.body(load)
        await clients_until(session, url, body, clients, time.perf_counter() + warmup)
        watched = list(watched)
        cpu_before = [server.cpu_seconds() for server in watched]
        client_before = time.process_time()
        machine_before = machine_busy_seconds()
        started = time.perf_counter()
        latencies, errors = await clients_until(session, url, body, clients, started + seconds)
        elapsed = time.perf_counter() - started
        client_cpu = (time.process_time() - client_before) / elapsed
        machine_cpu = (machine_busy_seconds() - machine_before) / elapsed
        shares = {server.name: (server.cpu_seconds() - before) / elapsed
                  for server, before in zip(watched, cpu_before, strict=True)}
    result = LoadResult(len(latencies), len(errors), seconds, latencies, client_cpu, machine_cpu,
                        errors[0] if errors else "")
    return result, shares


async def sequential(session: aiohttp.ClientSession, target: Target, load: Workload, count: int) -> list[float]:
    """One client, one request at a time: the latency of each."""
    url, body = target.url(), target.body(load)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        error = await one_call(session, url, body)
        if error:
            raise RuntimeError(f"{target.name} failed: {error}\n{target.server.log_tail()}")
        latencies.append(time.perf_counter() - started)
    return latencies


async def sequential_rounds(session: aiohttp.ClientSession, plan: Plan, targets: list[Target], load: Workload,
                            requests: int) -> dict[str, list[tuple[list[float], float]]]:
    """Each target's latencies and its server's CPU seconds per request, for each round. Within a
    round the targets take turns, in an order that rotates, each after a warm-up."""
    runs: dict[str, list[tuple[list[float], float]]] = {target.name: [] for target in targets}
    for round_ in range(plan.rounds):
        for target in rotated(targets, round_):
            await checked_call(session, target, load)
            await sequential(session, target, load, plan.latency_warmup_requests)
            cpu_before = target.server.cpu_seconds()
            latencies = await sequential(session, target, load, requests)
            runs[target.name].append((latencies, (target.server.cpu_seconds() - cpu_before) / requests))
    return runs


# --------------------------------------------------------------------------------------------
# Figures: medians with min and max over rounds.
# --------------------------------------------------------------------------------------------


def spread(values: Iterable[float]) -> dict[str, float]:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the value below which `fraction` of the samples lie."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return seconds * 1000


def percentile_ms_by_round(runs: dict[str, list[tuple[list[float], float]]], fraction: float) -> dict[str, list[float]]:
    """For each target of sequential_rounds, one percentile of its latencies (ms) a round."""
    return {name: [ms(percentile(latencies, fraction)) for latencies, _ in got] for name, got in runs.items()}


def rotated(items: list[Any], by: int) -> list[Any]:
    """Round r starts with a different item, so that no target always runs first."""
    by %= len(items)
    return items[by:] + items[:by]


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    started = time.perf_counter()
    print(f"--- {what}", file=sys.stderr, flush=True)
    yield
    print(f"    {what}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The sections.
# --------------------------------------------------------------------------------------------


async def measure_footprint(plan: Plan, servers: Servers) -> dict[str, Any]:
    """6. Start-up (spawn until /health answers) and idle memory, each start a fresh proxy against a
    fake that is already up; and what importing aiohttp alone costs, the floor under the start-up."""
    fake = servers.fake()
    await servers.ready(fake)
    startup, idle = [], []
    for _ in range(plan.startups):
        server = servers.proxy(fake)
        startup.append(await server.wait_ready(servers.session))
        await asyncio.sleep(0.2)  # let it settle: what it holds when nobody calls
        idle.append(server.rss())
        server.stop()
    floor = []
    for _ in range(plan.startups):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import aiohttp.web"], check=True)
        floor.append(time.perf_counter() - started)
    return {"startup_ms": spread(map(ms, startup)), "idle_rss_mb": spread(rss / MB for rss in idle),
            "python_import_aiohttp_ms": spread(map(ms, floor))}


async def measure_latency(plan: Plan, servers: Servers) -> dict[str, Any]:
    """1. Added latency against a fake that answers at once: one client, sequential requests.
    The bare relay splits what is added into the hop any aiohttp proxy costs and the proxy's work."""
    fake = servers.fake()
    proxy_server = servers.proxy(fake)
    relay = servers.relay(fake)
    await servers.ready(fake, proxy_server, relay)
    targets = [direct_target(fake), proxy_target(proxy_server), relay_target(relay)]
    rows = []
    async with aiohttp.ClientSession() as session:
        for count, requests in plan.latency_requests.items():
            load = workload(count, plan.document_chars)
            runs = await sequential_rounds(session, plan, targets, load, requests)
            p50, p99 = percentile_ms_by_round(runs, 0.5), percentile_ms_by_round(runs, 0.99)
            cpu_per_request = {name: [cpu for _, cpu in runs[name]] for name in ("proxy", "relay")}

            def added(figures: dict[str, list[float]], path: str, base: str = "direct") -> dict[str, float]:
                return spread(b - a for a, b in zip(figures[base], figures[path], strict=True))

            rows.append({
                "documents": count, "requests_per_round": requests,
                "direct_p50_ms": spread(p50["direct"]), "proxy_p50_ms": spread(p50["proxy"]),
                "relay_p50_ms": spread(p50["relay"]),
                "added_p50_ms": added(p50, "proxy"), "added_p99_ms": added(p99, "proxy"),
                "direct_p99_ms": spread(p99["direct"]), "proxy_p99_ms": spread(p99["proxy"]),
                "relay_added_p50_ms": added(p50, "relay"),
                "proxy_work_p50_ms": added(p50, "proxy", base="relay"),
                "proxy_cpu_ms_per_request": spread(map(ms, cpu_per_request["proxy"])),
                "relay_cpu_ms_per_request": spread(map(ms, cpu_per_request["relay"])),
            })
            print(f"    {count} documents: added p50 {rows[-1]['added_p50_ms']['median']:.2f} ms "
                  f"(bare relay {rows[-1]['relay_added_p50_ms']['median']:.2f} ms)", file=sys.stderr)
    return {"rows": rows}


async def measure_throughput(plan: Plan, servers: Servers) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """2. and 3. Requests per second, proxy vs direct vs naive, at each upstream time; and the
    proxy's memory under that load (for 6)."""
    load = workload(plan.throughput_documents, plan.document_chars)
    paths = []  # per upstream time: the fake, the proxy in front of it, the naive baseline, the bare relay
    for delay in plan.upstream_ms:
        fake = servers.fake(delay)
        paths.append((delay, fake, servers.proxy(fake), servers.naive(fake), servers.relay(fake)))
    await servers.ready(*(server for _, *four in paths for server in four))
    runs: dict[tuple[float, int, str], list[tuple[LoadResult, dict[str, float]]]] = {}
    peak_rss: dict[int, int] = {}  # clients -> the proxy's peak under that load
    for round_ in range(plan.rounds):
        for clients in plan.throughput_clients:
            for delay, fake, proxy_server, naive, relay in paths:
                targets = [direct_target(fake), proxy_target(proxy_server)]
                if clients in plan.naive_clients:
                    targets.append(naive_target(naive))
                if clients in plan.relay_clients:
                    targets.append(relay_target(relay))
                for target in rotated(targets, round_):
                    async with PeakRss(proxy_server) as peak:
                        result, shares = await closed_loop(target, load, clients, plan.window_seconds,
                                                           plan.warmup_seconds, [proxy_server, fake, naive, relay])
                    if target.name == "proxy":
                        peak_rss[clients] = max(peak_rss.get(clients, 0), peak.bytes)
                    runs.setdefault((delay, clients, target.name), []).append((result, shares))
        print(f"    round {round_ + 1} of {plan.rounds} done", file=sys.stderr)

    def figures(delay: float, clients: int, name: str) -> list[tuple[LoadResult, dict[str, float]]]:
        return runs[(delay, clients, name)]

    throughput_rows, naive_rows = [], []
    for delay, fake, proxy_server, naive, _ in paths:
        for clients in plan.throughput_clients:
            direct, ours = figures(delay, clients, "direct"), figures(delay, clients, "proxy")
            relay = runs.get((delay, clients, "relay"))
            throughput_rows.append({
                "upstream_ms": delay, "clients": clients,
                "direct_rps": spread(r.rps for r, _ in direct), "proxy_rps": spread(r.rps for r, _ in ours),
                "proxy_over_direct": spread(p.rps / d.rps for (d, _), (p, _) in zip(direct, ours, strict=True)),
                "proxy_p50_ms": spread(ms(percentile(r.latencies, 0.5)) for r, _ in ours),
                "direct_p50_ms": spread(ms(percentile(r.latencies, 0.5)) for r, _ in direct),
                # CPU in cores (1.0 = one core busy): shows who is the bottleneck on 2 cores
                "client_cpu_direct": spread(r.client_cpu for r, _ in direct),
                "client_cpu_proxy": spread(r.client_cpu for r, _ in ours),
                "proxy_cpu": spread(s[proxy_server.name] for _, s in ours),
                "fake_cpu_direct": spread(s[fake.name] for _, s in direct),
                "fake_cpu_proxy": spread(s[fake.name] for _, s in ours),
                # cores busy with processes outside the benchmark during the proxy's windows: the
                # machine is shared, and this is the noise the figures carry
                "others_cpu_proxy": spread(max(0.0, r.machine_cpu - r.client_cpu - sum(s.values())) for r, s in ours),
                "machine_cpu_proxy": spread(r.machine_cpu for r, _ in ours),
                "failed": sum(r.failed for r, _ in direct + ours),
                # the floor: one bare aiohttp hop, no work (bench/bare_relay.py)
                "relay_rps": spread(r.rps for r, _ in relay) if relay else None,
                "relay_over_direct": spread(r.rps / d.rps for (d, _), (r, _) in zip(direct, relay, strict=True))
                if relay else None,
            })
            if clients in plan.naive_clients:
                baseline = figures(delay, clients, "naive")
                naive_rows.append({
                    "upstream_ms": delay, "clients": clients,
                    "naive_rps": spread(r.rps for r, _ in baseline), "proxy_rps": spread(r.rps for r, _ in ours),
                    "proxy_over_naive": spread(p.rps / max(n.rps, 1e-9)
                                               for (n, _), (p, _) in zip(baseline, ours, strict=True)),
                    "naive_cpu": spread(s[naive.name] for _, s in baseline),
                    "failed": sum(r.failed for r, _ in baseline),
                })
    load_rss = {"peak_rss_mb_by_clients": {str(c): b / MB for c, b in sorted(peak_rss.items())},
                "after_load_rss_mb": max(path[2].rss() for path in paths) / MB}
    throughput = {"documents_per_request": plan.throughput_documents, "window_seconds": plan.window_seconds,
                  "rows": throughput_rows}
    naive = {"documents_per_request": plan.throughput_documents, "rows": naive_rows}
    return throughput, naive, load_rss


async def big_request(session: aiohttp.ClientSession, server: Server, fake: Server, load: Workload,
                      requests: int) -> tuple[list[float], int, int]:
    """Wall times of `requests` sequential big requests, upstream calls per request, peak RSS."""
    async with session.post(fake.url + "/bench/reset") as response:
        await response.read()
    target = proxy_target(server)
    async with PeakRss(server) as peak:
        await checked_call(session, target, load)
        async with session.get(fake.url + "/bench/stats") as response:
            calls = (await response.json())["calls"]
        walls = await sequential(session, target, load, requests)
    return walls, calls, peak.bytes


async def measure_scale(plan: Plan, servers: Servers) -> dict[str, Any]:
    """5. 10,000 documents in one request, and the sweeps behind the --batch-size and
    --max-concurrency defaults, against a fake whose time per call grows with its inputs."""
    big = workload(plan.big_documents, plan.document_chars)
    small = workload(plan.throughput_documents, plan.document_chars)
    sweep_fake = servers.fake(plan.sweep_fixed_ms, plan.sweep_per_input_ms)
    slow_fake = servers.fake(plan.concurrency_upstream_ms)
    # Every configuration runs at once (idle, a proxy costs only memory), so rounds interleave them.
    by_batch = {size: servers.proxy(sweep_fake, "--batch-size", str(size)) for size in plan.batch_sizes}
    by_limit = {limit: (servers.proxy(sweep_fake, "--max-concurrency", str(limit)),
                        servers.proxy(slow_fake, "--max-concurrency", str(limit))) for limit in plan.max_concurrencies}
    await servers.ready(sweep_fake, slow_fake, *by_batch.values(), *(s for pair in by_limit.values() for s in pair))

    batch: dict[int, dict[str, list[float]]] = {size: {"wall": [], "rps": [], "calls": [], "rss": []}
                                                 for size in plan.batch_sizes}
    limit: dict[int, dict[str, list[float]]] = {n: {"wall": [], "rps": [], "rss": []} for n in plan.max_concurrencies}
    async with aiohttp.ClientSession() as session:
        for round_ in range(plan.rounds):
            for size in rotated(list(plan.batch_sizes), round_):
                walls, calls, rss = await big_request(session, by_batch[size], sweep_fake, big, plan.big_requests)
                batch[size]["wall"].append(ms(statistics.median(walls)))
                batch[size]["calls"].append(calls)
                batch[size]["rss"].append(rss / MB)
                result, _ = await closed_loop(proxy_target(by_batch[size]), small, plan.sweep_clients,
                                              plan.window_seconds, plan.warmup_seconds)
                batch[size]["rps"].append(result.rps)
            for n in rotated(list(plan.max_concurrencies), round_):
                big_proxy, slow_proxy = by_limit[n]
                walls, _, rss = await big_request(session, big_proxy, sweep_fake, big, plan.big_requests)
                limit[n]["wall"].append(ms(statistics.median(walls)))
                limit[n]["rss"].append(rss / MB)
                result, _ = await closed_loop(proxy_target(slow_proxy), small, plan.concurrency_clients,
                                              plan.window_seconds, plan.warmup_seconds)
                limit[n]["rps"].append(result.rps)
            print(f"    round {round_ + 1} of {plan.rounds} done", file=sys.stderr)
    batch_rows = [{"batch_size": size, "big_wall_ms": spread(f["wall"]), "big_upstream_calls": int(max(f["calls"])),
                   "big_peak_rss_mb": spread(f["rss"]), f"rps_{plan.throughput_documents}_docs": spread(f["rps"])}
                  for size, f in batch.items()]
    limit_rows = [{"max_concurrency": n, "big_wall_ms": spread(f["wall"]), "big_peak_rss_mb": spread(f["rss"]),
                   f"rps_{plan.throughput_documents}_docs": spread(f["rps"])} for n, f in limit.items()]
    default = next((row for row in batch_rows if row["batch_size"] == PROXY_DEFAULTS.batch_size), batch_rows[0])
    return {
        "documents": plan.big_documents,
        "upstream": f"{plan.sweep_fixed_ms:g} ms + {plan.sweep_per_input_ms:g} ms per input, calls in parallel",
        "proxy_defaults": {"batch_size": PROXY_DEFAULTS.batch_size, "max_concurrency": PROXY_DEFAULTS.max_concurrency},
        "big_request_at_default_batch_size": default,
        "batch_size_sweep": {"throughput_clients": plan.sweep_clients, "rows": batch_rows},
        "max_concurrency_sweep": {
            "big_request_batch_size": PROXY_DEFAULTS.batch_size,
            "throughput_clients": plan.concurrency_clients,
            "throughput_upstream": f"{plan.concurrency_upstream_ms:g} ms per call",
            "rows": limit_rows,
        },
    }


async def measure_speedups(plan: Plan, servers: Servers) -> dict[str, Any]:
    """7. The proxy with its optional speedups (orjson, uvloop) and without (PROXY_NO_SPEEDUPS=1), each
    beside the bare relay on the same event loop, all in one run: latency and CPU per request with
    one client against a fake that answers at once, then throughput with many clients at each
    upstream time. Every path is measured in every round, in an order that rotates."""
    fake = servers.fake()
    proxies = {"proxy": servers.proxy(fake), "proxy-stdlib": servers.proxy(fake, speedups=False)}
    relays = {"relay-uvloop": servers.relay(fake, "uvloop"), "relay-asyncio": servers.relay(fake, "asyncio")}
    await servers.ready(fake, *proxies.values(), *relays.values())
    targets = [direct_target(fake), *(Target(name, server, "/rerank", direct=False) for name, server in proxies.items()),
               *(Target(name, server, "/v1/classify", direct=True) for name, server in relays.items())]
    names = [target.name for target in targets]

    def paired(figures: dict[str, list[float]], pair: tuple[str, str], ratio: bool = False) -> dict[str, float]:
        ours, floor = pair
        return spread(a / b if ratio else a - b for a, b in zip(figures[ours], figures[floor], strict=True))

    latency_rows = []
    async with aiohttp.ClientSession() as session:
        for count, requests in plan.speedups_latency_requests.items():
            load = workload(count, plan.document_chars)
            runs = await sequential_rounds(session, plan, targets, load, requests)
            p50 = percentile_ms_by_round(runs, 0.5)
            cpu = {name: [ms(cpu) for _, cpu in got] for name, got in runs.items()}
            latency_rows.append({
                "documents": count, "requests_per_round": requests,
                "p50_ms": {name: spread(p50[name]) for name in names},
                "cpu_ms_per_request": {name: spread(cpu[name]) for name in names if name != "direct"},
                "own_p50_ms": {mode: paired(p50, pair) for mode, pair in SPEEDUP_PAIRS.items()},
                "cpu_over_relay": {mode: paired(cpu, pair, ratio=True) for mode, pair in SPEEDUP_PAIRS.items()},
                # the stdlib proxy against the relay on uvloop, and the speedups' gain on their own
                "stdlib_own_p50_ms_over_uvloop_relay": paired(p50, ("proxy-stdlib", "relay-uvloop")),
                "speedups_saved_p50_ms": paired(p50, ("proxy-stdlib", "proxy")),
            })
            own = latency_rows[-1]["own_p50_ms"]
            print(f"    {count} documents: own p50 {own['speedups']['median']:.2f} ms with speedups, "
                  f"{own['stdlib']['median']:.2f} ms without", file=sys.stderr)
    for server in (fake, *proxies.values(), *relays.values()):
        server.stop()

    load = workload(plan.throughput_documents, plan.document_chars)
    throughput_rows = []
    for delay in plan.upstream_ms:
        slow = servers.fake(delay)
        proxies = {"proxy": servers.proxy(slow), "proxy-stdlib": servers.proxy(slow, speedups=False)}
        relays = {"relay-uvloop": servers.relay(slow, "uvloop"), "relay-asyncio": servers.relay(slow, "asyncio")}
        await servers.ready(slow, *proxies.values(), *relays.values())
        watched = [*proxies.values(), *relays.values()]
        targets = [direct_target(slow), *(Target(n, s, "/rerank", direct=False) for n, s in proxies.items()),
                   *(Target(n, s, "/v1/classify", direct=True) for n, s in relays.items())]
        rps: dict[str, list[float]] = {name: [] for name in names}
        cores: dict[str, list[float]] = {name: [] for name in names if name != "direct"}
        for round_ in range(plan.rounds):
            for target in rotated(targets, round_):
                result, shares = await closed_loop(target, load, plan.speedups_clients, plan.window_seconds,
                                                   plan.warmup_seconds, watched)
                rps[target.name].append(result.rps)
                if target.name != "direct":
                    cores[target.name].append(shares[target.server.name])
        over_direct = {name: [r / d for r, d in zip(rps[name], rps["direct"], strict=True)] for name in names}
        throughput_rows.append({
            "upstream_ms": delay, "clients": plan.speedups_clients,
            "rps": {name: spread(rps[name]) for name in names},
            "over_direct": {name: spread(over_direct[name]) for name in names if name != "direct"},
            "cpu_cores": {name: spread(cores[name]) for name in cores},
            # how far the proxy stays behind the relay on the same loop, as a share of direct
            "gap_to_relay": {mode: spread(b - a for a, b in zip(over_direct[ours], over_direct[floor], strict=True))
                             for mode, (ours, floor) in SPEEDUP_PAIRS.items()},
        })
        for server in (slow, *watched):
            server.stop()
    return {"documents_per_request": plan.throughput_documents, "pairs": SPEEDUP_PAIRS,
            "latency_rows": latency_rows, "throughput_rows": throughput_rows}


def import_e2e() -> Any:
    """The tests' helpers (tests/helpers.py), which build the tiny model and start a real Infinity."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("tests.helpers")


async def measure_infinity(plan: Plan, servers: Servers, work: Path) -> dict[str, Any]:
    """4. A real infinity_emb on the end-to-end tier's tiny model (CPU), proxy vs direct."""
    e2e = import_e2e()
    model_dir = e2e.build_tiny_mxbai_model(work / "tiny-mxbai")
    port = free_port()
    log_path = servers.logs / "infinity.log"
    process = e2e.start_infinity(model_dir, port, log_path=log_path)
    infinity = Server("infinity", [], port, servers.logs, process=process)
    servers.started.append(infinity)
    servers.stack.callback(e2e.stop, process)
    started = time.perf_counter()
    await asyncio.to_thread(e2e.wait_ready, infinity.url + "/health", process, 180.0)
    infinity_startup = time.perf_counter() - started
    proxy_server = servers.proxy(infinity.url + "/v1")
    await servers.ready(proxy_server)
    load = workload(plan.infinity_documents, plan.document_chars)
    targets = [direct_target(infinity), proxy_target(proxy_server)]
    runs: dict[str, list[tuple[LoadResult, dict[str, float]]]] = {"direct": [], "proxy": []}
    for round_ in range(plan.rounds):
        for target in rotated(targets, round_):
            runs[target.name].append(await closed_loop(target, load, plan.infinity_clients,
                                                       plan.infinity_window_seconds, 2.0, [proxy_server, infinity]))
    direct, ours = runs["direct"], runs["proxy"]
    return {
        "clients": plan.infinity_clients, "documents_per_request": plan.infinity_documents,
        "window_seconds": plan.infinity_window_seconds, "infinity_startup_s": infinity_startup,
        "note": "infinity_emb runs the model on the same 2 CPU cores as the proxy and the load generator",
        "direct_rps": spread(r.rps for r, _ in direct), "proxy_rps": spread(r.rps for r, _ in ours),
        "proxy_over_direct": spread(p.rps / d.rps for (d, _), (p, _) in zip(direct, ours, strict=True)),
        "direct_p50_ms": spread(ms(percentile(r.latencies, 0.5)) for r, _ in direct),
        "proxy_p50_ms": spread(ms(percentile(r.latencies, 0.5)) for r, _ in ours),
        "proxy_cpu": spread(s[proxy_server.name] for _, s in ours),
        "infinity_cpu_direct": spread(s[infinity.name] for _, s in direct),
        "infinity_cpu_proxy": spread(s[infinity.name] for _, s in ours),
        "failed": sum(r.failed for r, _ in direct + ours),
    }


# --------------------------------------------------------------------------------------------
# Targets, the table, the machine.
# --------------------------------------------------------------------------------------------


def targets_met(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each against the median it is about."""
    checks: list[dict[str, Any]] = []

    def check(what: str, value: float | None, limit: float, at_least: bool = False) -> None:
        if value is not None:
            met = value >= limit if at_least else value < limit
            checks.append({"target": what, "value": value, "limit": limit, "met": met})

    for row in results.get("latency", {}).get("rows", []):
        limit = {100: 1.0, 1000: 5.0}.get(row["documents"])
        if limit:
            check(f"added p50 latency at {row['documents']} documents (ms)", row["added_p50_ms"]["median"], limit)
    for row in results.get("throughput", {}).get("rows", []):
        if row["clients"] in (32, 128):
            check(f"proxy/direct throughput, {row['clients']} clients, {row['upstream_ms']:g} ms upstream",
                  row["proxy_over_direct"]["median"], 0.95, at_least=True)
    for row in results.get("naive", {}).get("rows", []):
        if row["clients"] == 32:
            check(f"ours/naive throughput, 32 clients, {row['upstream_ms']:g} ms upstream",
                  row["proxy_over_naive"]["median"], 20.0, at_least=True)
    limits = {"speedups": {100: 0.5, 1000: 3.0}, "stdlib": {100: 0.8, 1000: 5.0}}
    for row in results.get("speedups", {}).get("latency_rows", []):
        for mode, by_documents in limits.items():
            if row["documents"] in by_documents:
                check(f"own added p50 above the bare relay, {mode}, {row['documents']} documents (ms)",
                      row["own_p50_ms"][mode]["median"], by_documents[row["documents"]])
        if row["documents"] == 50:
            for mode in limits:
                check(f"CPU per request over the bare relay's, {mode}, 50 documents",
                      row["cpu_over_relay"][mode]["median"], 1.5 + 1e-9)
    for row in results.get("speedups", {}).get("throughput_rows", []):
        if row["upstream_ms"] == 20:
            for mode in limits:
                check(f"bare-relay/direct minus proxy/direct, {mode}, {row['clients']} clients, 20 ms upstream",
                      row["gap_to_relay"][mode]["median"], 0.1 + 1e-9)
    scale = results.get("scale", {})
    if scale:
        check(f"peak RSS, {scale['documents']:,} documents in one request (MB)",
              scale["big_request_at_default_batch_size"]["big_peak_rss_mb"]["median"], 200.0)
    footprint = results.get("footprint", {})
    if "startup_ms" in footprint:
        check("start-up to ready (ms)", footprint["startup_ms"]["median"], 500.0)
        check("idle RSS (MB)", footprint["idle_rss_mb"]["median"], 50.0)
    return checks


def fmt(value: dict[str, float] | float | None, digits: int = 1) -> str:
    """'median [min, max]' for a spread, else the number."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}, {value['max']:.{digits}f}]"
    return f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The whole result as Markdown tables: what the README shows."""
    out = []
    machine = results["machine"]
    out.append(f"Machine: {machine['nproc']} cores, {machine['cpu_model']}, Python {machine['python']}, "
               f"aiohttp {machine['aiohttp']}. Figures: median [min, max] over {results['plan']['rounds']} rounds.")
    if "latency" in results:
        out.append("\n**1. Added latency** (one client, sequential; fake Infinity answers at once)\n")
        out.append(markdown_table(
            ["documents", "direct p50 ms", "proxy p50 ms", "added p50 ms", "added p99 ms", "proxy CPU ms/request",
             "bare relay: added p50 ms", "bare relay: CPU ms/request"],
            [[str(r["documents"]), fmt(r["direct_p50_ms"], 2), fmt(r["proxy_p50_ms"], 2), fmt(r["added_p50_ms"], 2),
              fmt(r["added_p99_ms"], 2), fmt(r["proxy_cpu_ms_per_request"], 2), fmt(r["relay_added_p50_ms"], 2),
              fmt(r["relay_cpu_ms_per_request"], 2)] for r in results["latency"]["rows"]]))
    if "throughput" in results:
        t = results["throughput"]
        out.append(f"\n**2. Throughput** ({t['documents_per_request']} documents a request; requests/s; "
                   "CPU in cores, 1.0 = one core busy)\n")
        out.append(markdown_table(
            ["upstream ms", "clients", "direct rps", "proxy rps", "proxy/direct", "proxy CPU",
             "client CPU (direct)", "client CPU (proxy)", "others' CPU (proxy)", "bare relay/direct"],
            [[f"{r['upstream_ms']:g}", str(r["clients"]), fmt(r["direct_rps"], 0), fmt(r["proxy_rps"], 0),
              fmt(r["proxy_over_direct"], 2), fmt(r["proxy_cpu"], 2), fmt(r["client_cpu_direct"], 2),
              fmt(r["client_cpu_proxy"], 2), fmt(r["others_cpu_proxy"], 2), fmt(r["relay_over_direct"], 2)]
             for r in t["rows"]]))
    if "naive" in results:
        out.append("\n**3. Against the naive design** (FastAPI, `requests.post` in an `async def` route)\n")
        out.append(markdown_table(
            ["upstream ms", "clients", "naive rps", "proxy rps", "ours/naive"],
            [[f"{r['upstream_ms']:g}", str(r["clients"]), fmt(r["naive_rps"], 1), fmt(r["proxy_rps"], 0),
              fmt(r["proxy_over_naive"], 1)] for r in results["naive"]["rows"]]))
    if "infinity" in results:
        i = results["infinity"]
        out.append("\n**4. Real Infinity** (tiny model on CPU)\n")
        if "skipped" in i:
            out.append(f"skipped: {i['skipped']}")
        else:
            out.append(markdown_table(
                ["clients", "direct rps", "proxy rps", "proxy/direct", "direct p50 ms", "proxy p50 ms", "proxy CPU"],
                [[str(i["clients"]), fmt(i["direct_rps"], 1), fmt(i["proxy_rps"], 1), fmt(i["proxy_over_direct"], 2),
                  fmt(i["direct_p50_ms"], 0), fmt(i["proxy_p50_ms"], 0), fmt(i["proxy_cpu"], 2)]]))
            out.append(f"\n{i['note']}.")
    if "scale" in results:
        s = results["scale"]
        rps_key = f"rps_{results['plan']['throughput_documents']}_docs"
        out.append(f"\n**5. One request of {s['documents']:,} documents, and the `--batch-size` sweep** "
                   f"(upstream: {s['upstream']}; throughput: {s['batch_size_sweep']['throughput_clients']} clients, "
                   f"{results['plan']['throughput_documents']} documents a request)\n")
        out.append(markdown_table(
            ["--batch-size", "wall ms", "upstream calls", "peak RSS MB", "rps"],
            [[str(r["batch_size"]), fmt(r["big_wall_ms"], 0), str(r["big_upstream_calls"]),
              fmt(r["big_peak_rss_mb"], 0), fmt(r[rps_key], 0)] for r in s["batch_size_sweep"]["rows"]]))
        c = s["max_concurrency_sweep"]
        out.append(f"\n**`--max-concurrency` sweep** (big request at --batch-size {c['big_request_batch_size']}; "
                   f"throughput: {c['throughput_clients']} clients, upstream {c['throughput_upstream']})\n")
        out.append(markdown_table(
            ["--max-concurrency", "big request wall ms", "peak RSS MB", "rps"],
            [[str(r["max_concurrency"]), fmt(r["big_wall_ms"], 0), fmt(r["big_peak_rss_mb"], 0),
              fmt(r[rps_key], 0)] for r in c["rows"]]))
    if "footprint" in results:
        f = results["footprint"]
        out.append("\n**6. Footprint**\n")
        rows = [["start-up to /health answering (ms)", fmt(f["startup_ms"], 0)],
                ["`python -c 'import aiohttp.web'` alone, the floor under it (ms)", fmt(f["python_import_aiohttp_ms"], 0)],
                ["idle RSS (MB)", fmt(f["idle_rss_mb"], 1)]]
        by_clients = f.get("load_rss", {}).get("peak_rss_mb_by_clients")
        if by_clients:
            rows.append([f"peak RSS under the load of section 2, up to {max(map(int, by_clients))} clients (MB)",
                         fmt(max(by_clients.values()), 1)])
        out.append(markdown_table(["", ""], rows))
    if "speedups" in results:
        out.append(speedups_report(results["speedups"]))
    if results.get("targets"):
        out.append("\n**Targets**\n")
        out.append(markdown_table(
            ["target", "limit", "measured", "met"],
            [[t["target"], f"{t['limit']:g}", f"{t['value']:.2f}", "yes" if t["met"] else "NO"]
             for t in results["targets"]]))
    return "\n".join(out)


def speedups_report(section: dict[str, Any]) -> str:
    pairs = " and ".join(f"`{ours}` beside `{floor}`" for ours, floor in section["pairs"].values())
    out = [f"\n**7. With and without the speedups** (`proxy` runs with orjson and uvloop, `proxy-stdlib` with "
           f"PROXY_NO_SPEEDUPS=1; the bare relay on either loop; own = {pairs}). Latency: one client, sequential, "
           "fake Infinity answers at once\n"]
    out.append(markdown_table(
        ["documents", "direct p50", "proxy p50", "relay-uvloop p50", "own, speedups", "proxy-stdlib p50",
         "relay-asyncio p50", "own, stdlib", "CPU/request proxy : relay-uvloop", "CPU/request stdlib : relay-asyncio"],
        [[str(r["documents"]), fmt(r["p50_ms"]["direct"], 2), fmt(r["p50_ms"]["proxy"], 2),
          fmt(r["p50_ms"]["relay-uvloop"], 2), fmt(r["own_p50_ms"]["speedups"], 2),
          fmt(r["p50_ms"]["proxy-stdlib"], 2), fmt(r["p50_ms"]["relay-asyncio"], 2), fmt(r["own_p50_ms"]["stdlib"], 2),
          f"{fmt(r['cpu_ms_per_request']['proxy'], 2)} : {fmt(r['cpu_ms_per_request']['relay-uvloop'], 2)} = "
          f"{fmt(r['cpu_over_relay']['speedups'], 2)}",
          f"{fmt(r['cpu_ms_per_request']['proxy-stdlib'], 2)} : {fmt(r['cpu_ms_per_request']['relay-asyncio'], 2)} = "
          f"{fmt(r['cpu_over_relay']['stdlib'], 2)}"] for r in section["latency_rows"]]))
    out.append(f"\nThroughput ({section['documents_per_request']} documents a request; x/direct, and the proxy's gap "
               "to the relay on its loop)\n")
    out.append(markdown_table(
        ["upstream ms", "clients", "direct rps", "proxy/direct", "relay-uvloop/direct", "gap", "proxy-stdlib/direct",
         "relay-asyncio/direct", "gap", "proxy CPU", "proxy-stdlib CPU"],
        [[f"{r['upstream_ms']:g}", str(r["clients"]), fmt(r["rps"]["direct"], 0), fmt(r["over_direct"]["proxy"], 2),
          fmt(r["over_direct"]["relay-uvloop"], 2), fmt(r["gap_to_relay"]["speedups"], 2),
          fmt(r["over_direct"]["proxy-stdlib"], 2), fmt(r["over_direct"]["relay-asyncio"], 2),
          fmt(r["gap_to_relay"]["stdlib"], 2), fmt(r["cpu_cores"]["proxy"], 2), fmt(r["cpu_cores"]["proxy-stdlib"], 2)]
         for r in section["throughput_rows"]]))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "python": platform.python_version(),
            "platform": platform.platform(), "aiohttp": aiohttp.__version__,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "client_event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0]}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


async def run(plan: Plan, sections: list[str], logs: Path, work: Path, proxy_script: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "plan": asdict(plan),
                               "command": " ".join(shlex.quote(arg) for arg in sys.argv), "logs": str(logs),
                               "proxy_script": str(proxy_script)}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            servers = Servers(session, logs, stack, proxy_script)
            load_rss = None
            if "footprint" in sections:
                with timed("6. footprint"):
                    results["footprint"] = await measure_footprint(plan, servers)
            if "latency" in sections:
                with timed("1. added latency"):
                    results["latency"] = await measure_latency(plan, servers)
            if "throughput" in sections:
                with timed("2. and 3. throughput, proxy vs direct vs naive"):
                    results["throughput"], results["naive"], load_rss = await measure_throughput(plan, servers)
            if "scale" in sections:
                with timed("5. scale and sweeps"):
                    results["scale"] = await measure_scale(plan, servers)
            if "infinity" in sections:
                if plan.infinity:
                    with timed("4. real Infinity"):
                        results["infinity"] = await measure_infinity(plan, servers, work)
                else:
                    results["infinity"] = {"skipped": "--no-infinity or --smoke"}
            if "speedups" in sections:
                with timed("7. speedups: with and without orjson and uvloop, beside the bare relay"):
                    results["speedups"] = await measure_speedups(plan, servers)
            if load_rss is not None and "footprint" in results:
                results["footprint"]["load_rss"] = load_rss
        # what ran, so that a test can check that every server is gone
        results["servers"] = [{"name": server.name, "pid": server.process.pid} for server in servers.started]
    results["seconds"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["targets"] = targets_met(results)
    return results


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed: the load generator takes less of the CPU it shares with the proxy.
    The proxy itself runs as a user runs it, on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="What the rerank proxy costs, against Infinity directly.")
    parser.add_argument("--smoke", action="store_true", help="tiny counts and no real Infinity: what CI runs")
    parser.add_argument("--no-infinity", action="store_true", help="skip section 4 (real infinity_emb)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--rounds", type=int, help="override the plan's rounds")
    parser.add_argument("--seconds", type=float, help="override the throughput window in seconds")
    parser.add_argument("--table-from", type=Path, metavar="JSON", help="print the table of an earlier run and exit")
    parser.add_argument("--proxy-script", type=Path, default=PROXY_SCRIPT,
                        help="measure another copy of the proxy (an optimisation under test); prompts still come "
                        "from proxy-classifier.py")
    args = parser.parse_args(argv)
    if args.table_from:
        earlier = json.loads(args.table_from.read_text())
        print(report({**earlier, "targets": targets_met(earlier)}))
        return 0
    plan = SMOKE if args.smoke else FULL
    if args.no_infinity:
        plan = replace(plan, infinity=False)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    if args.seconds:
        plan = replace(plan, window_seconds=args.seconds)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    # The servers' logs go next to the results: they explain a failed or odd run.
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as scratch:
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            results = loop.run_until_complete(run(plan, sections, logs, Path(scratch), args.proxy_script.resolve()))
        finally:
            loop.close()
    table = report(results)
    args.out.write_text(json.dumps({**results, "table": table}, indent=2) + "\n")
    print(table)
    print(f"\nwritten to {args.out} in {results['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
