import os

from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.postprocessor.cohere_rerank import CohereRerank

# The proxy's root URL: the Cohere SDK appends /v2/rerank itself.
PROXY_URL = os.environ.get("RERANK_PROXY_URL", "http://localhost:8002")
MODEL = os.environ.get("RERANK_MODEL", "michaelfeil/mxbai-rerank-base-v2-seq")


def rerank(query: str, texts: list[str], top_n: int = 3) -> list[tuple[str, float]]:
    # The SDK insists on a key; the proxy checks it only when started with --api-key.
    reranker = CohereRerank(model=MODEL, base_url=PROXY_URL, top_n=top_n,
                            api_key=os.environ.get("RERANK_PROXY_KEY", "unused"))
    nodes = reranker.postprocess_nodes([NodeWithScore(node=TextNode(text=text)) for text in texts], query_str=query)
    return [(node.node.get_content(), node.score) for node in nodes]


if __name__ == "__main__":
    print(rerank("what is the capital of france", ["berlin is in germany", "paris is in france"]))
