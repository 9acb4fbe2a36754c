"""The optional speedups (docs/configuration.md, "Optional speedups"): orjson and uvloop change the cost, never an answer.

The proxy picks its JSON functions once, at import: orjson when it is installed, the standard library
when it is not or when PROXY_NO_SPEEDUPS=1. CI runs the fast and reliability tiers twice, once each way;
the tests here also put both implementations side by side in one run, whichever way the module was
imported: every input below gets the same value or the same error, and every request the same status
and the same answer as JSON values.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, free_port, proxy, strict_environment

SPEEDUPS_OFF = os.environ.get("PROXY_NO_SPEEDUPS", "") not in ("", "0")
SPEEDUPS_INSTALLED = all(importlib.util.find_spec(name) for name in ("orjson", "uvloop"))


def need_orjson() -> Any:
    if importlib.util.find_spec("orjson") is None:
        message = "orjson is not installed: pip install -r requirements-speedups.txt"
        if strict_environment():
            pytest.fail(message)
        pytest.skip(message)
    import orjson

    return orjson


@pytest.fixture
def with_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """The orjson functions callable even when the module was imported with PROXY_NO_SPEEDUPS=1."""
    monkeypatch.setattr(proxy, "orjson", need_orjson())


IMPLEMENTATIONS = {
    "stdlib": (proxy.stdlib_json_loads, proxy.stdlib_json_dumps, proxy.stdlib_escaped_utf8,
               proxy.stdlib_escaped_utf8_each),
    "orjson": (proxy.orjson_loads, proxy.orjson_dumps, proxy.orjson_escaped_utf8, proxy.orjson_escaped_utf8_each),
}
BOUND = ("json_loads", "json_dumps", "escaped_utf8", "escaped_utf8_each")


def use(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Bind the module's JSON functions as the import would have bound them for `name`."""
    for attribute, implementation in zip(BOUND, IMPLEMENTATIONS[name], strict=True):
        monkeypatch.setattr(proxy, attribute, implementation)


# ---------------------------------------------------------------------------------------------
# Which implementation runs
# ---------------------------------------------------------------------------------------------


def test_the_import_binds_orjson_when_installed_and_the_stdlib_with_PROXY_NO_SPEEDUPS() -> None:
    if SPEEDUPS_OFF:
        assert proxy.orjson is None and proxy.uvloop is None
        assert tuple(getattr(proxy, attribute) for attribute in BOUND) == IMPLEMENTATIONS["stdlib"]
        return
    if not SPEEDUPS_INSTALLED:
        if strict_environment():
            pytest.fail("orjson and uvloop must be installed in CI: pip install -r requirements-speedups.txt")
        pytest.skip("orjson or uvloop not installed")
    assert proxy.orjson is not None and proxy.uvloop is not None
    assert tuple(getattr(proxy, attribute) for attribute in BOUND) == IMPLEMENTATIONS["orjson"]


def start_line(env: dict[str, str]) -> str:
    """The proxy's first log line, started as a user starts it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "proxy-classifier.py"), "--host", "127.0.0.1", "--port", str(port),
         "--infinity-url", "http://127.0.0.1:9/v1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while "listening on" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()
        return line
    finally:
        process.terminate()
        process.wait(timeout=15)
        process.stderr.close()


@pytest.mark.parametrize("off", [False, True], ids=["speedups", "PROXY_NO_SPEEDUPS=1"])
def test_the_start_line_names_the_speedups_in_use(off: bool) -> None:
    env = {name: value for name, value in os.environ.items() if name != "PROXY_NO_SPEEDUPS"}
    if off:
        env["PROXY_NO_SPEEDUPS"] = "1"
    elif not SPEEDUPS_INSTALLED:
        if strict_environment():
            pytest.fail("orjson and uvloop must be installed in CI: pip install -r requirements-speedups.txt")
        pytest.skip("orjson or uvloop not installed")
    line = start_line(env)
    if off:
        assert "speedups: off (PROXY_NO_SPEEDUPS)" in line, line
    else:
        import orjson
        import uvloop

        assert f"speedups: orjson {orjson.__version__}, uvloop {uvloop.__version__}" in line, line


# ---------------------------------------------------------------------------------------------
# Reading JSON: where orjson and the standard library differ, the proxy reads as the stdlib does
# ---------------------------------------------------------------------------------------------


def outcome(loads: Any, raw: bytes, strict: bool = True, seen_as: Any = None) -> tuple[str, str]:
    """What a parser makes of `raw`: the value with its exact types (1 is not 1.0), or the error."""
    try:
        value = loads(raw, strict)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return type(exc).__name__, str(exc)
    return "value", repr(seen_as(value) if seen_as else value)


def as_orjson_reads_integers(value: Any) -> Any:
    """Infinity's answers are read without the exactness pass: where orjson read the answer, an
    integer outside [-2**63, 2**64) stays the float it made of it (the answer is checked field by
    field, and its error messages re-read it with the stdlib)."""
    if isinstance(value, dict):
        return {key: as_orjson_reads_integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_orjson_reads_integers(item) for item in value]
    if proxy.is_integer(value) and not -(2**63) <= value < 2**64:
        return float(value)
    return value


def read_alike(raw: bytes, strict: bool) -> None:
    read = outcome(proxy.orjson_loads, raw, strict)
    if strict:
        assert read == outcome(proxy.stdlib_json_loads, raw)
    else:
        assert read in (outcome(proxy.stdlib_json_loads, raw, strict),
                        outcome(proxy.stdlib_json_loads, raw, strict, as_orjson_reads_integers))


DIFFERENCES = {  # each one a place where orjson alone would read differently or refuse
    "integer beyond 64 bits": b'{"n": 18446744073709551616}',
    "negative integer beyond 64 bits": b'{"n": -9223372036854775809}',
    "integers at 64 bits' edges": b'[18446744073709551615, -9223372036854775808, 9223372036854775807]',
    "integer of 5000 digits": b"[" + b"7" * 5000 + b"]",
    "NaN": b'{"n": NaN}',
    "Infinity": b'{"n": [Infinity, -Infinity]}',
    "1e999": b'{"n": 1e999}',
    "-1e999": b"-1e999",
    "lone high surrogate": b'{"s": "a\\ud800b"}',
    "lone low surrogate": b'["\\udfff"]',
    "surrogate pair": b'["\\ud83d\\ude00"]',
    "UTF-8-encoded surrogate": b'["\xed\xa0\x80"]',
    "nesting 1025 deep": b"[" * 1025 + b"]" * 1025,
    "nesting 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "duplicate keys": b'{"a": 1, "b": 2, "a": 3}',
    "-0": b"[-0, -0.0, 0.0]",
    "UTF-8 BOM": b'\xef\xbb\xbf{"a": 1}',
    "UTF-16": '{"a": "\u00e9"}'.encode("utf-16"),
    "UTF-16 without BOM": '{"a": 1}'.encode("utf-16-le"),
    "not UTF-8": b'{"a": "\xff"}',
    "overlong UTF-8": b'["\xc0\x80"]',
    "tiny float": b"[4.9e-324, 2.5e-324, 1e-400]",
    "float beyond 2**63": b"[1e19, -9.3e18]",
    "control character": b'["a\x01"]',
    "trailing comma": b"[1,]",
    "empty": b"",
}


@pytest.mark.parametrize("strict", [True, False], ids=["client body", "Infinity's answer"])
@pytest.mark.parametrize("raw", DIFFERENCES.values(), ids=DIFFERENCES.keys())
def test_orjson_reads_every_known_difference_as_the_stdlib_does(with_orjson: None, raw: bytes, strict: bool) -> None:
    read_alike(raw, strict)


def test_an_integer_beyond_64_bits_is_read_exactly_with_orjson(with_orjson: None) -> None:
    assert proxy.orjson_loads(b'{"top_n": 18446744073709551616}') == {"top_n": 2**64}


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Any JSON value a client could send: integers of any size, floats of any size and sign (infinities
# and NaN too: json.dumps writes them, and both ways must refuse them alike), any text, lone
# surrogates included.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=16)


@SETTINGS
@given(value=json_values, ascii_only=st.booleans(), strict=st.booleans())
def test_any_json_text_is_read_alike(with_orjson: None, value: Any, ascii_only: bool, strict: bool) -> None:
    read_alike(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"), strict)


@SETTINGS
@given(raw=st.binary(max_size=60) | st.builds(
    lambda text, cut, noise: text.encode("utf-8", "surrogatepass")[:cut] + noise,
    st.builds(json.dumps, json_values), st.integers(0, 80), st.binary(max_size=3)))
def test_any_bytes_are_read_alike(with_orjson: None, raw: bytes) -> None:
    read_alike(raw, strict=True)


# ---------------------------------------------------------------------------------------------
# Writing JSON: the same JSON values, and the same prompts in the classify bodies
# ---------------------------------------------------------------------------------------------

# What an answer can hold: what the strict reader returns (finite numbers, any text).
answer_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=16)


@SETTINGS
@given(value=answer_values)
def test_any_answer_is_written_as_the_same_json_value(with_orjson: None, value: Any) -> None:
    ours, theirs = proxy.orjson_dumps(value), proxy.stdlib_json_dumps(value)
    assert repr(json.loads(ours)) == repr(json.loads(theirs))
    ours.decode("utf-8")  # always valid UTF-8: a lone surrogate is written as an escape


@SETTINGS
@given(text=any_text | st.text(max_size=200))
def test_a_document_reaches_the_classify_body_as_the_same_text(with_orjson: None, text: str) -> None:
    def carried(escape: Any) -> str:
        try:
            return json.loads(b'"' + escape(text) + b'"')
        except UnicodeEncodeError:
            return "UnicodeEncodeError"  # an unpaired surrogate: the 400 that names the document

    assert carried(proxy.orjson_escaped_utf8) == carried(proxy.stdlib_escaped_utf8)
    assert carried(proxy.orjson_escaped_utf8) in (text, "UnicodeEncodeError")


@SETTINGS
@given(texts=st.lists(any_text | st.text(max_size=50), max_size=6))
def test_a_batch_of_documents_is_escaped_as_each_document_alone(with_orjson: None, texts: list[str]) -> None:
    def each(escape_each: Any) -> list[Any] | str:
        try:  # the texts as a JSON reader gets them back (orjson and the stdlib escape some characters differently)
            return [json.loads(b'"' + escaped + b'"') for escaped in escape_each(texts)]
        except UnicodeEncodeError:
            return "UnicodeEncodeError"  # an unpaired surrogate: the 400 that names the document

    assert each(proxy.orjson_escaped_utf8_each) == each(proxy.stdlib_escaped_utf8_each)
    assert each(proxy.stdlib_escaped_utf8_each) in (texts, "UnicodeEncodeError")


# ---------------------------------------------------------------------------------------------
# Through the proxy: the same status and the same answer for every request, both ways
# ---------------------------------------------------------------------------------------------


async def answer_with(client: Any, monkeypatch: pytest.MonkeyPatch, name: str, raw: bytes,
                      path: str) -> tuple[int, Any]:
    use(monkeypatch, name)
    response = await client.post(path, data=raw)
    answer = await response.json()
    if isinstance(answer, dict):
        answer.pop("id", None)  # a new uuid4 and time each request
        answer.pop("created", None)
    return response.status, answer


async def both_ways(client: Any, monkeypatch: pytest.MonkeyPatch, raw: bytes, path: str = "/v1/rerank") -> Any:
    stdlib = await answer_with(client, monkeypatch, "stdlib", raw, path)
    fast = await answer_with(client, monkeypatch, "orjson", raw, path)
    assert repr(fast) == repr(stdlib)
    return stdlib


REQUESTS = {  # (body, the status the contract gives it)
    "top_n beyond 64 bits": (b'{"query": "q", "documents": ["a", "b"], "top_n": 18446744073709551616}', 200),
    "top_n below -2**63": (b'{"query": "q", "documents": ["a", "b"], "top_n": -9223372036854775809}', 200),
    "top_n 1e19": (b'{"query": "q", "documents": ["a"], "top_n": 1e19}', 400),
    "query a huge integer": (b'{"query": 18446744073709551616, "documents": ["a"]}', 400),
    "echoed document with a huge integer": (
        b'{"query": "q", "documents": [{"text": "a", "id": 18446744073709551616}], "return_documents": true}', 200),
    "rank_fields line with a huge integer": (
        b'{"query": "q", "documents": [{"n": 18446744073709551616}], "rank_fields": ["n"]}', 200),
    "lone surrogate in a document": (b'{"query": "q", "documents": ["ok", "a \\ud800 b"]}', 400),
    "lone surrogate in the query": (b'{"query": "q\\udfff", "documents": ["ok"]}', 400),
    "echoed lone surrogate outside the ranked field": (
        b'{"query": "q", "documents": [{"t": "x", "u": "\\ud800"}], "rank_fields": ["t"], "return_documents": true}',
        200),
    "NaN": (b'{"query": "q", "documents": [{"text": "a", "x": NaN}]}', 400),
    "1e999": (b'{"query": "q", "documents": ["a"], "x": 1e999}', 400),
    # MAX_BODY_NESTING (512, the body object included) holds whichever parser reads: orjson reads 1024
    # levels, the stdlib about 950 at a handler's depth of the stack.
    "nesting 512 deep, at the bound": (b'{"query": "q", "documents": ["a"], "x": ' + b"[" * 511 + b"]" * 511 + b"}",
                                       200),
    "nesting 513 deep, past the bound": (b'{"query": "q", "documents": ["a"], "x": ' + b"[" * 512 + b"]" * 512 + b"}",
                                         400),
    "nesting 960 deep: orjson reads it, the stdlib may not": (
        b'{"query": "q", "documents": ["a"], "x": ' + b"[" * 959 + b"]" * 959 + b"}", 400),
    "nesting 1010 deep": (b'{"query": "q", "documents": ["a"], "x": ' + b"[" * 1009 + b"]" * 1009 + b"}", 400),
    "nesting 2000 deep": (b'{"query": "q", "documents": [{"text": "a", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}]}",
                          400),
    "duplicate keys": (b'{"query": "q", "documents": ["a"], "query": "r"}', 200),
    "UTF-8 BOM": (b'\xef\xbb\xbf{"query": "q", "documents": ["a"]}', 200),
    "UTF-16": '{"query": "q", "documents": ["\u00e9"]}'.encode("utf-16"),
    "not UTF-8": (b'{"query": "q", "documents": ["\xff"]}', 400),
    "non-ASCII echoed": ('{"query": "q", "documents": ["caf\u00e9 \u6771\u4eac"], "return_documents": true}'.encode(),
                         200),
}


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("case", REQUESTS.values(), ids=REQUESTS.keys())
async def test_every_request_gets_the_same_status_and_answer_both_ways(
        client: Any, with_orjson: None, monkeypatch: pytest.MonkeyPatch, case: Any, path: str) -> None:
    raw, expected = case if isinstance(case, tuple) else (case, 200)
    status, answer = await both_ways(client, monkeypatch, raw, path)
    assert status == expected, answer


rerank_bodies = st.fixed_dictionaries({
    "query": any_text,
    "documents": st.lists(any_text | st.fixed_dictionaries({"text": any_text}, optional={"n": json_values}),
                          max_size=4),
}, optional={
    "top_n": st.integers() | st.floats(allow_nan=False) | st.none(),
    "return_documents": st.booleans(),
    "raw_scores": st.booleans(),
    "rank_fields": st.just(["text", "n"]),
    "extra": json_values,
})


@SETTINGS
@given(body=rerank_bodies, path=st.sampled_from(["/v1/rerank", "/v2/rerank"]))
async def test_any_rerank_body_gets_the_same_status_and_answer_both_ways(
        client: Any, with_orjson: None, monkeypatch: pytest.MonkeyPatch, body: dict[str, Any], path: str) -> None:
    await both_ways(client, monkeypatch, json.dumps(body).encode("utf-8", "surrogatepass"), path)


HUGE_TOKENS = (b'{"data": [[{"label": "1", "score": 0.5}]], "usage": {"prompt_tokens": 18446744073709551616}}')
HUGE_SCORE = b'{"data": [[{"label": "1", "score": 18446744073709551616}]]}'
NAN_SCORE = b'{"data": [[{"label": "1", "score": NaN}]]}'
DEEP_ITEM = b'{"data": [' + b"[" * 1010 + b"]" * 1010 + b"]}"  # orjson reads it, the stdlib cannot


@pytest.mark.parametrize(("answer", "expected"), [(HUGE_TOKENS, 200), (HUGE_SCORE, 502), (NAN_SCORE, 502),
                                                 (DEEP_ITEM, 502)], ids=["tokens", "score", "NaN", "nested 1010 deep"])
async def test_infinity_answers_beyond_what_orjson_reads_are_handled_alike(
        client: Any, fake_infinity: Any, with_orjson: None, monkeypatch: pytest.MonkeyPatch, answer: bytes,
        expected: int) -> None:
    async def odd_answer(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    fake_infinity.fault = odd_answer
    status, body = await both_ways(client, monkeypatch, b'{"query": "q", "documents": ["a"]}')
    assert status == expected, body


# ---------------------------------------------------------------------------------------------
# Infinity's answers and the plan read as the contract says, whatever their shape
# ---------------------------------------------------------------------------------------------


def reference_probabilities(data: list[Any], positive: str) -> list[float] | None:
    """The contract read slowly: each item's first label named `positive`, a number in [0, 1]."""
    scores = []
    for item in data:
        found = [label.get("score") for label in item if isinstance(label, dict) and label.get("label") == positive] \
            if isinstance(item, list) else []
        score = found[0] if found else None
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            return None
        scores.append(float(score))
    return scores


labels = st.fixed_dictionaries({"label": st.sampled_from(["1", "0", "2"]),
                                "score": st.floats(-0.5, 1.5) | st.sampled_from([0, 1, True, None, "0.5", 0.5])})
items = st.lists(labels | st.integers(), max_size=3) | st.just([{"label": "1", "score": 0.25}, {"label": "0"}])


@SETTINGS
@given(data=st.lists(items, max_size=6), floats=st.lists(st.floats(0, 1), max_size=6))
def test_infinity_answers_are_read_as_the_first_positive_label_of_each_item(data: list[Any], floats: list[float]) -> None:
    # mostly Infinity's own shape (two labels, sorted by score), with odd items mixed in
    data = [[{"label": "1", "score": p}, {"label": "0", "score": 1 - p}][:: 1 if p > 0.5 else -1]
            for p in floats] + data
    expected = reference_probabilities(data, "1")
    try:
        scores, _ = proxy.positive_probabilities({"data": data}, len(data), "1")
    except proxy.RerankError as exc:
        assert expected is None and exc.status == 502
    else:
        assert repr(scores) == repr(expected)


@pytest.mark.parametrize("texts", [["a", "b", "a"], ["a", "b " * 5000, "c"], ["a", "b", "c"], []])
def test_a_plan_without_chunks_or_repeats_maps_each_document_to_its_own_prompt(texts: list[str]) -> None:
    request = proxy.parse_rerank({"query": "q", "documents": texts}, proxy.Config(max_doc_chars=1000))
    plan = proxy.plan_prompts(request, proxy.Config(max_doc_chars=1000))
    assert [[plan.unique_texts[i] for i in ids] for ids in plan.chunks_by_document] == [
        proxy.chunks_of(text, 1000, 10) for text in texts]
    assert len(set(plan.unique_texts)) == len(plan.unique_texts)


def test_the_speedups_are_named_with_version_ranges_and_installed_by_setup_and_the_image() -> None:
    requirements = [line.split(";")[0].strip() for line in (ROOT / "requirements-speedups.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert [line.split(">=")[0] for line in requirements] == ["orjson", "uvloop"]
    assert all(">=" in line and ",<" in line for line in requirements), requirements
    assert "-r requirements-speedups.txt" in (ROOT / "setup.sh").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements-speedups.txt" in dockerfile.split("COPY proxy-classifier.py")[0]
    runtime = (ROOT / "requirements.txt").read_text()
    assert "orjson" not in runtime and "uvloop" not in runtime  # optional: the proxy runs without them
