#!/usr/bin/env python3
"""THE NAIVE BASELINE: not the proxy, but the design the proxy is measured against (bench/bench.py).

A FastAPI route declared `async def` that calls the blocking `requests.post`, as such a service is
often first written. The blocking call holds the event loop for the whole upstream round trip, so
the server answers one rerank request at a time however many clients wait. Same prompts as the
proxy; no validation, no batching, no errors worth the name. Do not deploy it.

    python bench/naive_baseline.py --port 8003 --infinity-url http://127.0.0.1:7997/v1
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import requests
import uvicorn
from fastapi import FastAPI

_spec = importlib.util.spec_from_file_location("proxy_classifier", Path(__file__).parents[1] / "proxy-classifier.py")
proxy = sys.modules["proxy_classifier"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proxy)

app = FastAPI()
INFINITY_URL = "http://127.0.0.1:7997/v1"


@app.post("/rerank")
async def rerank(body: dict) -> dict:
    prompts = [proxy.prompt_for(body["query"], document) for document in body["documents"]]
    answer = requests.post(f"{INFINITY_URL}/classify", json={"model": "m", "input": prompts}, timeout=60).json()
    scores = [next(label["score"] for label in item if label["label"] == "1") for item in answer["data"]]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {"results": [{"index": i, "relevance_score": scores[i]} for i in order]}


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the naive baseline (see the module docstring)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--infinity-url", default=INFINITY_URL)
    args = parser.parse_args()
    INFINITY_URL = args.infinity_url.rstrip("/")
    uvicorn.run(app, host=args.host, port=args.port)
