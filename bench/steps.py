#!/usr/bin/env python3
"""The proxy's own work per request, step by step, in-process: no sockets, no event loop.

Each pure step of one rerank request (read the body, check it, plan the prompts, write the classify
bodies, read Infinity's answers, score, write the answer) timed on the benchmark's documents, with
orjson and with the standard library side by side in one run:

    .venv/bin/python bench/steps.py                    # 100 and 1,000 documents
    .venv/bin/python bench/steps.py --documents 50 --repeat 7

Figures are the best of `--repeat` runs of `--number` calls each, in microseconds: the least the
step costs here, what remains once the machine's noise is taken out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import timeit
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("bench_harness", BENCH / "bench.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules["bench_harness"] = harness
_spec.loader.exec_module(harness)
proxy = harness.proxy
fake = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location("fake", BENCH / "fake_infinity.py"))
spec.loader.exec_module(fake)

BOUND = ("json_loads", "json_dumps", "escaped_utf8", "escaped_utf8_each")
IMPLEMENTATIONS = {"stdlib": ("stdlib_json_loads", "stdlib_json_dumps", "stdlib_escaped_utf8", "stdlib_escaped_utf8_each"),
                   "orjson": ("orjson_loads", "orjson_dumps", "orjson_escaped_utf8", "orjson_escaped_utf8_each")}


def use(name: str) -> None:
    for attribute, implementation in zip(BOUND, IMPLEMENTATIONS[name], strict=True):
        setattr(proxy, attribute, getattr(proxy, implementation))


def steps(documents: int, config: Any) -> dict[str, Any]:
    """Each step as a function of no arguments, fed by the one before."""
    load = harness.workload(documents, harness.FULL.document_chars)
    body = proxy.decode_body(load.rerank_body)
    request = proxy.parse_rerank(body, config)
    plan = proxy.plan_prompts(request, config)
    calls = proxy.classify_bodies(request.model, plan, config.batch_size)
    answers = [b'{"object":"classify","data":[' + fake.FakeInfinity(0, 0, False).data(inputs)
               + b'],"usage":{"prompt_tokens":1,"total_tokens":1}}' for _, inputs in calls]
    scores = [s for raw, (_, inputs) in zip(answers, calls, strict=True)
              for s in proxy.positive_probabilities(proxy.json_loads(raw, strict=False), inputs, "1")[0]]
    document_scores = proxy.document_scores(plan, scores)
    return {
        "read the body": lambda: proxy.decode_body(load.rerank_body),
        "check it": lambda: proxy.parse_rerank(body, config),
        "plan the prompts": lambda: proxy.plan_prompts(request, config),
        "write the classify bodies": lambda: proxy.classify_bodies(request.model, plan, config.batch_size),
        "read Infinity's answers": lambda: [proxy.positive_probabilities(proxy.json_loads(raw, strict=False),
                                                                         inputs, "1")
                                           for raw, (_, inputs) in zip(answers, calls, strict=True)],
        "score the documents": lambda: proxy.document_scores(plan, scores),
        "write the answer": lambda: proxy.json_dumps(proxy.infinity_answer(request, document_scores, 1)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=20)
    args = parser.parse_args()
    config = proxy.Config()
    available = [name for name in IMPLEMENTATIONS if name == "stdlib" or importlib.util.find_spec("orjson")]
    if "orjson" in available and proxy.orjson is None:
        import orjson

        proxy.orjson = orjson  # imported with PROXY_NO_SPEEDUPS=1: the orjson functions still run here
    results: dict[str, dict[str, dict[str, float]]] = {}
    for documents in args.documents:
        for name in available:
            use(name)
            for step, call in steps(documents, config).items():
                best = min(timeit.repeat(call, number=args.number, repeat=args.repeat)) / args.number
                results.setdefault(str(documents), {}).setdefault(step, {})[name] = best * 1e6
    for documents, by_step in results.items():
        print(f"\n{documents} documents (µs, best of {args.repeat} x {args.number})\n")
        print("| step | " + " | ".join(available) + " |")
        print("| --- |" + " --- |" * len(available))
        for step, figures in by_step.items():
            print(f"| {step} | " + " | ".join(f"{figures[name]:.0f}" for name in available) + " |")
        totals = [sum(figures[name] for figures in by_step.values()) for name in available]
        print("| **all steps** | " + " | ".join(f"**{total:.0f}**" for total in totals) + " |")
    print(json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
