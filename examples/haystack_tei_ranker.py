import os

from haystack import Document
from haystack.utils import Secret
from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

# The proxy's origin: this ranker posts to {origin}/rerank and drops any path in the URL.
PROXY_URL = os.environ.get("RERANK_PROXY_URL", "http://localhost:8002")


def rerank(query: str, texts: list[str], top_k: int = 3) -> list[tuple[str, float]]:
    # The key only matters for a proxy started with --api-key; without this, the ranker sends HF_TOKEN.
    ranker = HuggingFaceTEIRanker(url=PROXY_URL, top_k=top_k,
                                  token=Secret.from_env_var("RERANK_PROXY_KEY", strict=False))
    result = ranker.run(query=query, documents=[Document(content=text) for text in texts])
    return [(document.content, document.score) for document in result["documents"]]


if __name__ == "__main__":
    print(rerank("what is the capital of france", ["berlin is in germany", "paris is in france"]))
