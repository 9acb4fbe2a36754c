import os

from infinity_client import Client
from langchain_community.document_compressors import InfinityRerank
from langchain_core.documents import Document

# The proxy's root URL (or .../v1): infinity_client posts to {base_url}/rerank.
PROXY_URL = os.environ.get("RERANK_PROXY_URL", "http://localhost:8002")
MODEL = os.environ.get("RERANK_MODEL", "michaelfeil/mxbai-rerank-base-v2-seq")
KEY = os.environ.get("RERANK_PROXY_KEY")


def rerank(query: str, texts: list[str], top_n: int = 3) -> list[tuple[str, float]]:
    # Pass your own client: without one, InfinityRerank calls http://localhost:7997 (and it refuses an
    # AuthenticatedClient). Without raise_on_unexpected_status, an error answer becomes a TypeError.
    client = Client(base_url=PROXY_URL, headers={"Authorization": f"Bearer {KEY}"} if KEY else {},
                    raise_on_unexpected_status=True)
    reranker = InfinityRerank(client=client, model=MODEL, top_n=top_n)
    documents = reranker.compress_documents([Document(page_content=text) for text in texts], query)
    return [(document.page_content, document.metadata["relevance_score"]) for document in documents]


if __name__ == "__main__":
    print(rerank("what is the capital of france", ["berlin is in germany", "paris is in france"]))
