import os

from langchain_cohere import CohereRerank
from langchain_core.documents import Document

# The proxy's root URL: the Cohere SDK appends /v2/rerank itself.
PROXY_URL = os.environ.get("RERANK_PROXY_URL", "http://localhost:8002")
MODEL = os.environ.get("RERANK_MODEL", "michaelfeil/mxbai-rerank-base-v2-seq")


def rerank(query: str, texts: list[str], top_n: int = 3) -> list[tuple[str, float]]:
    # The SDK insists on a key; the proxy checks it only when started with --api-key.
    reranker = CohereRerank(model=MODEL, base_url=PROXY_URL, top_n=top_n,
                            cohere_api_key=os.environ.get("RERANK_PROXY_KEY", "unused"))
    documents = reranker.compress_documents([Document(page_content=text) for text in texts], query)
    return [(document.page_content, document.metadata["relevance_score"]) for document in documents]


if __name__ == "__main__":
    print(rerank("what is the capital of france", ["berlin is in germany", "paris is in france"]))
