"""The fast tier: every promise of docs/api.md and docs/configuration.md, against a fake Infinity (conftest.py).

Each test is one promise, named for it. The fake answers like infinity_emb 0.0.78 as measured;
test_e2e.py checks the same chain against the real server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil
import pytest
import yaml
from aiohttp import web
from aioresponses import aioresponses
from yarl import URL

from conftest import (
    LOADED_MACHINE_SLACK,
    ROOT,
    SERVED_MODEL,
    document_in,
    free_port,
    hashed_probability,
    listens_on,
    proxy,
    tcp_connections,
)
from tests.helpers import GOOD, assert_error, eventually, post, send

QUERY = "What is the capital of the United States?"
DOCUMENTS = [
    "Carson City is the capital city of the American state of Nevada.",
    "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean. Its capital is Saipan.",
    "Washington, D.C. is the capital of the United States.",
    "Capital punishment has existed in the United States since before it was a country.",
]
# The prompt for DOCUMENTS[2], written out by hand from mxbai-rerank-v2's trained template.
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
    "query: What is the capital of the United States?\n"
    "document: Washington, D.C. is the capital of the United States.\n"
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def scores_by_document(fake: Any, table: dict[str, float], default: float = 0.5) -> None:
    """Make the fake score each prompt by the document inside it."""
    fake.score = lambda prompt: table.get(document_in(prompt), default)


# ---------------------------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------------------------


def test_prompt_is_mxbai_rerank_v2_trained_template_character_for_character() -> None:
    assert proxy.prompt_for(QUERY, DOCUMENTS[2]) == EXPECTED_PROMPT


def test_prompt_with_instruction_has_instruction_line_before_query() -> None:
    prompt = proxy.prompt_for("q", "d", "Find the legal passage")
    assert "<|im_start|>user\ninstruction: Find the legal passage\nquery: q\ndocument: d\nYou are" in prompt
    assert proxy.prompt_for("q", "d", "") == proxy.prompt_for("q", "d")


async def test_upstream_receives_the_exact_prompts(client: Any, fake_infinity: Any) -> None:
    answer = await post(client, {"query": QUERY, "documents": DOCUMENTS})
    assert answer.status == 200
    assert fake_infinity.inputs == [proxy.classify_input(QUERY, d) for d in DOCUMENTS]
    assert fake_infinity.inputs[2] == EXPECTED_PROMPT + "<|endoftext|>"
    assert fake_infinity.classify_bodies[0]["model"] == SERVED_MODEL


async def test_upstream_receives_instruction_from_request_or_default(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(instruction="Default instruction")
    await post(client, {"query": "q", "documents": ["d"]})
    await post(client, {"query": "q", "documents": ["d"], "instruction": "Own instruction"})
    await post(client, {"query": "q", "documents": ["d"], "instruction": ""})
    assert fake_infinity.inputs == [proxy.classify_input("q", "d", "Default instruction"),
                                    proxy.classify_input("q", "d", "Own instruction"), proxy.classify_input("q", "d")]


@pytest.mark.parametrize("text", ['quote " and \\ backslash', "line\nbreak\ttab", "unicode é 漢字 🦀", "nul \x00 char",
                                  "\u2028 separators \u2029", "</script>{}[]"])
def test_hand_written_classify_body_is_the_json_of_the_prompts(text: str) -> None:
    request = proxy.parse_rerank({"query": text, "documents": [text, "x"], "instruction": text}, proxy.Config())
    plan = proxy.plan_prompts(request, proxy.Config())
    [(body, inputs)] = proxy.classify_bodies("m", plan, 256)
    assert inputs == 2
    assert json.loads(body) == {"model": "m", "input": [proxy.classify_input(text, text, text),
                                                       proxy.classify_input(text, "x", text)]}


async def test_text_goes_into_the_prompt_verbatim_without_stripping(client: Any, fake_infinity: Any) -> None:
    await post(client, {"query": "  padded query \n", "documents": ["\tpadded doc  "]})
    assert fake_infinity.classify_bodies[0]["input"] == [proxy.classify_input("  padded query \n", "\tpadded doc  ")]


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


async def test_score_is_positive_label_probability_whatever_the_label_order(client: Any, fake_infinity: Any) -> None:
    # The fake, like Infinity, sorts labels by score: "1" comes first for 0.9 and last for 0.2.
    scores_by_document(fake_infinity, {"hi": 0.9, "lo": 0.2})
    answer = await post(client, {"query": "q", "documents": ["lo", "hi"]})
    assert answer.status == 200
    assert [(r["index"], r["relevance_score"]) for r in answer.body["results"]] == [(1, 0.9), (0, 0.2)]


def test_positive_probability_is_looked_up_by_label_name() -> None:
    answer = {"data": [[{"label": "0", "score": 0.7}, {"label": "1", "score": 0.3}],
                       [{"label": "1", "score": 0.6}, {"label": "0", "score": 0.4}]],
              "usage": {"prompt_tokens": 12, "total_tokens": 12}}
    assert proxy.positive_probabilities(answer, 2, "1") == ([0.3, 0.6], 12)
    assert proxy.positive_probabilities(answer, 2, "0") == ([0.7, 0.4], 12)


async def test_raw_scores_are_log_odds_of_the_positive_label(client: Any, fake_infinity: Any) -> None:
    scores_by_document(fake_infinity, {"a": 0.8, "b": 0.5, "c": 0.1})
    answer = await post(client, {"query": "q", "documents": ["a", "b", "c"], "raw_scores": True})
    assert answer.status == 200
    got = {r["index"]: r["relevance_score"] for r in answer.body["results"]}
    assert got[0] == pytest.approx(math.log(4))
    assert got[1] == pytest.approx(0.0)
    assert got[2] == pytest.approx(math.log(0.1 / 0.9))


async def test_raw_scores_near_certainty_keep_their_precision_from_the_other_label(
        client: Any, fake_infinity: Any) -> None:
    # Infinity's probabilities are float32: at a log-odds of 15, p rounds to 1.0 while the other label keeps its
    # own 3.059e-7 exactly. ln(p) - ln(1 - p) would say 27.6 (clamped); both sides say 15.
    fake_infinity.labels = lambda p1: [{"label": "1", "score": 1.0}, {"label": "0", "score": 3.059023205018258e-07}]
    answer = await post(client, {"query": "q", "documents": ["a"], "raw_scores": True})
    assert answer.status == 200
    assert answer.body["results"][0]["relevance_score"] == pytest.approx(15.0, abs=1e-6)
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert answer.body["results"][0]["relevance_score"] == 1.0


def test_raw_score_of_certainty_is_finite() -> None:
    assert proxy.log_odds(1.0) == pytest.approx(math.log(1 - 1e-12) - math.log(1e-12))
    assert proxy.log_odds(0.0) == pytest.approx(-proxy.log_odds(1.0))
    assert math.isfinite(proxy.log_odds(1.0))


async def test_results_sorted_by_score_and_ties_keep_lower_index_first(client: Any, fake_infinity: Any) -> None:
    scores_by_document(fake_infinity, {"a": 0.3, "b": 0.7, "c": 0.3, "d": 0.7, "e": 0.9})
    answer = await post(client, {"query": "q", "documents": ["a", "b", "c", "d", "e"]})
    assert [r["index"] for r in answer.body["results"]] == [4, 1, 3, 0, 2]


@pytest.mark.parametrize(("top_n", "expected"), [(None, 4), (0, 4), (-3, 4), (1, 1), (3, 3), (4, 4), (99, 4)])
async def test_top_n_keeps_the_best_n_and_means_all_when_absent_nonpositive_or_large(
        client: Any, fake_infinity: Any, top_n: int | None, expected: int) -> None:
    scores_by_document(fake_infinity, {d: s for d, s in zip(DOCUMENTS, [0.2, 0.1, 0.9, 0.4], strict=True)})
    body: dict[str, Any] = {"query": QUERY, "documents": DOCUMENTS}
    if top_n is not None:
        body["top_n"] = top_n
    answer = await post(client, body)
    assert [r["index"] for r in answer.body["results"]] == [2, 3, 0, 1][:expected]


async def test_null_optional_fields_mean_absent(client: Any) -> None:
    answer = await post(client, {
        "query": "q", "documents": ["a", "b"], "top_n": None, "return_documents": None, "model": None,
        "instruction": None, "raw_scores": None, "rank_fields": None, "max_chunks_per_doc": None,
        "max_tokens_per_doc": None})
    assert answer.status == 200
    assert len(answer.body["results"]) == 2
    assert answer.body["model"] == SERVED_MODEL
    assert all(r["document"] is None for r in answer.body["results"])


# ---------------------------------------------------------------------------------------------
# Answer shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
async def test_infinity_shaped_answer(client: Any, fake_infinity: Any, path: str) -> None:
    scores_by_document(fake_infinity, {d: s for d, s in zip(DOCUMENTS, [0.2, 0.1, 0.9, 0.4], strict=True)})
    before = int(time.time())
    answer = await post(client, {"query": QUERY, "documents": DOCUMENTS, "top_n": 2,
                                 "model": "michaelfeil/mxbai-rerank-large-v2-seq"}, path)
    assert answer.status == 200
    tokens = sum(len(p.strip()) for p in fake_infinity.inputs)  # the fake counts characters, as Infinity does
    assert answer.body["object"] == "rerank"
    assert answer.body["results"] == [{"relevance_score": 0.9, "index": 2, "document": None},
                                 {"relevance_score": 0.4, "index": 3, "document": None}]
    assert answer.body["model"] == "michaelfeil/mxbai-rerank-large-v2-seq"
    assert fake_infinity.classify_bodies[0]["model"] == "michaelfeil/mxbai-rerank-large-v2-seq"
    assert answer.body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert re.fullmatch(r"rerank-[0-9a-f-]{36}", answer.body["id"]) and uuid.UUID(answer.body["id"][7:]).version == 4
    assert before <= answer.body["created"] <= time.time() + 1
    assert answer.body["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 1},
                              "tokens": {"input_tokens": tokens, "output_tokens": 0}}
    assert list(answer.body) == ["object", "results", "model", "usage", "id", "created", "meta"]


async def test_cohere_v2_shaped_answer(client: Any, fake_infinity: Any) -> None:
    scores_by_document(fake_infinity, {d: s for d, s in zip(DOCUMENTS, [0.2, 0.1, 0.9, 0.4], strict=True)})
    answer = await post(client, {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}, "/v2/rerank")
    assert answer.status == 200
    tokens = sum(len(p.strip()) for p in fake_infinity.inputs)
    assert answer.body["results"] == [{"index": 2, "relevance_score": 0.9}, {"index": 3, "relevance_score": 0.4}]
    assert answer.body["model"] == SERVED_MODEL
    assert answer.body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert answer.body["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                              "tokens": {"input_tokens": tokens, "output_tokens": 0}}
    assert re.fullmatch(r"rerank-[0-9a-f-]{36}", answer.body["id"])
    assert set(answer.body) == {"id", "results", "model", "usage", "meta"}


async def test_return_documents_echoes_documents_as_given_on_v1(client: Any, fake_infinity: Any) -> None:
    documents = ["plain", {"text": "object", "id": 7}]
    scores_by_document(fake_infinity, {"plain": 0.9, "object": 0.1})
    answer = await post(client, {"query": "q", "documents": documents, "return_documents": True})
    assert [r["document"] for r in answer.body["results"]] == ["plain", {"text": "object", "id": 7}]


async def test_return_documents_gives_objects_on_v2(client: Any, fake_infinity: Any) -> None:
    documents = ["plain", {"text": "object", "id": 7}]
    scores_by_document(fake_infinity, {"plain": 0.9, "object": 0.1})
    answer = await post(client, {"query": "q", "documents": documents, "return_documents": True}, "/v2/rerank")
    assert [r["document"] for r in answer.body["results"]] == [{"text": "plain"}, {"text": "object", "id": 7}]


def test_search_units_are_per_hundred_documents_at_least_one() -> None:
    assert [proxy.search_units(n) for n in (0, 1, 100, 101, 250, 10_000)] == [1, 1, 1, 2, 3, 100]


async def test_usage_sums_prompt_tokens_over_calls_and_counts_missing_usage_as_zero(
        make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(batch_size=2)
    answer = await post(client, {"query": "q", "documents": ["a", "b", "c"]})
    assert len(fake_infinity.classify_bodies) == 2
    assert answer.body["usage"]["prompt_tokens"] == sum(len(p.strip()) for p in fake_infinity.inputs)
    answer_without_usage = {"data": [[{"label": "1", "score": 0.5}, {"label": "0", "score": 0.5}]]}
    assert proxy.positive_probabilities(answer_without_usage, 1, "1") == ([0.5], 0)


@pytest.mark.parametrize(("count", "counted"), [(7, 7), (0, 0), (2**64 - 1, 2**64 - 1), (-1, 0), (2**64, 0),
                                                (7.0, 0), ("7", 0), (True, 0), (None, 0)])
def test_a_prompt_token_count_that_is_no_count_adds_zero(count: Any, counted: int) -> None:
    answer = {"data": [[{"label": "1", "score": 0.5}]], "usage": {"prompt_tokens": count}}
    assert proxy.positive_probabilities(answer, 1, "1") == ([0.5], counted)


# ---------------------------------------------------------------------------------------------
# Documents as objects, rank_fields
# ---------------------------------------------------------------------------------------------


async def test_rank_fields_score_field_lines_in_the_given_order(client: Any, fake_infinity: Any) -> None:
    documents = [{"title": "Paris", "body": "Capital of France", "year": 2024, "tags": ["a", "b"]},
                 {"body": "only body"}, "a string document"]
    answer = await post(client, {"query": "q", "documents": documents,
                                 "rank_fields": ["title", "body", "tags"], "return_documents": True})
    assert answer.status == 200
    assert [document_in(p) for p in fake_infinity.inputs] == [
        'title: Paris\nbody: Capital of France\ntags: ["a","b"]', "body: only body", "a string document"]
    assert {r["index"]: r["document"] for r in answer.body["results"]}[0] == documents[0]


async def test_a_rank_field_named_twice_is_scored_once(client: Any, fake_infinity: Any) -> None:
    documents = [{"title": "Paris", "body": "Capital of France"}]
    answer = await post(client, {"query": "q", "documents": documents,
                                 "rank_fields": ["title", "body", "title", "body", "title"]})
    assert answer.status == 200
    assert [document_in(p.strip()) for p in fake_infinity.inputs] == ["title: Paris\nbody: Capital of France"]


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"rank_fields": [f"f{i}" for i in range(33)]}, "rank_fields", ["33 entries", "at most 32"]),
    ({"rank_fields": ["title"] * 400}, "rank_fields", ["400 entries", "at most 32"]),
    ({"rank_fields": ["title", "x" * 257]}, "rank_fields[1]", ["257 characters", "at most 256"]),
    ({"model": "m" * 257}, "model", ["257 characters", "at most 256"]),
    ({"instruction": "i" * 4001}, "instruction", ["4001 characters", "at most 4000"]),
], ids=["33 rank_fields", "one rank field 400 times", "a long rank field", "a long model", "a long instruction"])
async def test_a_field_that_would_multiply_memory_is_400_naming_it(
        client: Any, fake_infinity: Any, change: dict[str, Any], param: str, words: list[str]) -> None:
    body = {"query": "q", "documents": [{"title": "x" * 1000}], **change}
    answer = await post(client, body)
    assert_error(answer, 400, "invalid_request_error", *words, param=param)
    assert fake_infinity.classify_bodies == []


async def test_rank_fields_and_model_at_their_limits_are_served(client: Any, fake_infinity: Any) -> None:
    fields = [f"{i:0256d}" for i in range(32)]
    answer = await post(client, {"query": "q", "rank_fields": fields, "model": "m" * 256,
                                 "documents": [{fields[0]: "a", fields[31]: "b"}]})
    assert answer.status == 200 and answer.body["model"] == "m" * 256
    assert document_in(fake_infinity.inputs[0].strip()) == f"{fields[0]}: a\n{fields[31]}: b"


async def test_rank_fields_empty_list_is_the_same_as_absent(client: Any, fake_infinity: Any) -> None:
    await post(client, {"query": "q", "documents": [{"text": "t", "title": "x"}], "rank_fields": []})
    assert document_in(fake_infinity.inputs[0]) == "t"


async def test_rank_fields_document_with_none_of_them_is_400_naming_it(client: Any) -> None:
    answer = await post(client, {"query": "q", "documents": [{"title": "a"}, {"other": 1}],
                                 "rank_fields": ["title"]})
    assert_error(answer, 400, "invalid_request_error", "documents[1]", "rank_fields", param="documents[1]")


async def test_object_document_without_text_is_400_naming_it(client: Any) -> None:
    answer = await post(client, {"query": "q", "documents": ["ok", {"title": "no text"}]})
    assert_error(answer, 400, "invalid_request_error", "documents[1]", "text", param="documents[1]")


# ---------------------------------------------------------------------------------------------
# Long inputs: chunks, cuts, de-duplication, batches
# ---------------------------------------------------------------------------------------------


def test_chunks_end_after_last_whitespace_in_their_final_tenth() -> None:
    text = "a" * 95 + " " + "b" * 50  # the space is at index 95, inside the last tenth of 100
    assert proxy.chunks_of(text, 100, 10) == ["a" * 95 + " ", "b" * 50]


def test_chunks_are_cut_at_the_limit_without_whitespace_near_it() -> None:
    text = "a" * 50 + " " + "b" * 200  # whitespace only at index 50, not in the last tenth
    assert proxy.chunks_of(text, 100, 10) == [text[:100], text[100:200], text[200:]]


def test_chunks_do_not_overlap_and_only_the_first_are_kept() -> None:
    text = " ".join(f"w{i:04d}" for i in range(2000))
    chunks = proxy.chunks_of(text, 500, 10)
    assert len(chunks) == 10
    assert "".join(chunks) == text[: sum(len(c) for c in chunks)]
    assert all(len(c) <= 500 for c in chunks)
    assert proxy.chunks_of("short", 500, 10) == ["short"]


async def test_long_document_scores_as_its_best_chunk(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(max_doc_chars=100)
    long_doc = "x" * 100 + "best" + "y" * 96 + "z" * 50
    fake_infinity.score = lambda prompt: 0.95 if "best" in prompt else 0.25
    answer = await post(client, {"query": "q", "documents": ["short", long_doc]})
    assert answer.status == 200
    assert [document_in(p) for p in fake_infinity.inputs] == [
        "short", "x" * 100, "best" + "y" * 96, "z" * 50]
    assert answer.body["results"][0] == {"relevance_score": 0.95, "index": 1, "document": None}


async def test_no_prompt_exceeds_infinity_limit_or_loses_its_suffix(client: Any, fake_infinity: Any) -> None:
    spaced = " ".join(f"word{i}" for i in range(40_000))  # 308,889 characters: more than Infinity accepts
    unspaced = "".join(str(i) for i in range(30_000))  # 138,890 characters without any whitespace
    answer = await post(client, {"query": "q" * 10_000, "documents": [spaced, unspaced],
                                 "instruction": "i" * 4000})
    assert answer.status == 200
    assert fake_infinity.inputs
    for prompt in fake_infinity.inputs:
        assert len(prompt) <= 122_880
        assert prompt.endswith(proxy.DEFAULT_TEMPLATE.tail + proxy.PAD_ANCHOR)
    # Each document gave at most --max-chunks-per-doc (10) chunks of at most --max-doc-chars (8000).
    assert len(fake_infinity.inputs) == 20


async def test_max_chunks_per_doc_from_request_bounds_chunks(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(max_doc_chars=10)
    await post(client, {"query": "q", "documents": ["a" * 10 + "b" * 10 + "c" * 10], "max_chunks_per_doc": 2})
    assert [document_in(p) for p in fake_infinity.inputs] == ["a" * 10, "b" * 10]


async def test_max_tokens_per_doc_cuts_documents_to_three_characters_a_token(client: Any, fake_infinity: Any) -> None:
    await post(client, {"query": "q", "documents": ["abcdefghijklmnop"], "max_tokens_per_doc": 4})
    assert document_in(fake_infinity.inputs[0]) == "abcdefghijkl"


async def test_max_tokens_per_doc_cuts_before_chunking(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(max_doc_chars=10)
    await post(client, {"query": "q", "documents": ["a" * 10 + "b" * 10 + "c" * 10], "max_tokens_per_doc": 4})
    assert [document_in(p) for p in fake_infinity.inputs] == ["a" * 10, "bb"]


async def test_query_is_cut_to_max_query_chars(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(max_query_chars=5)
    await post(client, {"query": "0123456789", "documents": ["d"]})
    assert fake_infinity.inputs == [proxy.classify_input("01234", "d")]


async def test_instruction_longer_than_max_query_chars_is_400(make_proxy: Any) -> None:
    client = await make_proxy(max_query_chars=5)
    answer = await post(client, {"query": "q", "documents": ["d"], "instruction": "too long"})
    assert_error(answer, 400, "invalid_request_error", "instruction", "at most 5", param="instruction")


async def test_identical_prompts_are_sent_once_and_share_their_score(client: Any, fake_infinity: Any) -> None:
    answer = await post(client, {"query": "q", "documents": ["same", "other", "same", {"text": "same"}]})
    assert answer.status == 200
    assert [document_in(p) for p in fake_infinity.inputs] == ["same", "other"]
    scores = {r["index"]: r["relevance_score"] for r in answer.body["results"]}
    assert scores[0] == scores[2] == scores[3] == hashed_probability(proxy.prompt_for("q", "same"))


async def test_more_documents_than_batch_size_go_in_several_calls_in_order(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(batch_size=3)
    documents = [f"doc {i}" for i in range(10)]
    answer = await post(client, {"query": "q", "documents": documents})
    assert answer.status == 200
    assert [len(b["input"]) for b in fake_infinity.classify_bodies] == [3, 3, 3, 1]
    expected = {i: hashed_probability(proxy.prompt_for("q", d)) for i, d in enumerate(documents)}
    assert {r["index"]: r["relevance_score"] for r in answer.body["results"]} == expected


async def test_more_documents_than_infinity_accepts_in_one_call(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(batch_size=2048)
    documents = [f"d{i}" for i in range(5000)]
    answer = await post(client, {"query": "q", "documents": documents, "top_n": 3})
    assert answer.status == 200
    assert sorted(len(b["input"]) for b in fake_infinity.classify_bodies) == [904, 2048, 2048]
    expected = sorted(range(5000), key=lambda i: (-hashed_probability(proxy.prompt_for("q", documents[i])), i))
    assert [r["index"] for r in answer.body["results"]] == expected[:3]


async def test_empty_documents_answer_no_results_without_calling_infinity(client: Any, fake_infinity: Any) -> None:
    answer = await post(client, {"query": "q", "documents": []}, "/v2/rerank")
    assert answer.status == 200
    assert answer.body["results"] == []
    assert answer.body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert fake_infinity.classify_bodies == []


# ---------------------------------------------------------------------------------------------
# Request validation: every field, 400 naming it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"query": None}, "query", ["required"]),
    ({"query": 3}, "query", ["string"]),
    ({"documents": None}, "documents", ["required"]),
    ({"documents": "a"}, "documents", ["list"]),
    ({"documents": [1]}, "documents[0]", ["string"]),
    ({"documents": ["a", None]}, "documents[1]", ["string"]),
    ({"top_n": "3"}, "top_n", ["integer"]),
    ({"top_n": True}, "top_n", ["integer"]),
    ({"top_n": 3.0}, "top_n", ["integer"]),
    ({"return_documents": "yes"}, "return_documents", ["boolean"]),
    ({"return_documents": 1}, "return_documents", ["boolean"]),
    ({"model": 7}, "model", ["string"]),
    ({"instruction": ["x"]}, "instruction", ["string"]),
    ({"raw_scores": "true"}, "raw_scores", ["boolean"]),
    ({"rank_fields": "title"}, "rank_fields", ["list"]),
    ({"rank_fields": [1]}, "rank_fields[0]", ["string"]),
    ({"max_chunks_per_doc": 0}, "max_chunks_per_doc", ["at least 1"]),
    ({"max_chunks_per_doc": "2"}, "max_chunks_per_doc", ["integer"]),
    ({"max_tokens_per_doc": -1}, "max_tokens_per_doc", ["at least 1"]),
    ({"max_tokens_per_doc": 1.5}, "max_tokens_per_doc", ["integer"]),
])
async def test_mistyped_or_missing_field_is_400_naming_it(
        client: Any, fake_infinity: Any, change: dict[str, Any], param: str, words: list[str]) -> None:
    body = {"query": "q", "documents": ["a", "b"], **change}
    body = {k: v for k, v in body.items() if not (k in ("query", "documents") and v is None)}
    answer = await post(client, body)
    assert_error(answer, 400, "invalid_request_error", param.split("[")[0], *words, param=param)
    assert fake_infinity.classify_bodies == []


async def test_a_query_blank_in_all_that_is_scored_is_400_saying_so(make_proxy: Any) -> None:
    client = await make_proxy(max_query_chars=10)
    answer = await post(client, {"query": " " * 10 + "late words", "documents": ["a"]})
    assert_error(answer, 400, "invalid_request_error", "only whitespace in its first 10 characters",
                 "--max-query-chars", param="query")


async def test_every_field_is_checked_before_empty_documents_answer(client: Any) -> None:
    answer = await post(client, {"query": "q", "documents": [], "top_n": "3"})
    assert_error(answer, 400, "invalid_request_error", "top_n", param="top_n")


@pytest.mark.parametrize(("body", "words"), [
    (b"", ["empty"]), (b"not json", ["not valid JSON"]), (b"[1, 2]", ["object", "list"]),
    (b'"text"', ["object"]), (b"\xff\xfe\x00", ["not valid JSON"]), (b"[" * 100_000 + b"]" * 100_000, ["nested"]),
])
async def test_body_that_is_not_a_json_object_is_400(client: Any, body: bytes, words: list[str]) -> None:
    answer = await post(client, body)
    assert_error(answer, 400, "invalid_request_error", *words, param=None)


async def test_body_is_json_whatever_its_content_type(client: Any) -> None:
    body = json.dumps({"query": "q", "documents": ["a"]})
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        answer = await post(client, body, headers=headers)
        assert answer.status == 200 and len(answer.body["results"]) == 1


async def test_too_many_documents_is_400(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(max_documents=3)
    answer = await post(client, {"query": "q", "documents": ["a"] * 4})
    assert_error(answer, 400, "invalid_request_error", "too many documents", "4", "at most 3", param="documents")
    assert fake_infinity.classify_bodies == []


@pytest.mark.parametrize(("body", "param"), [
    (b'{"query": "q", "documents": ["ok", "bad \\ud800 text"]}', "documents[1]"),
    (b'{"query": "q \\udfff", "documents": ["ok"]}', "query"),
    (b'{"query": "q", "documents": [], "model": "m\\ud800"}', "model"),
    (b'{"query": "q", "documents": ["ok"], "instruction": "\\ud800"}', "instruction"),
])
async def test_lone_surrogate_is_400_naming_its_field_and_not_sent_upstream(
        client: Any, fake_infinity: Any, body: bytes, param: str) -> None:
    answer = await post(client, body)
    assert_error(answer, 400, "invalid_request_error", "surrogate", param, param=param)
    assert fake_infinity.classify_bodies == []


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
async def test_non_finite_numbers_are_400(client: Any, number: bytes) -> None:
    answer = await post(client, b'{"query": "q", "documents": [{"text": "a", "x": ' + number + b"}]}")
    assert_error(answer, 400, "invalid_request_error", "not valid JSON")


async def test_unknown_fields_are_ignored(client: Any) -> None:
    answer = await post(client, {"query": "q", "documents": ["a"], "priority": 1, "extra": {"x": 1}})
    assert answer.status == 200 and len(answer.body["results"]) == 1


# ---------------------------------------------------------------------------------------------
# TEI-shaped requests ({"query", "texts"} on /rerank and /v1/rerank) and GET /info
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
async def test_tei_texts_get_a_bare_list_of_every_text_best_first_ties_lower_index_first(
        client: Any, fake_infinity: Any, path: str) -> None:
    scores_by_document(fake_infinity, {"a": 0.3, "b": 0.7, "c": 0.3, "d": 0.7, "e": 0.9})
    answer = await post(client, {"query": "q", "texts": ["a", "b", "c", "d", "e"]}, path)
    assert answer.status == 200
    assert answer.body == [{"index": 4, "score": 0.9}, {"index": 1, "score": 0.7}, {"index": 3, "score": 0.7},
                      {"index": 0, "score": 0.3}, {"index": 2, "score": 0.3}]
    assert fake_infinity.inputs == [proxy.classify_input("q", t) for t in "abcde"]


async def test_tei_return_text_adds_each_text_as_given(client: Any, fake_infinity: Any) -> None:
    scores_by_document(fake_infinity, {" lo ": 0.2, "hi\n": 0.8})
    answer = await post(client, {"query": "q", "texts": [" lo ", "hi\n"], "return_text": True})
    assert answer.status == 200
    assert answer.body == [{"index": 1, "score": 0.8, "text": "hi\n"}, {"index": 0, "score": 0.2, "text": " lo "}]


async def test_tei_raw_scores_are_log_odds(client: Any, fake_infinity: Any) -> None:
    scores_by_document(fake_infinity, {"a": 0.8, "b": 0.1})
    answer = await post(client, {"query": "q", "texts": ["a", "b"], "raw_scores": True})
    assert answer.status == 200
    assert [r["index"] for r in answer.body] == [0, 1]
    assert answer.body[0]["score"] == pytest.approx(math.log(4))
    assert answer.body[1]["score"] == pytest.approx(math.log(0.1 / 0.9))


@pytest.mark.parametrize(("truncate", "direction"), [(True, "Left"), (False, "Right"), (True, "left"), (None, "RIGHT"),
                                                     (True, None)])
async def test_tei_truncate_and_direction_in_any_case_are_accepted_and_long_texts_are_chunked(
        make_proxy: Any, fake_infinity: Any, truncate: bool | None, direction: str | None) -> None:
    client = await make_proxy(max_doc_chars=100)
    long_text = " ".join(f"w{i:03d}" for i in range(50))  # 249 characters: three chunks, whatever the direction
    body = {"query": "q", "texts": ["short", long_text], "truncate": truncate, "truncation_direction": direction}
    answer = await post(client, body)
    assert answer.status == 200
    assert fake_infinity.inputs == [proxy.classify_input("q", chunk) for chunk in
                                    ["short", *proxy.chunks_of(long_text, 100, 10)]]
    assert len(fake_infinity.inputs) == 4
    chunk_scores = [hashed_probability(p.removesuffix(proxy.PAD_ANCHOR)) for p in fake_infinity.inputs]
    assert {r["index"]: r["score"] for r in answer.body} == {0: chunk_scores[0], 1: max(chunk_scores[1:])}


async def test_tei_scores_equal_the_documents_scores_for_the_same_texts(client: Any) -> None:
    tei = (await post(client, {"query": QUERY, "texts": DOCUMENTS})).body
    infinity = (await post(client, {"query": QUERY, "documents": DOCUMENTS})).body
    assert [(r["index"], r["score"]) for r in tei] == [(r["index"], r["relevance_score"]) for r in infinity["results"]]


async def test_tei_has_no_top_n_and_ignores_other_fields(client: Any) -> None:
    answer = await post(client, {"query": "q", "texts": ["a", "b", "c"], "top_n": 1, "rank_fields": 3,
                                 "return_documents": "x", "priority": 1})
    assert answer.status == 200
    assert sorted(r["index"] for r in answer.body) == [0, 1, 2]


async def test_tei_model_and_instruction_are_used_as_for_documents(client: Any, fake_infinity: Any) -> None:
    answer = await post(client, {"query": "q", "texts": ["a"], "model": "m", "instruction": "Find it"})
    assert answer.status == 200
    assert fake_infinity.classify_bodies[0]["model"] == "m"
    assert fake_infinity.inputs == [proxy.classify_input("q", "a", "Find it")]


async def test_tei_empty_texts_answer_an_empty_list_without_calling_infinity(client: Any, fake_infinity: Any) -> None:
    answer = await post(client, {"query": "q", "texts": []}, "/rerank")
    assert (answer.status, answer.body) == (200, [])
    assert fake_infinity.classify_bodies == []


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"texts": "a"}, "texts", ["list"]),
    ({"texts": [1]}, "texts[0]", ["string"]),
    ({"texts": ["a", {"text": "b"}]}, "texts[1]", ["string", "object"]),
    ({"texts": ["a", None]}, "texts[1]", ["string"]),
    ({"documents": ["a"]}, "texts", ["documents", "not both"]),
    ({"return_text": "yes"}, "return_text", ["boolean"]),
    ({"truncate": "true"}, "truncate", ["boolean"]),
    ({"truncate": 1}, "truncate", ["boolean"]),
    ({"truncation_direction": "up"}, "truncation_direction", ["left", "right", "up"]),
    ({"truncation_direction": 1}, "truncation_direction", ["string"]),
    ({"raw_scores": "true"}, "raw_scores", ["boolean"]),
    ({"query": None}, "query", ["required"]),
    ({"query": " "}, "query", ["whitespace"]),
    ({"model": 7}, "model", ["string"]),
    ({"instruction": ["x"]}, "instruction", ["string"]),
])
async def test_tei_mistyped_or_missing_field_is_400_naming_it(
        client: Any, fake_infinity: Any, change: dict[str, Any], param: str, words: list[str]) -> None:
    body = {k: v for k, v in {"query": "q", "texts": ["a", "b"], **change}.items() if v is not None}
    answer = await post(client, body, "/rerank")
    assert_error(answer, 400, "invalid_request_error", param.split("[")[0], *words, param=param)
    assert fake_infinity.classify_bodies == []


async def test_tei_every_field_is_checked_before_empty_texts_answer(client: Any) -> None:
    answer = await post(client, {"query": "q", "texts": [], "truncation_direction": "middle"})
    assert_error(answer, 400, "invalid_request_error", "truncation_direction", param="truncation_direction")
    answer = await post(client, {"query": 1, "texts": []})
    assert_error(answer, 400, "invalid_request_error", "query", param="query")


async def test_tei_too_many_texts_is_400_naming_texts(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(max_documents=3)
    answer = await post(client, {"query": "q", "texts": ["a"] * 4})
    assert_error(answer, 400, "invalid_request_error", "too many texts", "4", "at most 3", param="texts")
    assert fake_infinity.classify_bodies == []


async def test_tei_lone_surrogate_is_400_naming_the_text(client: Any, fake_infinity: Any) -> None:
    answer = await post(client, b'{"query": "q", "texts": ["ok", "bad \\ud800"]}')
    assert_error(answer, 400, "invalid_request_error", "surrogate", "texts[1]", param="texts[1]")
    assert fake_infinity.classify_bodies == []


async def test_texts_are_not_a_dialect_of_v2_rerank(client: Any, fake_infinity: Any) -> None:
    answer = await post(client, {"query": "q", "texts": ["a"]}, "/v2/rerank")
    assert_error(answer, 400, "invalid_request_error", "documents", "required", param="documents")


async def test_tei_request_log_line_counts_its_texts(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="proxy-classifier"):
        await post(client, {"query": "secret", "texts": ["secret a", "secret b", "secret a"]}, "/rerank")
    line = next(r.getMessage() for r in caplog.records if r.name == "proxy-classifier")
    assert "status=200 documents=3 chunks=2 upstream_calls=1" in line
    assert "secret" not in caplog.text


@pytest.mark.parametrize("path", ["/info", "/v1/info"])
async def test_info_is_teis_info_for_a_reranker_served_locally(
        make_proxy: Any, fake_infinity: Any, path: str) -> None:
    client = await make_proxy(model="my/reranker", max_documents=500, batch_size=64)
    response = await client.get(path)
    assert response.status == 200
    info = await response.json()
    assert info["model_id"] == "my/reranker"
    assert info["model_type"] == {"reranker": {"id2label": {"0": "0", "1": "1"}, "label2id": {"0": 0, "1": 1}}}
    assert info["max_input_length"] == 8192
    assert info["max_client_batch_size"] == 500
    assert info["max_batch_requests"] == 64
    assert info["auto_truncate"] is True
    assert isinstance(info["version"], str) and info["version"]
    assert info["model_sha"] is None and info["sha"] is None and info["docker_label"] is None
    assert fake_infinity.forwarded == [] and fake_infinity.classify_bodies == []


async def test_info_needs_the_key_like_every_route_but_the_probes(make_proxy: Any) -> None:
    client = await make_proxy(api_key="secret")
    for path in ("/info", "/v1/info"):
        assert (await client.get(path)).status == 401
        response = await client.get(path, headers={"Authorization": "Bearer secret"})
        assert response.status == 200
        assert list((await response.json())["model_type"]) == ["reranker"]


# ---------------------------------------------------------------------------------------------
# Upstream failures: each row of the contract's error table
# ---------------------------------------------------------------------------------------------


def answer_with(status: int, body: Any, headers: dict[str, str] | None = None, raw: bool = False) -> Any:
    async def fault(request: web.Request) -> web.Response:
        if raw:
            return web.Response(status=status, text=body, content_type="text/html", headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return fault


async def test_infinity_400_about_the_model_is_400_with_its_message(client: Any, fake_infinity: Any) -> None:
    fake_infinity.models = ["model-a", "model-b"]  # several models: the model field must match one
    answer = await post(client, {"query": "q", "documents": ["a"], "model": "model-c"})
    assert_error(answer, 400, "invalid_request_error", "Infinity", "Invalid model: model-c", param="model")


async def test_infinity_401_to_the_clients_key_is_401_with_its_message(client: Any, fake_infinity: Any) -> None:
    fake_infinity.api_key = "right"
    answer = await post(client, {"query": "q", "documents": ["a"]}, headers={"Authorization": "Bearer wrong"})
    assert_error(answer, 401, "authentication_error", "Unauthorized")
    answer = await post(client, {"query": "q", "documents": ["a"]}, headers={"Authorization": "Bearer right"})
    assert answer.status == 200
    assert fake_infinity.classify_headers[-1]["Authorization"] == "Bearer right"


async def test_infinity_403_to_the_clients_key_is_403(client: Any, fake_infinity: Any) -> None:
    fake_infinity.fault = answer_with(403, {"detail": "Forbidden"})
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 403, "permission_error", "Forbidden")


@pytest.mark.parametrize("infinity_api_key", ["wrong", ""])
async def test_infinity_401_to_the_proxys_own_key_is_502(make_proxy: Any, fake_infinity: Any,
                                                        infinity_api_key: str) -> None:
    fake_infinity.api_key = "right"
    client = await make_proxy(api_key="proxy-key", infinity_api_key=infinity_api_key)
    client_key = {"Authorization": "Bearer proxy-key"}
    answer = await post(client, {"query": "q", "documents": ["a"]}, headers=client_key)
    assert_error(answer, 502, "upstream_error", "--infinity-api-key", "Unauthorized")
    answer = await send(client, "GET", "/v1/models", headers=client_key)  # forwarded routes alike
    assert_error(answer, 502, "upstream_error", "--infinity-api-key")


async def test_infinity_404_is_502_with_prefix_hint(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(infinity_url=fake_infinity.url.replace("/v1", "/v2"))
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 502, "upstream_error", "404", "prefix", "--infinity-url")


async def test_infinity_422_is_502_with_its_detail_and_a_hint(client: Any, fake_infinity: Any) -> None:
    fake_infinity.fault = answer_with(422, {"detail": [{"msg": "List should have at most 2048 items"}]})
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 502, "upstream_error", "422", "at most 2048 items", "--batch-size")


@pytest.mark.parametrize(("headers", "retry_after"), [({"Retry-After": "7"}, "7"), (None, None)])
async def test_infinity_429_is_429_with_its_retry_after(
        client: Any, fake_infinity: Any, headers: dict[str, str] | None, retry_after: str | None) -> None:
    fake_infinity.fault = answer_with(429, {"error": {"message": "queue full"}}, headers)
    answer = await send(client, "POST", "/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert_error(answer, 429, "rate_limit_error", "queue full")
    assert answer.headers.get("Retry-After") == retry_after


@pytest.mark.parametrize("upstream_status", [500, 502, 503, 418])
async def test_infinity_5xx_or_other_status_is_502(client: Any, fake_infinity: Any, upstream_status: int) -> None:
    fake_infinity.fault = answer_with(upstream_status, {"error": {"message": "engine exploded"}})
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 502, "upstream_error", str(upstream_status), "engine exploded")


@pytest.mark.parametrize(("body", "words"), [
    ({"data": []}, ["0 classifications for 2"]),
    ({"nodata": 1}, ["no 'data'"]),
    ({"data": [[{"label": "0", "score": 1.0}]] * 2}, ["no label '1'"]),
    ({"data": [[{"label": "1", "score": 1.5}]] * 2}, ["not a probability", "1.5"]),
    ({"data": [[{"label": "1", "score": "0.5"}]] * 2}, ["not a probability"]),
    ({"data": [[{"label": "1", "score": True}]] * 2}, ["not a probability"]),
])
async def test_infinity_answer_of_the_wrong_shape_is_502(client: Any, fake_infinity: Any, body: Any,
                                                         words: list[str]) -> None:
    fake_infinity.fault = answer_with(200, body)
    answer = await post(client, {"query": "q", "documents": ["a", "b"]})
    assert_error(answer, 502, "upstream_error", *words)


@pytest.mark.parametrize(("text", "words"), [('{"data": [[{"label": "1", "score": NaN}]]}', ["not a probability", "nan"]),
                                             ("<html>Bad Gateway</html>", ["not JSON", "Bad Gateway"])])
async def test_infinity_nan_score_or_html_is_502(client: Any, fake_infinity: Any, text: str, words: list[str]) -> None:
    fake_infinity.fault = answer_with(200, text, raw=True)
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 502, "upstream_error", *words)


async def test_infinity_redirect_is_not_followed(client: Any, fake_infinity: Any, aiohttp_server: Any) -> None:
    elsewhere = web.Application()
    visits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        visits.append(request.path)
        return web.json_response({"data": []})

    elsewhere.router.add_route("*", "/{tail:.*}", record)
    other = await aiohttp_server(elsewhere, host="127.0.0.1")
    fake_infinity.fault = answer_with(307, {}, headers={"Location": str(other.make_url("/stolen"))})
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 502, "upstream_error", "307")
    response = await client.post("/v1/embeddings", data=b'{"input": ["x"]}', allow_redirects=False)
    assert response.status == 307  # forwarded verbatim, Location included, not followed
    assert response.headers["Location"] == str(other.make_url("/stolen"))
    assert visits == []


async def test_unreachable_infinity_is_502_naming_the_url(make_proxy: Any, unlistened_socket: socket.socket) -> None:
    url = f"http://127.0.0.1:{unlistened_socket.getsockname()[1]}/v1"
    client = await make_proxy(infinity_url=url)
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 502, "upstream_error", f"{url}/classify", "cannot reach")


async def test_rerank_slower_than_timeout_is_504_within_the_timeout(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(timeout=0.5)
    fake_infinity.delay = 3600  # never, for this test: the 504 is the proxy's own timer
    started = time.monotonic()
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 504, "timeout_error", "--timeout", "0.5")
    assert time.monotonic() - started < 0.5 + LOADED_MACHINE_SLACK


async def test_unknown_route_is_json_404(client: Any) -> None:
    assert_error(await send(client, "GET", "/nothing/here"), 404, "not_found_error", "no route", "/nothing/here")


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
async def test_wrong_method_on_rerank_route_is_local_json_405(client: Any, fake_infinity: Any, path: str) -> None:
    answer = await send(client, "GET", path)
    assert_error(answer, 405, "method_not_allowed", "GET", "POST")
    assert answer.headers["Allow"] == "POST"
    assert fake_infinity.forwarded == []


async def test_body_larger_than_max_body_size_is_json_413(make_proxy: Any) -> None:
    client = await make_proxy(max_body_size=1000)
    answer = await post(client, {"query": "q", "documents": ["x" * 2000]})
    assert_error(answer, 413, "request_too_large", "--max-body-size", "1000")


async def test_a_bug_is_500_with_request_id_logged_with_traceback(
        client: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(proxy, "plan_prompts", broken)
    with caplog.at_level(logging.INFO, logger="proxy-classifier"):
        answer = await send(client, "POST", "/v1/rerank", json={"query": "q", "documents": ["a"]},
                            headers={"X-Request-ID": "req-42"})
    assert_error(answer, 500, "internal_error", "req-42")
    failure = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert "req-42" in failure.getMessage() and failure.exc_info[0] is ZeroDivisionError


# ---------------------------------------------------------------------------------------------
# Request ids and logging
# ---------------------------------------------------------------------------------------------


async def test_request_id_is_kept_when_valid_and_replaced_when_not(client: Any, fake_infinity: Any) -> None:
    for good in ("abc.DEF_1-2", "trace:span:1", "x" * 128):
        response = await client.post("/v1/rerank", json={"query": "q", "documents": ["a"]},
                                     headers={"X-Request-ID": good})
        assert response.headers["X-Request-ID"] == good
        assert fake_infinity.classify_headers[-1]["X-Request-ID"] == good
    for bad in ("has space", "x" * 129, "semi;colon", "slash/", "quote\"", "caf\u00e9", "tab\there"):
        response = await client.post("/v1/rerank", json={"query": "q", "documents": ["a"]},
                                     headers={"X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    response = await client.get("/nothing")
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


async def test_one_info_line_per_request_without_query_or_document_text(
        client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="proxy-classifier"):
        await client.post("/v1/rerank", json={"query": "secret query", "documents": ["secret doc", "secret doc"]},
                          headers={"X-Request-ID": "rid-1"})
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy-classifier"]
    assert len(lines) == 1
    assert "request_id=rid-1" in lines[0] and "status=200" in lines[0] and "/v1/rerank" in lines[0]
    assert "documents=2 chunks=1 upstream_calls=1" in lines[0]
    assert "secret" not in caplog.text


@pytest.mark.parametrize("path", ["/v1/rerank%0aINFO%20forged%20line%1b[31m", "/x%0d%0a%e2%80%a8%c2%85\\%22",
                                  "/%f0%9f%a6%80%20%7f"])
async def test_a_path_cannot_forge_a_log_line_or_carry_a_control_character(
        client: Any, caplog: pytest.LogCaptureFixture, path: str) -> None:
    with caplog.at_level(logging.INFO, logger="proxy-classifier"):
        response = await client.post(path, data=b"{}")
    assert response.status in (404, 405)
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy-classifier"]
    assert len(lines) == 1
    assert lines[0].isascii() and lines[0].isprintable(), lines[0]
    logged_path = lines[0].split()[2]  # request_id=..., the method, the path: one token
    assert logged_path.startswith("/") and "\\x" in logged_path  # each control character escaped, as \\xNN
    assert f"status={response.status} " in lines[0]


def test_values_from_a_request_are_escaped_for_the_log() -> None:
    assert proxy.escaped_for_log("/v1/rerank") == "/v1/rerank"
    assert proxy.escaped_for_log('a\nb\x1b[0m c"\\') == "a\\x0ab\\x1b[0m\\x20c\\x22\\x5c"
    assert proxy.escaped_for_log("\u2028\x85\u00e9\udc80") == "\\u2028\\x85\\xe9\\udc80"


async def test_log_line_of_a_failed_request_counts_the_calls_it_made(
        make_proxy: Any, fake_infinity: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_proxy(batch_size=2)
    fake_infinity.fault = answer_with(503, {"error": {"message": "down"}})
    with caplog.at_level(logging.INFO, logger="proxy-classifier"):
        await post(client, {"query": "q", "documents": ["a", "b", "c"]})
    line = next(r.getMessage() for r in caplog.records if r.name == "proxy-classifier")
    assert "status=502 documents=3 chunks=3 upstream_calls=2" in line


# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("infinity_api_key", ["", "not-lent-to-unchecked-clients"])
async def test_without_api_key_the_clients_authorization_is_forwarded(
        make_proxy: Any, fake_infinity: Any, infinity_api_key: str) -> None:
    client = await make_proxy(infinity_api_key=infinity_api_key)
    await post(client, {"query": "q", "documents": ["a"]}, headers={"Authorization": "Bearer client-token"})
    await client.get("/v1/models", headers={"Authorization": "Bearer client-token"})
    assert fake_infinity.classify_headers[0]["Authorization"] == "Bearer client-token"
    assert fake_infinity.forwarded[0][3]["Authorization"] == "Bearer client-token"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic c2VjcmV0", "Bearer", "secret"])
async def test_with_api_key_a_missing_or_wrong_key_is_401(make_proxy: Any, fake_infinity: Any,
                                                          authorization: str | None) -> None:
    client = await make_proxy(api_key="secret")
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (("POST", "/rerank"), ("POST", "/v1/rerank"), ("POST", "/v2/rerank"), ("GET", "/models"),
                         ("GET", "/v1/models"), ("POST", "/v1/embeddings"), ("GET", "/v1/anything")):
        answer = await send(client, method, path, json={"query": "q", "documents": ["a"]}, headers=headers)
        assert_error(answer, 401, "authentication_error", "Authorization: Bearer")
    assert fake_infinity.classify_bodies == [] and fake_infinity.forwarded == []


async def test_with_api_key_the_right_key_passes_and_infinity_gets_the_proxys_key(
        make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(api_key="secret", infinity_api_key="upstream-key")
    fake_infinity.api_key = "upstream-key"
    for scheme in ("Bearer", "bearer", "BEARER"):
        answer = await post(client, {"query": "q", "documents": ["a"]},
                            headers={"Authorization": f"{scheme} secret"})
        assert answer.status == 200
    assert {h["Authorization"] for h in fake_infinity.classify_headers} == {"Bearer upstream-key"}


async def test_with_api_key_and_no_infinity_key_infinity_gets_no_authorization(
        make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(api_key="secret")
    await post(client, {"query": "q", "documents": ["a"]}, headers={"Authorization": "Bearer secret"})
    assert "Authorization" not in fake_infinity.classify_headers[0]


async def test_a_bearer_token_that_is_not_utf8_is_401_not_500(make_proxy: Any) -> None:
    client = await make_proxy(api_key="secret")
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    body = b'{"query": "q", "documents": ["a"]}'
    writer.write(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b'"authentication_error"' in answer


async def test_probes_are_open_without_a_key(make_proxy: Any) -> None:
    client = await make_proxy(api_key="secret")
    assert (await client.get("/health")).status == 200
    assert (await client.get("/ready")).status == 200


# ---------------------------------------------------------------------------------------------
# Forwarded routes, /models, /health, /ready
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/models", "/v1/models"])
async def test_models_are_infinitys_list(client: Any, fake_infinity: Any, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    assert [m["id"] for m in (await response.json())["data"]] == [SERVED_MODEL]
    assert fake_infinity.forwarded[0][1] == "/v1/models"


async def test_other_routes_under_the_prefix_are_forwarded_verbatim(client: Any, fake_infinity: Any) -> None:
    body = b'{"model":"m","input":["hello"]}'
    response = await client.post("/v1/embeddings?x=1&y=%20", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert await response.read() == b'{"object":"list","echo":' + body + b"}"
    assert response.headers["Content-Type"].startswith("application/json")
    method, path_qs, sent, headers = fake_infinity.forwarded[0]
    assert (method, path_qs, sent) == ("POST", "/v1/embeddings?x=1&y=%20", body)
    assert headers["Content-Type"] == "application/json"


async def test_infinitys_own_404_comes_back_verbatim(client: Any) -> None:
    response = await client.get("/v1/no-such-route")
    assert response.status == 404
    assert await response.text() == "404: Not Found"  # the fake's (aiohttp's) body, not ours


async def test_path_outside_the_prefix_is_a_local_404(client: Any, fake_infinity: Any) -> None:
    assert_error(await send(client, "POST", "/embeddings", json={}), 404, "not_found_error", "no route")
    answer = await send(client.session, "GET", URL(f"{client.make_url('/')}v1/../health", encoded=True))
    # sent as is (a client library would have normalised it away), refused before it is forwarded
    assert_error(answer, 404, "not_found_error", "no route", "/v1/../health")
    assert fake_infinity.forwarded == []


async def test_no_request_can_make_the_proxy_call_another_host(client: Any, fake_infinity: Any) -> None:
    with aioresponses(passthrough=["http://127.0.0.1"]) as mocked:
        response = await client.get("/v1//evil.example/x")
        assert response.status == 404  # reached the fake Infinity as a path, not another host
        assert not [key for key in mocked.requests if "evil" in str(key[1].host)]


async def test_with_an_empty_prefix_everything_else_is_forwarded(make_proxy: Any, fake_infinity: Any) -> None:
    client = await make_proxy(infinity_url=fake_infinity.url.removesuffix("/v1"))
    response = await client.post("/v1/embeddings", data=b"{}")
    assert response.status == 200
    assert fake_infinity.forwarded[0][1] == "/v1/embeddings"
    answer = await post(client, {"query": "q", "documents": ["a"]}, "/rerank")
    assert_error(answer, 502, "upstream_error", "404", "prefix")  # this Infinity has no /classify without its prefix


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "m", "input": ["ok", "  "]}', "input[1]"),
    (b'{"model": "m", "input": ""}', "input"),
    (b'{"model": "m", "\\u0069nput": ["ok", "\\t"]}', "input[1]"),  # the name escaped: Infinity reads "input"
    ('{"model": "m", "input": [" "]}'.encode("utf-16"), "input[0]"),  # JSON may be UTF-16
], ids=["list", "string", "escaped name", "utf-16"])
async def test_forwarded_call_with_a_blank_input_is_400_and_not_sent(
        client: Any, fake_infinity: Any, body: bytes, param: str) -> None:
    answer = await post(client, body, "/v1/embeddings")
    assert_error(answer, 400, "invalid_request_error", param, "empty", param=param)
    assert fake_infinity.forwarded == []


async def test_health_is_ok_and_says_infinity_answers(client: Any) -> None:
    response = await client.get("/health")
    assert (response.status, await response.json()) == (200, {"status": "ok", "upstream": "ok", "models": {}})


async def test_health_is_200_and_says_why_when_infinity_is_down(make_proxy: Any,
                                                                 unlistened_socket: socket.socket) -> None:
    port = unlistened_socket.getsockname()[1]
    client = await make_proxy(infinity_url=f"http://127.0.0.1:{port}/v1")
    response = await client.get("/health")
    answer = await response.json()
    assert response.status == 200 and answer["status"] == "ok"
    assert f"127.0.0.1:{port}/health" in answer["upstream"] and "cannot reach" in answer["upstream"]


async def test_probes_answer_within_a_second_when_infinity_hangs(make_proxy: Any, aiohttp_server: Any) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)  # never, for this test
        return web.json_response({})

    stalled = web.Application()
    stalled.router.add_get("/health", hang)
    server = await aiohttp_server(stalled, host="127.0.0.1")
    client = await make_proxy(infinity_url=str(server.make_url("/v1")))
    for path, status in (("/health", 200), ("/ready", 503)):
        started = time.monotonic()
        response = await client.get(path)
        assert response.status == status
        # The probes' own 0.8 s wait, and a loaded machine's slack: never the upstream's hour.
        assert time.monotonic() - started < proxy.READINESS_PROBE_SECONDS + LOADED_MACHINE_SLACK
    assert "did not answer within" in (await (await client.get("/health")).json())["upstream"]


async def test_ready_is_200_when_infinity_answers_else_503(make_proxy: Any, fake_infinity: Any,
                                                           unlistened_socket: socket.socket) -> None:
    client = await make_proxy()
    response = await client.get("/ready")
    assert (response.status, await response.json()) == (200, {"status": "ready"})
    down = await make_proxy(infinity_url=f"http://127.0.0.1:{unlistened_socket.getsockname()[1]}/v1")
    assert_error(await send(down, "GET", "/ready"), 503, "service_unavailable", "not ready")


@pytest.mark.parametrize("path", ["/health", "/ready", "/models", "/info", "/v1/info"])
async def test_local_routes_answer_other_methods_with_405(client: Any, fake_infinity: Any, path: str) -> None:
    assert_error(await post(client, b"{}", path), 405, "method_not_allowed", "POST", "GET")
    assert fake_infinity.forwarded == []


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_contracts() -> None:
    config = proxy.load_config([], environ={})
    assert (config.host, config.port, config.infinity_url, config.model) == (
        "127.0.0.1", 8002, "http://localhost:7997/v1", SERVED_MODEL)
    assert (config.timeout, config.max_documents, config.max_body_size) == (60.0, 10_000, 32 * 1024 * 1024)
    assert (config.max_query_chars, config.max_doc_chars, config.max_chunks_per_doc) == (4000, 8000, 10)
    assert (config.positive_label, config.instruction, config.api_key, config.template) == ("", None, "", "")
    assert proxy.template_for(proxy.TEMPLATES, config.template, config.model).positive_label == "1"
    assert 1 <= config.batch_size <= 2048 and config.max_concurrency >= 32


def test_environment_variables_set_options_and_flags_win() -> None:
    environ = {"INFINITY_URL": "http://infinity:7997/v1", "MAX_DOC_CHARS": "500", "PORT": "9000",
               "API_KEY": "k", "TIMEOUT": "2.5"}
    config = proxy.load_config(["--port", "9100"], environ=environ)
    assert (config.infinity_url, config.max_doc_chars, config.port, config.api_key, config.timeout) == (
        "http://infinity:7997/v1", 500, 9100, "k", 2.5)


@pytest.mark.parametrize(("argv", "environ", "words"), [
    (["--batch-size", "5000"], {}, ["--batch-size", "2048", "5000"]),
    (["--batch-size", "0"], {}, ["--batch-size", "at least 1"]),
    (["--timeout", "-1"], {}, ["--timeout", "positive"]),
    (["--timeout", "nan"], {}, ["--timeout"]),
    (["--max-concurrency", "0"], {}, ["--max-concurrency"]),
    (["--port", "70000"], {}, ["--port"]),
    (["--max-doc-chars", "120000"], {}, ["--max-doc-chars", "122880"]),
    (["--infinity-url", "localhost:7997"], {}, ["--infinity-url"]),
    (["--log-level", "LOUD"], {}, ["--log-level"]),
    (["--infinity-url", "http://user:pw@infinity:7997/v1"], {}, ["--infinity-url", "credentials"]),
    ([], {"MAX_DOCUMENTS": "many"}, ["MAX_DOCUMENTS", "many"]),
    (["--port", "eighty"], {}, ["--port", "eighty"]),
])
def test_out_of_range_option_stops_with_a_clear_message(
        capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], words: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        proxy.load_config(argv, environ=environ)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_help_lists_every_option_with_its_environment_variable_and_default() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "proxy-classifier.py"), "--help"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    flat = " ".join(out.split())
    for flag, _, _ in proxy.OPTIONS:
        assert flag in flat
        assert f"env {proxy.env_name(flag)};" in flat
    assert "default 8002" in flat and "default http://localhost:7997/v1" in flat and "default 60.0" in flat


@pytest.mark.parametrize(("argv", "says"), [(["--batch-size", "5000"], "--batch-size must be at most 2048"),
                                            (["--bacth-size", "8"], "unrecognized arguments: --bacth-size"),
                                            (["--port"], "argument --port: expected one argument")])
def test_a_bad_option_stops_the_proxy_with_one_line_naming_it_and_the_help(argv: list[str], says: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "proxy-classifier.py"), *argv],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert says in line and line.endswith("proxy-classifier.py --help lists every option"), line


def test_run_as_a_script_without_host_the_proxy_listens_on_loopback_only() -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "proxy-classifier.py"), "--port", str(port),
                                "--infinity-url", "http://127.0.0.1:9/v1"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not listens_on(process.pid, port) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        listening = {c.laddr.ip for c in tcp_connections(psutil.Process(process.pid))
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    finally:
        process.terminate()
        process.wait(10)
    assert listening == {"127.0.0.1"}


@pytest.mark.parametrize(("host", "says"), [("127.0.0.1", "another program listens there"),
                                            ("192.0.2.1", "must be an address of this machine")])
def test_a_port_it_cannot_listen_on_gives_one_line_naming_it_and_the_fix(host: str, says: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "proxy-classifier.py"), "--host", host, "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert f"cannot listen on {host}:{port}" in line and says in line, line
    assert "listening" not in done.stderr  # said only once the socket is bound


# ---------------------------------------------------------------------------------------------
# Packaging: the Dockerfile, the compose file and the README agree with the proxy
# ---------------------------------------------------------------------------------------------


def test_compose_file_agrees_with_the_proxys_defaults() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    infinity, proxy_service = compose["services"]["infinity"], compose["services"]["proxy"]
    command = infinity["command"] if isinstance(infinity["command"], str) else " ".join(infinity["command"])
    assert infinity["image"].startswith("michaelf34/infinity")
    assert "--model-id michaelfeil/mxbai-rerank-base-v2-seq" in command
    assert "--port 7997" in command and "--url-prefix /v1" in command
    environment = proxy_service["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    known = {proxy.env_name(flag) for flag, _, _ in proxy.OPTIONS}
    assert set(environment) <= known, set(environment) - known
    assert environment["INFINITY_URL"] == "http://infinity:7997/v1"
    assert environment["HOST"] == "0.0.0.0"  # the proxy's own default, 127.0.0.1, is unreachable from the host
    assert any(str(port).endswith(":8002") for port in proxy_service["ports"])
    assert proxy_service["depends_on"]["infinity"]["condition"] == "service_healthy"
    assert "7997/health" in " ".join(infinity["healthcheck"]["test"])
    assert proxy_service["build"] == "."


def test_dockerfile_runs_the_proxy_as_non_root_with_a_stdlib_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", dockerfile, re.M)
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    for copied in re.findall(r"^COPY (?:--\S+ )*(\S+) ", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied
    healthcheck = dockerfile[dockerfile.index("\nHEALTHCHECK "):].split("\n\n")[0]
    assert "urllib.request" in healthcheck and "/health" in healthcheck and "curl" not in healthcheck
    assert "os.environ.get('PORT', '8002')" in healthcheck  # it probes the port the proxy listens on
    assert re.search(r'^CMD \["python", "proxy-classifier.py"\]', dockerfile, re.M)
    assert re.search(r"^EXPOSE 8002$", dockerfile, re.M)
    assert re.search(r"^\s*HOST=0\.0\.0\.0$", dockerfile, re.M)  # a container listens on every interface
    # requirements are installed before the code is copied, so code changes keep the cached layer
    assert dockerfile.index("requirements.txt") < dockerfile.index("COPY proxy-classifier.py")


# ---------------------------------------------------------------------------------------------
# The pad anchor and its self-check
# ---------------------------------------------------------------------------------------------

PROBE = proxy.prompt_for(*proxy.ANCHOR_PROBE).rstrip()


async def test_every_input_is_the_prompt_then_the_pad_anchor(client: Any, fake_infinity: Any) -> None:
    await post(client, {"query": "q", "documents": ["a", "b \n"], "instruction": "i"})
    assert fake_infinity.inputs == [proxy.prompt_for("q", d, "i") + "<|endoftext|>" for d in ("a", "b \n")]
    # Infinity strips every input: the anchor keeps the prompt's own trailing newline from being cut.
    assert [text.strip() for text in fake_infinity.inputs] == fake_infinity.inputs


async def test_the_self_check_runs_once_per_model_before_its_first_call(client: Any, fake_infinity: Any) -> None:
    fake_infinity.delay = 0.2  # the first requests arrive together, while the check runs
    answers = await asyncio.gather(*(post(client, {"query": "q", "documents": [str(i)]}) for i in range(5)))
    assert [answer.status for answer in answers] == [200] * 5
    await post(client, {"query": "q", "documents": ["later"]})
    # One input a call: in one batch the bare probe would be padded.
    assert fake_infinity.probe_bodies == [{"model": SERVED_MODEL, "input": [PROBE]},
                                          {"model": SERVED_MODEL, "input": [PROBE + "<|endoftext|>"]}]
    assert len(fake_infinity.classify_bodies) == 6


async def test_a_model_that_pads_with_another_token_is_sent_the_anchor_it_skips(
        client: Any, fake_infinity: Any) -> None:
    fake_infinity.pad_token = "<|im_end|>"
    answer = await post(client, {"query": "q", "documents": ["a", "b"], "raw_scores": True})
    assert answer.status == 200
    assert fake_infinity.inputs == [proxy.prompt_for("q", d) + "<|im_end|>" for d in ("a", "b")]
    assert {r["index"]: r["relevance_score"] for r in answer.body["results"]} == {
        i: pytest.approx(proxy.log_odds(hashed_probability(proxy.prompt_for("q", d)))) for i, d in enumerate("ab")}
    assert [body["input"] for body in fake_infinity.probe_bodies] == [
        [PROBE], [PROBE + "<|endoftext|>"], [PROBE + "<|im_end|>"]]
    health = await (await client.get("/health")).json()
    assert health["models"] == {SERVED_MODEL: {"template": "mxbai-rerank-v2", "anchor": "<|im_end|>",
                                               "template_check": "ok"}}


async def test_a_model_that_skips_no_anchor_is_reported_everywhere_and_still_served(
        client: Any, fake_infinity: Any, caplog: pytest.LogCaptureFixture) -> None:
    fake_infinity.pad_token = None
    # Whatever token the model reads last moves its score: reading an anchor, it scores otherwise than the prompt.
    fake_infinity.score = lambda text: 0.1 if text.endswith(("<|endoftext|>", "<|im_end|>")) else 0.6
    with caplog.at_level(logging.INFO, logger="proxy-classifier"):
        answer = await post(client, {"query": "q", "documents": ["a"]})
    assert answer.status == 200  # the operator decides
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert repr(SERVED_MODEL) in warning and "pad_token_id" in warning and "config.json" in warning
    report = (await (await client.get("/health")).json())["models"][SERVED_MODEL]
    assert report["template_check"].startswith("failed") and report["anchor"] == "<|endoftext|>"
    assert (await (await client.get("/info")).json())["template_check"].startswith("failed")
    metrics = await (await client.get("/metrics")).text()
    assert f'rerank_proxy_template_check{{model="{SERVED_MODEL}",template="mxbai-rerank-v2"}} 0.0' in metrics


async def test_ready_runs_the_self_check_of_the_default_model(client: Any, fake_infinity: Any) -> None:
    assert (await (await client.get("/info")).json())["template_check"] == "unchecked"
    assert (await client.get("/ready")).status == 200
    assert len(fake_infinity.probe_bodies) == 2
    info = await (await client.get("/info")).json()
    assert (info["template"], info["anchor"], info["template_check"]) == ("mxbai-rerank-v2", "<|endoftext|>", "ok")
    assert (await client.get("/ready")).status == 200
    assert len(fake_infinity.probe_bodies) == 2  # cached


async def test_a_self_check_that_infinity_refuses_fails_its_request_and_runs_again_next_time(
        client: Any, fake_infinity: Any) -> None:
    fake_infinity.probe_status = 503
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert answer.status == 502 and "503" in answer.body["error"]["message"]
    assert fake_infinity.classify_bodies == []  # no prompt went out with an anchor nobody checked
    fake_infinity.probe_status = 200
    assert (await post(client, {"query": "q", "documents": ["a"]})).status == 200
    assert len(fake_infinity.probe_bodies) == 1 + 2  # the refused bare probe; then the whole check


async def test_model_names_that_all_mean_the_one_served_model_are_checked_once(
        client: Any, fake_infinity: Any) -> None:
    # With one model loaded, Infinity ignores the name: clients' names must not each cost a check.
    for name in ("first", *(f"alias-{i}" for i in range(10))):
        assert (await post(client, {"query": "q", "documents": ["a"], "model": name})).status == 200
    assert [body["model"] for body in fake_infinity.probe_bodies] == [SERVED_MODEL] * 2  # one check: two calls
    assert set((await (await client.get("/health")).json())["models"]) == {SERVED_MODEL}
    assert fake_infinity.model_lookups == 1  # the list is read again only for a name it lacks, and not often


async def test_where_infinity_cannot_list_its_models_each_name_is_checked_as_it_comes(
        client: Any, fake_infinity: Any) -> None:
    fake_infinity.models_status = 401
    for name in ("a", "b", "a"):
        assert (await post(client, {"query": "q", "documents": ["d"], "model": name})).status == 200
    assert [body["model"] for body in fake_infinity.probe_bodies] == ["a", "a", "b", "b"]  # a check: two calls


async def test_a_self_check_made_with_a_key_infinity_refuses_fails_only_that_keys_requests(
        client: Any, fake_infinity: Any) -> None:
    # Without --api-key each client's key goes to Infinity, the self-check's calls included.
    refused, answer_probe = asyncio.Event(), fake_infinity.answer_probe

    async def probe(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer good":
            await refused.wait()  # the bad key's check is still running when the good key's request comes
            return web.json_response({"detail": "Unauthorized"}, status=401)
        return await answer_probe(request)

    fake_infinity.answer_probe = probe
    bad = asyncio.create_task(post(client, GOOD, headers={"Authorization": "Bearer bad"}))
    assert await eventually(lambda: client.server.app[proxy.CHECKS].running)
    good = asyncio.create_task(post(client, GOOD, headers={"Authorization": "Bearer good"}))
    await eventually(good.done)  # never, where the good key's request waits on the bad key's check
    refused.set()
    assert (await good).status == 200
    assert_error(await bad, 401, "authentication_error", "Unauthorized")


async def test_a_model_list_refused_for_one_clients_key_is_read_again_with_the_next_clients(
        client: Any, fake_infinity: Any) -> None:
    fake_infinity.api_key = "good"
    fake_infinity.models, fake_infinity.cross_encoders = ["my-cross-encoder"], {"my-cross-encoder"}
    assert (await post(client, GOOD, headers={"Authorization": "Bearer bad"})).status == 401
    answer = await post(client, GOOD, headers={"Authorization": "Bearer good"})
    assert answer.status == 200
    assert [body["documents"] for body in fake_infinity.rerank_bodies] == [GOOD["documents"]]


async def test_self_checks_left_running_are_bounded_beyond_that_each_request_checks_for_itself(
        client: Any, fake_infinity: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.AnchorChecks, "MAX_CHECKED", 1)
    checks, stalled, probed = client.server.app[proxy.CHECKS], asyncio.Event(), []
    answer_probe = fake_infinity.answer_probe

    async def probe(request: web.Request) -> web.Response:
        probed.append(request.headers.get("Authorization"))
        await stalled.wait()  # Infinity stalls: every check is still running when the next request comes
        return await answer_probe(request)

    fake_infinity.answer_probe = probe
    first = asyncio.create_task(post(client, GOOD, headers={"Authorization": "Bearer one"}))
    assert await eventually(lambda: len(checks.running) == 1)
    second = asyncio.create_task(post(client, GOOD, headers={"Authorization": "Bearer two"}))
    assert await eventually(lambda: "Bearer two" in probed)
    assert list(checks.running) == [(SERVED_MODEL, "Bearer one")]  # the second checks for itself, leaving none
    stalled.set()
    assert ((await first).status, (await second).status) == (200, 200)


async def test_a_model_list_read_with_a_refused_key_holds_up_no_other_clients_request(
        client: Any, fake_infinity: Any) -> None:
    fake_infinity.api_key = "good"
    infinity, refused, reads = client.server.app[proxy.INFINITY], asyncio.Event(), []
    served_models = infinity.served_models

    async def slowly_refused(headers: dict[str, str]) -> Any:
        reads.append(headers.get("Authorization"))
        if headers.get("Authorization") == "Bearer bad":
            await refused.wait()  # Infinity is slow to refuse it: the good key's request comes meanwhile
            return None
        return await served_models(headers)

    infinity.served_models = slowly_refused
    bad = asyncio.create_task(post(client, GOOD, headers={"Authorization": "Bearer bad"}))
    assert await eventually(lambda: reads == ["Bearer bad"])
    good = asyncio.create_task(post(client, GOOD, headers={"Authorization": "Bearer good"}))
    assert await eventually(good.done)  # not queued behind the bad key's read
    assert (await good).status == 200
    refused.set()
    assert (await bad).status == 401


async def test_a_key_infinity_refused_the_model_list_to_is_not_asked_again_at_once(
        client: Any, fake_infinity: Any) -> None:
    fake_infinity.api_key = "good"
    infinity, reads = client.server.app[proxy.INFINITY], []
    served_models = infinity.served_models

    async def counted(headers: dict[str, str]) -> Any:
        reads.append(headers.get("Authorization"))
        return await served_models(headers)

    infinity.served_models = counted
    for _ in range(3):
        assert (await post(client, GOOD, headers={"Authorization": "Bearer bad"})).status == 401
    assert reads == ["Bearer bad"]  # again after ServedModels.RETRY_SECONDS


# ---------------------------------------------------------------------------------------------
# No prompt outgrows the model's context
# ---------------------------------------------------------------------------------------------


def test_without_a_tokenizer_every_prompt_fits_the_context_in_utf8_bytes() -> None:
    config = proxy.Config()
    request = proxy.parse_rerank({"query": "東" * 4000, "documents": ["京" * 8000, "ok"]}, config)
    plan = proxy.plan_prompts(request, config)
    inputs = [text for body, _ in proxy.classify_bodies("m", plan, 256) for text in json.loads(body)["input"]]
    # A token of a byte-level BPE holds at least one byte: the bytes bound the tokens, special tokens aside.
    for text in inputs:
        special = sum(text.count(token) for token in proxy.DEFAULT_TEMPLATE.special_tokens)
        stripped = text
        for token in proxy.DEFAULT_TEMPLATE.special_tokens:
            stripped = stripped.replace(token, "")
        assert len(stripped.encode()) + special <= proxy.DEFAULT_TEMPLATE.max_tokens
    query = inputs[0].split("query: ")[1].split("\ndocument: ")[0]
    assert 1000 < len(query) < 4000  # cut to three quarters of the context, as mixedbread's library cuts it
    assert "".join(document_in(text) for text in inputs[:-1]) == "京" * len("".join(
        document_in(text) for text in inputs[:-1]))  # chunks of the one document, then "ok"
    assert document_in(inputs[-1]) == "ok"


def test_a_tokenizer_file_that_cannot_be_read_stops_the_proxy_at_start(tmp_path: Any,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as stopped:
        proxy.load_config(["--tokenizer", str(bad)], environ={})
    assert stopped.value.code == 2
    assert "--tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------

QWEN3_CARD_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                     'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
QWEN3_CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_CARD_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def qwen3_card_input(query: str, document: str, instruction: str = QWEN3_CARD_TASK) -> str:
    """The Qwen3-Reranker model card's prefix + format_instruction + suffix, then the pad anchor."""
    return (QWEN3_CARD_PREFIX + f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
            + QWEN3_CARD_SUFFIX + "<|endoftext|>")


def qwen3_labels(fake: Any) -> None:
    """A fake serving a yes/no classifier, as a Qwen3-Reranker conversion is."""
    fake.labels = lambda p1: sorted([{"label": "yes", "score": p1}, {"label": "no", "score": 1.0 - p1}],
                                    key=lambda label: -label["score"])


@pytest.mark.parametrize("model", ["Qwen/Qwen3-Reranker-0.6B", "my-QWEN3-RERANKER-seq", "tomaarsen/qwen3-reranker-4b"])
async def test_a_model_named_qwen3_reranker_in_any_case_gets_the_model_cards_prompt(
        client: Any, fake_infinity: Any, model: str) -> None:
    qwen3_labels(fake_infinity)
    answer = await post(client, {"query": "q?", "documents": ["a", " b "], "model": model})
    assert answer.status == 200
    assert fake_infinity.inputs == [qwen3_card_input("q?", "a"), qwen3_card_input("q?", " b ")]
    assert {r["index"]: r["relevance_score"] for r in answer.body["results"]} == {
        0: hashed_probability(qwen3_card_input("q?", "a").removesuffix("<|endoftext|>")),
        1: hashed_probability(qwen3_card_input("q?", " b ").removesuffix("<|endoftext|>"))}


async def test_qwen3_instruction_comes_from_the_request_then_the_flag_then_the_template(
        make_proxy: Any, fake_infinity: Any) -> None:
    qwen3_labels(fake_infinity)
    model = "qwen3-reranker-0.6b"
    default = await make_proxy()
    for instruction in ("Find code", ""):  # "" keeps an empty <Instruct> line, as the card's format_instruction does
        await post(default, {"query": "q", "documents": ["d"], "model": model, "instruction": instruction})
    await post(default, {"query": "q", "documents": ["d"], "model": model})
    flagged = await make_proxy(instruction="From the flag")
    await post(flagged, {"query": "q", "documents": ["d"], "model": model})
    assert fake_infinity.inputs == [qwen3_card_input("q", "d", "Find code"), qwen3_card_input("q", "d", ""),
                                    qwen3_card_input("q", "d"), qwen3_card_input("q", "d", "From the flag")]


async def test_the_template_flag_holds_for_every_model_name(make_proxy: Any, fake_infinity: Any) -> None:
    qwen3_labels(fake_infinity)
    client = await make_proxy(template="qwen3-reranker")
    assert (await post(client, {"query": "q", "documents": ["d"], "model": "my-alias"})).status == 200
    assert fake_infinity.inputs == [qwen3_card_input("q", "d")]
    mxbai = await make_proxy(template="mxbai-rerank-v2")
    fake_infinity.labels = FakeLabels.mxbai
    await post(mxbai, {"query": "q", "documents": ["d"], "model": "qwen3-reranker"})
    assert fake_infinity.inputs[-1] == proxy.classify_input("q", "d")


class FakeLabels:
    @staticmethod
    def mxbai(p1: float) -> list[dict[str, Any]]:
        return sorted([{"label": "1", "score": p1}, {"label": "0", "score": 1.0 - p1}], key=lambda label: -label["score"])


async def test_positive_label_follows_the_template_unless_the_flag_names_one(make_proxy: Any, fake_infinity: Any) -> None:
    fake_infinity.labels = lambda p1: [{"label": "yes", "score": 0.25}, {"label": "no", "score": 0.75}]
    qwen3 = await make_proxy()
    answer = (await post(qwen3, {"query": "q", "documents": ["d"], "model": "qwen3-reranker"})).body
    assert answer["results"][0]["relevance_score"] == 0.25
    flagged = await make_proxy(positive_label="no")
    answer = (await post(flagged, {"query": "q", "documents": ["d"], "model": "qwen3-reranker"})).body
    assert answer["results"][0]["relevance_score"] == 0.75


def test_an_unknown_template_stops_the_proxy_at_start_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        proxy.load_config(["--template", "qwen4"], environ={})
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "'qwen4'" in error and "mxbai-rerank-v2" in error and "qwen3-reranker" in error


async def test_info_gives_the_labels_and_context_of_the_default_models_template(make_proxy: Any) -> None:
    client = await make_proxy(model="Qwen/Qwen3-Reranker-4B-seq")
    info = await (await client.get("/info")).json()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "no", "1": "yes"}, "label2id": {"no": 0, "yes": 1}}}
    assert (info["template"], info["max_input_length"]) == ("qwen3-reranker", 8192)


async def test_request_metrics_and_log_lines_name_the_template(client: Any, fake_infinity: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    qwen3_labels(fake_infinity)
    with caplog.at_level(logging.INFO, logger="proxy-classifier"):
        await post(client, {"query": "q", "documents": ["d"], "model": "qwen3-reranker"})
    assert "template=qwen3-reranker " in caplog.records[-1].getMessage()
    metrics = await (await client.get("/metrics")).text()
    assert 'rerank_proxy_requests_total{route="/v1/rerank",status="200",template="qwen3-reranker"} 1.0' in metrics
    assert 'rerank_proxy_documents_total{route="/v1/rerank",template="qwen3-reranker"} 1.0' in metrics


def test_each_templates_own_length_sets_the_document_budget() -> None:
    config, counter = proxy.Config(), proxy.TokenCounter()
    costs = {name: counter.template_cost(template, template.has_line(template.default_instruction))
             for name, template in proxy.TEMPLATES.items()}
    assert costs["mxbai-rerank-v2"] != costs["qwen3-reranker"]
    for name, template in proxy.TEMPLATES.items():
        request = proxy.parse_rerank({"query": "q", "documents": ["x" * 8000]}, config)
        [chunk, *_] = proxy.plan_prompts(request, config, counter, template).unique_texts
        assert len(chunk) == template.max_tokens - costs[name] - proxy.BOUNDARY_TOKENS - 1 - len(
            template.default_instruction), name


# ---------------------------------------------------------------------------------------------
# Template files
# ---------------------------------------------------------------------------------------------

MXBAI_AS_A_FILE = {"name": "mxbai-rerank-v2", "models": ["mxbai-rerank"],
                   "prefix": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                   "<|im_end|>\n<|im_start|>user\n",
                   "instruction_line": "instruction: {instruction}\n", "query_line": "query: {query}\n",
                   "document_line": "document: {document}\n",
                   "suffix": "You are a search relevance expert who evaluates how well documents match search queries. "
                   "For each query-document pair, carefully analyze the semantic relationship between them, then "
                   "provide your binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
                   "<|im_end|>\n<|im_start|>assistant\n",
                   "positive_label": "1", "labels": ["0", "1"]}


def template_file(tmp_path: Any, *templates: dict[str, Any]) -> str:
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"templates": list(templates)}))
    return str(path)


@pytest.mark.parametrize("instruction", ["", "Find the legal passage"])
@pytest.mark.parametrize("document", ["d", "", " {x} \n", "東京 🙂"])
def test_a_file_that_redeclares_a_built_in_template_gives_byte_identical_prompts(
        tmp_path: Any, instruction: str, document: str) -> None:
    redeclared = proxy.templates_from_file(template_file(tmp_path, MXBAI_AS_A_FILE))["mxbai-rerank-v2"]
    built_in = proxy.TEMPLATES["mxbai-rerank-v2"]
    assert redeclared.prompt("q {query}", document, instruction).encode() == built_in.prompt(
        "q {query}", document, instruction).encode()
    assert redeclared == built_in


async def test_a_template_file_adds_a_template_chosen_by_its_models(make_proxy: Any, fake_infinity: Any,
                                                                   tmp_path: Any) -> None:
    own = {"name": "my-reranker", "models": ["my-reranker"], "prefix": "P:", "instruction_line": "I={instruction};",
           "query_line": "Q={query};", "document_line": "D={document};", "suffix": "A:", "positive_label": "1",
           "labels": ["0", "1"], "default_instruction": "rank it", "instruction_optional": False}
    client = await make_proxy(template_file=template_file(tmp_path, own))
    await post(client, {"query": "q", "documents": ["d"], "model": "the-MY-RERANKER-v1"})
    await post(client, {"query": "q", "documents": ["d"], "model": "other"})
    assert fake_infinity.inputs == ["P:I=rank it;Q=q;D=d;A:<|endoftext|>", proxy.classify_input("q", "d")]


@pytest.mark.parametrize(("content", "words"), [
    ("{not json", ["not a JSON object"]),
    (json.dumps({"templates": {}}), ["'templates' must be a list"]),
    (json.dumps({"templates": [{**MXBAI_AS_A_FILE, "suffx": "x"}]}), ["templates[0].suffx", "not a template field"]),
    (json.dumps({"templates": [{**MXBAI_AS_A_FILE, "query_line": "query: {q}\n"}]}), ["templates[0].query_line", "{query}"]),
    (json.dumps({"templates": [{**MXBAI_AS_A_FILE, "document_line": "{document} {document}"}]}), ["document_line"]),
    (json.dumps({"templates": [{**MXBAI_AS_A_FILE, "positive_label": "yes"}]}), ["templates[0].positive_label"]),
    (json.dumps({"templates": [{**MXBAI_AS_A_FILE, "max_tokens": "8192"}]}), ["templates[0].max_tokens", "int"]),
    (json.dumps({"templates": [{"name": "x"}]}), ["templates[0] lacks", "prefix"]),
])
def test_a_bad_template_file_stops_the_proxy_naming_the_file_and_the_field(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], content: str, words: list[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as stopped:
        proxy.load_config(["--template-file", str(path)], environ={})
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    for word in [str(path), *words]:
        assert word in error, (word, error)


# ---------------------------------------------------------------------------------------------
# Cross-encoders pass through to Infinity's own /rerank
# ---------------------------------------------------------------------------------------------


def cross_encoder_score(query: str, document: str, raw: bool = False) -> float:
    p = hashed_probability(query + "\0" + document.strip())
    return math.log(p) - math.log1p(-p) if raw else p


@pytest.mark.parametrize(("path", "field"), [("/v1/rerank", "documents"), ("/v2/rerank", "documents"),
                                             ("/rerank", "texts")])
@pytest.mark.parametrize("raw", [False, True])
async def test_a_cross_encoder_is_scored_by_infinitys_rerank_in_the_shape_asked_for(
        client: Any, fake_infinity: Any, path: str, field: str, raw: bool) -> None:
    fake_infinity.models, fake_infinity.cross_encoders = ["my-cross-encoder"], {"my-cross-encoder"}
    documents = ["alpha", "beta", "gamma", "delta"]
    answer = await post(client, {"query": "q", field: documents, "raw_scores": raw}, path)
    assert answer.status == 200
    expected = sorted(((i, cross_encoder_score("q", d, raw)) for i, d in enumerate(documents)), key=lambda x: -x[1])
    results = answer.body if field == "texts" else answer.body["results"]
    key = "score" if field == "texts" else "relevance_score"
    assert [(r["index"], r[key]) for r in results] == [(i, pytest.approx(s)) for i, s in expected]
    assert fake_infinity.classify_bodies == [] and fake_infinity.probe_bodies == []
    assert fake_infinity.rerank_bodies == [{"model": proxy.Config().model, "query": "q", "documents": documents,
                                            "raw_scores": raw, "return_documents": False}]


async def test_a_cross_encoder_honours_top_n_and_return_documents_and_batches(make_proxy: Any, fake_infinity: Any
                                                                           ) -> None:
    fake_infinity.models, fake_infinity.cross_encoders = ["ce", "mxbai"], {"ce"}
    client = await make_proxy(batch_size=3)
    documents = [f"doc {i}" for i in range(7)]
    answer = await post(client, {"query": "q", "documents": documents, "model": "ce", "top_n": 2,
                                 "return_documents": True}, "/v2/rerank")
    assert answer.status == 200
    order = sorted(range(7), key=lambda i: -cross_encoder_score("q", documents[i]))[:2]
    assert answer.body["results"] == [{"index": i, "relevance_score": cross_encoder_score("q", documents[i]),
                                  "document": {"text": documents[i]}} for i in order]
    assert [len(body["documents"]) for body in fake_infinity.rerank_bodies] == [3, 3, 1]
    assert answer.body["usage"] == {"prompt_tokens": 21, "total_tokens": 21}


async def test_beside_a_cross_encoder_a_classify_model_keeps_its_prompts(make_proxy: Any, fake_infinity: Any) -> None:
    fake_infinity.models, fake_infinity.cross_encoders = ["ce", SERVED_MODEL], {"ce"}
    client = await make_proxy()
    await post(client, {"query": "q", "documents": ["d"], "model": "ce"})
    await post(client, {"query": "q", "documents": ["d"]})
    assert fake_infinity.inputs == [proxy.classify_input("q", "d")]
    assert len(fake_infinity.rerank_bodies) == 1


async def test_a_cross_encoders_wrong_answer_is_502(client: Any, fake_infinity: Any) -> None:
    fake_infinity.models, fake_infinity.cross_encoders = ["ce"], {"ce"}

    async def repeated_index(request: web.Request) -> web.Response | None:
        if request.path.endswith("/rerank"):
            return web.json_response({"results": [{"index": 0, "relevance_score": 0.5}] * 2})
        return None

    fake_infinity.fault = repeated_index
    answer = await post(client, {"query": "q", "documents": ["a", "b"]})
    assert_error(answer, 502, "upstream_error", "index")


# ---------------------------------------------------------------------------------------------
# What a review of the templates, the self-check and the limits found (each failed before its fix)
# ---------------------------------------------------------------------------------------------


async def test_the_self_check_reads_the_positive_label_the_flag_names(make_proxy: Any, fake_infinity: Any) -> None:
    fake_infinity.labels = lambda p1: sorted([{"label": "LABEL_1", "score": p1}, {"label": "LABEL_0", "score": 1 - p1}],
                                             key=lambda label: -label["score"])
    client = await make_proxy(positive_label="LABEL_1")
    answer = await post(client, {"query": "q", "documents": ["d"]})
    assert answer.status == 200, answer.body
    assert (await (await client.get("/health")).json())["models"][SERVED_MODEL]["template_check"] == "ok"


async def test_a_model_named_by_an_alias_gets_the_template_of_the_name_infinity_serves(
        client: Any, fake_infinity: Any) -> None:
    fake_infinity.models = ["Qwen/Qwen3-Reranker-0.6B-seq"]  # one model: Infinity takes any name for it
    qwen3_labels(fake_infinity)
    assert (await post(client, {"query": "q", "documents": ["d"], "model": "my-alias"})).status == 200
    assert fake_infinity.inputs == [qwen3_card_input("q", "d")]


async def test_a_model_list_that_could_not_be_read_is_read_again_soon(
        client: Any, fake_infinity: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.ServedModels, "RETRY_SECONDS", 0.0)  # read again at once: no waiting here
    fake_infinity.models, fake_infinity.cross_encoders = ["ce"], {"ce"}
    fake_infinity.models_status = 503
    assert (await post(client, {"query": "q", "documents": ["d"], "model": "ce"})).status == 200
    assert fake_infinity.rerank_bodies == []  # not known to be a cross-encoder: prompts
    fake_infinity.models_status = 200
    assert (await post(client, {"query": "q", "documents": ["d"], "model": "ce"})).status == 200
    assert len(fake_infinity.rerank_bodies) == 1


async def test_a_cross_encoder_score_beyond_any_float_is_502(client: Any, fake_infinity: Any) -> None:
    fake_infinity.models, fake_infinity.cross_encoders = ["ce"], {"ce"}

    async def huge_integer(request: web.Request) -> web.Response | None:
        if request.path.endswith("/rerank"):
            return web.Response(body=b'{"results":[{"index":0,"relevance_score":' + b"9" * 400 + b"}]}",
                                content_type="application/json")
        return None

    fake_infinity.fault = huge_integer
    answer = await post(client, {"query": "q", "documents": ["a"]})
    assert_error(answer, 502, "upstream_error", "not a number")


async def test_a_cross_encoder_document_utf8_cannot_carry_is_400_naming_it(client: Any, fake_infinity: Any) -> None:
    fake_infinity.models, fake_infinity.cross_encoders = ["ce"], {"ce"}
    answer = await post(client, b'{"query":"q","documents":["a","b\\ud800"]}')
    assert_error(answer, 400, "invalid_request_error", "surrogate", param="documents[1]")
    assert fake_infinity.rerank_bodies == []


async def test_a_utf16_body_of_too_many_values_is_refused_as_its_utf8_would_be(client: Any) -> None:
    body = '{"query":"q","documents":["d"],"x":"\\"","y":[' + "[]," * 2_000_000 + '[]],"z":""}'
    for encoding in ("utf-8", "utf-16-le"):
        response = await client.post("/v1/rerank", data=body.encode(encoding))
        assert response.status == 400, encoding
        assert "JSON values" in (await response.json())["error"]["message"]


@pytest.mark.parametrize(("change", "words"), [
    ({"document_line": "{document}{document!s}"}, ["document_line", "{document}"]),
    ({"document_line": "document: {document:>2}\n"}, ["document_line"]),
    ({"query_line": "{query}{query.__len__}"}, ["query_line"]),
    ({"max_tokens": 10}, ["template mxbai-rerank-v2", "max_tokens"]),
])
def test_a_template_that_would_fail_every_request_stops_the_proxy_at_start(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], change: dict[str, Any], words: list[str]) -> None:
    path = template_file(tmp_path, {**MXBAI_AS_A_FILE, **change})
    with pytest.raises(SystemExit):
        proxy.load_config(["--template-file", path], environ={})
    error = capsys.readouterr().err
    for word in words:
        assert word in error, (word, error)


async def test_a_file_that_redeclares_the_default_template_replaces_it_for_every_model(
        make_proxy: Any, fake_infinity: Any, tmp_path: Any) -> None:
    client = await make_proxy(template_file=template_file(tmp_path, {**MXBAI_AS_A_FILE, "prefix": "NEW:"}))
    await post(client, {"query": "q", "documents": ["d"], "model": "some-other-model"})
    assert fake_infinity.inputs[0].startswith("NEW:query: q\n")
