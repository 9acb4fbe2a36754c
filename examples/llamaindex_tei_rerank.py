import os

from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

# The proxy's root URL (or .../v1): this postprocessor posts to {base_url}/rerank.
PROXY_URL = os.environ.get("RERANK_PROXY_URL", "http://localhost:8002")
KEY = os.environ.get("RERANK_PROXY_KEY")


def rerank(query: str, texts: list[str], top_n: int = 3) -> list[tuple[str, float]]:
    # auth_token is the whole Authorization header, scheme included.
    reranker = TextEmbeddingInference(base_url=PROXY_URL, top_n=top_n, auth_token=f"Bearer {KEY}" if KEY else None)
    nodes = reranker.postprocess_nodes([NodeWithScore(node=TextNode(text=text)) for text in texts], query_str=query)
    return [(node.node.get_content(), node.score) for node in nodes]


if __name__ == "__main__":
    print(rerank("what is the capital of france", ["berlin is in germany", "paris is in france"]))
