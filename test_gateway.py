"""End-to-end tier: the LiteLLM Proxy server (the gateway) in front of the proxy and a real Infinity.

`litellm --config litellm-config.yaml` is started as a user starts it (from .venv-gateway: LiteLLM's
proxy extras and infinity-emb need different uvicorn versions, so they cannot share a venv), with only
RERANK_PROXY_URL and LITELLM_MASTER_KEY set. Rerank calls through the gateway's /rerank, /v1/rerank and
/v2/rerank, for both providers, get the model's own scores; its /health reports every deployment healthy.

Then scale-out and failover: two proxy + Infinity pairs under one model_name, with the repository's
router and health-check settings. Both pairs serve; one pair's Infinity stops mid-run and every client
request still gets a correct 200; the pair serves again once its Infinity is back; a proxy that dies
outright is what the config then does, measured. Every figure is printed (run with -s to read them) and
written to failover-figures.json in the test's log directory.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, free_port, logged_until_now
from tests.helpers import (
    DOCUMENTS,
    LOCAL_HTTP,
    MISSING_PACKAGES,
    QUERY,
    SCORE_TOLERANCE,
    SERVER_START_SECONDS,
    LoggedProcess,
    build_tiny_mxbai_model,
    library_prompt,
    model_logit_margin,
    offline_tier,
    sigmoid,
    start_infinity,
    start_proxy,
    stop,
    subprocess_env,
    wait_ready,
)

pytestmark = pytest.mark.e2e

GATEWAY = ROOT / ".venv-gateway" / "bin" / "litellm"
CONFIG_FILE = ROOT / "litellm-config.yaml"
MASTER_KEY = "sk-gateway-test-master-key-0123456789"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
GATEWAY_START_SECONDS = 120.0  # about 9 s here
PROXY_START_SECONDS = 30.0
CALL_SECONDS = 30.0  # any one call through the gateway
REPO_CONFIG = yaml.safe_load(CONFIG_FILE.read_text())
ROUTER = REPO_CONFIG["router_settings"]
HEALTH_CHECK_INTERVAL = REPO_CONFIG["general_settings"]["health_check_interval"]


# --------------------------------------------------------------------------------------------
# The servers: proxy + Infinity pairs that a test can stop and start again on the same ports, and
# the gateway.
# --------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One proxy in front of its own Infinity, on fixed ports so that either can come back."""

    name: str
    model_dir: Path
    logs: Path
    infinity_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    infinity: Any = None
    proxy: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start_infinity(self) -> None:
        # Each start logs to its own file: a restarted Infinity does not write over the first one's log.
        log_path = self.logs / f"{self.name}-infinity-{time.monotonic_ns()}.log"
        self.infinity = start_infinity(self.model_dir, self.infinity_port, log_path=log_path)
        wait_ready(f"http://127.0.0.1:{self.infinity_port}/health", self.infinity, SERVER_START_SECONDS)

    def start_proxy(self) -> None:
        self.proxy = start_proxy(f"http://127.0.0.1:{self.infinity_port}/v1", self.proxy_port,
                                 self.logs / f"{self.name}-proxy.log")
        wait_ready(f"{self.url}/ready", self.proxy, PROXY_START_SECONDS)

    def served(self, documents: int) -> dict[int, int]:
        """How many rerank requests of `documents` documents the proxy answered, by status. LiteLLM's
        health checks send one document, so they are not counted with the clients' requests."""
        counts: dict[int, int] = {}
        for line in logged_until_now(self.url, self.proxy.log_path).splitlines():
            if " POST /rerank status=" in line and f" documents={documents} " in line:
                status = int(line.split(" status=")[1].split()[0])
                counts[status] = counts.get(status, 0) + 1
        return counts

    def stop(self) -> None:
        for proc in (self.proxy, self.infinity):
            if proc is not None:
                stop(proc)


def start_gateway(config_path: Path, log_path: Path, proxy_url: str) -> tuple[LoggedProcess, str]:
    """`litellm --config FILE`, as the README starts it, on a free local port."""
    port = free_port()
    env = {**subprocess_env(), "RERANK_PROXY_URL": proxy_url, "LITELLM_MASTER_KEY": MASTER_KEY}
    gateway = LoggedProcess([str(GATEWAY), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)],
                            log_path, env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/health/liveliness", gateway, GATEWAY_START_SECONDS)
    return gateway, url


@dataclass(frozen=True)
class GatewayAnswer:
    """An answer through the gateway: its body, lower-cased headers and when it was sent and came (failover timing)."""

    status: int
    body: Any
    headers: dict[str, str]
    seconds: float
    at: float  # time.monotonic() when the answer arrived

    @property
    def sent(self) -> float:
        return self.at - self.seconds

    @property
    def retries(self) -> int:
        return int(self.headers.get("x-litellm-attempted-retries") or 0)

    @property
    def api_base(self) -> str:
        return self.headers.get("x-litellm-model-api-base", "")


def timed_gateway_call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> GatewayAnswer:
    """A call to the gateway with its master key, unlike tests/helpers.http_json: when it was sent and answered,
    its headers in lower case, a body that is not JSON kept as text, and no answer at all (a timeout) returned
    as status 0, so that a run of calls counts it as a failed request rather than stopping."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **AUTH, **(headers or {})})
    started = time.monotonic()
    try:
        with LOCAL_HTTP.open(request, timeout=CALL_SECONDS) as response:
            status, raw, answer_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, answer_headers = exc.code, exc.read(), exc.headers
    except OSError as exc:  # no answer at all (a timeout): a failed request, reported as such
        status, raw, answer_headers = 0, json.dumps({"error": str(exc)}).encode(), {}
    now = time.monotonic()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return GatewayAnswer(status, parsed, {k.lower(): v for k, v in dict(answer_headers).items()}, now - started, now)


def health(gateway_url: str) -> dict[str, Any]:
    answer = timed_gateway_call("GET", gateway_url + "/health")
    assert answer.status == 200, answer.body
    return answer.body


def wait_for_health(gateway_url: str, done: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    """LiteLLM's background health checks, polled until `done` says they show what is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        report = health(gateway_url)
        if done(report) or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# Fixtures: the world of this file.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def gateway_world() -> Iterator[None]:
    gateway = [] if GATEWAY.exists() else [f"{GATEWAY.relative_to(ROOT)} (litellm[proxy])"]
    yield from offline_tier("the gateway tier", [*MISSING_PACKAGES, *gateway])


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-logs")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mxbai_model(tmp_path_factory.mktemp("gateway-model") / "model")


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> dict[str, Any]:
    """The model's own scores for QUERY and DOCUMENTS (run with transformers), and their ranking."""
    margin = model_logit_margin(tiny_model)
    scores = [sigmoid(margin(library_prompt(QUERY, document))) for document in DOCUMENTS]
    return {"scores": scores, "order": sorted(range(len(scores)), key=lambda i: (-scores[i], i))}


def running_pair(name: str, model_dir: Path, logs: Path) -> Iterator[Pair]:
    pair = Pair(name, model_dir, logs)
    try:
        pair.start_infinity()
        pair.start_proxy()
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def pair_a(tiny_model: Path, logs: Path) -> Iterator[Pair]:
    yield from running_pair("a", tiny_model, logs)


@pytest.fixture(scope="module")
def pair_b(tiny_model: Path, logs: Path) -> Iterator[Pair]:
    yield from running_pair("b", tiny_model, logs)


@pytest.fixture(scope="module")
def gateway(pair_a: Pair, logs: Path) -> Iterator[str]:
    """The repository's litellm-config.yaml, unchanged, pointed at pair a."""
    proc, url = start_gateway(CONFIG_FILE, logs / "gateway.log", pair_a.url)
    try:
        yield url
    finally:
        stop(proc)


def failover_config(proxy_urls: list[str]) -> dict[str, Any]:
    """The repository's config with its infinity/ deployment once per pair, under the one model_name;
    router and health-check settings as they are."""
    config = copy.deepcopy(REPO_CONFIG)
    [deployment] = [d for d in config["model_list"] if d["litellm_params"]["model"].startswith("infinity/")]
    config["model_list"] = []
    for url in proxy_urls:
        entry = copy.deepcopy(deployment)
        entry["litellm_params"]["api_base"] = url
        config["model_list"].append(entry)
    return config


@pytest.fixture(scope="module")
def failover_gateway(pair_a: Pair, pair_b: Pair, logs: Path) -> Iterator[str]:
    config_path = logs / "litellm-failover.yaml"
    config_path.write_text(yaml.safe_dump(failover_config([pair_a.url, pair_b.url])))
    proc, url = start_gateway(config_path, logs / "failover-gateway.log", pair_a.url)
    try:
        wait_for_health(url, lambda report: report.get("healthy_count") == 2, 30)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def figures(logs: Path) -> Iterator[dict[str, Any]]:
    """What the failover tests measured: printed, and kept beside the logs."""
    measured: dict[str, Any] = {}
    yield measured
    (logs / "failover-figures.json").write_text(json.dumps(measured, indent=1))
    print("\nfailover figures:", json.dumps(measured, indent=1))


# --------------------------------------------------------------------------------------------
# The repository's config, as a user runs it.
# --------------------------------------------------------------------------------------------

DEPLOYMENTS = {d["model_name"]: d["litellm_params"]["model"] for d in REPO_CONFIG["model_list"]}


def test_gateway_health_reports_every_rerank_deployment_healthy(gateway: str, pair_a: Pair) -> None:
    report = wait_for_health(gateway, lambda r: r.get("healthy_count", 0) + r.get("unhealthy_count", 0) >= 2, 30)
    assert report["unhealthy_count"] == 0, report["unhealthy_endpoints"]
    assert sorted(e["model"] for e in report["healthy_endpoints"]) == sorted(DEPLOYMENTS.values())
    assert {e["api_base"] for e in report["healthy_endpoints"]} == {pair_a.url}


def test_gateway_refuses_a_call_without_the_master_key(gateway: str, pair_a: Pair) -> None:
    seen = pair_a.served(len(DOCUMENTS))
    answer = timed_gateway_call("POST", gateway + "/rerank",
                                {"model": "mxbai-rerank", "query": QUERY, "documents": DOCUMENTS},
                                headers={"Authorization": "Bearer sk-wrong"})
    # Without a database LiteLLM cannot look the key up as a virtual key: 400 "No connected db.".
    assert answer.status in (400, 401), answer.body
    assert pair_a.served(len(DOCUMENTS)) == seen


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("model_name", sorted(DEPLOYMENTS))
@pytest.mark.parametrize(("top_n", "return_documents"), [(None, False), (3, True)])
def test_gateway_rerank_gets_the_models_own_scores(gateway: str, expected: dict[str, Any], path: str,
                                                   model_name: str, top_n: int | None,
                                                   return_documents: bool) -> None:
    body = {"model": model_name, "query": QUERY, "documents": DOCUMENTS, "return_documents": return_documents}
    if top_n is not None:
        body["top_n"] = top_n
    answer = timed_gateway_call("POST", gateway + path, body)
    assert answer.status == 200, answer.body
    results = answer.body["results"]
    order = expected["order"][:top_n]
    assert [r["index"] for r in results] == order
    for result in results:
        assert result["relevance_score"] == pytest.approx(expected["scores"][result["index"]], abs=SCORE_TOLERANCE)
    documents = [r.get("document") for r in results]
    if not return_documents:
        assert documents == [None] * len(order)
    elif DEPLOYMENTS[model_name].startswith("cohere/"):
        assert documents == [{"text": DOCUMENTS[i]} for i in order]
    else:  # LiteLLM's infinity/ provider drops a falsy document (the blank one)
        assert documents == [{"text": DOCUMENTS[i]} if DOCUMENTS[i] else None for i in order]


# --------------------------------------------------------------------------------------------
# Scale-out and failover: two pairs under one model_name, the repository's router settings.
# --------------------------------------------------------------------------------------------

FAILOVER_BODY = {"model": "mxbai-rerank", "query": QUERY, "documents": DOCUMENTS}


def assert_correct(answer: GatewayAnswer, expected: dict[str, Any]) -> None:
    assert answer.status == 200, (answer.status, answer.body)
    results = answer.body["results"]
    assert [r["index"] for r in results] == expected["order"]
    for result in results:
        assert result["relevance_score"] == pytest.approx(expected["scores"][result["index"]], abs=SCORE_TOLERANCE)


def rerank_through(gateway_url: str) -> GatewayAnswer:
    return timed_gateway_call("POST", gateway_url + "/rerank", FAILOVER_BODY)


SPLIT_REQUESTS = 40


def test_two_pairs_under_one_model_name_both_serve(failover_gateway: str, pair_a: Pair, pair_b: Pair,
                                                   expected: dict[str, Any], figures: dict[str, Any]) -> None:
    a_before, b_before = pair_a.served(len(DOCUMENTS)), pair_b.served(len(DOCUMENTS))
    answers = [rerank_through(failover_gateway) for _ in range(SPLIT_REQUESTS)]
    for answer in answers:
        assert_correct(answer, expected)
    by_base = {url: sum(a.api_base == url for a in answers) for url in (pair_a.url, pair_b.url)}
    figures["split"] = {"requests": SPLIT_REQUESTS, "pair_a": by_base[pair_a.url], "pair_b": by_base[pair_b.url],
                        "retries": sum(a.retries for a in answers)}
    # LiteLLM's simple-shuffle picks a deployment at random: that one pair gets none of 40 has
    # probability 2 * 2**-40. Each proxy's own log agrees with the gateway's headers.
    assert by_base[pair_a.url] > 0 and by_base[pair_b.url] > 0
    assert sum(by_base.values()) == SPLIT_REQUESTS
    assert pair_a.served(len(DOCUMENTS)) == {200: a_before.get(200, 0) + by_base[pair_a.url]}
    assert pair_b.served(len(DOCUMENTS)) == {200: b_before.get(200, 0) + by_base[pair_b.url]}


class Traffic:
    """One client sending FAILOVER_BODY through the gateway back to back, in a thread, until told to stop
    or `limit` requests have been sent, PACE seconds apart."""

    def __init__(self, gateway_url: str, limit: int) -> None:
        self.gateway_url = gateway_url
        self.limit = limit
        self.answers: list[GatewayAnswer] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopping.is_set() and len(self.answers) < self.limit:
            self.answers.append(rerank_through(self.gateway_url))
            self.stopping.wait(PACE)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=2 * CALL_SECONDS)

    def wait_until(self, done: Callable[[list[GatewayAnswer]], bool], timeout: float) -> bool:
        """Whether the answers so far satisfy `done` within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.answers[:]):
            if time.monotonic() > deadline or not self.thread.is_alive():
                return False
            time.sleep(0.05)
        return True


PACE = 0.05
TRAFFIC_LIMIT = 2000  # with PACE and about 40 ms a request, a bound of about three minutes
RECOVERY_SECONDS = ROUTER["cooldown_time"] + 2 * HEALTH_CHECK_INTERVAL + 30


def test_a_pair_whose_infinity_stops_is_failed_over_and_serves_again_once_it_is_back(
        failover_gateway: str, pair_a: Pair, pair_b: Pair, expected: dict[str, Any],
        figures: dict[str, Any]) -> None:
    a_before = pair_a.served(len(DOCUMENTS)).get(200, 0)

    def served_by_a_after(moment: float) -> Callable[[list[GatewayAnswer]], bool]:
        return lambda answers: any(a.api_base == pair_a.url and a.sent > moment for a in answers)

    with Traffic(failover_gateway, TRAFFIC_LIMIT) as traffic:
        # Mid-run: pair a has served this traffic before its Infinity stops.
        assert traffic.wait_until(served_by_a_after(0.0), 60), "pair a served nothing before the stop"
        stopping_at = time.monotonic()
        stop(pair_a.infinity)
        stopped_at = time.monotonic()
        answers_at_stop = len(traffic.answers)
        traffic.wait_until(lambda answers: len(answers) >= answers_at_stop + 100, 60)
        restarting_at = time.monotonic()
        pair_a.start_infinity()
        back_at = time.monotonic()
        serves_again = traffic.wait_until(served_by_a_after(back_at), RECOVERY_SECONDS)
    answers = traffic.answers
    for answer in answers:
        assert_correct(answer, expected)
    retried = [a for a in answers if a.retries > 0]
    a_log = pair_a.served(len(DOCUMENTS))
    last_retry_at = max((a.at for a in retried), default=stopping_at)
    served_again_at = min((a.at for a in answers if a.api_base == pair_a.url and a.sent > back_at), default=None)
    figures["infinity_stopped"] = {
        "requests": len(answers), "failed": sum(a.status != 200 for a in answers),
        "needed_a_retry": len(retried), "retries": sum(a.retries for a in retried),
        "seconds_to_stop_infinity": round(stopped_at - stopping_at, 2),
        "last_retried_request_seconds_after_stop": round(last_retry_at - stopping_at, 2),
        "retried_request_seconds_max": round(max((a.seconds for a in retried), default=0.0), 3),
        "plain_request_seconds_median": round(sorted(a.seconds for a in answers if not a.retries)[
            len([a for a in answers if not a.retries]) // 2], 3),
        "pair_a_502s_in_its_log": a_log.get(502, 0),
        "seconds_infinity_was_down": round(back_at - stopping_at, 1),
        "seconds_from_infinity_back_to_pair_a_serving": (
            round(served_again_at - back_at, 1) if served_again_at is not None else None),
        "seconds_from_stop_to_pair_a_serving_again": (
            round(served_again_at - stopping_at, 1) if served_again_at is not None else None),
    }
    assert sum(a.status != 200 for a in answers) == 0
    # While pair a's Infinity was down, every request (retried or not) was answered by pair b.
    assert {a.api_base for a in answers if stopped_at < a.sent and a.at < restarting_at} == {pair_b.url}
    assert serves_again, f"pair a did not serve again within {RECOVERY_SECONDS} s of its Infinity's return"
    assert a_log.get(200, 0) > a_before


PROXY_DEATH_REQUESTS = 60


def test_a_proxy_that_dies_outright_is_routed_around_once_health_checks_see_it(
        failover_gateway: str, pair_a: Pair, pair_b: Pair, expected: dict[str, Any],
        figures: dict[str, Any]) -> None:
    pair_a.proxy.kill()  # SIGKILL: no graceful shutdown, connections are refused from now on
    pair_a.proxy.wait(timeout=10)
    killed_at = time.monotonic()
    answers = [rerank_through(failover_gateway) for _ in range(PROXY_DEATH_REQUESTS)]
    report = wait_for_health(
        failover_gateway,
        lambda r: pair_a.url in {e["api_base"] for e in r.get("unhealthy_endpoints", [])},
        2 * HEALTH_CHECK_INTERVAL + 15)
    seen_unhealthy_at = time.monotonic()
    after = [rerank_through(failover_gateway) for _ in range(20)]
    failed = [a for a in answers if a.status != 200]
    figures["proxy_killed"] = {
        "requests": len(answers), "failed": len(failed), "failed_statuses": sorted({a.status for a in failed}),
        "needed_a_retry": sum(a.retries > 0 for a in answers), "retries": sum(a.retries for a in answers),
        "seconds_of_those_requests": round(answers[-1].at - killed_at, 2),
        "seconds_until_health_check_marked_it_unhealthy": round(seen_unhealthy_at - killed_at, 1),
        "after_health_check": {"requests": len(after), "failed": sum(a.status != 200 for a in after),
                               "needed_a_retry": sum(a.retries > 0 for a in after)},
    }
    for answer in answers:
        if answer.status == 200:
            assert_correct(answer, expected)
    assert pair_a.url in {e["api_base"] for e in report["unhealthy_endpoints"]}
    for answer in after:
        assert_correct(answer, expected)
        assert answer.api_base == pair_b.url and answer.retries == 0
