import os

from haystack import Document
from haystack.utils import Secret
from haystack_integrations.components.rankers.cohere import CohereRanker

# The proxy's root URL: the Cohere SDK appends /v2/rerank itself.
PROXY_URL = os.environ.get("RERANK_PROXY_URL", "http://localhost:8002")
MODEL = os.environ.get("RERANK_MODEL", "michaelfeil/mxbai-rerank-base-v2-seq")


def rerank(query: str, texts: list[str], top_k: int = 3) -> list[tuple[str, float]]:
    # The SDK insists on a key; the proxy checks it only when started with --api-key.
    key = Secret.from_token(os.environ.get("RERANK_PROXY_KEY", "unused"))
    ranker = CohereRanker(model=MODEL, api_base_url=PROXY_URL, api_key=key, top_k=top_k)
    result = ranker.run(query=query, documents=[Document(content=text) for text in texts])
    return [(document.content, document.score) for document in result["documents"]]


if __name__ == "__main__":
    print(rerank("what is the capital of france", ["berlin is in germany", "paris is in france"]))
