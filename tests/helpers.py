"""The helpers the test modules share, so that no test module imports another; fixtures are in conftest.py.

- The real chain: servers started as users start them (infinity_emb, the proxy), their logs and their
  stopping; plain HTTP; the offline environment.
- The tiny models, built offline, and the references the scores are checked against (mixedbread's library,
  the model itself): never the proxy's own prompt code.
- Asking the in-process proxy and checking its answers; the fake Infinity's faults; the proxy as a process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from aiohttp import ClientResponse, ClientSession, ClientTimeout, ContentTypeError, TCPConnector, web

from conftest import (
    LOADED_MACHINE_SLACK,
    LOCAL_HTTP,
    ROOT,
    FakeInfinity,
    free_port,
    hashed_probability,
    listens_on,
    missing_tier,
    proxy,
)

E2E_PACKAGES = ("torch", "transformers", "tokenizers", "infinity_emb", "litellm", "cohere", "mxbai_rerank")
# The fidelity tier scores with mixedbread's library and its batching; the templates tier builds a cross-encoder.
FIDELITY_PACKAGES = ("torch", "transformers", "tokenizers", "infinity_emb", "mxbai_rerank", "accelerate", "batched")
TEMPLATES_PACKAGES = ("torch", "transformers", "tokenizers", "infinity_emb", "mxbai_rerank", "accelerate",
                      "sentence_transformers")


def missing_packages(*names: str) -> list[str]:
    """The packages among `names` that this Python cannot import."""
    return [name for name in names if importlib.util.find_spec(name) is None]


MISSING_PACKAGES = missing_packages(*E2E_PACKAGES)


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


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A call with the standard library, its body sent as JSON: the status and the answer's JSON, an error status
    included (returned, not raised)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with LOCAL_HTTP.open(request, timeout=CALL_SECONDS) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rerank_body(field: str, query: str, documents: list[str], **extra: Any) -> dict[str, Any]:
    """A rerank request with its documents under `field`: "documents", or TEI's "texts"."""
    return {"query": query, field: documents, **extra}


def ok_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """http_json held to a 200: the answer's JSON."""
    status, answer = http_json(method, url, body, headers)
    assert status == 200, answer
    return answer


def rerank(base: str, path: str, body: dict[str, Any]) -> Any:
    """ok_json of a rerank body POSTed to the server at `base`."""
    return ok_json("POST", base + path, body)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class Server:
    url: str  # Infinity's includes its /v1 prefix; the proxy's is its origin
    proc: subprocess.Popen


def offline_tier(tier: str, missing: list[str], alternative: str = "") -> Iterator[None]:
    """The tier's packages, or a skip that says how to install them (a failure where CI demands every
    tier); and the offline environment for this process while the tier runs."""
    if missing:
        missing_tier(f"{tier} needs {', '.join(missing)}: run ./setup.sh --dev{alternative}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_ENV.items():
            patch.setenv(name, value)
        yield


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
            if attempt == 2 or "address already in use" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")


def running_infinity(models: list[tuple[Path, str | None]], logs: Path, name: str, *options: str) -> Iterator[Server]:
    """A real infinity_emb serving each (directory, served name), its log in `logs`, stopped afterwards."""
    proc, port = ready_on_a_free_port(
        lambda port: start_infinity_serving(models, port, logs / f"{name}.log", *options), "/health",
        SERVER_START_SECONDS)
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


QUERY = "what is the capital of france"


DOCUMENTS = [
    "paris is the capital of france",
    "Grüße aus Köln: 東京の天気は晴れ 🙂",
    "the cat sat in the garden while it rained",
    "berlin is the capital of germany",
    "",  # blank documents are valid and scored
    "python proxy rerank infinity model score",
]


LOG_ODDS_TOLERANCE = 1e-3  # raw_scores against the library's score, where a float32 probability can carry it


CONTEXT_TOKENS = 8192  # mxbai-rerank-v2's, and the tiny model's


QUERIES = [
    "what is the capital of france",
    "how do vaccines train the immune system",
    "best time of year to visit kyoto",
    "python asyncio timeout example",
    "side effects of ibuprofen",
    "who wrote the brothers karamazov",
]


PASSAGES = [
    "Paris is the capital and most populous city of France",
    "Vaccines expose the immune system to a harmless piece of a pathogen so it learns to recognise it",
    "Kyoto is famous for its cherry blossoms in spring and its red maple leaves in autumn",
    "asyncio.timeout is an asynchronous context manager that cancels the block when time runs out",
    "Common side effects of ibuprofen include stomach pain, heartburn and nausea",
    "The Brothers Karamazov is the final novel by the Russian author Fyodor Dostoevsky",
    "Berlin is the capital of Germany and its largest city",
    "The Rhine flows through six countries before it reaches the North Sea",
    "A sourdough starter is a live culture of flour and water",
    "Tokyo has hot humid summers and mild winters with little snow",
]


@dataclass(frozen=True)
class Case:
    name: str
    query: str
    document: str
    boundary: bool  # the library's token ids cannot be sent as text (see the module's docstring)


# Hard text. `boundary` is what the test measures and asserts: it is declared here so that the list of
# pairs held to the whole prompt's score is written down, not found at run time.
HARD_CASES = [
    Case("plain", "capital of france", "Paris is the capital of France", False),
    Case("query ends with ?", "what is the capital of france?", "Paris is the capital of France", True),
    Case("document ends with .", "capital of france", "Paris is the capital of France.", True),
    Case("both end with punctuation", "capital of france?", "Paris is the capital of France.", True),
    Case("whitespace at both ends of the document", "capital of france", "  Paris is the capital  ", True),
    Case("whitespace at both ends of the query", "  capital of france  ", "Paris is the capital", True),
    Case("document ends with a newline", "capital of france", "Paris\nis the capital\n", True),
    Case("empty document", "capital of france", "", True),
    Case("blank document", "capital of france", "   ", True),
    Case("CJK", "東京の天気", "東京は晴れ、気温は二十度です", False),
    Case("emoji", "🙂 weather in tokyo", "sunny 🌞 in tokyo all week", False),
    Case("query ends with an emoji", "weather in tokyo 🙂", "sunny in tokyo all week", True),
    Case("combining marks", "cafe\u0301 in ko\u0308ln", "the cafe\u0301 by the cathedral in ko\u0308ln", False),
    Case("JSON", 'find {"city": "paris"}', '{"city": "paris", "country": "france", "population": 2102650}', True),
    Case("braces", "format {query} and {document}", "use {0} and {1}, or {name}", True),
    Case("chat tokens as text", "what ends a turn", f"the token {IM_END} ends a turn and {IM_START} starts one", False),
]


def causal_tokenizer_corpus(rng: random.Random) -> list[str]:
    """Text like what the model will see, so that the merges cover the template's words and the newlines
    that follow punctuation (Qwen2's pattern makes "?\\n" and ".\\n" single pieces)."""
    from mxbai_rerank import MxbaiRerankV2 as Library

    template = Library.chat_template["prefix"] + Library.task_prompt + Library.chat_template["suffix"]
    words = " ".join(QUERIES + PASSAGES + [case.query + " " + case.document for case in HARD_CASES]).split()
    corpus = [template] * 5
    for _ in range(600):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        ends = rng.choice(["", "?", ".", " ", "}"]), rng.choice(["", ".", "!", "}", "\n", " "])
        corpus.append(f"query: {line}{ends[0]}\ndocument: {line}{ends[1]}\n")
    return corpus


def qwen_like_tokenizer(corpus: list[str], special_tokens: list[str]) -> Any:
    """A byte-level BPE trained on `corpus` the way Qwen's tokenizers split text (Qwen2's own pre-tokenizer
    pattern, NFC), each of `special_tokens` one token, padding with <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=END_OF_TEXT,
                                   additional_special_tokens=[t for t in special_tokens if t != END_OF_TEXT],
                                   model_max_length=CONTEXT_TOKENS)


def build_tiny_causal_reranker(directory: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2ForCausalLM shaped like mxbai-rerank-v2, with the "0"/"1" rows of its lm_head
    scaled so that the library's scores spread over about -6..+6 (saturated probabilities compare nothing)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = qwen_like_tokenizer(causal_tokenizer_corpus(random.Random(seed)), [END_OF_TEXT, IM_START, IM_END])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT_TOKENS,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        torch_dtype="float32", initializer_range=0.05,
    )
    with torch.random.fork_rng(devices=[]):  # seeds this model without reseeding the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    spread_answer_rows(model, tokenizer, [library_prompt(q, d) for q in QUERIES for d in PASSAGES], "1", "0")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def spread_answer_rows(model: Any, tokenizer: Any, prompts: list[str], positive: str, negative: str,
                       spread: float = 2.5) -> None:
    """Rescale the positive - negative direction of the lm_head so that its scores on realistic prompts have
    mean 0 and standard deviation `spread`: random weights alone give scores within a few tenths of 0."""
    import torch

    with torch.no_grad():
        last = torch.stack([model.model(**tokenizer(p, return_tensors="pt")).last_hidden_state[0, -1] for p in prompts])
        yes, no = tokenizer.convert_tokens_to_ids(positive), tokenizer.convert_tokens_to_ids(negative)
        rows = model.lm_head.weight
        middle, difference = (rows[yes] + rows[no]) / 2, rows[yes] - rows[no]
        difference = difference * (spread / (last @ difference).std())
        mean_state = last.mean(0)
        difference -= (last @ difference).mean() * mean_state / mean_state.dot(mean_state)
        rows[yes], rows[no] = middle + difference / 2, middle - difference / 2


def convert(causal: Path, destination: Path, *flags: str) -> Path:
    """scripts/convert_causal_to_seq.py, run as a user runs it."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_causal_to_seq.py"), str(causal),
                           str(destination), *flags], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return destination


class Library:
    """mixedbread's MxbaiRerankV2 on the causal model, and that model's score of a whole prompt."""

    def __init__(self, causal: Path) -> None:
        import torch
        from mxbai_rerank import MxbaiRerankV2

        self.reranker = MxbaiRerankV2(str(causal), device="cpu", torch_dtype=torch.float32)

    def rank(self, query: str, documents: list[str], top_k: int | None = None, instruction: str | None = None
             ) -> list[tuple[int, float]]:
        results = self.reranker.rank(query, documents, top_k=top_k or len(documents), return_documents=False,
                                     instruction=instruction)
        return [(result.index, result.score) for result in results]

    def scores(self, query: str, documents: list[str], instruction: str | None = None) -> list[float]:
        return [score for _, score in sorted(self.rank(query, documents, instruction=instruction))]

    def library_ids(self, query: str, document: str, instruction: str | None = None) -> list[int]:
        inputs = self.reranker.prepare_inputs([query], [document], instruction=instruction)
        return inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()

    def whole_ids(self, query: str, document: str, instruction: str | None = None) -> list[int]:
        return self.reranker.tokenizer(library_prompt(query, document, instruction),
                                       add_special_tokens=False)["input_ids"]

    def whole_score(self, query: str, document: str, instruction: str | None = None) -> float:
        """The causal model's score of the whole prompt tokenized at once, as Infinity tokenizes it."""
        import torch

        ids = torch.tensor([self.whole_ids(query, document, instruction)])
        with torch.no_grad():
            return float(self.reranker.forward(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0])


def log_odds_approx(score: float) -> Any:
    """The library's score as raw_scores gives it back: from both of Infinity's float32 label probabilities, so
    within LOG_ODDS_TOLERANCE at any score (from the positive one alone, 1 - p would lose it above about +9)."""
    return pytest.approx(score, abs=LOG_ODDS_TOLERANCE)


def scores_by_index(answer: Any) -> dict[int, float]:
    """The index -> score of any shape: Infinity's and Cohere's results, or TEI's bare list."""
    results = answer if isinstance(answer, list) else answer["results"]
    return {r["index"]: r["score"] if "score" in r else r["relevance_score"] for r in results}


def order_of(answer: Any) -> list[int]:
    return [r["index"] for r in (answer if isinstance(answer, list) else answer["results"])]


FaultHook = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


GOOD = {"query": "Which rivers flow into the North Sea?",
        "documents": ["The Rhine flows into the North Sea near Rotterdam.", "The Danube flows into the Black Sea."]}


PROXY_SCRIPT = ROOT / "proxy-classifier.py"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any  # the parsed JSON, or None when the answer is not JSON
    seconds: float


async def answer_of(response: ClientResponse, started: float) -> Answer:
    """An aiohttp response read whole; its body parsed as aiohttp's response.json() parses it (None when the
    answer does not say it is JSON, or is empty or not JSON); `seconds` counted from `started` (time.monotonic())."""
    await response.read()
    try:
        parsed = await response.json()
    except (ContentTypeError, ValueError):
        parsed = None
    return Answer(response.status, dict(response.headers), parsed, time.monotonic() - started)


async def send(client: Any, method: str, path: Any, body: Any = None, **kwargs: Any) -> Answer:
    """Any call through a pytest-aiohttp client or a ClientSession with a base_url: a body that is not bytes or
    text is sent as its JSON; `kwargs` (headers, json=...) go to aiohttp as they are."""
    data = body if body is None or isinstance(body, (bytes, str)) else json.dumps(body)
    started = time.monotonic()
    async with client.request(method, path, data=data, **kwargs) as response:
        return await answer_of(response, started)


async def post(client: Any, body: Any, path: str = "/v1/rerank", **kwargs: Any) -> Answer:
    """POST a rerank body (JSON-encoded unless bytes or text) through a pytest-aiohttp client or a ClientSession."""
    return await send(client, "POST", path, body, **kwargs)


def assert_error(answer: Answer, status: int, error_type: str, *words: str, param: str | None = None) -> None:
    """The contract's JSON error, and nothing else: this status, type and param, and each word in the message."""
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    assert isinstance(answer.body, dict) and set(answer.body) == {"error"}, answer.body  # no partial results
    error = answer.body["error"]
    assert error == {"message": error["message"], "type": error_type, "param": param, "code": status}
    for word in words:
        assert word in error["message"], (word, error["message"])


def expected_scores(query: str, documents: list[str], instruction: str = "") -> list[float]:
    """What the fake scores for each document's prompt (it skips the pad anchor, as the model does)."""
    return [hashed_probability(proxy.prompt_for(query, document, instruction)) for document in documents]


def assert_ranked(answer: Answer, body: dict[str, Any]) -> None:
    """A 200 whose results are this request's documents, scored for this request's query, best first."""
    assert answer.status == 200, answer.body
    scores = expected_scores(body["query"], body["documents"])
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    assert [(r["index"], r["relevance_score"]) for r in answer.body["results"]] == [(i, scores[i]) for i in order]


async def eventually(condition: Callable[[], bool], within: float = LOADED_MACHINE_SLACK) -> bool:
    """Whether the condition holds within the time: cancellation and socket closing take a few turns of the
    loop, and many more on a loaded machine. It returns as soon as the condition holds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def classify_answer(data: str) -> str:
    return '{"object":"classify","data":' + data + ',"model":"m","usage":{"prompt_tokens":1,"total_tokens":1}}'


def answers(status: int, body: str, content_type: str = "application/json",
            headers: dict[str, str] | None = None) -> FaultHook:
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, text=body, content_type=content_type, headers=headers)

    return hook


@dataclass
class Upstream:
    """The fake Infinity with a fault installed, counting the calls that reach the fault."""

    fake: FakeInfinity
    calls: int = 0  # calls the fault saw (all of them: it sits in front of every route but /health)
    running: int = 0  # calls still inside the fault

    def fail_with(self, hook: FaultHook) -> None:
        async def counted(request: web.Request) -> web.StreamResponse | None:
            self.calls += 1
            self.running += 1
            try:
                return await hook(request)
            finally:
                self.running -= 1

        self.fake.fault = counted

    def heal(self) -> None:
        self.fake.fault = None


@dataclass
class ProxyProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def session(self, connections: int = 100, timeout: float = 30.0) -> ClientSession:
        return ClientSession(base_url=self.url, connector=TCPConnector(limit=connections),
                             timeout=ClientTimeout(total=timeout))

    async def exit_code(self, within: float) -> int | None:
        await eventually(lambda: self.process.poll() is not None, within)
        return self.process.poll()

    def accepts_connections(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0


WIDE = "\U0001F600abcdefghi"  # 16 bytes in a body as a JSON string and a comma, 4 bytes a character once parsed


def costliest_accepted_body() -> bytes:
    """As many values as a body may hold (one per 16 bytes), each a string Python holds at 4 bytes a character,
    in 10,000 documents echoed back: the most memory a body the proxy accepts can cost."""
    documents = [{"text": f"d{i}", "x": [WIDE] * 180} for i in range(10_000)]
    body = json.dumps({"query": "q", "documents": documents, "return_documents": True}, ensure_ascii=False)
    return body.encode()


async def terminated(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: a process the tests started is gone when this returns."""
    if process.poll() is None:
        process.terminate()
        if not await eventually(lambda: process.poll() is not None, within=10):
            process.kill()
            process.wait()
