#!/usr/bin/env python3
"""How often the tokenization boundary applies, and how far it moves a score (docs/how-it-works.md, Fidelity).

mixedbread's library tokenizes the query part and the document part on their own; Infinity tokenizes the
whole prompt the proxy sends. Where a part ends in punctuation or whitespace, Qwen2's pre-tokenizer joins
its last piece with the template's newline ("?\\n", ".\\n", " \\n"), so the ids differ. This counts, over
realistic pairs, how many cross that boundary, and scores each crossing pair both ways on the fidelity
tier's tiny causal model (Qwen2's own pre-tokenizer pattern, random weights): the library's score, and the
model's score of the whole prompt, which is what the proxy's answer equals.

The documents are the first paragraphs of the standard library's docstrings (English prose that ends in
a full stop, as most passages do); the queries are written two ways, as keywords (MS MARCO style) and as
questions ending in "?". Offline, about a minute:

    .venv/bin/python bench/boundary.py
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import Library, build_tiny_causal_reranker

KEYWORD_QUERIES = ["python list sort stable", "read file line by line", "http request timeout", "parse json string",
                   "thread safe queue", "unicode normalization", "temporary directory cleanup", "regular expression"]
QUESTION_QUERIES = [query.capitalize() + "?" for query in
                    ["how do i sort a list stably", "how can i read a file line by line",
                     "what sets an http request timeout", "how to parse a json string",
                     "is there a thread safe queue", "what is unicode normalization",
                     "how is a temporary directory cleaned up", "how do regular expressions match"]]


def stdlib_paragraphs(count: int, rng: random.Random) -> list[str]:
    paragraphs = []
    for module in sorted(name for name in sys.stdlib_module_names if not name.startswith(("_", "idlelib", "turtle", "this", "antigravity"))):
        try:
            doc = importlib.import_module(module).__doc__ or ""
        except BaseException:  # some need a display, a platform or an optional dependency; one exits
            continue
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        if 40 <= len(paragraph) <= 600:
            paragraphs.append(paragraph)
    rng.shuffle(paragraphs)
    return paragraphs[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=60)
    args = parser.parse_args()
    rng = random.Random(0)
    documents = stdlib_paragraphs(args.documents, rng)
    with tempfile.TemporaryDirectory() as directory:
        library = Library(build_tiny_causal_reranker(Path(directory) / "causal"))
        ends_in_text = sum(document[-1].isalnum() for document in documents)
        print(f"{len(documents)} documents; {len(documents) - ends_in_text} end in punctuation or whitespace")
        for name, queries in (("keyword queries", KEYWORD_QUERIES), ("question queries", QUESTION_QUERIES)):
            moves, pairs = [], 0
            for query in queries:
                for document in documents:
                    pairs += 1
                    if library.library_ids(query, document) != library.whole_ids(query, document):
                        [score] = library.scores(query, [document])
                        moves.append(abs(library.whole_score(query, document) - score))
            quantiles = statistics.quantiles(moves, n=20) if len(moves) > 1 else moves * 19
            print(f"{name}: {len(moves)} of {pairs} pairs ({100 * len(moves) / pairs:.0f}%) cross the boundary; "
                  f"|score move| in log-odds on the tiny model: median {statistics.median(moves):.3f}, "
                  f"95th percentile {quantiles[18]:.3f}, max {max(moves):.3f}" if moves else
                  f"{name}: none of {pairs} pairs cross the boundary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
