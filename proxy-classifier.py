#!/usr/bin/env python3
"""Rerank proxy for Infinity.

Infinity serves LLM rerankers converted to two-label classifiers (mxbai-rerank-v2's ``-seq``
conversions, Qwen3-Reranker's) only through ``/classify`` (Infinity issue 552). This proxy accepts
Cohere/Infinity/TEI-style rerank requests on ``/rerank``, ``/v1/rerank`` and ``/v2/rerank``, builds
each model's own prompt for every query and document, sends the prompts to Infinity as batched
``/classify`` calls over one shared HTTP session, and answers with relevance scores in the shape each
client parses; a cross-encoder goes to Infinity's own ``/rerank``.

The file reads top to bottom, each name defined before it is used: the templates, configuration,
errors and the JSON codec, the translation as pure functions, admission and metrics, the upstream client,
thin handlers, the middleware and the app factory, main().
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import functools
import hmac
import json
import logging
import math
import os
import re
import socket
import string
import sys
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import prometheus_client
from aiohttp import ClientSession, ClientTimeout, HttpVersion11, TCPConnector, TraceConfig, client_exceptions, web
from yarl import URL

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline_in  # unlike asyncio.wait_for, no task per use
else:
    from async_timeout import timeout as deadline_in  # aiohttp's own dependency before 3.11

log = logging.getLogger("proxy-classifier")
PROXY_VERSION = "1.0"  # --version, GET /info (where TEI reports its own) and the image's label (Dockerfile ARG)

# Optional speedups (orjson for JSON, uvloop for the event loop): used when installed, chosen once
# here so that no call site branches on them. PROXY_NO_SPEEDUPS=1 turns them off. It is the one
# environment variable read outside Config: the choice binds functions while the module is imported,
# before any Config exists, and the test suite runs once more with it set to cover the stdlib path.
SPEEDUPS_OFF = os.environ.get("PROXY_NO_SPEEDUPS", "") not in ("", "0")
orjson: Any = None
uvloop: Any = None
if not SPEEDUPS_OFF:
    with contextlib.suppress(ImportError):
        import orjson
    with contextlib.suppress(ImportError):
        import uvloop


# --------------------------------------------------------------------------------------------
# 1. What the models expect: each reranker family's prompt as data, the one function that renders
#    it, and how many tokens a text takes. A family is an entry here, never a branch in the request path.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A causal-LM reranker's prompt, in named pieces, as its authors' code joins them: prefix, [instruction
    line], query line, document line, suffix. The model answers at the suffix's last token; converted to a
    two-label classifier it is served by Infinity's /classify."""

    name: str
    prefix: str
    instruction_line: str  # holds {instruction}
    query_line: str  # holds {query}
    document_line: str  # holds {document}
    suffix: str
    positive_label: str  # the classifier label whose probability is the relevance
    labels: tuple[str, ...]  # id2label, in label-id order
    default_instruction: str = ""
    instruction_optional: bool = True  # an empty instruction drops its line (mxbai) or keeps it empty (Qwen3)
    # Pad anchors, tried in order by the self-check (see AnchorCheck): Infinity strips every input, which
    # would cut the prompt's trailing newline and move the read-out one token back. A pad token after the
    # prompt is not whitespace, so it is not stripped, and a *ForSequenceClassification model reads the
    # last token that is not its pad token: exactly the trained last position.
    anchors: tuple[str, ...] = ("<|endoftext|>", "<|im_end|>")
    special_tokens: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    max_tokens: int = 8192  # the longest prompt the model scores; its authors' code never passes it
    models: tuple[str, ...] = ()  # without --template, a model whose name holds one of these (any case) uses it

    def has_line(self, instruction: str) -> bool:
        """Whether a prompt with this instruction has an instruction line."""
        return bool(instruction) or not self.instruction_optional

    def head(self, query: str, instruction: str) -> str:
        """Everything before the document: the same for every prompt of one request."""
        line = self.instruction_line.format(instruction=instruction) if self.has_line(instruction) else ""
        return self.prefix + line + self.query_line.format(query=query) + self.document_parts[0]

    @functools.cached_property
    def document_parts(self) -> tuple[str, str]:
        before, after = self.document_line.format(document="\0").split("\0")
        return before, after

    @functools.cached_property
    def tail(self) -> str:
        """Everything after the document, without the anchor: the same for every prompt."""
        return self.document_parts[1] + self.suffix

    def prompt(self, query: str, document: str, instruction: str = "") -> str:
        """The exact text the model was trained to score for one query and one document."""
        return self.head(query, instruction) + document + self.tail


QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
TEMPLATES: dict[str, Template] = {
    # mixedbread's mxbai_rerank_v2.py (and vLLM's mxbai_rerank_v2.jinja): the template printed on the -seq
    # model cards differs (a leading <|endoftext|>, spaces before newlines); the trained one is this.
    "mxbai-rerank-v2": Template(
        name="mxbai-rerank-v2",
        prefix=QWEN_SYSTEM + "<|im_start|>user\n",
        instruction_line="instruction: {instruction}\n",
        query_line="query: {query}\n",
        document_line="document: {document}\n",
        suffix="You are a search relevance expert who evaluates how well documents match search queries. "
        "For each query-document pair, carefully analyze the semantic relationship between them, "
        "then provide your binary relevance judgment (0 for not relevant, 1 for relevant).\n"
        "Relevance:<|im_end|>\n<|im_start|>assistant\n",
        positive_label="1",
        labels=("0", "1"),
        models=("mxbai-rerank",),
    ),
    # The Qwen3-Reranker model card's prefix, format_instruction and suffix. Its instruction line is always
    # there: the card's format_instruction writes it for any instruction that is not None, "" included.
    "qwen3-reranker": Template(
        name="qwen3-reranker",
        prefix="<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n',
        instruction_line="<Instruct>: {instruction}\n",
        query_line="<Query>: {query}\n",
        document_line="<Document>: {document}",
        suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        positive_label="yes",
        labels=("no", "yes"),
        default_instruction="Given a web search query, retrieve relevant passages that answer the query",
        instruction_optional=False,
        models=("qwen3-reranker",),
    ),
}
DEFAULT_TEMPLATE = TEMPLATES["mxbai-rerank-v2"]  # for a model no template names


def template_for(templates: dict[str, Template], chosen: str, *names: str) -> Template:
    """--template for every request; else the first template (a file's before the built-in ones) whose
    `models` names part of the model's name (the request's, then the one Infinity serves it under); else
    mxbai-rerank-v2 (a file's, where it re-declares it)."""
    if chosen:
        return templates[chosen]
    for name in map(str.lower, names):
        for template in templates.values():
            if any(part.lower() in name for part in template.models):
                return template
    return templates.get(DEFAULT_TEMPLATE.name, DEFAULT_TEMPLATE)


# A template file's fields and their JSON types, from Template's own (a tuple is a JSON list); those without a default
# are required.
TEMPLATE_FIELDS = {field.name: {"str": str, "bool": bool, "int": int, "tuple[str, ...]": list}[field.type]
                   for field in dataclasses.fields(Template)}
REQUIRED_FIELDS = [field.name for field in dataclasses.fields(Template) if field.default is dataclasses.MISSING]
PLACEHOLDERS = {"instruction_line": "instruction", "query_line": "query", "document_line": "document"}


def json_type(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"the number {value!r}"
    return {type(None): "null", bool: "a boolean", str: "a string", list: "a list"}.get(type(value), "an object")


def template_from_entry(entry: Any, where: str) -> Template:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object")
    for field, value in entry.items():
        kind = TEMPLATE_FIELDS.get(field)
        if kind is None:
            raise ValueError(f"{where}.{field} is not a template field (known: {', '.join(TEMPLATE_FIELDS)})")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}.{field} must be a {kind.__name__}, got {json_type(value)}")
        if kind is list and not all(isinstance(item, str) and item for item in value):
            raise ValueError(f"{where}.{field} must be a list of non-empty strings")
    missing = [field for field in REQUIRED_FIELDS if field not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    for field, placeholder in PLACEHOLDERS.items():
        try:  # one bare {placeholder}: no other field, no conversion or format spec, nothing Python would evaluate
            ok = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(entry[field])
                  if name is not None] == [(placeholder, "", None)] and "\0" not in entry[field]
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{where}.{field} must hold {{{placeholder}}} once and no other braces "
                             "(write a literal brace twice: {{ }})")
    if entry["positive_label"] not in entry["labels"] or len(entry["labels"]) < 2:
        raise ValueError(f"{where}.positive_label must be one of labels, which needs at least two")
    if entry.get("max_tokens", 1) < 1 or not entry.get("anchors", True):
        raise ValueError(f"{where}: max_tokens must be at least 1 and anchors not empty")
    return Template(**{field: tuple(value) if isinstance(value, list) else value for field, value in entry.items()})


def templates_from_file(path: str) -> dict[str, Template]:
    """The templates of a --template-file, file's first: {"templates": [{field: value, ...}, ...]}
    (docs/how-it-works.md, Templates). A mistake raises ValueError naming the file, the field and what is wrong."""
    if not path:
        return dict(TEMPLATES)
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)["templates"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--template-file {path}: not a JSON object with a 'templates' list ({exc})") from None
    if not isinstance(entries, list):
        raise ValueError(f"--template-file {path}: 'templates' must be a list")
    own = {}
    for i, entry in enumerate(entries):
        template = template_from_entry(entry, f"--template-file {path}: templates[{i}]")
        own[template.name] = template
    return {**own, **{name: t for name, t in TEMPLATES.items() if name not in own}}


PAD_ANCHOR = DEFAULT_TEMPLATE.anchors[0]


def prompt_for(query: str, document: str, instruction: str = "", template: Template = DEFAULT_TEMPLATE) -> str:
    """The prompt as trained, without the anchor."""
    return template.prompt(query, document, instruction)


def classify_input(query: str, document: str, instruction: str = "", anchor: str = PAD_ANCHOR,
                   template: Template = DEFAULT_TEMPLATE) -> str:
    """What is sent to Infinity for one query and one document: the prompt, then the pad anchor."""
    return template.prompt(query, document, instruction) + anchor


def template_overhead_chars(template: Template) -> int:
    """Characters of the longest prompt that are not the query, instruction or document."""
    return len(template.prompt("", "", "x")) - 1 + max(map(len, template.anchors))


# Room for the few tokens that BPE merges can add where the pieces of a prompt meet.
BOUNDARY_TOKENS = 16
# At most this many characters a token are tokenized to find how many fit in a budget: were tokens longer,
# fewer characters would be kept than could be, never more.
MOST_CHARS_PER_TOKEN = 32


class TokenCounter:
    """How many tokens a text takes, as an upper bound. With --tokenizer, the model's own count (the
    optional `tokenizers` package; no torch). Without, the text's UTF-8 bytes after the NFC normalisation
    Qwen's tokenizers apply: a byte-level BPE token holds at least one byte, so no script (CJK, emoji)
    can make a prompt outgrow the model. A special token of the template counts as one token."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.template_costs: dict[tuple[Template, bool], int] = {}

    @classmethod
    def from_file(cls, path: str) -> TokenCounter:
        if not path:
            return cls()
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
        try:
            return cls(Tokenizer.from_file(path))
        except Exception as exc:  # the library raises its own error types for a missing or bad file
            raise ValueError(f"--tokenizer {path!r} is not a tokenizer.json the tokenizers package reads: {exc}") from None

    def bytes_bound(self, text: str) -> int:
        if text.isascii():
            return len(text)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return len(text.encode("utf-8", "surrogatepass"))

    def count(self, text: str) -> int:
        bound = self.bytes_bound(text)
        if self.tokenizer is None or bound <= 1:
            return bound
        return len(self.offsets(text) or ()) or bound

    def offsets(self, text: str) -> list[tuple[int, int]] | None:
        """Each token's character span, by the model's tokenizer; None for text it cannot take (an unpaired
        surrogate: the request is refused for it later, naming the document)."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).offsets
        except TypeError:
            return None

    def fits(self, text: str, budget: int) -> bool:
        return self.bytes_bound(text) <= budget or (self.tokenizer is not None and self.count(text) <= budget)

    def template_cost(self, template: Template, instruction_line: bool) -> int:
        """Tokens of a prompt's fixed text (with or without its instruction line), its anchor included;
        counted once per template."""
        cost = self.template_costs.get((template, instruction_line))
        if cost is None:
            line = template.instruction_line.format(instruction="") if instruction_line else ""
            text = (template.prefix + line + template.query_line.format(query="")
                    + template.document_line.format(document="") + template.suffix)
            if self.tokenizer is None:
                specials = sum(text.count(token) for token in template.special_tokens)
                for token in template.special_tokens:
                    text = text.replace(token, "")
                cost = self.bytes_bound(text) + specials + 1
            else:
                cost = self.count(text) + 1
            self.template_costs[template, instruction_line] = cost
        return cost

    def query_room(self, template: Template, instruction: str) -> int:
        """The tokens left for the query: it and the instruction take at most three quarters of what the
        template leaves (mixedbread's library keeps the same share), the rest is the document's."""
        room = (template.max_tokens - self.template_cost(template, template.has_line(instruction)) - BOUNDARY_TOKENS)
        return room * 3 // 4 - (self.count(instruction) if instruction else 0)

    def fitting(self, text: str, budget: int) -> int:
        """How many leading characters of `text` fit in `budget` tokens."""
        if self.bytes_bound(text) <= budget:
            return len(text)
        if self.tokenizer is not None:
            # A token holds at most a few dozen characters: no more than this prefix can fit, and a 4 MB
            # document is not tokenized whole to keep its first few thousand tokens.
            text = text[: max(budget, 1) * MOST_CHARS_PER_TOKEN]
            offsets = self.offsets(text)
            if offsets is not None:
                return len(text) if len(offsets) <= budget else offsets[max(budget, 0)][0]
        if text.isascii():
            return max(budget, 0)
        end = min(len(text), budget)
        while end > 0 and (cost := self.bytes_bound(text[:end])) > budget:
            end = min(end - 1, end * budget // cost)
        return max(end, 0)


UTF8_BOUND = TokenCounter()


# --------------------------------------------------------------------------------------------
# 2. Configuration: one frozen dataclass, filled from flags and environment variables here only.
# --------------------------------------------------------------------------------------------

# Infinity refuses an input over 122,880 characters (422) and 2048 inputs in one call.
INFINITY_MAX_INPUT_CHARS = 122_880
INFINITY_MAX_BATCH = 2048
# What one prompt costs in memory beyond its document's text (the template in its /classify body, the objects that
# track it), measured: 10,000 one-word documents take about 14 MB in a body of 89 KB. Each prompt counts as this many
# bytes against --max-pending-bytes, or a flood of such requests would pass under a bound on bodies alone.
PROMPT_BYTES = 1536
CONNECT_TIMEOUT_SECONDS = 5.0  # an unreachable Infinity fails fast, whatever --timeout says
# Probes must answer within what orchestrators wait (Kubernetes: 1 s by default), whatever Infinity does.
LIVENESS_PROBE_SECONDS = 0.8
READINESS_PROBE_SECONDS = 0.8


def option(default: Any, text: str, secret: bool = False, least: int | None = None) -> Any:
    """A Config field that is also a flag (--batch-size) and an environment variable (BATCH_SIZE), with its
    --help text and lowest value: this table alone drives argparse, the environment, the defaults and --help."""
    return dataclasses.field(default=default, metadata={"help": text, "secret": secret, "least": least})


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(flag: str) -> str:
    return flag.lstrip("-").upper().replace("-", "_")


@dataclass(frozen=True)
class Config:
    # Loopback unless told otherwise: a proxy with no --api-key must not be open to the network by accident.
    # The image sets HOST=0.0.0.0, where a container needs it.
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface; then set --api-key)")
    port: int = option(8002, "port to listen on", least=0)
    infinity_url: str = option("http://localhost:7997/v1", "Infinity's base URL including its --url-prefix")
    model: str = option("michaelfeil/mxbai-rerank-base-v2-seq",
                        "model name sent to Infinity and echoed when a request names none")
    timeout: float = option(60.0, "seconds a whole rerank request may take, queueing included (else 504)")
    batch_size: int = option(256, "prompts per /classify call (at most 2048)", least=1)
    max_concurrency: int = option(64, "scoring calls to Infinity (/classify, a cross-encoder's /rerank) in flight at "
                                  "once, over all requests", least=1)
    max_documents: int = option(10_000, "documents allowed in one rerank request", least=1)
    max_body_size: int = option(32 * 1024 * 1024, "bytes allowed in one request body (else 413)", least=1)
    max_query_chars: int = option(4000, "a longer query is cut to this many characters", least=1)
    max_doc_chars: int = option(8000, "a longer document is split into chunks of at most this many characters",
                                least=1)
    max_chunks_per_doc: int = option(10, "chunks of one document scored, when a request gives no max_chunks_per_doc",
                                     least=1)
    template: str = option("", "the prompt template for every request (mxbai-rerank-v2, qwen3-reranker, or one of "
                           "--template-file); without it each request's model name chooses")
    template_file: str = option("", "a JSON file of templates that adds to or replaces the built-in ones "
                                "(docs/how-it-works.md)")
    instruction: str | None = option(None, "the instruction used when a request gives none (default: the "
                                     "template's; mxbai-rerank-v2 has none, and an empty one means no instruction line)")
    positive_label: str = option("", "the classifier label whose probability is the relevance score (default: the "
                                 "template's, 1 for mxbai-rerank-v2)")
    tokenizer: str = option("", "the served model's tokenizer.json: prompts are kept within the model's context "
                            "counted in its tokens (needs the tokenizers package); without it, counted in UTF-8 "
                            "bytes, a bound for any script")
    api_key: str = option("", "if set, clients must send 'Authorization: Bearer <key>'", secret=True)
    infinity_api_key: str = option("", "bearer token the proxy sends to Infinity", secret=True)
    log_level: str = option("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL")
    # Chosen by measurement (docs/operations.md, "Limits"): with them the proxy's peak RSS under any flood stays well under 1 GiB.
    max_concurrent_requests: int = option(256, "requests handled at once; more are refused at once (429 "
                                          "overloaded_error)", least=1)
    max_pending_bytes: int = option(64 * 1024 * 1024, f"bytes of request bodies, and {PROMPT_BYTES} a prompt plus "
                                    "its query and instruction, held at once; more are refused at once (429 "
                                    "overloaded_error)")
    client_timeout: float = option(30.0, "seconds a client may take to send its headers, and then its body (else "
                                   "408 or the connection is closed), and to read its answer")

    def check(self) -> None:
        """Raise ValueError with the flag's name for any value the proxy cannot run with."""
        self.check_numbers()
        self.check_prompts()
        self.check_infinity_url()
        if self.max_pending_bytes < self.max_body_size:
            raise ValueError(
                f"--max-pending-bytes ({self.max_pending_bytes}) must be at least --max-body-size "
                f"({self.max_body_size}), or a body of the largest allowed size could never be admitted")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL (got {self.log_level!r})")

    def check_numbers(self) -> None:
        for field in dataclasses.fields(self):
            value, least = getattr(self, field.name), field.metadata["least"]
            if least is not None and not value >= least:
                raise ValueError(f"{flag_of(field.name)} must be at least {least} (got {value})")
            if field.type == "float" and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{flag_of(field.name)} must be a positive number of seconds (got {value:g})")
        if self.port > 65535:
            raise ValueError(f"--port must be at most 65535 (got {self.port})")
        if self.batch_size > INFINITY_MAX_BATCH:
            raise ValueError(f"--batch-size must be at most {INFINITY_MAX_BATCH}, Infinity's "
                             f"INFINITY_MAX_CLIENT_BATCH_SIZE (got {self.batch_size})")

    def check_prompts(self) -> None:
        templates = templates_from_file(self.template_file)
        # The longest prompt: an instruction and a query of --max-query-chars each, one chunk.
        longest = max(map(template_overhead_chars, templates.values())) + 2 * self.max_query_chars + self.max_doc_chars
        if longest > INFINITY_MAX_INPUT_CHARS:
            raise ValueError(
                f"--max-query-chars and --max-doc-chars allow prompts of {longest} characters; "
                f"Infinity refuses inputs over {INFINITY_MAX_INPUT_CHARS} "
                "(keep 2 * max-query-chars + max-doc-chars under about 122,000)")
        if len(self.instruction or "") > self.max_query_chars:
            raise ValueError("--instruction is longer than --max-query-chars")
        if self.template and self.template not in templates:
            raise ValueError(f"--template {self.template!r} is not a template; known: {', '.join(templates)}")
        counter = TokenCounter.from_file(self.tokenizer)  # a bad --tokenizer stops the proxy at start
        for template in templates.values():  # else every request would be refused for it
            if counter.query_room(template, template.default_instruction if self.instruction is None
                                  else self.instruction) < 1:
                raise ValueError(f"template {template.name}: its max_tokens ({template.max_tokens}) leaves no room "
                                 "for a query beside its own text and the instruction (--instruction or its default)")

    def check_infinity_url(self) -> None:
        url = URL(self.infinity_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"--infinity-url must be an http(s) URL with a host, like "
                             f"http://localhost:7997/v1 (got {self.infinity_url!r})")
        if url.query_string or url.fragment:
            raise ValueError("--infinity-url must not have a query or fragment")
        if url.user is not None or url.password is not None:
            raise ValueError("--infinity-url must not carry credentials; give Infinity's key as --infinity-api-key")


# (flag, type, help) of every option, from Config's own fields; the environment variable is the flag upper-cased.
OPTIONS: list[tuple[str, type, str]] = [
    (flag_of(field.name), {"int": int, "float": float}.get(field.type, str), field.metadata["help"])
    for field in dataclasses.fields(Config)]
SECRET_OPTIONS = {flag_of(field.name) for field in dataclasses.fields(Config) if field.metadata["secret"]}


class OneLineParser(argparse.ArgumentParser):
    """A mistake in the options is one line that names it and where the options are, not 20 lines of usage first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; {self.prog} --help lists every option\n")


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over the defaults."""
    environ = dict(os.environ if environ is None else environ)
    parser = OneLineParser(
        prog="proxy-classifier.py",
        description="Rerank proxy: serves /rerank, /v1/rerank and /v2/rerank over Infinity's /classify for LLM "
        "rerankers (mxbai-rerank-v2, Qwen3-Reranker). Every option can also be set by the environment variable shown.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {PROXY_VERSION}")
    for flag, kind, text in OPTIONS:
        default = getattr(Config, flag[2:].replace("-", "_"))
        shown = "(unset)" if flag in SECRET_OPTIONS or default in ("", None) else default
        parser.add_argument(flag, type=kind, default=None, metavar=env_name(flag),
                            help=f"{text} [env {env_name(flag)}; default {shown}]")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for flag, kind, _ in OPTIONS:
        given = getattr(args, flag[2:].replace("-", "_"))
        if given is None and env_name(flag) in environ:
            raw = environ[env_name(flag)]
            try:
                given = kind(raw)
            except ValueError:
                parser.error(f"environment variable {env_name(flag)}={raw!r} is not a valid {kind.__name__}")
        if given is not None:
            values[flag[2:].replace("-", "_")] = given
    config = Config(**values)
    try:
        config.check()
    except ValueError as exc:
        parser.error(str(exc))
    return config


# --------------------------------------------------------------------------------------------
# 3. Errors and the JSON codec: one error type; JSON read and written the same way with orjson or without.
# --------------------------------------------------------------------------------------------


RETRY_AFTER = "Retry-After"  # the header of a 429 (the proxy's, or Infinity's passed on)


class RerankError(Exception):
    """Any failure the client should see; rendered as the contract's JSON by one middleware."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
        405: "method_not_allowed", 408: "request_timeout_error", 413: "request_too_large",
        415: "unsupported_media_type", 429: "rate_limit_error",
        502: "upstream_error", 503: "service_unavailable", 504: "timeout_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.kind = kind or self.TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> RerankError:
    return RerankError(400, message, param)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unpaired_surrogate(param: str) -> RerankError:
    # JSON can carry a lone UTF-16 surrogate ("\ud800"); UTF-8, and so Infinity, cannot.
    return bad_request(f"{param} contains an unpaired UTF-16 surrogate (such as \\ud800), which is not text", param)


def checked_text(text: str, param: str) -> str:
    """The text as given, or a 400 naming `param` when UTF-8 (and so Infinity) cannot carry it."""
    if not (text.isascii() or is_utf8(text)):
        raise unpaired_surrogate(param)
    return text


def refuse_non_finite(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def finite_float(text: str) -> float:
    """NaN and Infinity are not JSON: a body carrying them (1e999 too) could not be echoed as JSON."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


# Built once: json.loads with hooks builds a decoder and its scanner on every call.
_strict_json_decoder = json.JSONDecoder(parse_constant=refuse_non_finite, parse_float=finite_float)


def stdlib_json_loads(raw: bytes, strict: bool = True) -> Any:
    """JSON as the standard library reads it. Strict (a client's body): NaN, Infinity and numbers
    beyond a float (1e999) are refused, since an answer could not echo them as JSON."""
    if not strict:
        return json.loads(raw)
    # As json.loads reads bytes (UTF-8, -16 or -32, by the first bytes), then the prebuilt decoder.
    return _strict_json_decoder.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


HUGE_NUMBER = 2.0**63  # orjson reads integers in [-2**63, 2**64) exactly, any other as a float this large or larger


def holds_huge_number(value: Any) -> bool:
    """Whether a value holds a float of magnitude 2**63 or more: the mark of an integer orjson read as
    a float. Each list or object is looked at in one C-level pass (a list of strings costs little)."""
    pending: list[Any] = [[value]]
    while pending:
        container = pending.pop()
        items = container.values() if isinstance(container, dict) else container
        kinds = set(map(type, items))
        if float in kinds and any(abs(item) >= HUGE_NUMBER for item in items if isinstance(item, float)):
            return True
        if dict in kinds or list in kinds:
            pending.extend(item for item in items if isinstance(item, (dict, list)))
    return False


def orjson_loads(raw: bytes, strict: bool = True) -> Any:
    """orjson where it reads a body as the standard library does, else the stdlib's own value or error.
    orjson refuses what the stdlib reads (an unpaired surrogate "\\ud800", whose 400 then names its
    field; nesting past 1024, a BOM, UTF-16, NaN) and reads an integer beyond 64 bits as a float,
    which the stdlib reads exactly. Not strict (Infinity's answers), the float stays: the answer is
    checked field by field, and its error messages quote the stdlib's reading."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return stdlib_json_loads(raw, strict)
    return stdlib_json_loads(raw) if strict and holds_huge_number(value) else value


# The proxy's CPU goes mostly into JSON, and the template dwarfs a typical document. So the
# classify body is written by hand: the fixed tail is JSON-escaped once per template and anchor, the
# head once per request, and only the document once per prompt.
_escape_json = json.encoder.encode_basestring  # str -> '"escaped"', C-accelerated
_escape_ascii_json = json.encoder.encode_basestring_ascii  # the same for ASCII text, faster
# No cycle check: every value it writes is a tree (parsed JSON, or built here), and skipping the check
# saves about a tenth of writing an answer (timeit, 100 results: 87 against 98 us).
compact_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def stdlib_escaped_utf8(text: str) -> bytes:
    """`text` JSON-escaped, without quotes, as UTF-8. Each part of a body is encoded on its own: one document outside
    ASCII must not turn the whole body into a wide string that is then encoded again (faster on text that is mostly
    ASCII). Raises UnicodeEncodeError for an unpaired surrogate."""
    return (_escape_ascii_json if text.isascii() else _escape_json)(text)[1:-1].encode("utf-8")


def orjson_escaped_utf8(text: str) -> bytes:
    """The same bytes, 7 to 9 times faster (timeit, a 500-character passage); orjson refuses an unpaired
    surrogate, and the stdlib escaper then raises the UnicodeEncodeError that names the document."""
    try:
        return orjson.dumps(text)[1:-1]
    except orjson.JSONEncodeError:
        return stdlib_escaped_utf8(text)


def stdlib_escaped_utf8_each(texts: list[str]) -> list[bytes]:
    return [stdlib_escaped_utf8(text) for text in texts]


def orjson_escaped_utf8_each(texts: list[str]) -> list[bytes]:
    """Each text escaped, with orjson called straight from one comprehension (faster than a
    function call per text); on an unpaired surrogate, by the stdlib, whose error names the text."""
    try:
        return [orjson.dumps(text)[1:-1] for text in texts]
    except orjson.JSONEncodeError:
        return stdlib_escaped_utf8_each(texts)


escaped_utf8 = stdlib_escaped_utf8 if orjson is None else orjson_escaped_utf8
escaped_utf8_each = stdlib_escaped_utf8_each if orjson is None else orjson_escaped_utf8_each


def stdlib_json_dumps(value: Any) -> bytes:
    return compact_json(value).encode()


def orjson_dumps(value: Any) -> bytes:
    """The same JSON values as the stdlib writes (non-ASCII as UTF-8, not \\u escapes). What orjson
    refuses (an unpaired surrogate or an integer beyond 64 bits in an echoed document) the stdlib writes."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return stdlib_json_dumps(value)


json_loads = stdlib_json_loads if orjson is None else orjson_loads
json_dumps = stdlib_json_dumps if orjson is None else orjson_dumps

# Far deeper than any real document, and far enough below Python's recursion limit that encoding a
# document again (its rank_fields lines, or the answer echoing it) cannot overflow the stack: the
# parser accepts nesting almost up to that limit, and a RecursionError there would be a 500.
MAX_DOCUMENT_NESTING = 64

# A whole body: one fixed bound, below both parsers' own (orjson's 1024 levels; the stdlib's recursion
# limit less the stack in use, about 950 in a handler), so that the status never depends on the parser.
MAX_BODY_NESTING = 512


def nesting_of(value: Any) -> int:
    """How many objects and lists deep a JSON value goes (0 for a string), counted level by level without
    recursion; a level without objects or lists (a body's documents, most often) is seen in one C-level pass."""
    depth, level = 0, [value]
    while set(map(type, level)) & {dict, list}:
        depth += 1
        level = [child for item in level if type(item) in (dict, list)
                 for child in (item.values() if type(item) is dict else item)]
    return depth


# What a parsed body costs depends on how many JSON values it holds, not on its bytes: an empty list costs Python
# 56 bytes and takes 3 in the body ("[],"), a two-letter string 56 and 5 ('"ab",'): 32 MiB of them in an ignored
# field took 20 times the body and seconds to build. So a body may hold 8 values a document it may carry, and one
# per 16 bytes beyond that, counted before it is parsed as the commas, "[" and "{" outside strings (every value
# but a container's first follows a comma): values then cost at most about 5 times the body. A body under 1 MiB is
# parsed whatever it holds (a few tens of MB at most), so that its error says what is wrong with it (a deep
# nesting, say) rather than how many values it has.
VALUES_PER_DOCUMENT = 8

BODY_BYTES_PER_VALUE = 16

VALUES_COUNTED_FROM = 1 << 20  # body bytes

_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'",[{')))

_STRUCTURE_IN_A_STRING = re.compile(rb'"([^"]*)"')  # quote pairs, empty strings too: they must pair up


def values_outside_strings(raw: bytes) -> int:
    """The commas, "[" and "{" of a JSON text that are not inside a string, in C-level passes over the bytes:
    escaped backslashes and quotes are dropped, then everything but quotes, commas and brackets, and what is left
    between two quotes was text."""
    structure = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    in_strings = sum(map(len, _STRUCTURE_IN_A_STRING.findall(structure)))
    return len(structure) - structure.count(b'"') - in_strings


def refuse_json_that_expands(raw: bytes, max_documents: int) -> None:
    """A 400, before parsing, for a body of more values than its size justifies. Counted first cheaply, commas and
    brackets in text included; only a body over the bound by that count is counted again without its strings
    (text full of commas or brackets, such as code or CSV, is no reason to refuse)."""
    allowed = VALUES_PER_DOCUMENT * max_documents + len(raw) // BODY_BYTES_PER_VALUE
    if len(raw) < VALUES_COUNTED_FROM or raw.count(b",") + raw.count(b"[") + raw.count(b"{") <= allowed:
        return
    encoding = json.detect_encoding(raw)
    if not encoding.startswith("utf-8"):  # UTF-16 or -32, which JSON allows: its escapes are counted as UTF-8's
        with contextlib.suppress(UnicodeDecodeError):  # not text at all: the parser says so
            raw = raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    found = values_outside_strings(raw)
    if found > allowed:
        raise bad_request(f"the request body holds about {found} JSON values, more than a body of {len(raw)} bytes "
                          f"may ({allowed}: {VALUES_PER_DOCUMENT} a document and one per {BODY_BYTES_PER_VALUE} "
                          "bytes); leave out what the proxy does not need")


def decode_body(raw: bytes, max_documents: int = Config.max_documents) -> dict[str, Any]:
    """The request body as a JSON object, whatever its Content-Type says (curl without -H)."""
    if not raw or raw.isspace():
        raise bad_request("the request body is empty; send a JSON object with 'query' and 'documents'")
    refuse_json_that_expands(raw, max_documents)
    too_deep = f"the request body is nested too deeply: at most {MAX_BODY_NESTING} levels"
    try:
        body = json_loads(raw)
    except RecursionError:
        raise bad_request(too_deep) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if nesting_of(body) > MAX_BODY_NESTING:  # orjson reads up to 1024 levels, the stdlib as deep as the stack allows
        raise bad_request(too_deep)
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {json_type(body)}")
    return body


# --------------------------------------------------------------------------------------------
# 4. The translation, as pure functions: body -> rerank request -> prompts -> classify calls ->
#    scores per document -> the answer for the route's shape. No I/O here.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[Any]  # as the client gave them: echoed back with return_documents
    texts: list[str]  # what is scored for each document
    top_n: int | None
    return_documents: bool
    model: str
    instruction: str | None  # None: the template's default
    raw_scores: bool
    max_chunks_per_doc: int
    max_tokens_per_doc: int | None


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def optional_field(body: dict[str, Any], name: str, kind: str) -> Any:
    """The field's value, None when absent or null, or a 400 naming it when of the wrong type."""
    value = body.get(name)
    if value is None:
        return None
    ok = {"string": isinstance(value, str), "boolean": isinstance(value, bool),
          "integer": is_integer(value), "list": isinstance(value, list)}[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise bad_request(f"'{name}' must be {article} {kind}, got {json_type(value)}", name)
    return value


def as_text(value: Any) -> str:
    # The stdlib both ways: this text goes into the prompt, and orjson writes some numbers
    # differently (1e-7 where the stdlib writes 1e-07), which would change the score.
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def text_of(document: Any, index: int, rank_fields: list[str] | None) -> str:
    """What is scored for one document: a string, an object's 'text', or its rank_fields lines."""
    if isinstance(document, str):
        return document
    param = f"documents[{index}]"
    if not isinstance(document, dict):
        raise bad_request(f"{param} must be a string or an object with 'text', got {json_type(document)}", param)
    if nesting_of(document) > MAX_DOCUMENT_NESTING:
        raise bad_request(f"{param} is nested more than {MAX_DOCUMENT_NESTING} levels deep", param)
    if rank_fields:
        lines = [f"{field}: {as_text(document[field])}" for field in rank_fields if field in document]
        if not lines:
            raise bad_request(f"{param} has none of the rank_fields {rank_fields}", param)
        return "\n".join(lines)
    text = document.get("text")
    if not isinstance(text, str):
        raise bad_request(
            f"{param} is an object without a string 'text'; give 'text' or name fields in 'rank_fields'", param
        )
    return text


MAX_NAME_CHARS = 256  # a rank field's name, a model's

MAX_RANK_FIELDS = 32


def checked_rank_fields(rank_fields: list[Any] | None) -> list[str] | None:
    """The fields to score, each once, in the order first named: a field named twice would put its value into
    every prompt twice (a 1 MB field named 400 times: 400 MB of prompts)."""
    if rank_fields is None:
        return None
    if len(rank_fields) > MAX_RANK_FIELDS:
        raise bad_request(f"'rank_fields' has {len(rank_fields)} entries, at most {MAX_RANK_FIELDS}", "rank_fields")
    for i, field in enumerate(rank_fields):
        if not isinstance(field, str):
            raise bad_request(f"rank_fields[{i}] must be a string, got {json_type(field)}", f"rank_fields[{i}]")
        if len(field) > MAX_NAME_CHARS:
            raise bad_request(f"rank_fields[{i}] is {len(field)} characters, at most {MAX_NAME_CHARS}",
                              f"rank_fields[{i}]")
    return list(dict.fromkeys(rank_fields))


def text_field(body: dict[str, Any], name: str, most: int, required: bool = False, cut: bool = False) -> Any:
    """A string field: None when absent (a 400 when required), at most `most` characters (longer: cut, or a
    400), and text UTF-8 can carry."""
    value = optional_field(body, name, "string")
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required", name)
        return None
    if len(value) > most:
        if not cut:
            raise bad_request(f"'{name}' is {len(value)} characters, at most {most}", name)
        value = value[:most]
    return checked_text(value, name)


def at_least_one(body: dict[str, Any], name: str) -> int | None:
    value = optional_field(body, name, "integer")
    if value is not None and value < 1:
        raise bad_request(f"'{name}' must be at least 1", name)
    return value


def document_list(body: dict[str, Any], name: str, max_documents: int) -> list[Any]:
    items = optional_field(body, name, "list")
    if items is None:
        raise bad_request(f"'{name}' is required: a list of strings or objects", name)
    if len(items) > max_documents:
        raise bad_request(f"too many {name}: {len(items)}, at most {max_documents} in one request; "
                          "split them into several requests", name)
    return items


def parse_rerank(body: dict[str, Any], config: Config) -> RerankRequest:
    """Check every field of a rerank body (a 400 naming the first wrong one) and normalise it."""
    query = text_field(body, "query", config.max_query_chars, required=True, cut=True)
    if not query.strip():
        cut = len(body["query"]) > config.max_query_chars  # a query is cut to what is scored, then looked at
        where = f" in its first {config.max_query_chars} characters (--max-query-chars), all that is scored"
        raise bad_request("'query' must not be empty or only whitespace" + (where if cut else ""), "query")
    documents = document_list(body, "documents", config.max_documents)
    rank_fields = checked_rank_fields(optional_field(body, "rank_fields", "list"))
    top_n = optional_field(body, "top_n", "integer")
    return_documents = optional_field(body, "return_documents", "boolean")
    model = text_field(body, "model", MAX_NAME_CHARS)  # it goes into every /classify body and the answer
    instruction = text_field(body, "instruction", config.max_query_chars)
    raw_scores = optional_field(body, "raw_scores", "boolean")
    max_chunks, max_tokens = at_least_one(body, "max_chunks_per_doc"), at_least_one(body, "max_tokens_per_doc")
    if set(map(type, documents)) <= {str}:  # the common case, checked in one pass
        texts = documents
    else:
        texts = [text_of(document, i, rank_fields) for i, document in enumerate(documents)]
    return RerankRequest(
        query=query, documents=documents, texts=texts,
        top_n=top_n if top_n is not None and 0 < top_n < len(documents) else None,
        return_documents=bool(return_documents), model=model if model is not None else config.model,
        instruction=instruction if instruction is not None else config.instruction,  # None: the template's
        raw_scores=bool(raw_scores), max_chunks_per_doc=max_chunks or config.max_chunks_per_doc,
        max_tokens_per_doc=max_tokens)


TRUNCATION_DIRECTIONS = ("left", "right")  # TEI's; Haystack sends "Left"/"Right"


def rerank_body_from_tei(body: dict[str, Any], config: Config) -> dict[str, Any]:
    """Text-embeddings-inference's dialect ({"query", "texts"}) as a rerank body: the texts are the documents and
    return_text is return_documents. TEI's own fields are checked here; the rest by parse_rerank. truncate and
    truncation_direction have no effect: long texts are chunked as every document is."""
    if body.get("documents") is not None:
        raise bad_request("give either 'texts' (TEI's rerank) or 'documents', not both", "texts")
    texts = document_list(body, "texts", config.max_documents)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise bad_request(f"texts[{i}] must be a string, got {json_type(text)}", f"texts[{i}]")
        checked_text(text, f"texts[{i}]")
    return_text = optional_field(body, "return_text", "boolean")
    optional_field(body, "truncate", "boolean")
    direction = optional_field(body, "truncation_direction", "string")
    if direction is not None and direction.lower() not in TRUNCATION_DIRECTIONS:
        raise bad_request(f"'truncation_direction' must be 'left' or 'right', got {direction!r}",
                          "truncation_direction")
    return {"query": body.get("query"), "documents": texts, "return_documents": return_text,
            "raw_scores": body.get("raw_scores"), "model": body.get("model"), "instruction": body.get("instruction")}


_WHITESPACE = re.compile(r"\s")


def chunks_of(text: str, max_chars: int, max_chunks: int, budget: int | None = None,
              counter: TokenCounter = UTF8_BOUND) -> list[str]:
    """Split a long document so that no prompt is cut by the tokenizer (which would drop the task
    suffix and make the score meaningless): chunks of at most `max_chars` characters and `budget`
    tokens. A chunk ends after the last whitespace in its final tenth when there is one, else at the
    limit; chunks do not overlap; the first ones are kept."""
    if len(text) <= max_chars and (budget is None or counter.fits(text, budget)):
        return [text]
    chunks: list[str] = []
    start = 0
    while start < len(text) and len(chunks) < max_chunks:
        end = start + max_chars
        if budget is not None and not counter.fits(text[start:end], budget):
            end = start + max(1, counter.fitting(text[start:end], budget))
        if end < len(text):
            window_start = end - max(1, (end - start) // 10)
            cut = -1
            for match in _WHITESPACE.finditer(text, window_start, end):
                cut = match.end()
            if cut > start:
                end = cut
        chunks.append(text[start:end])
        start = end
    return chunks


@dataclass(frozen=True)
class ClassifyPlan:
    template: Template
    prompt_head: str  # everything before the document, the same for every prompt of the request
    unique_texts: list[str]  # distinct document chunks: each is scored once
    chunks_by_document: list[list[int]]  # indexes into unique_texts for each document


def fitted_query(query: str, instruction: str, template: Template, counter: TokenCounter) -> str:
    """The query, cut so that it and the instruction take at most three quarters of the model's context
    (mixedbread's library keeps the same share for the query), leaving the rest to the document."""
    room = counter.query_room(template, instruction)
    if room < 1:
        raise bad_request(f"'instruction' leaves no room for the query in the model's {template.max_tokens} tokens",
                          "instruction")
    return query if counter.bytes_bound(query) <= room else query[: max(1, counter.fitting(query, room))]


def plan_prompts(request: RerankRequest, config: Config, counter: TokenCounter = UTF8_BOUND,
                 template: Template = DEFAULT_TEMPLATE) -> ClassifyPlan:
    """Every document's chunks, each prompt within the model's context, de-duplicated: identical
    prompts within a request are sent once."""
    instruction = template.default_instruction if request.instruction is None else request.instruction
    query = fitted_query(request.query, instruction, template, counter)
    head = template.head(query, instruction)
    budget = (template.max_tokens - counter.template_cost(template, template.has_line(instruction)) - BOUNDARY_TOKENS
              - counter.count(query) - (counter.count(instruction) if instruction else 0))
    texts = request.texts
    longest = max(map(len, texts), default=0)
    # The common case, seen in C-level passes: no text needs a look of its own, as none can pass the budget (an
    # ASCII character is one byte; NFC makes at most 3 characters of one, of at most 4 bytes each in UTF-8).
    if (request.max_tokens_per_doc is None and longest <= min(config.max_doc_chars, budget)
            and (12 * longest <= budget or all(map(str.isascii, texts))) and len(set(texts)) == len(texts)):
        return ClassifyPlan(template, head, texts, [[i] for i in range(len(texts))])
    index_of: dict[str, int] = {}
    unique: list[str] = []
    by_document: list[list[int]] = []
    for text in texts:
        if request.max_tokens_per_doc is not None:
            # Without the model's tokenizer, about 3 characters a token.
            text = text[: counter.fitting(text, request.max_tokens_per_doc) if counter.tokenizer is not None
                        else 3 * request.max_tokens_per_doc]
        ids = []
        for chunk in chunks_of(text, config.max_doc_chars, request.max_chunks_per_doc, budget, counter):
            at = index_of.get(chunk)
            if at is None:
                at = index_of[chunk] = len(unique)
                unique.append(chunk)
            ids.append(at)
        by_document.append(ids)
    return ClassifyPlan(template, head, unique, by_document)


def batches(count: int, batch_size: int) -> list[range]:
    """Which of `count` inputs go into each call to Infinity."""
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def document_param(plan: ClassifyPlan, batch: range) -> str:
    """Which document holds the text that UTF-8 cannot carry (the error path only)."""
    bad = next(i for i in batch if not is_utf8(plan.unique_texts[i]))
    return f"documents[{next(d for d, ids in enumerate(plan.chunks_by_document) if bad in ids)}]"


@functools.lru_cache(maxsize=64)
def closing_tail(template: Template, anchor: str) -> bytes:
    """The JSON-escaped tail, anchor and closing quote that end every input of one template and anchor."""
    return (_escape_json(template.tail + anchor)[1:-1] + '"').encode()


def classify_bodies(model: str, plan: ClassifyPlan, batch_size: int,
                    anchor: str = PAD_ANCHOR) -> list[tuple[bytes, int]]:
    """The /classify calls to make, as (JSON body, number of inputs). Bodies are written by hand:
    the template is escaped once, not per prompt, and the prompts of a call are joined in one pass
    (between two documents stands tail + anchor + "," + head)."""
    texts = plan.unique_texts
    head = b'"' + escaped_utf8(plan.prompt_head)  # parse_rerank checked the query and instruction
    opening = b'{"model":"' + escaped_utf8(model) + b'","input":[' + head
    tail = closing_tail(plan.template, anchor)
    separator = tail + b"," + head
    calls = []
    for batch in batches(len(texts), batch_size):
        try:
            documents = separator.join(escaped_utf8_each(texts[batch.start:batch.stop]))
        except UnicodeEncodeError:
            raise unpaired_surrogate(document_param(plan, batch)) from None
        calls.append((opening + documents + tail + b"]}", len(batch)))
    return calls


def prompt_tokens(answer: dict[str, Any]) -> int:
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else 0
    # A count beyond 64 bits is no count (and orjson would have read it as a float).
    return tokens if is_integer(tokens) and 0 <= tokens < 2**64 else 0


def log_odds(p: float) -> float:
    """mxbai's raw score: logit_1 - logit_0 for the two-label model, kept finite."""
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p) - math.log1p(-p)


def positive_score(item: Any, positive_label: str, raw: bool) -> float:
    """One input's probability of the positive label, looked up by name (Infinity sorts an item's labels by score);
    when `raw`, its log-odds from both sides, ln(p) - ln(the other labels' p): Infinity's probabilities are float32,
    and near p = 1 the other side keeps the precision that 1 - p has lost (at +15, 1 - p is off by a fifth)."""
    labels = item if type(item) is list else []  # a loop, not next() over a generator: 4 times faster (timeit)
    p = None
    for label in labels:
        if type(label) is dict and label.get("label") == positive_label:
            p = label.get("score")
            break
    if p is None:
        raise RerankError(502, f"Infinity's answer has no label {positive_label!r}: is the template right for this "
                          "model (--template, or a model name that names it), or --positive-label?")
    if not ((type(p) is float or type(p) is int) and 0.0 <= p <= 1.0):  # JSON's numbers, not a boolean
        raise RerankError(502, f"Infinity answered a score that is not a probability: {p!r}")
    if not raw:
        return float(p)
    rest = sum(other["score"] for other in labels if isinstance(other, dict)
               and other.get("label") != positive_label and type(other.get("score")) in (int, float))
    return math.log(max(p, 1e-300)) - math.log(rest) if 0 < rest < 1 else log_odds(p)


def positive_probabilities(answer: Any, expected: int, positive_label: str,
                           raw: bool = False) -> tuple[list[float], int]:
    """Each input's probability of the positive label (its log-odds when `raw`), and the call's prompt tokens."""
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        raise RerankError(502, "Infinity's /classify answer has no 'data' list")
    data = answer["data"]
    if len(data) != expected:
        raise RerankError(502, f"Infinity answered {len(data)} classifications for {expected} inputs")
    return [positive_score(item, positive_label, raw) for item in data], prompt_tokens(answer)


def cross_encoder_bodies(request: RerankRequest, batch_size: int) -> list[tuple[bytes, int]]:
    """The calls to Infinity's own /rerank for a cross-encoder, as (JSON body, number of documents): the
    query and texts as given (the model truncates them itself; none longer than Infinity accepts), in batches."""
    texts = request.texts
    if request.max_tokens_per_doc is not None:  # no tokenizer of the cross-encoder's at hand: about 3 characters a token
        texts = [text[: 3 * request.max_tokens_per_doc] for text in texts]
    texts = [checked_text(text[:INFINITY_MAX_INPUT_CHARS], f"documents[{i}]") for i, text in enumerate(texts)]
    return [(json_dumps({"model": request.model, "query": request.query, "documents": texts[batch.start:batch.stop],
                         "raw_scores": request.raw_scores, "return_documents": False}), len(batch))
            for batch in batches(len(texts), batch_size)]


def cross_encoder_scores(answer: Any, expected: int) -> tuple[list[float], int]:
    """Each document's score from Infinity's /rerank answer, back in the documents' order (Infinity sorts
    its results by score), and the call's prompt tokens."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or len(results) != expected:
        raise RerankError(502, f"Infinity's /rerank answer does not have {expected} results")
    scores: list[float | None] = [None] * expected
    for result in results:
        index = result.get("index") if isinstance(result, dict) else None
        score = result.get("relevance_score") if isinstance(result, dict) else None
        if not is_integer(index) or not 0 <= index < expected or scores[index] is not None:
            raise RerankError(502, f"Infinity's /rerank answer has a wrong or repeated index: {index!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not -1e300 < score < 1e300:
            raise RerankError(502, f"Infinity's /rerank answer has a score that is not a number: {score!r}")
        scores[index] = float(score)
    return scores, prompt_tokens(answer)  # type: ignore[return-value]


def document_scores(plan: ClassifyPlan, prompt_scores: list[float]) -> list[float]:
    """A chunked document scores as its best chunk (probabilities and log-odds rank alike)."""
    return [prompt_scores[ids[0]] if len(ids) == 1 else max(prompt_scores[i] for i in ids)
            for ids in plan.chunks_by_document]


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Document indexes, best first; equal scores keep the lower index first."""
    # Python's sort is stable, also with reverse=True: equal scores stay in index order.
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    return order[:top_n] if top_n is not None else order


def search_units(documents: int) -> int:
    return max(1, math.ceil(documents / 100))


def answer_meta(version: str, documents: int, tokens: int) -> dict[str, Any]:
    return {"api_version": {"version": version}, "billed_units": {"search_units": search_units(documents)},
            "tokens": {"input_tokens": tokens, "output_tokens": 0}}


def infinity_answer(request: RerankRequest, scores: list[float], tokens: int) -> dict[str, Any]:
    """/rerank and /v1/rerank: what LiteLLM's infinity/ provider parses. A string document stays a
    string (that provider needs one)."""
    documents = request.documents
    results = [{"relevance_score": scores[i], "index": i,
                "document": documents[i] if request.return_documents else None}
               for i in ranked(scores, request.top_n)]
    return {"object": "rerank", "results": results, "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": f"rerank-{uuid.uuid4()}", "created": int(time.time()),
            "meta": answer_meta("1", len(documents), tokens)}


def cohere_v2_answer(request: RerankRequest, scores: list[float], tokens: int) -> dict[str, Any]:
    """/v2/rerank: what the Cohere SDK and LiteLLM's cohere/ provider parse. A document, when asked
    for, is an object: {"text": ...} for a string (that provider rejects a string or a null)."""
    results = []
    for i in ranked(scores, request.top_n):
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if request.return_documents:
            document = request.documents[i]
            result["document"] = {"text": document} if isinstance(document, str) else document
        results.append(result)
    return {"id": f"rerank-{uuid.uuid4()}", "results": results, "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "meta": answer_meta("2", len(request.documents), tokens)}


def tei_answer(request: RerankRequest, scores: list[float], tokens: int) -> list[dict[str, Any]]:
    """TEI's /rerank: a bare list of every text, best first (Dify cuts top_n in this order), with
    "text" when return_text asked for it."""
    if request.return_documents:
        return [{"index": i, "score": scores[i], "text": request.documents[i]} for i in ranked(scores, None)]
    return [{"index": i, "score": scores[i]} for i in ranked(scores, None)]


def tei_info(config: Config, template: Template, check_report: dict[str, Any] | None) -> dict[str, Any]:
    """TEI's GET /info for the served model: Dify's TEI provider adds a model only when model_type
    says "reranker". TEI's fields that describe its own backend (dtype, token budgets, tokenizer
    workers) have no counterpart here and are left out rather than made up. Beyond TEI's fields: the
    template and what the self-check found ("unchecked" until the model is first used or /ready runs)."""
    id2label = dict(enumerate(template.labels))
    return {
        "model_id": config.model, "model_sha": None,
        "model_type": {"reranker": {"id2label": {str(i): label for i, label in id2label.items()},
                                    "label2id": {label: i for i, label in id2label.items()}}},
        "max_input_length": template.max_tokens, "max_batch_requests": config.batch_size,
        "max_client_batch_size": config.max_documents,
        "auto_truncate": True,  # a long text is never refused: it is chunked
        "version": PROXY_VERSION, "sha": None, "docker_label": None,
        **(check_report or {"template": template.name, "anchor": template.anchors[0], "template_check": "unchecked"}),
    }


# --------------------------------------------------------------------------------------------
# 5. Admission and metrics: what each request holds and what the proxy counts.
# --------------------------------------------------------------------------------------------

@dataclass
class RequestStats:
    """One request as its log line and its metrics tell it, and what it holds against the admission bounds."""

    route: str  # the matched route's template: never the raw path
    started: float = dataclasses.field(default_factory=time.perf_counter)
    documents: int = 0
    chunks: int = 0
    upstream_calls: int = 0
    template: str = ""
    held_bytes: int = 0  # counted against --max-pending-bytes
    admitted: bool = False  # holds one of --max-concurrent-requests' places

    def milliseconds(self) -> float:
        return 1000 * (time.perf_counter() - self.started)


STATS = web.RequestKey("stats", RequestStats)

RETRY_OVERLOADED_SECONDS = "1"


def overloaded(why: str) -> RerankError:
    return RerankError(429, f"the proxy is overloaded: {why}; retry shortly or use another replica",
                       headers={RETRY_AFTER: RETRY_OVERLOADED_SECONDS}, kind="overloaded_error")


class Admission:
    """The requests the proxy holds at once and the body bytes they bring. Over either bound a request is
    refused at once (TEI's --max-concurrent-requests, Envoy's overload manager), not queued until --timeout:
    together the bounds cap the proxy's memory under any flood, and a router learns at once to go elsewhere."""

    def __init__(self, config: Config) -> None:
        self.max_requests = config.max_concurrent_requests
        self.max_bytes = config.max_pending_bytes
        self.max_body_size = config.max_body_size
        self.requests = 0
        self.bytes = 0

    def would_admit(self, declared: int | None) -> bool:
        declared = declared or 0
        return (declared <= self.max_body_size and self.requests < self.max_requests
                and self.bytes + declared <= self.max_bytes)

    def admit(self, stats: RequestStats, declared: int | None) -> None:
        """Decided from the headers, before any of the body is read."""
        declared = declared or 0  # a chunked body is counted as it arrives (take)
        if declared > self.max_body_size:  # refused before reading it, rather than while reading it
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_size, actual_size=declared)
        if self.requests >= self.max_requests:
            raise overloaded(f"{self.requests} requests are in hand, the most --max-concurrent-requests allows")
        self.take(stats, declared)
        self.requests += 1
        stats.admitted = True

    def take(self, stats: RequestStats, more: int) -> None:
        """More bytes for an admitted request: a chunked body as it arrives, its prompts once planned. A request alone
        may pass the bound (its prompts can): else a request allowed by the other limits could be refused for ever."""
        if self.bytes + more > self.max_bytes and self.bytes > stats.held_bytes:
            raise overloaded(f"the requests in hand ({self.bytes} bytes of bodies and prompts, {PROMPT_BYTES} a "
                             f"prompt and its query) and this one would pass --max-pending-bytes ({self.max_bytes})")
        self.bytes += more
        stats.held_bytes += more

    def release(self, stats: RequestStats) -> None:
        self.requests -= 1
        self.bytes -= stats.held_bytes


ADMISSION = web.AppKey("admission", Admission)

# Why a request was refused or cut off, by its error type: rerank_proxy_rejected_total{reason}.
REJECTED_AS = {"overloaded_error": "overloaded", "request_timeout_error": "client_timeout",
               "request_too_large": "too_large"}

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

METRICS_CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class Metrics:
    """What /metrics shows. A registry of the app's own (tests build many apps in one process), with the
    library's process, platform and GC collectors. Labels are route templates, statuses and fixed words:
    never a raw path, a query or a document."""

    def __init__(self, requests_in_progress: Callable[[], float]) -> None:
        registry = self.registry = prometheus_client.CollectorRegistry()
        for collector in (prometheus_client.ProcessCollector, prometheus_client.PlatformCollector,
                          prometheus_client.GCCollector):
            collector(registry=registry)
        self.requests = prometheus_client.Counter(
            "rerank_proxy_requests", "Requests answered, by matched route, status (499: the client went away) and "
            "template (cross-encoder: passed to Infinity's /rerank; empty: not a rerank, or refused before one)",
            ("route", "status", "template"), registry=registry)
        self.request_seconds = prometheus_client.Histogram(
            "rerank_proxy_request_duration_seconds", "Time from the request's headers to its answer written",
            ("route",), buckets=DURATION_BUCKETS, registry=registry)
        self.documents = prometheus_client.Counter(
            "rerank_proxy_documents", "Documents (or TEI texts) received in accepted rerank requests",
            ("route", "template"), registry=registry)
        self.upstream_calls = prometheus_client.Counter(
            "rerank_proxy_upstream_calls", "Scoring calls to Infinity (/classify, a cross-encoder's /rerank, the "
            "self-check), by outcome", ("outcome",), registry=registry)
        self.upstream_seconds = prometheus_client.Histogram(
            "rerank_proxy_upstream_call_duration_seconds", "Time of one scoring call, from its slot to its answer",
            buckets=DURATION_BUCKETS, registry=registry)
        self.upstream_in_flight = prometheus_client.Gauge(
            "rerank_proxy_upstream_in_flight", "Scoring calls in flight", registry=registry)
        prometheus_client.Gauge(
            "rerank_proxy_requests_in_progress", "Requests admitted and not yet answered", registry=registry,
        ).set_function(requests_in_progress)
        self.template_check = prometheus_client.Gauge(
            "rerank_proxy_template_check", "1 when the served model skips the prompt's pad anchor (its scores are "
            "its authors'), 0 when it reads it (docs/how-it-works.md)", ("model", "template"), registry=registry)
        self.rejected = prometheus_client.Counter(
            "rerank_proxy_rejected", "Requests refused or cut off: overloaded, client_timeout, too_large",
            ("reason",), registry=registry)

        # Labelled children by their labels: labels() validates and locks on every call. Bounded like the labels.
        self._labelled: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def answered(self, stats: RequestStats, status: int) -> None:
        route, template = stats.route, stats.template
        self.labelled(self.requests, route, str(status), template).inc()
        self.labelled(self.request_seconds, route).observe(time.perf_counter() - stats.started)
        if stats.documents:
            self.labelled(self.documents, route, template).inc(stats.documents)

    def labelled(self, metric: Any, *labels: str) -> Any:
        child = self._labelled.get((metric, labels))
        if child is None:
            child = self._labelled[metric, labels] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


# --------------------------------------------------------------------------------------------
# 6. The upstream client: the one place that talks to Infinity.
# --------------------------------------------------------------------------------------------

IDENTITY = ("", "identity")  # a Content-Encoding that is no encoding
# Infinity's answers are read up to a size their call justifies, never decoded: a larger, compressed or endless
# answer is a 502 (504 past --timeout) with bounded memory. A /classify item is about 90 bytes (two labels, two
# scores): 1 KiB an input and 64 KiB for the rest (usage, model, id; an error's detail) leave room to spare.
CLASSIFY_ANSWER_BYTES_PER_INPUT = 1024
ANSWER_BYTES = 64 * 1024
MODELS_ANSWER_BYTES = 1024 * 1024  # GET /models: Infinity's list of a few models is a few KB
FORWARD_CHUNK_BYTES = 64 * 1024  # other forwarded routes are streamed through, a piece at a time


# When the request being served runs out of --timeout (the loop's clock): a call it cancels then is counted as a
# timeout, not as a client gone. Tasks started for the request see it too (they copy its context).
REQUEST_DEADLINE = contextvars.ContextVar("request_deadline", default=math.inf)


class BadAnswer(RerankError):
    """An answer from Infinity that the proxy will not take: too large, or compressed."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message)


async def bounded_answer(response: Any, most: int, url: Any) -> bytes:
    """Infinity's answer, read as it arrives and refused the moment it passes `most` bytes."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in IDENTITY:  # the proxy asks for none, and does not decode one (a bomb would cost GBs)
        raise BadAnswer(f"Infinity answered {url} compressed (Content-Encoding: {encoding[:40]}), though the "
                        "proxy asks for identity")
    pieces, size = [], 0
    async for piece in response.content.iter_chunked(FORWARD_CHUNK_BYTES):
        size += len(piece)
        if size > most:
            raise BadAnswer(f"Infinity's answer from {url} passed {most} bytes, more than its call can justify")
        pieces.append(piece)
    return b"".join(pieces)


def infinity_message(status: int, body: bytes) -> str:
    """Infinity's own complaint: {"error":{"message"}} (its shape) or {"detail"} (FastAPI's)."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:1000]
        if "detail" in parsed:
            detail = parsed["detail"]
            return (detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False))[:1000]
    text = body[:300].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f": {text}" if text else " with an empty body")


def not_json(answer: bytes) -> RerankError:
    return RerankError(502, f"Infinity's /classify answer is not JSON: {answer[:200]!r}")


def answer_scores(raw: bytes, read: Callable[[Any], tuple[list[float], int]]) -> tuple[list[float], int]:
    """An answer's scores as `read` finds them. A wrong answer is explained with its values as the standard
    library reads them (orjson reads an integer beyond 64 bits as a float, and nesting the stdlib cannot
    read), so that the 502 is the same with or without orjson."""
    try:
        answer = json_loads(raw, strict=False)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise not_json(raw) from None
    try:
        return read(answer)
    except RerankError:
        try:
            standard_reading = json.loads(raw)
        except RecursionError:
            raise not_json(raw) from None
        return read(standard_reading)


def reuse_tracing() -> TraceConfig:
    """Marks a request (its trace_request_ctx dict) whose connection came from the keep-alive pool:
    only such a connection can be one that Infinity closed while it sat idle."""

    async def reused(session: ClientSession, context: Any, params: Any) -> None:
        if isinstance(context.trace_request_ctx, dict):  # only scoring calls ask
            context.trace_request_ctx["reused"] = True

    tracing = TraceConfig()
    tracing.on_connection_reuseconn.append(reused)
    return tracing


async def all_or_nothing(calls: list[Awaitable[Any]]) -> list[Any]:
    """Run the calls concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Infinity:
    """Holds the shared ClientSession, the bound on calls in flight, and the mapping of Infinity's
    failures to the proxy's errors."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        metrics.upstream_in_flight.set_function(lambda: self.in_flight)  # read at scrape time: free per call
        self.origin = URL(config.infinity_url).origin()
        self.classify_url = config.infinity_url.rstrip("/") + "/classify"
        self.rerank_url = config.infinity_url.rstrip("/") + "/rerank"
        self.models_path = URL(config.infinity_url).raw_path.rstrip("/") + "/models"
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.session: ClientSession | None = None
        self.fresh_session: ClientSession | None = None
        self.probe_session: ClientSession | None = None
        self.forward_session: ClientSession | None = None
        self.in_flight = 0  # scoring calls holding a slot: the tests count them

    async def open(self) -> None:
        timeout = ClientTimeout(total=self.config.timeout, sock_connect=CONNECT_TIMEOUT_SECONDS)
        # The scoring calls' pool, as large as the bound on them. Keep-alive below uvicorn's 5 s (Infinity's server):
        # the proxy drops an idle connection before Infinity does, so stale ones stay rare. DNS answers are cached for
        # aiohttp's default 10 s only: a recreated Infinity container with a new address is found again quickly.
        pool = {"limit": self.config.max_concurrency, "limit_per_host": 0, "keepalive_timeout": 4}
        # No compressed answers: asked for none, and none decoded (bounded_answer refuses one).
        plain = {"auto_decompress": False, "headers": {"Accept-Encoding": "identity"}}
        self.session = ClientSession(timeout=timeout, connector=TCPConnector(**pool), skip_auto_headers=("User-Agent",),
                                     trace_configs=[reuse_tracing()], **plain)
        # Forwarded routes (embeddings, the model list) have a pool of their own, as large as the one they shared
        # before: however many of their answers stream at once, and however slowly, they take no connection a rerank
        # needs, and a small --max-concurrency (a CPU Infinity) still leaves them room.
        forwarding = TCPConnector(**{**pool, "limit": self.config.max_concurrency + 16})
        self.forward_session = ClientSession(timeout=timeout, connector=forwarding, skip_auto_headers=("User-Agent",),
                                             **plain)
        # Never reuses a connection: for the one retry after a stale keep-alive connection, and for the proxy's
        # own calls made now and then (the self-check, the model list), which leave no idle connection to go stale.
        self.fresh_session = ClientSession(timeout=timeout, connector=TCPConnector(force_close=True), **plain)
        # Probes are open without a key: their own small pool, so a flood of them never takes the
        # connections that classify calls need.
        self.probe_session = ClientSession(connector=TCPConnector(limit=4, keepalive_timeout=4), **plain)

    async def close(self) -> None:
        for session in (self.session, self.fresh_session, self.probe_session, self.forward_session):
            if session is not None:
                await session.close()

    def auth_headers(self, client_authorization: str | None) -> dict[str, str]:
        """Without --api-key the client's own Authorization goes through as it came; with it, the proxy vouches for
        the client and sends its own key (or none). The proxy never lends its key to a client it has not checked."""
        if not self.config.api_key:
            return {"Authorization": client_authorization} if client_authorization else {}
        if self.config.infinity_api_key:
            return {"Authorization": f"Bearer {self.config.infinity_api_key}"}
        return {}

    async def classify(self, body: bytes, expected: int, headers: dict[str, str], positive_label: str,
                       raw: bool = False) -> tuple[list[float], int]:
        """One /classify call: the positive label's probability for each input (its log-odds when `raw`), and
        the call's tokens."""
        return await self.scored(self.classify_url, body, expected, headers, True,
                                 lambda answer: positive_probabilities(answer, expected, positive_label, raw))

    async def rerank(self, body: bytes, expected: int, headers: dict[str, str]) -> tuple[list[float], int]:
        """One call to Infinity's own /rerank (a cross-encoder): each document's score, in the documents' order."""
        return await self.scored(self.rerank_url, body, expected, headers, True,
                                 lambda answer: cross_encoder_scores(answer, expected))

    async def scored(self, url: str, body: bytes, expected: int, headers: dict[str, str], pooled: bool,
                     read: Callable[[Any], tuple[list[float], int]]) -> tuple[list[float], int]:
        """A call for `expected` scores, within the bound on calls in flight, its answer read by `read`; its
        outcome counted in rerank_proxy_upstream_calls_total."""
        # Unless the call ends otherwise, its request gave up: the client left, or another call of it failed.
        outcome = "cancelled"
        try:
            status, answer_headers, raw = await self.timed_post(url, body, headers, expected, pooled)
            if status != 200:
                outcome = "http_429" if status == 429 else f"http_{status // 100}xx"
                raise self.failure(status, answer_headers, raw, url)
            outcome = "bad_answer"
            scores = answer_scores(raw, read)
            outcome = "ok"
            return scores
        except RerankError as exc:
            if outcome == "cancelled":  # no answer came
                outcome = "timeout" if exc.status == 504 else "bad_answer" if isinstance(exc, BadAnswer) else "unreachable"
            raise
        finally:
            if outcome == "cancelled" and asyncio.get_running_loop().time() >= REQUEST_DEADLINE.get():
                outcome = "timeout"  # the request's --timeout cancelled it
            self.metrics.labelled(self.metrics.upstream_calls, outcome).inc()

    async def timed_post(self, url: str, body: bytes, headers: dict[str, str], expected: int,
                         pooled: bool) -> tuple[int, Any, bytes]:
        async with self.slots:
            self.in_flight += 1
            started = time.perf_counter()
            try:
                most = ANSWER_BYTES + CLASSIFY_ANSWER_BYTES_PER_INPUT * expected
                return await self._post(url, body, headers, most, self.session if pooled else self.fresh_session)
            finally:
                self.in_flight -= 1
                self.metrics.upstream_seconds.observe(time.perf_counter() - started)

    async def _post(self, url: str, body: bytes, headers: dict[str, str], most: int,
                    session: ClientSession) -> tuple[int, Any, bytes]:
        headers = {"Content-Type": "application/json", **headers}
        for attempt in (1, 2):
            connection = {"reused": False}  # set by reuse_tracing() when the pool hands out a kept-alive one
            try:
                # A redirect is Infinity's answer, not an address to send the prompts to.
                async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                        trace_request_ctx=connection) as response:
                    return response.status, response.headers, await bounded_answer(response, most, url)
            except (client_exceptions.ServerDisconnectedError, client_exceptions.ClientOSError) as exc:
                # A keep-alive connection that Infinity closed between two requests fails before any
                # answer. /classify has no side effects, so it is retried once, on a new connection.
                # Nothing else is: a new connection that fails (refused, or dropped by a failing
                # Infinity) would fail again, and a retry would double the load on a server in trouble.
                if attempt == 2 or not connection["reused"]:
                    raise self.unreachable(exc, url) from None
                session = self.fresh_session
            except (client_exceptions.ClientError, asyncio.TimeoutError) as exc:  # aiohttp's total timeout too
                raise self.unreachable(exc, url) from None
        raise AssertionError("unreachable")

    def unreachable(self, exc: BaseException, url: Any) -> RerankError:
        """Map a call that got no complete answer: 504 for a stall, else 502 naming the URL tried."""
        if isinstance(exc, client_exceptions.ConnectionTimeoutError):
            return RerankError(502, f"could not connect to Infinity at {url} within {CONNECT_TIMEOUT_SECONDS:g} s; "
                               "is it running and is --infinity-url right?")
        if isinstance(exc, asyncio.TimeoutError):  # aiohttp's read timeouts and its total timeout alike
            return RerankError(504, f"Infinity did not answer within --timeout ({self.config.timeout:g} s)")
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, client_exceptions.ClientConnectorError):
            return RerankError(502, f"cannot reach Infinity at {url}: {reason}; "
                               "is it running and is --infinity-url right?")
        return RerankError(502, f"Infinity at {url} closed the connection before a complete answer ({reason}); "
                           "it may have restarted or crashed")

    def failure(self, status: int, headers: Any, raw: bytes, url: Any) -> RerankError:
        """Map Infinity's refusal to what the client should see (the contract's error table)."""
        message = infinity_message(status, raw)
        if status == 400:
            return RerankError(400, f"Infinity refused the request: {message}", "model")
        if status in (401, 403):
            if self.config.api_key:  # the key is the proxy's, not the client's: the operator's mistake
                return RerankError(502, f"Infinity refused the proxy's key ({status}: {message}); "
                                   "check --infinity-api-key")
            return RerankError(status, f"Infinity refused the Authorization header: {message}")
        if status == 404:
            return RerankError(502, f"Infinity answered 404 for {url}; check the prefix in "
                               "--infinity-url (it must match Infinity's --url-prefix, e.g. /v1)")
        if status == 422:
            return RerankError(502, f"Infinity refused a call the proxy built (422): {message}. Is "
                               f"--batch-size ({self.config.batch_size}) above Infinity's "
                               "INFINITY_MAX_CLIENT_BATCH_SIZE?")
        if status == 429:
            retry = headers.get(RETRY_AFTER)
            return RerankError(429, f"Infinity is overloaded (429): {message}; retry later",
                               headers={RETRY_AFTER: retry} if retry else None)
        return RerankError(502, f"Infinity failed with {status}: {message}")

    @staticmethod
    async def all_scores(calls: list[Awaitable[tuple[list[float], int]]]) -> tuple[list[float], int]:
        """All calls of one request, concurrently, their scores in order and their tokens summed. The first
        failure cancels the others: no partial answer is ever returned."""
        if len(calls) == 1:
            results = [await calls[0]]
        else:
            results = await all_or_nothing(calls)
        scores: list[float] = []
        tokens = 0
        for batch_scores, batch_tokens in results:
            scores.extend(batch_scores)
            tokens += batch_tokens
        return scores, tokens

    @contextlib.asynccontextmanager
    async def forwarded(self, method: str, raw_path: str, raw_query: str, body: bytes,
                        headers: dict[str, str]) -> AsyncIterator[Any]:
        """Infinity's answer to a forwarded call, its status and headers in and its body still to read."""
        # The configured origin, then the client's path: no request can name another host.
        url = URL(str(self.origin) + raw_path + ("?" + raw_query if raw_query else ""), encoded=True)
        if url.origin() != self.origin:
            raise RerankError(404, f"no route {raw_path}")
        try:
            async with self.forward_session.request(method, url, data=body or None, headers=headers,
                                                    allow_redirects=False) as response:  # verbatim, redirects too
                if response.status in (401, 403) and self.config.api_key:  # the proxy's key: a 502, as for reranks
                    raise self.failure(response.status, response.headers,
                                       await bounded_answer(response, ANSWER_BYTES, url), url)
                yield response
        except (client_exceptions.ClientError, asyncio.TimeoutError) as exc:
            raise self.unreachable(exc, url) from None

    async def served_models(self, headers: dict[str, str]) -> dict[str, frozenset[str]] | None:
        """The model ids Infinity lists at {prefix}/models, with their capabilities; none when it cannot say, and
        None when it refused the client's own key (another client's may do). Unpooled, as the self-check: a call
        made now and then leaves no idle connection to go stale."""
        url = self.origin.with_path(self.models_path)
        try:
            async with self.fresh_session.get(url, headers=headers, allow_redirects=False) as response:
                status, raw = response.status, await bounded_answer(response, MODELS_ANSWER_BYTES, url)
            if status in (401, 403) and not self.config.api_key:
                return None
            listed = json_loads(raw, strict=False)["data"] if status == 200 else []
            return {model["id"]: frozenset(c for c in model.get("capabilities") or () if isinstance(c, str))
                    for model in listed if isinstance(model.get("id"), str)}
        except (RerankError, client_exceptions.ClientError, asyncio.TimeoutError, ValueError, UnicodeDecodeError,
                RecursionError, TypeError, KeyError, AttributeError):
            return {}

    async def health(self, within: float) -> str:
        """'ok', or why Infinity's /health does not answer."""
        url = self.origin / "health"
        try:
            async with self.probe_session.get(url, timeout=ClientTimeout(total=within)) as response:
                await bounded_answer(response, ANSWER_BYTES, url)
                return "ok" if response.status == 200 else f"{url} answered {response.status}"
        except asyncio.TimeoutError:
            return f"{url} did not answer within {within:g} s"
        except client_exceptions.ClientError as exc:
            return f"cannot reach {url}: {str(exc) or type(exc).__name__}"
        except BadAnswer as exc:
            return exc.message


# The proxy's own calls to Infinity (its model list, the self-check) say who makes them, in Infinity's logs too.
INTERNAL = {"User-Agent": f"rerank-proxy/{PROXY_VERSION}"}
CROSS_ENCODER = "rerank"  # the capability Infinity lists for a model it serves at its own /rerank


class ServedModels:
    """What Infinity serves, from {prefix}/models: each model's name and capabilities, read when a request
    names a model not in the list (at most every REFRESH_SECONDS). A model served with "rerank" (a
    cross-encoder) goes to Infinity's /rerank; one served with "classify", or one Infinity does not list,
    is built into prompts by its template."""

    REFRESH_SECONDS = 30.0
    RETRY_SECONDS = 2.0
    MAX_REFUSED = 1024  # client keys remembered as refused (without --api-key each client's key asks)

    def __init__(self, infinity: Infinity) -> None:
        self.infinity = infinity
        self.capabilities: dict[str, frozenset[str]] = {}
        self.read_at = -math.inf
        self.reads: dict[str | None, asyncio.Future[None]] = {}  # in flight, by the Authorization it carries
        self.refused_at: dict[str | None, float] = {}  # when Infinity refused the list to a client's own key

    async def resolve(self, model: str, headers: dict[str, str]) -> tuple[str, frozenset[str]]:
        """The name Infinity serves `model` under, and its capabilities (none when Infinity does not say).
        With one model loaded, Infinity ignores the name a request gives: every name is that model."""
        if model in self.capabilities:  # the common case: nothing to read, nothing more to look at
            return self.known(model)
        key, now = headers.get("Authorization"), time.monotonic()
        if now - self.read_at > self.REFRESH_SECONDS and now - self.refused_at.get(key, -math.inf) > self.RETRY_SECONDS:
            reading = self.reads.get(key)
            if reading is None:  # the requests that carry one key share one read; a refused key holds up no other
                reading = self.reads[key] = asyncio.ensure_future(self.read(key, {**headers, **INTERNAL}))
                reading.add_done_callback(lambda _: self.reads.pop(key, None))
            await asyncio.shield(reading)
        return self.known(model)

    async def read(self, key: str | None, headers: dict[str, str]) -> None:
        listed = await self.infinity.served_models(headers)
        if listed is None:  # this client's key was refused: another client's may not be
            if len(self.refused_at) >= self.MAX_REFUSED:
                self.refused_at.clear()
            self.refused_at[key] = time.monotonic()
            return
        # A list that could not be read (Infinity down, or refusing the proxy's own key) is tried again after
        # RETRY_SECONDS, not trusted for REFRESH_SECONDS.
        self.read_at = time.monotonic() - (0 if listed else self.REFRESH_SECONDS - self.RETRY_SECONDS)
        self.capabilities = listed or self.capabilities

    def known(self, model: str) -> tuple[str, frozenset[str]]:
        """As resolve, from what is known now (no call)."""
        if model not in self.capabilities and len(self.capabilities) == 1:
            [model] = self.capabilities
        return model, self.capabilities.get(model, frozenset())


# The self-check (AnchorChecks.check): one fixed prompt, cut before its trailing whitespace so that it ends on a token
# the model reads, scored bare and followed by the anchor. A model that skips the anchor as padding reads the same
# token at the same position in both: the same score. One that reads it reads another token (the anchor): another
# score, apart by whole units of log-odds on the test models (docs/how-it-works.md). Comparing one anchor with two
# would not do: a model can score a pad token after itself almost as after the prompt. The tolerance holds for fp16 on
# a GPU: an 11-bit significand leaves about 1e-3 relative error on logits of magnitude up to ~30, some 0.03 on each
# and twice that on their difference, when the two inputs are padded to different lengths.
ANCHOR_PROBE = ("What is the boiling point of water at sea level?", "At sea level, water boils at 100 degrees Celsius.")
ANCHOR_TOLERANCE = 0.1  # log-odds


@dataclass(frozen=True)
class AnchorCheck:
    """What the self-check found for one served model: the pad anchor it skips, or that it skips none."""

    model: str
    template: Template
    anchor: str | None  # the first of the template's anchors the model skips as padding; None: none
    gaps: tuple[float, ...]  # per anchor tried: log-odds of the bare probe less those of probe and anchor

    @property
    def anchor_to_send(self) -> str:
        # A model that skips none of them reads whatever ends the prompt: the scores are off either way,
        # and the operator is told (WARNING, /health, /info, /metrics).
        return self.anchor or self.template.anchors[0]

    def report(self) -> dict[str, Any]:
        return {"template": self.template.name, "anchor": self.anchor_to_send,
                "template_check": "ok" if self.anchor else
                "failed: the model reads the pad anchor (docs/how-it-works.md, Fidelity)"}


class AnchorChecks:
    """Runs the self-check once per served model (when a model is first used, or by GET /ready) and keeps
    the outcome. Requests that arrive while it runs wait for the same check."""

    MAX_CHECKED = 64  # the newest kept, where Infinity's model list could not be read to bound the names

    def __init__(self, infinity: Infinity, metrics: Metrics, positive_label: str) -> None:
        self.infinity = infinity
        self.metrics = metrics
        self.positive_label = positive_label  # --positive-label, else each template's
        self.done: dict[str, AnchorCheck] = {}
        self.running: dict[tuple[str, str | None], asyncio.Future[AnchorCheck]] = {}

    async def anchor_for(self, model: str, template: Template, headers: dict[str, str]) -> str:
        """The anchor to send to `model` (a name Infinity serves it under: ServedModels.resolve), found by
        the check, which runs here the first time."""
        check = self.done.get(model)
        if check is None:
            # Shared by the requests that carry the same Authorization: a check made with a key Infinity refuses
            # fails for that key's requests only.
            key = (model, headers.get("Authorization"))
            running = self.running.get(key)
            if running is None and len(self.running) >= self.MAX_CHECKED:
                # A check left running outlives its request: under a flood of names or keys (Infinity stalled), one
                # of the request's own, which ends with it, so that what runs stays bounded by the requests in hand.
                return (await self.check(model, template, headers)).anchor_to_send
            if running is None:
                running = self.running[key] = asyncio.ensure_future(self.check(model, template, headers))
                running.add_done_callback(lambda _: self.running.pop(key, None))
            check = await asyncio.shield(running)  # a request that gives up leaves the check to the others
        return check.anchor_to_send

    async def check(self, model: str, template: Template, headers: dict[str, str]) -> AnchorCheck:
        """Score the probe bare and followed by each anchor: a model that skips the anchor scores them alike.
        One input a call: in one batch the bare probe would be padded, and a tokenizer that pads with the
        anchor would make the two alike whatever the model reads."""
        label = self.positive_label or template.positive_label

        async def log_odds_of(text: str) -> float:
            body = json_dumps({"model": model, "input": [text]})
            [score], _ = await self.infinity.scored(self.infinity.classify_url, body, 1, {**headers, **INTERNAL}, False,
                                                    lambda answer: positive_probabilities(answer, 1, label, True))
            return score

        bare = await log_odds_of(template.prompt(*ANCHOR_PROBE).rstrip())
        gaps = []
        for anchor in template.anchors:
            gaps.append(bare - await log_odds_of(template.prompt(*ANCHOR_PROBE).rstrip() + anchor))
            if abs(gaps[-1]) <= ANCHOR_TOLERANCE:
                found = AnchorCheck(model, template, anchor, tuple(gaps))
                break
        else:
            found = AnchorCheck(model, template, None, tuple(gaps))
            log.warning("model %r does not skip its pad token after the prompt (log-odds moved by %s after the "
                        "anchor %s): every score it gives is off. Set pad_token_id in its config.json to the id of "
                        "%s (docs/how-it-works.md, Fidelity)", model, ", ".join(f"{gap:.3g}" for gap in gaps),
                        " or ".join(template.anchors), template.anchors[0])
        if model not in self.done and len(self.done) >= self.MAX_CHECKED:
            oldest = self.done.pop(next(iter(self.done)))
            self.metrics.template_check.remove(oldest.model, oldest.template.name)
        self.done[model] = found
        self.metrics.template_check.labels(model, template.name).set(1 if found.anchor else 0)
        log.debug("template check: model %r, template %s, anchor %s", model, template.name,
                 found.anchor or "none skipped")
        return found

    async def ready_check(self, served: ServedModels, config: Config, templates: dict[str, Template],
                          within: float) -> None:
        """GET /ready starts the check for --model and waits for it within the probe's time, no longer."""

        async def check_default_model() -> None:
            headers = self.infinity.auth_headers(None)
            model, capabilities = await served.resolve(config.model, headers)
            if CROSS_ENCODER not in capabilities:
                await self.anchor_for(model, template_for(templates, config.template, config.model, model), headers)

        with contextlib.suppress(RerankError, asyncio.TimeoutError):
            await asyncio.wait_for(check_default_model(), within)

    def reports(self) -> dict[str, dict[str, Any]]:
        return {model: check.report() for model, check in self.done.items()}


# --------------------------------------------------------------------------------------------
# 7. Handlers: thin. Read, translate, call, answer.
# --------------------------------------------------------------------------------------------

CONFIG = web.AppKey("config", Config)
INFINITY = web.AppKey("infinity", Infinity)
CHECKS = web.AppKey("checks", AnchorChecks)
TOKENS = web.AppKey("tokens", TokenCounter)
MODELS = web.AppKey("models", ServedModels)
TEMPLATE_SET = web.AppKey("templates", dict)
REQUEST_ID = "X-Request-ID"
REQUEST_ID_KEY = web.RequestKey("request_id", str)

_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a short printable token, safe in a log line as it is
_UNSAFE_IN_LOG = re.compile(r'[\x00-\x20\x7f"\\]')


def escaped_for_log(value: str) -> str:
    """A value taken from a request, made one log token: control characters (a newline would forge a line, ESC a
    terminal sequence), spaces, quotes and backslashes become \\xNN, and anything outside ASCII a \\u escape."""
    escaped = _UNSAFE_IN_LOG.sub(lambda match: f"\\x{ord(match.group()):02x}", value)
    return escaped.encode("ascii", "backslashreplace").decode("ascii")


def upstream_headers(request: web.Request) -> dict[str, str]:
    headers = request.app[INFINITY].auth_headers(request.headers.get("Authorization"))
    headers[REQUEST_ID] = request[REQUEST_ID_KEY]
    return headers


AnswerShape = Callable[[RerankRequest, list[float], int], Any]  # a JSON object, or TEI's bare list
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def read_counted(request: web.Request, max_body_size: int) -> bytes:
    admission, stats = request.app[ADMISSION], request[STATS]
    pieces, size = [], 0
    async for piece in request.content.iter_any():
        size += len(piece)
        if size > max_body_size:
            raise web.HTTPRequestEntityTooLarge(max_size=max_body_size, actual_size=size)
        admission.take(stats, len(piece))
        pieces.append(piece)
    return b"".join(pieces)


async def read_body(request: web.Request) -> bytes:
    """The whole body. One still arriving must arrive within --client-timeout (else 408). One without
    Content-Length was not counted at admission: it is counted as it arrives, and refused (429) when
    it would take the bodies in hand past --max-pending-bytes."""
    config = request.app[CONFIG]
    counted_on_arrival = request.content_length is None and request.body_exists  # chunked
    if not counted_on_arrival and request.content.is_eof():
        return await request.read()  # all here already, the common case: no deadline to set
    try:
        async with deadline_in(config.client_timeout):
            return await (read_counted(request, config.max_body_size) if counted_on_arrival else request.read())
    except asyncio.TimeoutError:
        raise RerankError(408, f"the request body did not arrive within --client-timeout "
                          f"({config.client_timeout:g} s)") from None


async def scores_of_prompts(request: web.Request, rerank_request: RerankRequest, served: str,
                            headers: dict[str, str]) -> tuple[list[float], int]:
    """A causal-LM reranker: its template's prompts, scored by Infinity's /classify."""
    app, config, stats = request.app, request.app[CONFIG], request[STATS]
    template = template_for(app[TEMPLATE_SET], config.template, rerank_request.model, served)
    stats.template = template.name
    counter = app[TOKENS]
    if counter.tokenizer is None:
        plan = plan_prompts(rerank_request, config, counter, template)
    else:  # tokenizing long documents takes milliseconds each: off the event loop, which keeps serving
        plan = await asyncio.to_thread(plan_prompts, rerank_request, config, counter, template)
    # Before their bodies are built. Each prompt carries the query and the instruction (up to 2 * --max-query-chars).
    app[ADMISSION].take(stats, (PROMPT_BYTES + len(escaped_utf8(plan.prompt_head))) * len(plan.unique_texts))
    calls = classify_bodies(rerank_request.model, plan, config.batch_size, template.anchors[0])
    stats.chunks = len(plan.unique_texts)
    anchor = await app[CHECKS].anchor_for(served, template, headers)
    if anchor != template.anchors[0]:  # a model that pads with another token
        calls = classify_bodies(rerank_request.model, plan, config.batch_size, anchor)
    stats.upstream_calls = len(calls)  # all start at once: a failed request's log line shows them too
    label = config.positive_label or template.positive_label
    prompt_scores, tokens = await Infinity.all_scores(
        [app[INFINITY].classify(body, inputs, headers, label, rerank_request.raw_scores) for body, inputs in calls])
    return document_scores(plan, prompt_scores), tokens


async def scores_of_cross_encoder(request: web.Request, rerank_request: RerankRequest,
                                  headers: dict[str, str]) -> tuple[list[float], int]:
    """A model Infinity serves at its own /rerank: the query and documents go there as they are."""
    stats = request[STATS]
    stats.template = "cross-encoder"
    calls = cross_encoder_bodies(rerank_request, request.app[CONFIG].batch_size)
    request.app[ADMISSION].take(stats, sum(len(body) for body, _ in calls))
    stats.chunks, stats.upstream_calls = len(rerank_request.texts), len(calls)
    return await Infinity.all_scores([request.app[INFINITY].rerank(body, n, headers) for body, n in calls])


async def rerank(request: web.Request, shape: AnswerShape, speaks_tei: bool = False) -> web.Response:
    config = request.app[CONFIG]
    body = decode_body(await read_body(request), config.max_documents)
    if speaks_tei and body.get("texts") is not None:  # TEI's dialect shares /rerank and /v1/rerank
        body, shape = rerank_body_from_tei(body, config), tei_answer
    rerank_request = parse_rerank(body, config)
    del body  # the fields the proxy ignores are not held while Infinity works
    request[STATS].documents = len(rerank_request.documents)
    scores: list[float] = []
    tokens = 0
    if rerank_request.documents:  # none: an empty answer, and nothing asked of Infinity
        headers = upstream_headers(request)
        REQUEST_DEADLINE.set(asyncio.get_running_loop().time() + config.timeout)
        try:
            async with deadline_in(config.timeout):  # in the request's own task: wait_for would start one more
                served, capabilities = await request.app[MODELS].resolve(rerank_request.model, headers)
                if CROSS_ENCODER in capabilities:
                    scores, tokens = await scores_of_cross_encoder(request, rerank_request, headers)
                else:
                    scores, tokens = await scores_of_prompts(request, rerank_request, served, headers)
        except asyncio.TimeoutError:
            raise RerankError(504, f"the rerank request did not finish within --timeout ({config.timeout:g} s); "
                              "Infinity is slow or overloaded") from None
    return web.Response(body=json_dumps(shape(rerank_request, scores, tokens)), content_type="application/json",
                        charset="utf-8")


# /rerank and /v1/rerank answer in Infinity's shape, or TEI's for a body with texts; /v2/rerank in Cohere's.
rerank_infinity_shape = functools.partial(rerank, shape=infinity_answer, speaks_tei=True)
rerank_cohere_v2_shape = functools.partial(rerank, shape=cohere_v2_answer)


async def health(request: web.Request) -> web.Response:
    """Liveness, and what the self-check found for each model used so far."""
    upstream = await request.app[INFINITY].health(LIVENESS_PROBE_SECONDS)
    return web.json_response({"status": "ok", "upstream": upstream, "models": request.app[CHECKS].reports()})


async def ready(request: web.Request) -> web.Response:
    started = time.monotonic()
    upstream = await request.app[INFINITY].health(READINESS_PROBE_SECONDS)
    if upstream != "ok":
        raise RerankError(503, f"not ready: Infinity is not answering ({upstream})")
    # The self-check of --model, once: within what is left of the probe's time, and never a reason for 503.
    remaining = READINESS_PROBE_SECONDS - (time.monotonic() - started)
    if remaining > 0:
        app = request.app
        await app[CHECKS].ready_check(app[MODELS], app[CONFIG], app[TEMPLATE_SET], remaining)
    return web.json_response({"status": "ready"})


async def prometheus_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def info(request: web.Request) -> web.Response:
    """TEI's info for --model: its template's labels and context, and its self-check as known now."""
    app, config = request.app, request.app[CONFIG]
    model, _ = app[MODELS].known(config.model)
    template = template_for(app[TEMPLATE_SET], config.template, config.model, model)
    check = app[CHECKS].done.get(model)
    return web.json_response(tei_info(config, template, check.report() if check else None))


def copy_answer_headers(answer_headers: Any, response: web.StreamResponse, *more: str) -> None:
    for name in ("Content-Type", RETRY_AFTER, "Location", *more):
        if name in answer_headers:
            response.headers[name] = answer_headers[name]


def forwarded_headers(request: web.Request) -> dict[str, str]:
    headers = upstream_headers(request)
    for name in ("Content-Type", "Accept"):
        if name in request.headers:
            headers[name] = request.headers[name]
    return headers


def refuse_blank_inputs(body: bytes, max_documents: int) -> None:
    """An input that is empty after stripping can stall Infinity's batch worker for good (while its
    /health still answers): forwarded calls (/embeddings, /classify) must not carry one either. Every body is
    read as Infinity reads it (a name may be escaped, the text UTF-16), within the rerank bodies' bound on values."""
    if not body or body.isspace():
        return
    refuse_json_that_expands(body, max_documents)
    try:
        parsed = json_loads(body, strict=False)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return  # not JSON: Infinity answers that itself
    inputs = parsed.get("input") if isinstance(parsed, dict) else None
    for i, text in enumerate([inputs] if isinstance(inputs, str) else inputs if isinstance(inputs, list) else []):
        if isinstance(text, str) and not text.strip():
            param = "input" if isinstance(inputs, str) else f"input[{i}]"
            raise bad_request(f"{param} is empty or only whitespace; Infinity cannot take an empty input", param)


async def forward_to_infinity(request: web.Request, raw_path: str) -> web.StreamResponse:
    """Infinity's own answer, status and body verbatim: one base URL serves embeddings too. The body is
    streamed through a piece at a time, so an answer of any size (or one that never ends) costs a piece of
    memory, and --timeout bounds it."""
    body = await read_body(request)
    infinity, config = request.app[INFINITY], request.app[CONFIG]
    refuse_blank_inputs(body, config.max_documents)
    request[STATS].upstream_calls = 1
    async with infinity.forwarded(request.method, raw_path, request.rel_url.raw_query_string, body,
                                  forwarded_headers(request)) as answer:
        response = web.StreamResponse(status=answer.status)
        copy_answer_headers(answer.headers, response, "Content-Encoding")  # never decoded here: passed on as is
        response.headers[REQUEST_ID] = request[REQUEST_ID_KEY]
        response.content_length = answer.content_length
        try:
            await response.prepare(request)
            async with deadline_in(config.timeout):
                async for piece in answer.content.iter_chunked(FORWARD_CHUNK_BYTES):
                    await response.write(piece)
            await response.write_eof()
        except (client_exceptions.ClientError, ConnectionError, asyncio.TimeoutError):
            # Begun, the answer cannot become an error any more: the client sees it cut short, as it was (and a
            # client that went away is no failure of Infinity's).
            if request.transport is not None:
                request.transport.abort()
    return response


async def models(request: web.Request) -> web.Response:
    """Infinity's model list, status and body verbatim, read whole (at most MODELS_ANSWER_BYTES)."""
    body = await read_body(request)
    infinity = request.app[INFINITY]
    request[STATS].upstream_calls = 1
    async with infinity.forwarded(request.method, infinity.models_path, request.rel_url.raw_query_string, body,
                                  forwarded_headers(request)) as answer:
        listed = await bounded_answer(answer, MODELS_ANSWER_BYTES, answer.url)
        response = web.Response(status=answer.status, body=listed)
        copy_answer_headers(answer.headers, response)
    return response


async def forward_under_prefix(request: web.Request) -> web.StreamResponse:
    if ".." in request.path.split("/"):  # decoded, so %2e%2e counts too
        raise RerankError(404, f"no route {request.method} {request.path}")
    return await forward_to_infinity(request, request.rel_url.raw_path)


# --------------------------------------------------------------------------------------------
# 8. The middleware, the app factory and main().
# --------------------------------------------------------------------------------------------

OPEN_PATHS = {"/health", "/ready"}  # probes answer without a key
NEVER_REFUSED = {*OPEN_PATHS, "/metrics"}  # cheap, and most needed when the proxy is overloaded
UNMATCHED = "unmatched"  # the route label of a path no route serves: unknown paths add no series


def bearer_matches(header: str | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    # aiohttp keeps header bytes that are not UTF-8 as surrogate escapes: compare the bytes as sent.
    sent = token.strip().encode("utf-8", "surrogateescape")
    # Constant-time: the comparison must not reveal how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, key.encode("utf-8", "surrogateescape"))


def method_and_path(request: web.Request) -> tuple[str, str]:
    """For the log line: both come from the request, so both are escaped (one request, one line)."""
    return escaped_for_log(request.method), escaped_for_log(request.path)


def drop_slow_reader(request: web.Request) -> None:
    if request.transport is not None:
        metrics = request.app[METRICS]
        metrics.labelled(metrics.rejected, "client_timeout").inc()
        request.transport.abort()  # not close(): that would keep the unsent answer until it drains


async def deliver(request: web.Request, response: web.StreamResponse, within: float) -> None:
    """Write the answer now. An answer the client does not read (a 32 MiB return_documents echo) stays in
    memory until it is sent: it must count against the bounds, and a client that does not read it within
    --client-timeout is dropped."""
    dropping = asyncio.get_running_loop().call_later(within, drop_slow_reader, request)
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away, or was dropped
    finally:
        dropping.cancel()


async def write_while_held(request: web.Request, response: web.StreamResponse, stats: RequestStats) -> None:
    """An admitted request's answer is written here, while it still counts against the bounds. Refusing is free:
    an answer given before the whole body came (401, 404, 405, 413, 415, 429, 408) leaves the rest unread, and the
    connection is closed once the answer is out; aiohttp would otherwise read and discard the rest (for up to
    10 s) before the connection could carry another request."""
    body_left = request.body_exists and not request.content.is_eof()
    if body_left:
        response.force_close()  # "Connection: close"
    if stats.admitted or body_left:
        await deliver(request, response, request.app[CONFIG].client_timeout)
        if body_left and request.transport is not None:
            request.transport.close()


def aiohttp_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no route {request.method} {request.path}; rerank routes are POST /rerank, /v1/rerank, /v2/rerank"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}; use {exc.headers.get('Allow', 'POST')}"
    if exc.status == 413:
        return (f"the request body is larger than --max-body-size ({request.app[CONFIG].max_body_size} bytes); "
                "send fewer or shorter documents")
    return exc.reason or f"HTTP {exc.status}"


def error_response(exc: RerankError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


def refusal_from_headers(request: web.Request) -> RerankError | None:
    """What refuses a request from its headers alone: a missing or wrong key (401), or a compressed body (415).
    A compressed body is refused before any of it is read or decoded: Infinity decodes none either, and no rerank
    client compresses its bodies; so every bound (--max-body-size, --max-pending-bytes) counts the bytes the proxy
    really holds, and a gzip bomb costs nothing."""
    config = request.app[CONFIG]
    if config.api_key and request.path not in OPEN_PATHS and not bearer_matches(
            request.headers.get("Authorization"), config.api_key):
        return RerankError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if request.body_exists and encoding not in IDENTITY:
        shown = escaped_for_log(request.headers["Content-Encoding"][:40])
        return RerankError(415, f"Content-Encoding {shown!r} is not accepted: send the request body uncompressed "
                           "(no Content-Encoding header, or 'identity')")
    return None


async def continue_if_admitted(request: web.Request, methods: tuple[str, ...] = ()) -> None:
    """curl sends "Expect: 100-continue" with a large body and waits for "100 Continue" before sending it. It
    gets one only when the route takes its method, the headers pass and admission would take the request now;
    otherwise the 405, 401, 415, 429 or 413 is the answer it waits for, and the body is never sent."""
    if (request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"
            and (not methods or request.method in methods) and refusal_from_headers(request) is None
            and request.app[ADMISSION].would_admit(request.content_length)):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own expect handler: the answer has not started


async def answer_or_error(request: web.Request, handler: Handler, stats: RequestStats) -> web.StreamResponse:
    """The handler's answer once the key and admission allow it; any error rendered as the contract's JSON."""
    app = request.app
    try:
        refusal = refusal_from_headers(request)
        if refusal is not None:
            raise refusal
        if stats.route not in (UNMATCHED, *NEVER_REFUSED):
            app[ADMISSION].admit(stats, request.content_length)
        return await handler(request)
    except (RerankError, web.HTTPException) as exc:  # aiohttp's own 404, 405, 413 too
        error = exc if isinstance(exc, RerankError) else RerankError(exc.status, aiohttp_message(request, exc))
        if exc.status == 405 and "Allow" in exc.headers:
            error.headers["Allow"] = exc.headers["Allow"]
        if error.kind in REJECTED_AS:
            app[METRICS].labelled(app[METRICS].rejected, REJECTED_AS[error.kind]).inc()
        return error_response(error)
    except asyncio.CancelledError:
        log.info("request_id=%s %s %s cancelled: the client went away documents=%d ms=%.1f", request[REQUEST_ID_KEY],
                 *method_and_path(request), stats.documents, stats.milliseconds())
        raise
    except Exception:
        log.exception("request_id=%s %s %s failed: a bug", request[REQUEST_ID_KEY], *method_and_path(request))
        return error_response(RerankError(500, f"internal error; quote request id {request[REQUEST_ID_KEY]}"))


@web.middleware
async def errors_and_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request: its id, its key, its admission, one log line and its metrics; every error as the
    contract's JSON."""
    resource = request.match_info.route.resource  # None when no route matched: aiohttp's 404/405
    stats = request[STATS] = RequestStats(UNMATCHED if resource is None else resource.canonical)
    incoming = request.headers.get(REQUEST_ID, "")
    request[REQUEST_ID_KEY] = incoming if _REQUEST_ID_OK.fullmatch(incoming) else uuid.uuid4().hex
    status = 499  # nginx's "client closed request", unless an answer is made
    try:
        response = await answer_or_error(request, handler, stats)
        response.headers[REQUEST_ID] = request[REQUEST_ID_KEY]
        status = response.status
        await write_while_held(request, response, stats)
    finally:
        if stats.admitted:
            request.app[ADMISSION].release(stats)
        request.app[METRICS].answered(stats, status)
    log.info("request_id=%s %s %s status=%d documents=%d chunks=%d upstream_calls=%d template=%s ms=%.1f",
             request[REQUEST_ID_KEY], *method_and_path(request), status, stats.documents, stats.chunks,
             stats.upstream_calls, stats.template or "-", stats.milliseconds())
    return response


def only(methods: tuple[str, ...], handler: Handler) -> Handler:
    """Local routes answer any other method with a local 405, never by forwarding it."""

    async def checked(request: web.Request) -> web.StreamResponse:
        if request.method not in methods:
            raise web.HTTPMethodNotAllowed(request.method, methods)
        return await handler(request)

    return checked


def make_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[errors_and_log], client_max_size=config.max_body_size)
    app[CONFIG] = config
    admission = app[ADMISSION] = Admission(config)
    metrics = app[METRICS] = Metrics(lambda: admission.requests)
    infinity = app[INFINITY] = Infinity(config, metrics)
    app[CHECKS] = AnchorChecks(infinity, metrics, config.positive_label)
    app[TOKENS] = TokenCounter.from_file(config.tokenizer)
    app[MODELS] = ServedModels(infinity)
    app[TEMPLATE_SET] = templates_from_file(config.template_file)

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        # One shared session for the app's lifetime: opened before the first request, closed last.
        await infinity.open()
        yield
        await infinity.close()

    app.cleanup_ctx.append(upstream_session)
    get = ("GET", "HEAD")
    routes = [("/rerank", ("POST",), rerank_infinity_shape), ("/v1/rerank", ("POST",), rerank_infinity_shape),
              ("/v2/rerank", ("POST",), rerank_cohere_v2_shape), ("/health", get, health),
              ("/ready", get, ready), ("/metrics", get, prometheus_metrics), ("/models", get, models),
              ("/v1/models", get, models), ("/info", get, info), ("/v1/info", get, info)]
    for path, methods, handler in routes:
        app.router.add_route("*", path, only(methods, handler),
                             expect_handler=functools.partial(continue_if_admitted, methods=methods))
    prefix = URL(config.infinity_url).path.rstrip("/")
    app.router.add_route("*", prefix + "/{tail:.*}", forward_under_prefix, expect_handler=continue_if_admitted)
    return app


def server_options(config: Config) -> dict[str, Any]:
    """How aiohttp serves the app (main() and the tests alike)."""
    # aiohttp's keep-alive timer runs from a connection's opening and from each answer until the next
    # request's headers are complete: at --client-timeout it closes an idle connection, and one whose
    # headers never finish (aiohttp itself bounds only their size). The body has its own deadline (read_body).
    # auto_decompress off: a request body is never decoded (refusal_from_headers answers 415 from them).
    return {"keepalive_timeout": config.client_timeout, "auto_decompress": False}


# Each client connection takes a file descriptor: the usual soft limit (1024) would refuse connections long
# before memory or CPU run out.
WANTED_OPEN_FILES = 65536


def raise_open_files_limit() -> None:
    try:
        import resource
    except ImportError:  # not on Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(WANTED_OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        log.info("raised the open-files soft limit from %d to %d (the hard limit is %s), so that many client "
                 "connections can be held", soft, wanted, "unlimited" if hard == resource.RLIM_INFINITY else hard)


def speedups_in_use() -> str:
    """For the start line: which optional speedups run, or why none does."""
    used = [f"{module.__name__} {module.__version__}" for module in (orjson, uvloop) if module is not None]
    if used:
        return ", ".join(used)
    return "off (PROXY_NO_SPEEDUPS)" if SPEEDUPS_OFF else "none installed (pip install -r requirements-speedups.txt)"


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket the proxy serves on, bound and listening; or one line saying why not, and exit 1."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        # A flood of new connections waits in the kernel's queue for its fast 429, not in SYN retries.
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        why = (exc.strerror or str(exc)).split(" (while attempting")[0]
        if exc.errno == errno.EADDRINUSE:
            why += ": another program listens there; stop it, or choose another port with --port (PORT)"
        elif isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            why += ": --host (HOST) must be an address of this machine, such as 127.0.0.1 or 0.0.0.0"
        sys.exit(f"proxy-classifier.py: cannot listen on {host}:{port}: {why}")


def main(argv: list[str] | None = None) -> None:
    config = load_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise_open_files_limit()
    if config.infinity_api_key and not config.api_key:
        log.warning("--infinity-api-key is used only with --api-key: without it, each client's own "
                    "Authorization header goes to Infinity as it came")
    sock = listening_socket(config.host, config.port)
    log.info("listening on %s:%d, Infinity at %s, model %s, speedups: %s", config.host, sock.getsockname()[1],
             config.infinity_url, config.model, speedups_in_use())
    # uvloop's loop is handed to run_app rather than installed as the global policy (asyncio's
    # policies are deprecated from Python 3.14).
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    web.run_app(make_app(config), sock=sock, access_log=None, print=None, loop=loop, handler_cancellation=True,
                # SIGTERM/SIGINT: stop accepting, let requests in flight finish within their own deadline.
                shutdown_timeout=config.timeout, **server_options(config))


if __name__ == "__main__":
    sys.exit(main())
