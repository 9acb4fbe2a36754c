"""End-to-end tier: the proxy against the real thing.

A tiny, randomly initialised model shaped like mxbai-rerank-v2-seq (a two-label
Qwen2ForSequenceClassification with a byte-level BPE tokenizer) is built offline in seconds; a real
`infinity_emb v2` serves it on 127.0.0.1; the proxy runs as a subprocess, started as a user starts
it; the real LiteLLM and Cohere clients call the proxy. Scores are checked against the model itself,
run with transformers.

Nothing here uses the network. `bench/` imports `build_tiny_mxbai_model`, `start_infinity`,
`wait_ready` and `stop` from this file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import LOCAL_HTTP, ROOT, free_port, listens_on, missing_tier, proxy

pytestmark = pytest.mark.e2e

E2E_PACKAGES = ("torch", "transformers", "tokenizers", "infinity_emb", "litellm", "cohere", "mxbai_rerank")
MISSING_PACKAGES = [name for name in E2E_PACKAGES if importlib.util.find_spec(name) is None]

# No telemetry, no model hub, and LiteLLM's cost map from its own package (LiteLLM fetches that map
# from GitHub when it is imported, unless told otherwise).
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    # Every call here is local: an HTTP proxy set for the machine must not see it (httpx reads both).
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}

SERVER_START_SECONDS = 90.0  # Infinity is ready in about 6 to 9 s here; a slow CI runner gets room
PROXY_START_SECONDS = 30.0
CALL_SECONDS = 60.0  # any one HTTP call a test makes
SCORE_TOLERANCE = 1e-5  # measured: the proxy and transformers differ by about 1e-7
INFINITY_KEY = "e2e-infinity-key"

# --------------------------------------------------------------------------------------------
# The tiny model: mxbai-rerank-v2-seq's shape (a two-label Qwen2 classifier, Qwen's chat special
# tokens), random weights, built offline.
# --------------------------------------------------------------------------------------------

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
MAX_TOKENS = 4096  # every prompt here fits: Infinity would cut a longer one from the right
WORDS = (
    "query document relevance search expert judgment semantic relationship system user assistant "
    "instruction you are a helpful the of and to in for is on that with as it by this be at from "
    "capital france paris berlin germany river weather tokyo sunny rain cat dog house garden "
    "python proxy rerank infinity model score token chunk long short first last best"
).split()
UNICODE_WORDS = ("Grüße", "Köln", "東京", "天気", "晴れ", "naïve", "café", "Ωμέγα", "привет", "🙂")


def tokenizer_corpus(rng: random.Random, lines: int = 400) -> list[str]:
    """Lines like the prompts the model will see, so that the merges cover the template's words."""
    corpus = [library_prompt("what is the capital of france", "paris is its capital", "answer briefly")] * 5
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(UNICODE_WORDS))
        corpus.append(" ".join(words))
    return corpus


def library_prompt(query: str, document: str, instruction: str | None = None) -> str:
    """mxbai-rerank-v2's prompt as mixedbread's library (mxbai_rerank.MxbaiRerankV2) writes it: its own
    pieces, joined in its own order. The tests' reference: never the proxy's own prompt code."""
    from mxbai_rerank import MxbaiRerankV2 as library

    query_part = library.query_prompt.format(query=query)
    if instruction:
        query_part = library.instruction_prompt.format(instruction=instruction) + library.sep + query_part
    return (library.chat_template["prefix"] + query_part + library.sep + library.doc_prompt.format(document=document)
            + library.sep + library.task_prompt + library.chat_template["suffix"])


def build_tiny_mxbai_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random classifier shaped like mxbai-rerank-v2-seq, and its tokenizer, into
    `directory`. The same seed gives the same files. About 0.5 MB; seconds, mostly imports."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    # Byte-level: any text, unicode and emoji included, has tokens; nothing becomes unknown.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[END_OF_TEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(tokenizer_corpus(random.Random(seed)), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END], model_max_length=MAX_TOKENS,
    )
    tokenizer.save_pretrained(directory)

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_TOKENS,
        num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
        # Above the default 0.02, so that the document, not only the template, moves the score.
        initializer_range=0.05,
    )
    with torch.random.fork_rng(devices=[]):  # seeds this model without reseeding the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForSequenceClassification(config)
        # A small head keeps the probabilities inside (0, 1) (here about 0.3 to 0.8) rather than
        # saturated at 1.0, so that rankings and comparisons mean something.
        torch.nn.init.normal_(model.score.weight, std=0.15)
    model.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# Subprocesses: Infinity and the proxy, their output in a file (a full pipe can block a server).
# --------------------------------------------------------------------------------------------


class LoggedProcess(subprocess.Popen):
    """A server in its own process group, writing everything it prints to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = Path(log_path)
        with open(self.log_path, "wb") as log:
            super().__init__(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"


def subprocess_env() -> dict[str, str]:
    """This environment, offline, and without settings the servers would read in place of our flags
    (the proxy's PORT, MODEL, API_KEY, ...; Infinity's INFINITY_*)."""
    proxy_settings = {proxy.env_name(flag) for flag, _, _ in proxy.OPTIONS}
    env = {name: value for name, value in os.environ.items()
           if name not in proxy_settings and not name.startswith("INFINITY_")}
    return {**env, **OFFLINE_ENV}


def infinity_command() -> str:
    beside_python = Path(sys.executable).with_name("infinity_emb")  # the venv running the tests
    return str(beside_python) if beside_python.exists() else shutil.which("infinity_emb") or "infinity_emb"


def start_infinity(model_dir: Path, port: int, api_key: str | None = None,
                   log_path: Path | None = None) -> subprocess.Popen:
    """`infinity_emb v2` serving `model_dir` on 127.0.0.1:`port` under /v1, on the CPU. Its output goes
    to `log_path` (default: beside the model directory)."""
    options = ["--batch-size", "8", *(["--api-key", api_key] if api_key else [])]
    log_path = log_path or Path(model_dir).parent / f"infinity-{port}.log"
    return start_infinity_serving([(model_dir, None)], port, log_path, *options)


def start_infinity_serving(models: list[tuple[Path, str | None]], port: int, log_path: Path,
                           *options: str) -> subprocess.Popen:
    """`infinity_emb v2` serving each (directory, served name) on 127.0.0.1:`port` under /v1, on the CPU.
    A served name of None keeps Infinity's own (the last two parts of the path)."""
    command = [infinity_command(), "v2", "--port", str(port), "--host", "127.0.0.1", "--url-prefix", "/v1",
               "--engine", "torch", "--device", "cpu", *options]
    for model_dir, name in models:
        command += ["--model-id", str(model_dir), *(["--served-model-name", name] if name else [])]
    return LoggedProcess(command, log_path, subprocess_env())


def start_proxy(infinity_url: str, port: int, log_path: Path, *flags: str) -> subprocess.Popen:
    """The proxy, started as a user starts it."""
    command = [sys.executable, str(ROOT / "proxy-classifier.py"), "--host", "127.0.0.1", "--port", str(port),
               "--infinity-url", infinity_url, *flags]
    return LoggedProcess(command, log_path, subprocess_env())


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Return once `url` answers 200; raise with the server's output if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    port = urlsplit(url).port
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered; "
                               f"its output:\n{output_of(proc)}")
        try:
            with LOCAL_HTTP.open(url, timeout=2) as response:
                if response.status == 200 and listens_on(proc.pid, port):  # not another program on the port
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:  # refused while the server starts; URLError is an OSError
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready within {timeout:g} s ({last}); server output:\n{output_of(proc)}")


def output_of(proc: subprocess.Popen) -> str:
    return proc.log_tail() if isinstance(proc, LoggedProcess) else "(not captured)"


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: a dead Infinity batch worker can ignore SIGTERM."""
    if proc.poll() is None:
        signal_server(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_server(proc, signal.SIGKILL)
            proc.wait(timeout=grace)


def signal_server(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """The server's own process group when it leads one (start_new_session), else the process."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# Plain HTTP: the direct calls the clients are compared with.
# --------------------------------------------------------------------------------------------


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with LOCAL_HTTP.open(request, timeout=CALL_SECONDS) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rerank(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = http_json("POST", base + path, body)
    assert status == 200, answer
    return answer


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# Fixtures: the world. One tiny model, one Infinity, proxies in front of it, the clients.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str  # Infinity's includes its /v1 prefix; the proxy's is its origin
    proc: subprocess.Popen


@pytest.fixture(scope="session", autouse=True)
def e2e_world() -> Iterator[None]:
    yield from offline_tier("the end-to-end tier", MISSING_PACKAGES, " (or pip install -r requirements-e2e.txt)")


def offline_tier(tier: str, missing: list[str], alternative: str = "") -> Iterator[None]:
    """The tier's packages, or a skip that says how to install them (a failure where CI demands every
    tier); and the offline environment for this process while the tier runs."""
    if missing:
        missing_tier(f"{tier} needs {', '.join(missing)}: run ./setup.sh --dev{alternative}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mxbai_model(tmp_path_factory.mktemp("tiny-mxbai") / "model")


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


def ready_on_a_free_port(start: Callable[[int], subprocess.Popen], path: str,
                         seconds: float) -> tuple[subprocess.Popen, int]:
    """A server started and ready; on another port when another program took the one free_port() found."""
    for attempt in range(3):
        port = free_port()
        proc = start(port)
        try:
            wait_ready(f"http://127.0.0.1:{port}{path}", proc, seconds)
            return proc, port
        except BaseException as exc:
            stop(proc)
            if attempt == 2 or "address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


def running_infinity(model_dir: Path, logs: Path, name: str, api_key: str | None = None) -> Iterator[Server]:
    proc, port = ready_on_a_free_port(
        lambda port: start_infinity(model_dir, port, api_key=api_key, log_path=logs / f"{name}.log"),
        "/health", SERVER_START_SECONDS)
    try:
        yield Server(f"http://127.0.0.1:{port}/v1", proc)
    finally:
        stop(proc)


def running_proxy(infinity_url: str, logs: Path, name: str, *flags: str) -> Iterator[Server]:
    proc, port = ready_on_a_free_port(lambda port: start_proxy(infinity_url, port, logs / f"{name}.log", *flags),
                                      "/ready", PROXY_START_SECONDS)
    try:
        yield Server(f"http://127.0.0.1:{port}", proc)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def infinity(tiny_model: Path, logs: Path) -> Iterator[Server]:
    yield from running_infinity(tiny_model, logs, "infinity")


@pytest.fixture(scope="session")
def served_model(infinity: Server) -> str:
    """The name Infinity serves the tiny model under: without --served-model-name, the last two parts
    of its directory path."""
    status, answer = http_json("GET", infinity.url + "/models")
    assert status == 200, answer
    (name,) = [model["id"] for model in answer["data"]]
    return name


@pytest.fixture(scope="session")
def proxy_server(infinity: Server, served_model: str, logs: Path) -> Iterator[Server]:
    yield from running_proxy(infinity.url, logs, "proxy", "--model", served_model)


CHUNK_CHARS = 120  # small, so that a document of a few hundred characters is chunked


@pytest.fixture(scope="session")
def chunking_proxy(infinity: Server, served_model: str, logs: Path) -> Iterator[Server]:
    yield from running_proxy(infinity.url, logs, "chunking-proxy", "--model", served_model,
                             "--max-doc-chars", str(CHUNK_CHARS))


@pytest.fixture(scope="session")
def keyed_infinity(tiny_model: Path, logs: Path) -> Iterator[Server]:
    """A second Infinity, started with --api-key: only the key tests pay for it."""
    yield from running_infinity(tiny_model, logs, "keyed-infinity", api_key=INFINITY_KEY)


@pytest.fixture(scope="session")
def proxy_to_keyed_infinity(keyed_infinity: Server, served_model: str, logs: Path) -> Iterator[Server]:
    """No --api-key on this proxy: it forwards the client's Authorization to Infinity as it came."""
    yield from running_proxy(keyed_infinity.url, logs, "proxy-to-keyed-infinity", "--model", served_model)


@pytest.fixture(scope="session")
def logit_margin(tiny_model: Path) -> Callable[[str], float]:
    return model_logit_margin(tiny_model)


def model_logit_margin(tiny_model: Path) -> Callable[[str], float]:
    """The model's own answer, run with transformers: prompt -> logit_1 - logit_0, the whole prompt read as
    written (the proxy's pad anchor keeps Infinity's whitespace strip from touching it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()

    def margin(prompt: str) -> float:
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        assert encoded["input_ids"].shape[1] <= MAX_TOKENS, "Infinity would truncate this prompt"
        with torch.no_grad():
            logits = model(**encoded).logits[0]
        return float(logits[1] - logits[0])

    return margin


@pytest.fixture(scope="session")
def litellm_rerank(e2e_world: None) -> Callable[..., Any]:
    # Imported here, not at the top: after e2e_world has set LITELLM_LOCAL_MODEL_COST_MAP, which
    # LiteLLM reads when imported, and only by runs of this tier (the import takes seconds).
    import litellm

    return litellm.rerank


@pytest.fixture(scope="session")
def cohere_v2_client(proxy_server: Server) -> Any:
    import cohere

    return cohere.ClientV2(api_key="any-key", base_url=proxy_server.url, timeout=CALL_SECONDS)


@pytest.fixture(scope="session")
def cohere_v1_client(proxy_server: Server) -> Any:
    import cohere

    return cohere.Client(api_key="any-key", base_url=proxy_server.url, timeout=CALL_SECONDS)


# --------------------------------------------------------------------------------------------
# What the tests send.
# --------------------------------------------------------------------------------------------

QUERY = "what is the capital of france"
DOCUMENTS = [
    "paris is the capital of france",
    "Grüße aus Köln: 東京の天気は晴れ 🙂",
    "the cat sat in the garden while it rained",
    "berlin is the capital of germany",
    "",  # blank documents are valid and scored
    "python proxy rerank infinity model score",
]
INSTRUCTION = "prefer the document that names a city"
LONG_DOCUMENT = " ".join(["the weather in tokyo is sunny and the river is long"] * 6
                         + ["paris is the capital of france and its first city"] * 4)


def ranking(results: list[Any]) -> list[tuple[int, float]]:
    return [(result["index"], result["relevance_score"]) for result in results]


def assert_same_ranking(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [index for index, _ in got] == [index for index, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-6)


# --------------------------------------------------------------------------------------------
# The scores are the model's own.
# --------------------------------------------------------------------------------------------


def test_results_are_ordered_by_score(proxy_server: Server) -> None:
    answer = rerank(proxy_server.url, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    scores = [score for _, score in ranking(answer["results"])]
    assert len(set(scores)) == len(DOCUMENTS)  # no ties: the order is the model's alone
    assert scores == sorted(scores, reverse=True)


def test_a_long_document_scores_as_its_best_chunk(chunking_proxy: Server,
                                                  logit_margin: Callable[[str], float]) -> None:
    chunks = proxy.chunks_of(LONG_DOCUMENT, CHUNK_CHARS, proxy.Config().max_chunks_per_doc)
    assert len(chunks) > 2
    answer = rerank(chunking_proxy.url, "/v1/rerank", {"query": QUERY, "documents": [LONG_DOCUMENT]})
    best = max(sigmoid(logit_margin(library_prompt(QUERY, chunk))) for chunk in chunks)
    whole = sigmoid(logit_margin(library_prompt(QUERY, LONG_DOCUMENT)))
    assert answer["results"][0]["relevance_score"] == pytest.approx(best, abs=SCORE_TOLERANCE)
    assert best != pytest.approx(whole, abs=SCORE_TOLERANCE)  # so this measures the chunking


# --------------------------------------------------------------------------------------------
# Real clients get the proxy's ranking.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_documents", [True, False])
@pytest.mark.parametrize("top_n", [None, 3])
def test_litellm_infinity_provider_gets_the_proxys_ranking(
        proxy_server: Server, served_model: str, litellm_rerank: Callable[..., Any],
        return_documents: bool, top_n: int | None) -> None:
    direct = rerank(proxy_server.url, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": top_n})
    # That provider calls {api_base}/rerank.
    response = litellm_rerank(model=f"infinity/{served_model}", query=QUERY, documents=DOCUMENTS, top_n=top_n,
                              return_documents=return_documents, api_base=proxy_server.url + "/v1",
                              timeout=CALL_SECONDS)
    assert_same_ranking(ranking(response.results), ranking(direct["results"]))
    documents = [result.get("document") for result in response.results]
    if return_documents:
        # That provider wraps a string document as {"text": ...} and drops a falsy one (the blank).
        assert documents == [{"text": DOCUMENTS[i]} if DOCUMENTS[i] else None for i, _ in ranking(direct["results"])]
    else:
        assert documents == [None] * len(documents)


@pytest.mark.parametrize("return_documents", [True, False])
@pytest.mark.parametrize("top_n", [None, 3])
def test_litellm_cohere_provider_gets_the_proxys_ranking(
        proxy_server: Server, served_model: str, litellm_rerank: Callable[..., Any],
        return_documents: bool, top_n: int | None) -> None:
    direct = rerank(proxy_server.url, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": top_n})
    # Without Cohere v1 fields, that provider calls {api_base}/v2/rerank.
    response = litellm_rerank(model=f"cohere/{served_model}", query=QUERY, documents=DOCUMENTS, top_n=top_n,
                              return_documents=return_documents, api_base=proxy_server.url,
                              api_key="any-key", timeout=CALL_SECONDS)
    assert_same_ranking(ranking(response.results), ranking(direct["results"]))
    documents = [result.get("document") for result in response.results]
    if return_documents:
        assert documents == [{"text": DOCUMENTS[i]} for i, _ in ranking(direct["results"])]
    else:
        assert documents == [None] * len(documents)


@pytest.mark.xfail(strict=True, reason=(
    "LiteLLM's cohere/ provider calls /v1/rerank when given max_chunks_per_doc, and validates the answer "
    "as Cohere's: it rejects the Infinity shape's null or string 'document' (pydantic dict_type)"))
@pytest.mark.parametrize("return_documents", [True, False])
def test_litellm_cohere_provider_with_max_chunks_per_doc_gets_the_proxys_ranking(
        proxy_server: Server, served_model: str, litellm_rerank: Callable[..., Any],
        return_documents: bool) -> None:
    body = {"query": QUERY, "documents": DOCUMENTS, "max_chunks_per_doc": 2}
    direct = rerank(proxy_server.url, "/v1/rerank", body)
    response = litellm_rerank(model=f"cohere/{served_model}", query=QUERY, documents=DOCUMENTS,
                              max_chunks_per_doc=2, return_documents=return_documents,
                              api_base=proxy_server.url, api_key="any-key", timeout=CALL_SECONDS)
    assert_same_ranking(ranking(response.results), ranking(direct["results"]))


@pytest.mark.parametrize("return_documents", [True, False])
def test_litellm_cohere_provider_with_max_chunks_per_doc_works_with_a_v2_api_base(
        proxy_server: Server, served_model: str, litellm_rerank: Callable[..., Any],
        return_documents: bool) -> None:
    # The README's workaround: an api_base ending in /v2/rerank keeps that provider on Cohere's v2.
    body = {"query": QUERY, "documents": DOCUMENTS, "max_chunks_per_doc": 2}
    direct = rerank(proxy_server.url, "/v2/rerank", body)
    response = litellm_rerank(model=f"cohere/{served_model}", query=QUERY, documents=DOCUMENTS,
                              max_chunks_per_doc=2, return_documents=return_documents,
                              api_base=proxy_server.url + "/v2/rerank", api_key="any-key", timeout=CALL_SECONDS)
    assert_same_ranking(ranking(response.results), ranking(direct["results"]))


@pytest.mark.parametrize("top_n", [None, 3])
def test_cohere_v2_client_gets_the_proxys_ranking(proxy_server: Server, served_model: str,
                                                  cohere_v2_client: Any, top_n: int | None) -> None:
    direct = rerank(proxy_server.url, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": top_n})
    response = cohere_v2_client.rerank(model=served_model, query=QUERY, documents=DOCUMENTS, top_n=top_n)
    got = [(result.index, result.relevance_score) for result in response.results]
    assert_same_ranking(got, ranking(direct["results"]))


@pytest.mark.parametrize("return_documents", [True, False])
def test_cohere_v1_client_gets_the_proxys_ranking(proxy_server: Server, served_model: str,
                                                  cohere_v1_client: Any, return_documents: bool) -> None:
    direct = rerank(proxy_server.url, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 4})
    response = cohere_v1_client.rerank(model=served_model, query=QUERY, documents=DOCUMENTS, top_n=4,
                                       return_documents=return_documents)
    got = [(result.index, result.relevance_score) for result in response.results]
    assert_same_ranking(got, ranking(direct["results"]))
    # /v1/rerank gives a string document back as a string (the contract, for LiteLLM's infinity/);
    # the SDK, which does not validate, passes it on where its type promises an object with .text.
    expected = [DOCUMENTS[index] if return_documents else None for index, _ in got]
    assert [result.document for result in response.results] == expected


def test_models_route_lists_the_tiny_model_through_the_proxy(proxy_server: Server, tiny_model: Path) -> None:
    status, answer = http_json("GET", proxy_server.url + "/v1/models")
    assert status == 200
    # Infinity names a model by the last two parts of its path, not by the whole path.
    assert [model["id"] for model in answer["data"]] == ["/".join(tiny_model.parts[-2:])]
    assert answer["data"][0]["capabilities"] == ["classify"]


# --------------------------------------------------------------------------------------------
# Infinity's key, end to end.
# --------------------------------------------------------------------------------------------


def test_the_clients_key_reaches_a_keyed_infinity(proxy_to_keyed_infinity: Server, served_model: str,
                                                  litellm_rerank: Callable[..., Any],
                                                  logit_margin: Callable[[str], float]) -> None:
    response = litellm_rerank(model=f"infinity/{served_model}", query=QUERY, documents=DOCUMENTS[:2],
                              api_base=proxy_to_keyed_infinity.url + "/v1", api_key=INFINITY_KEY,
                              timeout=CALL_SECONDS)
    assert sorted(index for index, _ in ranking(response.results)) == [0, 1]
    for index, score in ranking(response.results):
        assert score == pytest.approx(sigmoid(logit_margin(library_prompt(QUERY, DOCUMENTS[index]))),
                                      abs=SCORE_TOLERANCE)


@pytest.mark.parametrize("authorization", [f"Bearer {INFINITY_KEY}-wrong", None], ids=["wrong", "missing"])
def test_a_wrong_or_missing_key_gets_the_proxys_401(proxy_to_keyed_infinity: Server,
                                                    authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    status, answer = http_json("POST", proxy_to_keyed_infinity.url + "/v1/rerank",
                               {"query": QUERY, "documents": DOCUMENTS[:2]}, headers)
    assert status == 401
    assert answer == {"error": {"message": answer["error"]["message"], "type": "authentication_error",
                                "param": None, "code": 401}}
    assert "Unauthorized" in answer["error"]["message"]  # Infinity's own word, inside the proxy's answer


# --------------------------------------------------------------------------------------------
# The fixture's promise to the benchmark.
# --------------------------------------------------------------------------------------------


def test_the_same_seed_builds_the_same_model(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_mxbai_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
