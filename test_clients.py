"""End-to-end tier, continued: the RAG frameworks' own reranker clients against the proxy and a real Infinity.

Haystack, LlamaIndex and LangChain ship reranker clients that speak TEI's `/rerank`, Infinity's `/rerank` or
Cohere's `/v2/rerank`. They live in a second venv, `.venv-clients` (requirements-clients.txt: langchain-cohere
needs cohere<6, the main venv's tests use the Cohere SDK 7), so each runs here as a subprocess of that venv's
Python, executing the very file the README shows (`examples/<client>.py`) or, for one option of one client, a
few lines beside it. Open WebUI, Dify and RAGFlow are too large to install: each is re-enacted from its source,
sending exactly what the product sends and reading exactly what it reads.

Every score is checked against the tiny model run with transformers (conftest.py's end-to-end fixtures build the world); which path
a client posted to, and how many documents, is read from the proxy's own log line for the request.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, logged_until_now, missing_tier
from tests.helpers import (
    CALL_SECONDS,
    DOCUMENTS,
    LOCAL_HTTP,
    QUERY,
    SCORE_TOLERANCE,
    Server,
    library_prompt,
    running_proxy,
    sigmoid,
    subprocess_env,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("e2e_world")]

CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
CLIENT_REQUIREMENTS = ROOT / "requirements-clients.txt"
EXAMPLES = ROOT / "examples"
PROXY_KEY = "clients-proxy-key"
CLIENT_SECONDS = 120.0  # one client subprocess: imports take 1 to 4 s here, the call well under one

# What each framework client posts to, read from its installed source (README "Using it from Haystack, ...").
CLIENT_ROUTES = {
    "haystack_tei_ranker": "/rerank",  # HuggingFaceTEIRanker: urljoin(url, "/rerank"), TEI's body
    "haystack_cohere_ranker": "/v2/rerank",  # CohereRanker: cohere.ClientV2
    "llamaindex_tei_rerank": "/rerank",  # TextEmbeddingInference: f"{base_url}/rerank", TEI's body
    "llamaindex_cohere_rerank": "/v2/rerank",  # CohereRerank: cohere.ClientV2
    "langchain_cohere_rerank": "/v2/rerank",  # langchain_cohere.CohereRerank: cohere.ClientV2
    "langchain_infinity_rerank": "/rerank",  # InfinityRerank: infinity_client, Infinity's body
}


# --------------------------------------------------------------------------------------------
# The second venv, and running a client in it.
# --------------------------------------------------------------------------------------------


def requirement_names() -> list[str]:
    lines = (line.split("#")[0].strip() for line in CLIENT_REQUIREMENTS.read_text().splitlines())
    return [re.split(r"[=<>!~\[ ]", line)[0] for line in lines if line]


@pytest.fixture(scope="session")
def clients_venv() -> Path:
    """.venv-clients with every package of requirements-clients.txt, or a skip that says how to build it (a
    failure where CI demands every tier)."""
    missing = requirement_names()
    if CLIENTS_PYTHON.exists():
        check = subprocess.run(
            [str(CLIENTS_PYTHON), "-c", "import importlib.metadata as m, sys\n"
             "for name in sys.argv[1:]:\n"
             "    try: m.version(name)\n"
             "    except m.PackageNotFoundError: print(name)", *missing],
            capture_output=True, text=True, timeout=CLIENT_SECONDS)
        missing = check.stdout.split() if check.returncode == 0 else missing
    if missing:
        missing_tier(f"the framework clients tier needs {', '.join(missing)} in .venv-clients: run ./setup.sh --dev "
                     "(or python3 -m venv .venv-clients && .venv-clients/bin/pip install -r requirements-clients.txt)")
    return CLIENTS_PYTHON


def clients_env(server: Server, model: str, key: str | None) -> dict[str, str]:
    """What the examples read (RERANK_PROXY_URL, RERANK_MODEL, RERANK_PROXY_KEY), offline, and without keys
    the clients would pick up on their own (Haystack's TEI ranker sends HF_TOKEN when it is set)."""
    own_keys = {"HF_TOKEN", "HF_API_TOKEN", "COHERE_API_KEY", "CO_API_KEY", "CO_API_URL", "RERANK_PROXY_KEY"}
    env = {name: value for name, value in subprocess_env().items() if name not in own_keys}
    env.update(RERANK_PROXY_URL=server.url, RERANK_MODEL=model, HAYSTACK_TELEMETRY_ENABLED="False")
    if key is not None:
        env["RERANK_PROXY_KEY"] = key
    return env


# Runs `rerank(query, texts, top)` from an example file, or a snippet that defines `rerank`, and prints its
# (text, score) pairs as JSON.
DRIVER = """
import json, runpy, sys
call = json.loads(sys.argv[1])
if call["example"]:
    rerank = runpy.run_path(call["example"])["rerank"]
else:
    namespace = {}
    exec(call["snippet"], namespace)
    rerank = namespace["rerank"]
print(json.dumps(rerank(call["query"], call["texts"], call["top"])))
"""


def run_client(clients_venv: Path, env: dict[str, str], *, example: str = "", snippet: str = "",
               top: int = len(DOCUMENTS)) -> subprocess.CompletedProcess:
    call = {"example": str(EXAMPLES / f"{example}.py") if example else "", "snippet": snippet,
            "query": QUERY, "texts": DOCUMENTS, "top": top}
    return subprocess.run([str(clients_venv), "-c", DRIVER, json.dumps(call)], env=env, capture_output=True,
                          text=True, timeout=CLIENT_SECONDS, stdin=subprocess.DEVNULL)


def ranked(done: subprocess.CompletedProcess) -> list[tuple[str, float]]:
    assert done.returncode == 0, f"the client failed:\n{done.stderr[-4000:]}"
    return [(text, score) for text, score in json.loads(done.stdout.splitlines()[-1])]


# --------------------------------------------------------------------------------------------
# What the proxy saw, and what the model says.
# --------------------------------------------------------------------------------------------

REQUEST_LINE = re.compile(r" (?P<method>GET|POST) (?P<path>\S+) status=(?P<status>\d+) documents=(?P<documents>\d+)")


@contextmanager
def requests_seen(server: Server) -> Iterator[list[tuple[str, str, int, int]]]:
    """The (method, path, status, documents) of every request the proxy logged while the block ran."""
    log_path: Path = server.proc.log_path
    start = log_path.stat().st_size
    seen: list[tuple[str, str, int, int]] = []
    yield seen
    text = logged_until_now(server.url, log_path, start)
    seen.extend((m["method"], m["path"], int(m["status"]), int(m["documents"])) for m in REQUEST_LINE.finditer(text))


@pytest.fixture(scope="session")
def model_score(logit_margin: Callable[[str], float]) -> Callable[..., float]:
    """The tiny model's own relevance for a query and a text, as transformers computes it."""

    def score(text: str, query: str = QUERY, raw: bool = False) -> float:
        margin = logit_margin(library_prompt(query, text))
        return margin if raw else sigmoid(margin)

    return score


def model_ranking(model_score: Callable[..., float], texts: list[str], top: int,
                  raw: bool = False) -> list[tuple[str, float]]:
    scored = sorted(((text, model_score(text, raw=raw)) for text in texts), key=lambda pair: -pair[1])
    assert len({score for _, score in scored}) == len(texts)  # no ties: the order is the model's alone
    return scored[:top]


def assert_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=SCORE_TOLERANCE)


@pytest.fixture(scope="session")
def keyed_proxy(infinity: Server, served_model: str, logs: Path) -> Iterator[Server]:
    """A proxy started with --api-key: clients must send `Authorization: Bearer <key>`."""
    yield from running_proxy(infinity.url, logs, "keyed-proxy", "--model", served_model, "--api-key", PROXY_KEY)


# --------------------------------------------------------------------------------------------
# The framework clients, each as the README shows it.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", CLIENT_ROUTES)
def test_each_framework_client_gets_the_models_ranking(example: str, clients_venv: Path, proxy_server: Server,
                                                        served_model: str, model_score: Callable[..., float]) -> None:
    with requests_seen(proxy_server) as seen:
        got = ranked(run_client(clients_venv, clients_env(proxy_server, served_model, None), example=example))
    assert_ranking(got, model_ranking(model_score, DOCUMENTS, len(DOCUMENTS)))
    assert seen == [("POST", CLIENT_ROUTES[example], 200, len(DOCUMENTS))]


@pytest.mark.parametrize("example", CLIENT_ROUTES)
def test_each_framework_client_cuts_at_its_top_n_through_a_keyed_proxy(example: str, clients_venv: Path,
                                                                      keyed_proxy: Server, served_model: str,
                                                                      model_score: Callable[..., float]) -> None:
    # Through a proxy with --api-key, with the key in RERANK_PROXY_KEY as the README says.
    got = ranked(run_client(clients_venv, clients_env(keyed_proxy, served_model, PROXY_KEY), example=example, top=2))
    assert_ranking(got, model_ranking(model_score, DOCUMENTS, 2))


@pytest.mark.parametrize("example", CLIENT_ROUTES)
def test_each_framework_client_sends_the_proxys_key(example: str, clients_venv: Path, keyed_proxy: Server,
                                                     served_model: str) -> None:
    # A wrong key is refused: so the key in RERANK_PROXY_KEY is what reaches the proxy. (LlamaIndex's TEI
    # postprocessor never looks at the status: it fails on its own assertion of one result per text.)
    with requests_seen(keyed_proxy) as seen:
        done = run_client(clients_venv, clients_env(keyed_proxy, served_model, PROXY_KEY + "-wrong"), example=example)
    assert done.returncode != 0
    assert seen[-1][:3] == ("POST", CLIENT_ROUTES[example], 401)
    if example == "llamaindex_tei_rerank":
        assert "AssertionError" in done.stderr


# --------------------------------------------------------------------------------------------
# One option of one client, where the README names it.
# --------------------------------------------------------------------------------------------

HAYSTACK_TEI = """
import os
from haystack import Document
from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker, TruncationDirection

def rerank(query, texts, top):
    ranker = HuggingFaceTEIRanker(url=os.environ["RERANK_PROXY_URL"] + os.environ["URL_PATH"], top_k=top,
                                  raw_scores=os.environ["RAW_SCORES"] == "1", token=None)
    direction = os.environ["TRUNCATION_DIRECTION"]
    result = ranker.run(query=query, documents=[Document(content=text) for text in texts],
                        truncation_direction=TruncationDirection(direction) if direction else None)
    return [(document.content, document.score) for document in result["documents"]]
"""


@pytest.mark.parametrize(("url_path", "direction", "raw"), [
    ("", "Left", False), ("", "Right", False), ("/v1/some/path", "", False), ("", "", True),
], ids=["truncation-left", "truncation-right", "url-with-a-path", "raw-scores"])
def test_haystack_tei_ranker_options_reach_the_proxy(url_path: str, direction: str, raw: bool, clients_venv: Path,
                                                     proxy_server: Server, served_model: str,
                                                     model_score: Callable[..., float]) -> None:
    # It sends truncation_direction as "Left"/"Right" (with "truncate": true), raw_scores always, and posts
    # to the URL's origin + /rerank whatever path the URL has.
    env = {**clients_env(proxy_server, served_model, None), "URL_PATH": url_path, "TRUNCATION_DIRECTION": direction,
           "RAW_SCORES": "1" if raw else "0"}
    with requests_seen(proxy_server) as seen:
        got = ranked(run_client(clients_venv, env, snippet=HAYSTACK_TEI, top=3))
    assert_ranking(got, model_ranking(model_score, DOCUMENTS, 3, raw=raw))
    assert seen == [("POST", "/rerank", 200, len(DOCUMENTS))]


@pytest.mark.parametrize("example", ["llamaindex_tei_rerank", "langchain_infinity_rerank"])
def test_a_base_url_ending_in_v1_serves_the_clients_that_append_rerank(example: str, clients_venv: Path,
                                                                       proxy_server: Server, served_model: str,
                                                                       model_score: Callable[..., float]) -> None:
    env = {**clients_env(proxy_server, served_model, None), "RERANK_PROXY_URL": proxy_server.url + "/v1"}
    with requests_seen(proxy_server) as seen:
        got = ranked(run_client(clients_venv, env, example=example, top=3))
    assert_ranking(got, model_ranking(model_score, DOCUMENTS, 3))
    assert seen == [("POST", "/v1/rerank", 200, len(DOCUMENTS))]


# --------------------------------------------------------------------------------------------
# Products too large to install, re-enacted from their source: the same request, the same reading.
# --------------------------------------------------------------------------------------------


def post_json_or_raise(url: str, body: Any, headers: dict[str, str]) -> Any:
    """POST as the clients here do, unlike tests/helpers.http_json: only the headers given, and a status >= 400
    raised (urllib's HTTPError), as their raise_for_status() raises it."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    with LOCAL_HTTP.open(request, timeout=CALL_SECONDS) as response:  # raises on a status >= 400
        return json.loads(response.read())


def get_json_or_raise(url: str, headers: dict[str, str]) -> Any:
    """GET as the clients here do: only the headers given, and a status >= 400 raised, as post_json_or_raise."""
    with LOCAL_HTTP.open(urllib.request.Request(url, headers=headers), timeout=CALL_SECONDS) as response:
        return json.loads(response.read())


def open_webui_scores(reranker_url: str, api_key: str, model: str, query: str, documents: list[str]) -> list[float]:
    """Open WebUI's ExternalReranker.predict (backend/open_webui/retrieval/models/external.py): the full
    configured URL, Bearer with the configured key (empty by default), every document, and one score per
    document read back in index order."""
    payload = {"model": model, "query": query, "documents": documents, "top_n": len(documents)}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    data = post_json_or_raise(reranker_url, payload, headers)
    return [result["relevance_score"] for result in sorted(data["results"], key=lambda result: result["index"])]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "api-key"])
def test_open_webui_external_reranker_gets_one_score_per_document(path: str, keyed: bool, proxy_server: Server,
                                                                  keyed_proxy: Server, served_model: str,
                                                                  model_score: Callable[..., float]) -> None:
    server, key = (keyed_proxy, PROXY_KEY) if keyed else (proxy_server, "")
    scores = open_webui_scores(server.url + path, key, served_model, QUERY, DOCUMENTS)
    assert scores == pytest.approx([model_score(document) for document in DOCUMENTS], abs=SCORE_TOLERANCE)


def dify_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def dify_model_type(server_url: str, api_key: str | None) -> tuple[str, int]:
    """Dify's TEI plugin (models/huggingface_tei, TeiHelper._get_tei_extra_parameter), when the model is
    added: GET {server_url}/info; the first key of model_type must be "reranker"; max_input_length becomes
    the model's context size."""
    info = get_json_or_raise(server_url.rstrip("/") + "/info", dify_headers(api_key))
    model_types = list(info.get("model_type", {}))
    assert model_types, "Dify: model_type is empty"
    return model_types[0], info.get("max_input_length", 512)


def dify_rerank(server_url: str, api_key: str | None, query: str, docs: list[str], score_threshold: float | None,
                top_n: int | None) -> list[dict[str, Any]]:
    """Dify's TEI rerank model (_invoke): POST {"query","texts","return_text":true} to {server_url}/rerank,
    then walk the answer in the server's order, keeping scores over the threshold, stopping at top_n."""
    results = post_json_or_raise(server_url.removesuffix("/") + "/rerank",
                                 {"query": query, "texts": docs, "return_text": True}, dify_headers(api_key))
    kept = []
    for result in results:
        document = {"index": result["index"], "text": result["text"], "score": result["score"]}
        if score_threshold is None or result["score"] >= score_threshold:
            kept.append(document)
        if top_n is not None and len(kept) >= top_n:
            break
    return kept


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "api-key"])
def test_dify_tei_provider_adds_the_model_and_gets_the_top_n(keyed: bool, proxy_server: Server,
                                                              keyed_proxy: Server, served_model: str,
                                                              model_score: Callable[..., float]) -> None:
    server, key = (keyed_proxy, PROXY_KEY) if keyed else (proxy_server, None)
    # Adding the model: its credential check reads /info, then reranks three texts with a threshold.
    assert dify_model_type(server.url, key) == ("reranker", 8192)
    dify_rerank(server.url, key, "Whose kasumi", ["Kasumi is a name.", "Her music is kawaii bass.", "PopiParty"],
                score_threshold=0.8, top_n=None)
    # A knowledge-base query: the top 3 in the server's order, so the answer must come sorted.
    kept = dify_rerank(server.url + "/", key, QUERY, DOCUMENTS, score_threshold=None, top_n=3)
    expected = model_ranking(model_score, DOCUMENTS, 3)
    assert [(document["text"], document["score"]) for document in kept] == [
        (text, pytest.approx(score, abs=SCORE_TOLERANCE)) for text, score in expected]
    assert [DOCUMENTS[document["index"]] for document in kept] == [document["text"] for document in kept]


def ragflow_scores(base_url: str, query: str, texts: list[str]) -> list[float]:
    """RAGFlow's HuggingfaceRerank.post (rag/llm/rerank_model.py): a scheme added when the base URL has none,
    /rerank appended unless it is there, batches of 8 texts with "truncate": true and no key, each batch's
    scores put back by index."""
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = f"http://{base}"
    endpoint = base if base.endswith("/rerank") else f"{base}/rerank"
    scores = [0.0] * len(texts)
    batch_size = 8
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        answer = post_json_or_raise(endpoint, {"query": query, "texts": batch, "raw_scores": False, "truncate": True},
                                    {"Content-Type": "application/json"})
        for result in answer:
            scores[result["index"] + start] = result["score"]
    return scores


RAGFLOW_TEXTS = [*DOCUMENTS, "tokyo weather is sunny", "the river is long", "paris is its first city",
                 "a dog in the house", "germany and france", "rain in berlin"]  # 12: a batch of 8, then of 4


@pytest.mark.parametrize("base", ["{host}", "http://{host}", "http://{host}/rerank"],
                         ids=["host-and-port", "url", "url-with-rerank"])
def test_ragflow_tei_reranker_gets_every_batch_scored(base: str, proxy_server: Server,
                                                      model_score: Callable[..., float]) -> None:
    host = proxy_server.url.removeprefix("http://")
    with requests_seen(proxy_server) as seen:
        scores = ragflow_scores(base.format(host=host), QUERY, RAGFLOW_TEXTS)
    assert scores == pytest.approx([model_score(text) for text in RAGFLOW_TEXTS], abs=SCORE_TOLERANCE)
    assert seen == [("POST", "/rerank", 200, 8), ("POST", "/rerank", 200, 4)]


def test_ragflow_cannot_use_a_proxy_with_an_api_key(keyed_proxy: Server) -> None:
    # RAGFlow's TEI reranker sends no Authorization header at all: the README says to leave --api-key off.
    with pytest.raises(urllib.error.HTTPError) as refused:
        ragflow_scores(keyed_proxy.url, QUERY, DOCUMENTS)
    assert refused.value.code == 401
