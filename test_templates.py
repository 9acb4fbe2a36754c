"""The templates tier: Qwen3-Reranker beside mxbai-rerank-v2, and a cross-encoder passed through, in ONE real Infinity.

The reference for Qwen3 is the Qwen3-Reranker model card's procedure, written out here from the card: its
system prefix and assistant suffix tokenized on their own, `format_instruction`'s text between them, the
causal model's `yes` and `no` logits at the last position, softmaxed. It runs on a tiny `Qwen3ForCausalLM`
built offline with a Qwen3-like tokenizer (Qwen2's pre-tokenizer pattern; `<think>`, `</think>`, `yes`, `no`),
whose two-label conversion (`scripts/convert_causal_to_seq.py --labels no yes`) Infinity serves beside
the fidelity tier's tiny mxbai-rerank-v2 and a tiny one-label BERT cross-encoder, which Infinity serves at its
own `/rerank`. Nothing here uses the proxy's own prompt code for an expected score.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import proxy
from tests.helpers import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    PASSAGES,
    QUERIES,
    TEMPLATES_PACKAGES,
    Library,
    Server,
    build_tiny_causal_reranker,
    convert,
    http_json,
    log_odds_approx,
    missing_packages,
    offline_tier,
    order_of,
    qwen_like_tokenizer,
    rerank,
    rerank_body,
    running_infinity,
    running_proxy,
    scores_by_index,
    spread_answer_rows,
)

pytestmark = pytest.mark.e2e


TOLERANCE = 1e-4
EOT, THINK, END_THINK = END_OF_TEXT, "<think>", "</think>"
QWEN3, MXBAI, CROSS_ENCODER = "tiny-Qwen3-Reranker-seq", "tiny-mxbai-rerank-v2-seq", "tiny-cross-encoder"
ALIAS = "tiny-house-reranker"  # the Qwen3 conversion again, under a name that does not say what it is
CHUNK_CHARS = 120

# The Qwen3-Reranker model card, in its own words: the prefix, the suffix and format_instruction's layout.
CARD_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def card_body(query: str, document: str, instruction: str | None) -> str:
    """format_instruction: the card's default task when the instruction is None, any other as given ("" too)."""
    return f"<Instruct>: {CARD_TASK if instruction is None else instruction}\n<Query>: {query}\n<Document>: {document}"


HARD = ["Paris is the capital of France.", "  padded on both ends  ", "", "   ", "東京は晴れ", "sunny 🌞 in tokyo 🙂",
        "cafe\u0301 in ko\u0308ln", '{"city": "paris"}', "use {0} and {1}", f"the token {IM_END} ends a turn", "ends\n"]
LONG_DOCUMENT = " ".join(["the weather in tokyo is sunny and the river is long"] * 6
                         + ["paris is the capital of france and its first city"] * 4)


# --------------------------------------------------------------------------------------------
# The tiny models.
# --------------------------------------------------------------------------------------------


def build_tiny_qwen3_reranker(directory: Path, seed: int = 1) -> Path:
    """A tiny random Qwen3ForCausalLM with a Qwen3-like tokenizer, its yes/no rows spread so that the card's
    scores cover most of (0, 1)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    rng = random.Random(seed)
    words = " ".join(QUERIES + PASSAGES + HARD).split()
    corpus = [CARD_PREFIX + card_body(q, d, None) + CARD_SUFFIX + " yes no" for q in QUERIES for d in PASSAGES]
    corpus += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + " yes no" for _ in range(400)]
    tokenizer = qwen_like_tokenizer(corpus, [EOT, IM_START, IM_END, THINK, END_THINK])
    yes = tokenizer.convert_tokens_to_ids("yes")
    assert tokenizer("yes", add_special_tokens=False)["input_ids"] == [yes] and yes != tokenizer.unk_token_id
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, torch_dtype="float32", initializer_range=0.05)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).eval()
    prompts = [CARD_PREFIX + card_body(q, d, None) + CARD_SUFFIX for q in QUERIES for d in PASSAGES]
    spread_answer_rows(model, tokenizer, prompts, "yes", "no")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def build_tiny_cross_encoder(directory: Path, seed: int = 2) -> Path:
    """A tiny random one-label BertForSequenceClassification: Infinity serves it at /rerank."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(QUERIES + PASSAGES + HARD, vocab_size=400, show_progress=False)
    wordpiece.save_model(str(directory))
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), model_max_length=512)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class Models:
    qwen3_causal: Path
    mxbai_causal: Path
    qwen3_seq: Path
    mxbai_seq: Path
    cross_encoder: Path


@pytest.fixture(scope="module", autouse=True)
def templates_world() -> Iterator[None]:
    yield from offline_tier("the templates tier", missing_packages(*TEMPLATES_PACKAGES))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("templates")
    qwen3 = build_tiny_qwen3_reranker(root / "qwen3-causal")
    mxbai = build_tiny_causal_reranker(root / "mxbai-causal")
    return Models(qwen3, mxbai, convert(qwen3, root / "qwen3-seq", "--labels", "no", "yes"),
                  convert(mxbai, root / "mxbai-seq"), build_tiny_cross_encoder(root / "cross-encoder"))


class Card:
    """The Qwen3-Reranker model card's procedure on the causal model."""

    def __init__(self, causal: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(causal, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(causal).eval()
        self.prefix = self.tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
        self.yes, self.no = self.tokenizer.convert_tokens_to_ids("yes"), self.tokenizer.convert_tokens_to_ids("no")

    def scores(self, query: str, documents: list[str], instruction: str | None = None) -> list[float]:
        import torch

        bodies = self.tokenizer([card_body(query, d, instruction) for d in documents], padding=False,
                                truncation="longest_first", return_attention_mask=False,
                                max_length=8192 - len(self.prefix) - len(self.suffix))
        bodies["input_ids"] = [self.prefix + ids + self.suffix for ids in bodies["input_ids"]]
        batch = self.tokenizer.pad(bodies, padding=True, return_tensors="pt", max_length=8192)
        with torch.no_grad():
            last = self.model(**batch).logits[:, -1, :]
        pair = torch.stack([last[:, self.no], last[:, self.yes]], dim=1)
        return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()


@pytest.fixture(scope="module")
def card(models: Models) -> Card:
    return Card(models.qwen3_causal)


@pytest.fixture(scope="module")
def infinity(models: Models, logs: Path) -> Iterator[Server]:
    """One Infinity serving all three: two through /classify, the cross-encoder through /rerank."""
    yield from running_infinity([(models.qwen3_seq, QWEN3), (models.mxbai_seq, MXBAI),
                                 (models.cross_encoder, CROSS_ENCODER), (models.qwen3_seq, ALIAS)], logs,
                                "infinity-templates")


@pytest.fixture(scope="module")
def proxy_server(infinity: Server, logs: Path) -> Iterator[Server]:
    yield from running_proxy(infinity.url, logs, "proxy-templates", "--model", MXBAI)


def rank(server: Server, path: str, field: str, query: str, documents: list[str], **extra: Any) -> Any:
    return rerank(server.url, path, rerank_body(field, query, documents, **extra))


ROUTES = [("/v1/rerank", "documents"), ("/v2/rerank", "documents"), ("/rerank", "texts")]


def assert_card_ranking(answer: Any, expected: list[float]) -> None:
    got = scores_by_index(answer)
    assert sorted(got) == list(range(len(expected)))
    for index, score in enumerate(expected):
        assert got[index] == pytest.approx(score, abs=TOLERANCE), index
    assert order_of(answer) == sorted(range(len(expected)), key=lambda i: (-expected[i], i))


# --------------------------------------------------------------------------------------------
# Qwen3-Reranker: the model card's scores.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "field"), ROUTES)
def test_qwen3_scores_are_the_model_cards(proxy_server: Server, card: Card, path: str, field: str) -> None:
    for query in QUERIES[:3]:
        expected = card.scores(query, PASSAGES)
        assert max(expected) - min(expected) > 0.3  # spread: the comparison says something
        assert_card_ranking(rank(proxy_server, path, field, query, PASSAGES, model=QWEN3), expected)


@pytest.mark.parametrize("instruction", ["Find the passage that names a city", ""])
def test_qwen3_instruction_from_the_request_is_the_cards_instruction(proxy_server: Server, card: Card,
                                                                      instruction: str) -> None:
    answer = rank(proxy_server, "/v2/rerank", "documents", QUERIES[0], PASSAGES, model=QWEN3, instruction=instruction)
    expected = card.scores(QUERIES[0], PASSAGES, instruction)
    assert_card_ranking(answer, expected)
    assert max(abs(a - b) for a, b in zip(expected, card.scores(QUERIES[0], PASSAGES), strict=True)) > 10 * TOLERANCE


@pytest.fixture(scope="module")
def instructed_proxy(infinity: Server, logs: Path) -> Iterator[Server]:
    yield from running_proxy(infinity.url, logs, "proxy-instructed", "--model", QWEN3, "--instruction",
                             "Prefer passages about cities")


def test_qwen3_instruction_from_the_flag_is_the_cards_instruction(instructed_proxy: Server, card: Card) -> None:
    answer = rank(instructed_proxy, "/v1/rerank", "documents", QUERIES[1], PASSAGES)  # no model: --model
    assert_card_ranking(answer, card.scores(QUERIES[1], PASSAGES, "Prefer passages about cities"))


@pytest.mark.parametrize(("path", "field"), ROUTES)
def test_qwen3_hard_text_scores_as_the_card(proxy_server: Server, card: Card, path: str, field: str) -> None:
    answer = rank(proxy_server, path, field, "what is the capital?", HARD, model=QWEN3)
    assert_card_ranking(answer, card.scores("what is the capital?", HARD))


@pytest.fixture(scope="module")
def chunking_proxy(infinity: Server, logs: Path) -> Iterator[Server]:
    yield from running_proxy(infinity.url, logs, "proxy-chunking", "--model", QWEN3, "--max-doc-chars",
                             str(CHUNK_CHARS))


def test_qwen3_long_document_scores_as_its_best_chunk(chunking_proxy: Server, card: Card) -> None:
    chunks = proxy.chunks_of(LONG_DOCUMENT, CHUNK_CHARS, 10)
    assert len(chunks) > 2
    answer = rank(chunking_proxy, "/v1/rerank", "documents", QUERIES[0], [LONG_DOCUMENT])
    chunk_scores = card.scores(QUERIES[0], chunks)
    assert answer["results"][0]["relevance_score"] == pytest.approx(max(chunk_scores), abs=TOLERANCE)
    assert max(chunk_scores) != pytest.approx(card.scores(QUERIES[0], [LONG_DOCUMENT])[0], abs=TOLERANCE)


@pytest.fixture(scope="module")
def aliased_proxy(infinity: Server, logs: Path) -> Iterator[Server]:
    """--template for a model served under a name that does not say qwen3-reranker."""
    yield from running_proxy(infinity.url, logs, "proxy-aliased", "--model", ALIAS, "--template", "qwen3-reranker")


def test_the_template_flag_serves_qwen3_under_an_alias(aliased_proxy: Server, proxy_server: Server,
                                                      card: Card) -> None:
    expected = card.scores(QUERIES[2], PASSAGES)
    assert_card_ranking(rank(aliased_proxy, "/v2/rerank", "documents", QUERIES[2], PASSAGES), expected)
    health = http_json("GET", aliased_proxy.url + "/health")[1]
    assert health["models"][ALIAS] == {"template": "qwen3-reranker", "anchor": EOT, "template_check": "ok"}
    # Without the flag, the name chooses: this one says nothing, so it gets mxbai-rerank-v2's prompt and looks for
    # its label "1", which a yes/no classifier does not have.
    status, answer = http_json("POST", proxy_server.url + "/v2/rerank",
                               {"query": QUERIES[2], "documents": PASSAGES, "model": ALIAS})
    assert status == 502 and "--template" in answer["error"]["message"]


def test_mxbai_beside_qwen3_keeps_its_own_prompt_and_the_librarys_scores(proxy_server: Server,
                                                                         models: Models) -> None:
    library = Library(models.mxbai_causal)
    query = QUERIES[0]
    answer = rank(proxy_server, "/v1/rerank", "documents", query, PASSAGES, raw_scores=True)  # --model: mxbai
    got = scores_by_index(answer)
    for index, score in library.rank(query, PASSAGES):
        assert got[index] == log_odds_approx(score)


# --------------------------------------------------------------------------------------------
# The cross-encoder: Infinity's own /rerank, in the shape the client asked for.
# --------------------------------------------------------------------------------------------


def infinity_rerank(infinity: Server, query: str, documents: list[str], **extra: Any) -> list[tuple[int, float]]:
    status, answer = http_json("POST", infinity.url + "/rerank",
                               {"model": CROSS_ENCODER, "query": query, "documents": documents, **extra})
    assert status == 200, answer
    return [(r["index"], r["relevance_score"]) for r in answer["results"]]


@pytest.mark.parametrize(("path", "field"), ROUTES)
@pytest.mark.parametrize("raw", [False, True])
def test_a_cross_encoder_passes_through_with_infinitys_scores_and_order(
        proxy_server: Server, infinity: Server, path: str, field: str, raw: bool) -> None:
    documents = [*PASSAGES, "", "   "]
    direct = infinity_rerank(infinity, QUERIES[0], documents, raw_scores=raw)
    answer = rank(proxy_server, path, field, QUERIES[0], documents, model=CROSS_ENCODER, raw_scores=raw)
    got = scores_by_index(answer)
    for index, score in direct:
        assert got[index] == pytest.approx(score, abs=1e-6)
    assert order_of(answer) == [index for index, _ in sorted(direct, key=lambda pair: (-pair[1], pair[0]))]
    if not raw:
        assert all(0 < score < 1 for score in got.values()) and max(got.values()) - min(got.values()) > 1e-3


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_a_cross_encoder_honours_top_n_and_return_documents(proxy_server: Server, infinity: Server,
                                                            path: str) -> None:
    direct = infinity_rerank(infinity, QUERIES[1], PASSAGES, top_n=3)
    answer = rank(proxy_server, path, "documents", QUERIES[1], PASSAGES, model=CROSS_ENCODER, top_n=3,
                  return_documents=True)
    assert [(r["index"], pytest.approx(r["relevance_score"], abs=1e-6)) for r in answer["results"]] == direct
    documents = [r["document"] for r in answer["results"]]
    assert documents == [PASSAGES[i] if path == "/v1/rerank" else {"text": PASSAGES[i]} for i, _ in direct]


def test_the_proxy_learns_capabilities_from_infinitys_model_list(proxy_server: Server) -> None:
    listed = {m["id"]: m["capabilities"] for m in http_json("GET", proxy_server.url + "/v1/models")[1]["data"]}
    assert listed == {QWEN3: ["classify"], MXBAI: ["classify"], CROSS_ENCODER: ["rerank"], ALIAS: ["classify"]}
    answer = rank(proxy_server, "/v1/rerank", "documents", "q", ["a"], model=CROSS_ENCODER)
    assert answer["results"][0]["index"] == 0
    health = http_json("GET", proxy_server.url + "/health")[1]
    assert CROSS_ENCODER not in health["models"]  # no template, no self-check: Infinity scores it itself
