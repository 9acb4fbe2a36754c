#!/usr/bin/env python3
"""Convert a causal-LM reranker into the two-label classifier that Infinity serves at /classify.

mxbai-rerank-v2 answers "1" or "0", Qwen3-Reranker "yes" or "no", as the next token after its prompt: its
relevance is logit(positive) - logit(negative) at the last position. A *ForSequenceClassification model
with a two-row head reads the same position, so the two answer tokens' rows of the lm_head become that
head, in the order (negative, positive): label 1 is the positive one, and Infinity's probability of it
is sigmoid(logit_positive - logit_negative), the authors' own score. This is how the
michaelfeil/mxbai-rerank-*-v2-seq checkpoints are made.

The head reads the last token that is not the pad token, which the proxy relies on (docs/how-it-works.md, Fidelity):
so the conversion sets pad_token_id, by default to <|endoftext|>, the token Qwen's tokenizers pad with.

    pip install -r scripts/requirements-convert.txt
    python scripts/convert_causal_to_seq.py mixedbread-ai/mxbai-rerank-base-v2 ./mxbai-rerank-base-v2-seq
    python scripts/convert_causal_to_seq.py Qwen/Qwen3-Reranker-0.6B ./qwen3-reranker-0.6b-seq --labels no yes

A source is a local directory or a model id that transformers can download. Then serve the result:
    infinity_emb v2 --model-id ./mxbai-rerank-base-v2-seq
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SystemExit(f"{text!r} is {len(ids)} tokens in this tokenizer; an answer label must be exactly one")
    return ids[0]


def convert(source: str, destination: Path, negative: str, positive: str, pad_token: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    causal = AutoModelForCausalLM.from_pretrained(source, torch_dtype="auto")
    rows = [token_id(tokenizer, negative), token_id(tokenizer, positive)]
    pad_id = tokenizer.convert_tokens_to_ids(pad_token)
    if pad_id is None or pad_id == tokenizer.unk_token_id:
        raise SystemExit(f"the pad token {pad_token!r} is not a token of this tokenizer")

    config = AutoConfig.from_pretrained(source)
    config.num_labels = 2
    config.id2label = {0: negative, 1: positive}
    config.label2id = {negative: 0, positive: 1}
    config.pad_token_id = pad_id
    config.architectures = None  # set again by save_pretrained from the class
    config.torch_dtype = causal.dtype
    classifier = AutoModelForSequenceClassification.from_config(config, torch_dtype=causal.dtype)
    # The transformer body is the causal model's, weight for weight; the head is its two answer rows.
    classifier.model.load_state_dict(causal.model.state_dict(), strict=True)
    with torch.no_grad():
        classifier.score.weight.copy_(causal.lm_head.weight[rows])
    if getattr(classifier.score, "bias", None) is not None:
        raise SystemExit("this architecture's classification head has a bias; the conversion assumes none")

    tokenizer.pad_token = pad_token
    destination.mkdir(parents=True, exist_ok=True)
    classifier.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the causal-LM reranker: a local directory or a model id")
    parser.add_argument("destination", type=Path, help="where to write the two-label classifier")
    parser.add_argument("--labels", nargs=2, metavar=("NEGATIVE", "POSITIVE"), default=("0", "1"),
                        help="the answer tokens, negative first: 0 1 for mxbai-rerank-v2 (default), no yes for "
                        "Qwen3-Reranker")
    parser.add_argument("--pad-token", default="<|endoftext|>",
                        help="the classifier's pad token, which its head skips (default <|endoftext|>)")
    args = parser.parse_args(argv)
    convert(args.source, args.destination, args.labels[0], args.labels[1], args.pad_token)
    print(f"wrote a two-label classifier ({args.labels[0]!r}, {args.labels[1]!r}) to {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
