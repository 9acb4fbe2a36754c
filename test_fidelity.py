"""The fidelity tier: the proxy's scores, through a real Infinity, are mixedbread's own.

The reference is mixedbread's library, `mxbai-rerank` (`MxbaiRerankV2`), scoring a tiny causal
`Qwen2ForCausalLM` built offline here with a Qwen2-like tokenizer (Qwen2's own pre-tokenizer pattern,
NFC, `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`). Infinity serves that model's two-label conversion,
made by `scripts/convert_causal_to_seq.py` as a user makes it, at Infinity's default batch size and with
`--batch-size 1`; the proxy runs as a user starts it. Nothing here uses the proxy's own prompt code for
an expected score: the library builds its prompts, tokenizes them and reads its logits itself.

The library tokenizes the query part and the document part on their own; Infinity tokenizes the whole
prompt. Where a part ends in punctuation or whitespace, its last piece merges with the template's newline
(`?\\n`, `.\\n`, ` \\n`), and no text a proxy can send gives the library's token ids. Such pairs are listed
here (BOUNDARY), and held to the model's own score of the whole prompt as the library writes it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import LOCAL_HTTP, proxy
from tests.helpers import (
    CALL_SECONDS,
    CONTEXT_TOKENS,
    FIDELITY_PACKAGES,
    HARD_CASES,
    LOG_ODDS_TOLERANCE,
    PASSAGES,
    QUERIES,
    Case,
    Library,
    Server,
    build_tiny_causal_reranker,
    convert,
    log_odds_approx,
    missing_packages,
    offline_tier,
    ok_json,
    order_of,
    rerank,
    rerank_body,
    running_infinity,
    running_proxy,
    scores_by_index,
    sigmoid,
)

pytestmark = pytest.mark.e2e


PROBABILITY_TOLERANCE = 1e-4  # relevance_score against sigmoid(the library's score)
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SEQ, SEQ_IM_END, SEQ_NO_PAD = "tiny-mxbai-seq", "tiny-mxbai-seq-imend", "tiny-mxbai-seq-nopad"

# --------------------------------------------------------------------------------------------
# What the tests send. Realistic queries and passages; then the hard ones.
# --------------------------------------------------------------------------------------------

INSTRUCTION = "Prefer passages that name a city"


BOUNDARY = [case.name for case in HARD_CASES if case.boundary]


# --------------------------------------------------------------------------------------------
# The tiny causal model, its conversions, and mixedbread's library on it.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    causal: Path
    seq: Path  # pads with <|endoftext|>: the anchor works
    seq_im_end: Path  # pads with <|im_end|>: the self-check finds that anchor instead
    seq_no_pad: Path  # no pad token: served only one input at a time, it reads whatever anchor comes last


@pytest.fixture(scope="module", autouse=True)
def fidelity_world() -> Iterator[None]:
    yield from offline_tier("the fidelity tier", missing_packages(*FIDELITY_PACKAGES), " (mxbai-rerank comes from requirements-fidelity.txt)")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("fidelity")
    causal = build_tiny_causal_reranker(root / "causal")
    seq_no_pad = convert(causal, root / "seq-nopad")
    config_path = seq_no_pad / "config.json"
    config = json.loads(config_path.read_text())
    config["pad_token_id"] = None  # what a conversion that never set one leaves
    config_path.write_text(json.dumps(config))
    return Models(causal, convert(causal, root / "seq"), convert(causal, root / "seq-imend", "--pad-token", IM_END),
                  seq_no_pad)


@pytest.fixture(scope="module")
def library(models: Models) -> Library:
    return Library(models.causal)


# --------------------------------------------------------------------------------------------
# Infinity, twice (its default batch size, and one input at a time), and a proxy in front of each.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batched_infinity(models: Models, logs: Path) -> Iterator[Server]:
    """Infinity's default batch size (32): concurrent inputs are padded into one batch."""
    yield from running_infinity([(models.seq, SEQ), (models.seq_im_end, SEQ_IM_END)], logs, "infinity-batched")


@pytest.fixture(scope="module")
def single_infinity(models: Models, logs: Path) -> Iterator[Server]:
    """--batch-size 1: the only way Infinity can serve a classifier without a pad token."""
    yield from running_infinity([(models.seq, SEQ), (models.seq_no_pad, SEQ_NO_PAD)], logs, "infinity-single",
                                "--batch-size", "1")


@pytest.fixture(scope="module")
def batched_proxy(batched_infinity: Server, logs: Path) -> Iterator[Server]:
    yield from running_proxy(batched_infinity.url, logs, "proxy-batched", "--model", SEQ)


@pytest.fixture(scope="module")
def single_proxy(single_infinity: Server, logs: Path) -> Iterator[Server]:
    yield from running_proxy(single_infinity.url, logs, "proxy-single", "--model", SEQ)


@pytest.fixture(scope="module", params=["batched", "single"])
def proxy_server(request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue(f"{request.param}_proxy")


ROUTES = [("/v1/rerank", "documents"), ("/v2/rerank", "documents"), ("/rerank", "documents"), ("/rerank", "texts")]


# --------------------------------------------------------------------------------------------
# The scores are the library's.
# --------------------------------------------------------------------------------------------


FIDELITY_FIGURES = Path("/tmp/proxy-fidelity-gaps.json")  # the README's "worst gap" figures, per run


@pytest.fixture(scope="module")
def worst_gaps() -> Iterator[dict[str, float]]:
    """The largest |relevance_score - sigmoid(library score)| seen per batch mode and route, written out."""
    gaps: dict[str, float] = {}
    yield gaps
    FIDELITY_FIGURES.write_text(json.dumps(gaps, indent=1, sort_keys=True))


@pytest.mark.parametrize(("path", "field"), ROUTES)
def test_relevance_is_the_sigmoid_of_the_librarys_score_in_its_order(
        proxy_server: Server, library: Library, path: str, field: str, worst_gaps: dict[str, float],
        request: pytest.FixtureRequest) -> None:
    key = f"{request.node.callspec.id.split('-')[0]} {path} {field}"
    for query in QUERIES:
        answer = rerank(proxy_server.url, path, rerank_body(field, query, PASSAGES))
        expected = library.rank(query, PASSAGES)
        got = scores_by_index(answer)
        assert order_of(answer) == [index for index, _ in expected], query
        for index, score in expected:
            assert got[index] == pytest.approx(sigmoid(score), abs=PROBABILITY_TOLERANCE), (query, index)
            worst_gaps[key] = max(worst_gaps.get(key, 0.0), abs(got[index] - sigmoid(score)))
    assert max(score for _, score in expected) - min(score for _, score in expected) > 2  # not saturated, not flat
    # Infinity lists each item's labels by score: some answers start with label "0", some with "1".
    assert min(got.values()) < 0.5 < max(got.values())


@pytest.mark.parametrize(("path", "field"), ROUTES)
def test_raw_scores_are_the_librarys_score(proxy_server: Server, library: Library, path: str, field: str) -> None:
    query = QUERIES[1]
    answer = rerank(proxy_server.url, path, rerank_body(field, query, PASSAGES, raw_scores=True))
    got = scores_by_index(answer)
    for index, score in library.rank(query, PASSAGES):
        assert got[index] == log_odds_approx(score)


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("top_n", [1, 3])
def test_top_n_is_the_librarys_top_k(proxy_server: Server, library: Library, path: str, top_n: int) -> None:
    answer = rerank(proxy_server.url, path, {"query": QUERIES[2], "documents": PASSAGES, "top_n": top_n})
    expected = library.rank(QUERIES[2], PASSAGES, top_k=top_n)
    assert [(r["index"], r["relevance_score"]) for r in answer["results"]] == [
        (index, pytest.approx(sigmoid(score), abs=PROBABILITY_TOLERANCE)) for index, score in expected]


@pytest.mark.parametrize(("path", "field"), ROUTES)
def test_the_instruction_is_the_librarys_instruction(proxy_server: Server, library: Library, path: str,
                                                     field: str) -> None:
    query = QUERIES[0]
    answer = rerank(proxy_server.url, path, rerank_body(field, query, PASSAGES, instruction=INSTRUCTION))
    got = scores_by_index(answer)
    with_it, without = library.scores(query, PASSAGES, INSTRUCTION), library.scores(query, PASSAGES)
    for index in range(len(PASSAGES)):
        assert got[index] == pytest.approx(sigmoid(with_it[index]), abs=PROBABILITY_TOLERANCE)
    assert max(abs(a - b) for a, b in zip(with_it, without, strict=True)) > 10 * LOG_ODDS_TOLERANCE  # the line matters


def test_the_boundary_pairs_are_exactly_the_listed_ones(library: Library) -> None:
    """The tokenization boundary, measured: which hard pairs the library tokenizes differently from the
    whole prompt. Every other pair's ids are the library's to the token."""
    measured = [case.name for case in HARD_CASES
                if library.library_ids(case.query, case.document) != library.whole_ids(case.query, case.document)]
    assert measured == BOUNDARY


@pytest.mark.parametrize("case", HARD_CASES, ids=lambda case: case.name)
def test_hard_text_scores_as_the_library_or_across_the_boundary_as_the_whole_prompt(
        proxy_server: Server, library: Library, case: Case) -> None:
    documents = [case.document, PASSAGES[0]]
    for path, field in ROUTES:
        got = scores_by_index(rerank(proxy_server.url, path, rerank_body(field, case.query, documents, raw_scores=True)))
        whole = library.whole_score(case.query, case.document)
        assert got[0] == log_odds_approx(whole), path  # the model, on what Infinity receives
        if not case.boundary:
            assert got[0] == log_odds_approx(library.scores(case.query, documents)[0]), path


def test_two_hundred_documents_in_one_request_score_as_the_library(proxy_server: Server, library: Library) -> None:
    rng = random.Random(7)
    words = " ".join(PASSAGES).split()  # some end in "," or carry a "." : those documents cross the boundary
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 30))) for _ in range(200)]
    answer = rerank(proxy_server.url, "/v1/rerank", {"query": QUERIES[0], "documents": documents, "raw_scores": True})
    expected = library.rank(QUERIES[0], documents)
    got = scores_by_index(answer)
    assert len(got) == 200
    across = {i for i, d in enumerate(documents) if library.library_ids(QUERIES[0], d) != library.whole_ids(QUERIES[0], d)}
    assert across == {i for i, d in enumerate(documents) if not d[-1].isalnum()}  # the boundary, and only there
    for index, score in expected:
        reference = library.whole_score(QUERIES[0], documents[index]) if index in across else score
        assert got[index] == log_odds_approx(reference), index
    same = [index for index, _ in expected if index not in across]
    assert [index for index in order_of(answer) if index not in across] == same or min(
        abs(got[a] - got[b]) for a, b in itertools.pairwise(same)) < 2 * LOG_ODDS_TOLERANCE  # a near-tie may swap


def test_concurrent_requests_that_infinity_batches_together_score_as_the_library(
        batched_proxy: Server, library: Library) -> None:
    bodies = [{"query": query, "documents": PASSAGES[i % 3:], "raw_scores": True} for i, query in enumerate(QUERIES * 2)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: rerank(batched_proxy.url, "/v2/rerank", body), bodies))
    for body, answer in zip(bodies, answers, strict=True):
        got = scores_by_index(answer)
        for index, score in library.rank(body["query"], body["documents"]):
            assert got[index] == log_odds_approx(score)


# --------------------------------------------------------------------------------------------
# The self-check: the anchor a model skips, found; a model that skips none, reported.
# --------------------------------------------------------------------------------------------


def test_a_model_that_pads_with_endoftext_is_checked_ok(batched_proxy: Server) -> None:
    rerank(batched_proxy.url, "/v1/rerank", {"query": "q", "documents": ["d"], "model": SEQ})
    report = ok_json("GET", batched_proxy.url + "/health")["models"][SEQ]
    assert report == {"template": "mxbai-rerank-v2", "anchor": EOT, "template_check": "ok"}


def test_a_model_that_pads_with_another_token_gets_that_anchor_and_the_librarys_scores(
        batched_proxy: Server, library: Library) -> None:
    query = QUERIES[3]
    answer = rerank(batched_proxy.url, "/v1/rerank", {"query": query, "documents": PASSAGES, "model": SEQ_IM_END,
                                                "raw_scores": True})
    got = scores_by_index(answer)
    for index, score in library.rank(query, PASSAGES):
        assert got[index] == log_odds_approx(score)
    report = ok_json("GET", batched_proxy.url + "/health")["models"][SEQ_IM_END]
    assert report == {"template": "mxbai-rerank-v2", "anchor": IM_END, "template_check": "ok"}
    assert metric(batched_proxy, "rerank_proxy_template_check", SEQ_IM_END) == 1.0


def metric(server: Server, name: str, model: str) -> float:
    with LOCAL_HTTP.open(server.url + "/metrics", timeout=CALL_SECONDS) as response:
        text = response.read().decode()
    pattern = rf'^{name}\{{model="{re.escape(model)}",template="mxbai-rerank-v2"\}} (\S+)$'
    (value,) = re.findall(pattern, text, re.MULTILINE)
    return float(value)


@pytest.fixture(scope="module")
def no_pad_proxy(single_infinity: Server, logs: Path) -> Iterator[Server]:
    yield from running_proxy(single_infinity.url, logs, "proxy-no-pad", "--model", SEQ_NO_PAD)


def test_a_model_without_a_pad_token_is_reported_and_still_served(no_pad_proxy: Server, logs: Path) -> None:
    # /ready runs the check of --model; the proxy started by running_proxy has answered it already.
    info = ok_json("GET", no_pad_proxy.url + "/info")
    assert info["template_check"].startswith("failed")
    assert ok_json("GET", no_pad_proxy.url + "/health")["models"][SEQ_NO_PAD]["template_check"].startswith("failed")
    assert metric(no_pad_proxy, "rerank_proxy_template_check", SEQ_NO_PAD) == 0.0
    log = (logs / "proxy-no-pad.log").read_text()
    (warning,) = [line for line in log.splitlines() if " WARNING " in line]
    assert SEQ_NO_PAD in warning and "pad_token_id" in warning and "config.json" in warning
    answer = rerank(no_pad_proxy.url, "/v1/rerank", {"query": "q", "documents": ["a", "b"]})  # the operator decides
    assert sorted(order_of(answer)) == [0, 1]


# --------------------------------------------------------------------------------------------
# No prompt outgrows the model: counted by the model's own tokenizer.
# --------------------------------------------------------------------------------------------

CJK = "東京都は日本の首都であり、世界有数の大都市である。"
EMOJI = "🌞🙂👩‍👩‍👧‍👦🇯🇵"


@pytest.mark.parametrize("tokenizer", [False, True], ids=["utf-8 bound", "--tokenizer"])
@pytest.mark.parametrize("text", [CJK, EMOJI, "ordinary words and sentences. "], ids=["CJK", "emoji", "ASCII"])
def test_every_prompt_fits_the_models_context_at_the_defaults(models: Models, tokenizer: bool, text: str) -> None:
    from transformers import AutoTokenizer

    model_tokenizer = AutoTokenizer.from_pretrained(models.seq)
    config = proxy.Config(tokenizer=str(models.seq / "tokenizer.json") if tokenizer else "")
    counter = proxy.TokenCounter.from_file(config.tokenizer)
    query, document = (text * 4000)[: config.max_query_chars], (text * 8000)[: config.max_doc_chars * 3]
    for instruction in ("", (text * 100)[:300]):
        body = {"query": query, "documents": [document, "short"], "instruction": instruction}
        request = proxy.parse_rerank(body, config)
        plan = proxy.plan_prompts(request, config, counter)
        inputs = [text for call, _ in proxy.classify_bodies("m", plan, config.batch_size)
                  for text in json.loads(call)["input"]]
        lengths = [len(model_tokenizer(text.strip(), add_special_tokens=False)["input_ids"]) for text in inputs]
        assert max(lengths) <= CONTEXT_TOKENS
        assert all(text.endswith(proxy.DEFAULT_TEMPLATE.tail + EOT) for text in inputs)  # nothing cut
        assert len(inputs) > 2  # the long document was chunked


def test_with_the_models_tokenizer_a_document_utf8_cannot_carry_is_a_400_and_a_long_one_is_cut_to_its_tokens(
        models: Models) -> None:
    from tokenizers import Tokenizer

    config = proxy.Config(tokenizer=str(models.seq / "tokenizer.json"))
    counter = proxy.TokenCounter.from_file(config.tokenizer)
    request = proxy.parse_rerank({"query": "q", "documents": ["a b " * 5000 + "\ud800"]}, config)
    plan = proxy.plan_prompts(request, config, counter)  # the tokenizer cannot take the text: counted in bytes
    with pytest.raises(proxy.RerankError) as refused:
        proxy.classify_bodies("m", plan, config.batch_size)
    assert (refused.value.status, refused.value.param) == (400, "documents[0]")
    long_document = "the weather in tokyo is sunny " * 150_000  # 4.5 MB: only its first tokens are tokenized
    request = proxy.parse_rerank({"query": "q", "documents": [long_document], "max_tokens_per_doc": 10}, config)
    [kept] = proxy.plan_prompts(request, config, counter).unique_texts
    assert long_document.startswith(kept) and 0 < len(Tokenizer.from_file(config.tokenizer).encode(kept).ids) <= 10
