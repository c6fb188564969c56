#!/usr/bin/env python3
"""Reranks one query and five documents through the real client libraries that speak rerank-server's HTTP
endpoints, prints each client's ranking, and checks that all of them agree on the order and the scores.

    cohere.ClientV2                      POST /v2/rerank  (Cohere v2)
    cohere.Client                        POST /v1/rerank  (Cohere v1, documents as {"text": ...} objects)
    langchain_cohere.CohereRerank        POST /v2/rerank  (through cohere.ClientV2)
    llama_index TextEmbeddingInference   POST /rerank     (Text Embeddings Inference)

    scripts/checks/http-clients.sh [URL]        (installs the pinned clients, then runs this file)
    python3 scripts/checks/http_client_matrix.py [URL]   (URL defaults to http://127.0.0.1:50051; RERANK_API_KEY is sent
                                             as a Bearer token when set; RERANK_MODEL is sent as the model
                                             name, by default the served model from GET /info)
Exits 0 when every client ran and all agree (scores to 1e-6), 1 otherwise.
"""
import os
import sys
from importlib.metadata import version

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Berlin is the capital and largest city of Germany.",
    "Paris is the capital of France and its largest city.",
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
    "Bananas are rich in potassium.",
    "France is a country in Western Europe; its capital is Paris.",
]
TOLERANCE = 1e-6
MODEL = os.environ.get("RERANK_MODEL")  # sent as "model" by the Cohere clients; None: the served model


def served_model(url, key):
    """The model id the server reports at GET /info (the server refuses another name with 400)."""
    import json
    import urllib.request
    request = urllib.request.Request(url.rstrip("/") + "/info",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["model"]


def cohere_v2(url, key):
    import cohere
    client = cohere.ClientV2(api_key=key, base_url=url, timeout=60)
    response = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=len(DOCUMENTS))
    return [(r.index, r.relevance_score, DOCUMENTS[r.index]) for r in response.results]


def cohere_v1(url, key):
    import cohere
    client = cohere.Client(api_key=key, base_url=url, timeout=60)
    response = client.rerank(model=MODEL, query=QUERY, documents=[{"text": d} for d in DOCUMENTS],
                             top_n=len(DOCUMENTS), return_documents=True)
    return [(r.index, r.relevance_score, r.document.text if r.document else None) for r in response.results]


def langchain(url, key):
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document
    reranker = CohereRerank(cohere_api_key=key, base_url=url, model=MODEL, top_n=len(DOCUMENTS))
    docs = [Document(page_content=d, metadata={"index": i}) for i, d in enumerate(DOCUMENTS)]
    return [(d.metadata["index"], d.metadata["relevance_score"], d.page_content)
            for d in reranker.compress_documents(docs, QUERY)]


def llama_index(url, key):
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference
    reranker = TextEmbeddingInference(base_url=url, top_n=len(DOCUMENTS), timeout=60,
                                      auth_token=f"Bearer {key}" if key else None)
    nodes = [NodeWithScore(node=TextNode(id_=str(i), text=d)) for i, d in enumerate(DOCUMENTS)]
    return [(int(n.node.id_), n.score, n.node.text) for n in reranker.postprocess_nodes(nodes, query_str=QUERY)]


CLIENTS = [  # (label, distribution whose version is shown, endpoint, function)
    ("cohere.ClientV2", "cohere", "POST /v2/rerank", cohere_v2),
    ("cohere.Client (v1)", "cohere", "POST /v1/rerank", cohere_v1),
    ("langchain_cohere.CohereRerank", "langchain-cohere", "POST /v2/rerank", langchain),
    ("llama_index TextEmbeddingInference", "llama-index-postprocessor-tei-rerank", "POST /rerank", llama_index),
]


def check(ranking):
    """Problems with one client's own answer: every document once, each text the one sent at its index,
    scores present and in descending order."""
    problems = []
    if sorted(i for i, _, _ in ranking) != list(range(len(DOCUMENTS))):
        problems.append(f"indices {[i for i, _, _ in ranking]} are not each document once")
    for i, score, text in ranking:
        if not isinstance(score, (int, float)):
            problems.append(f"document {i}: score {score!r} is not a number")
        if text != DOCUMENTS[i]:
            problems.append(f"document {i}: text {text!r} is not the one sent")
    scores = [s for _, s, _ in ranking if isinstance(s, (int, float))]
    if scores != sorted(scores, reverse=True):
        problems.append("scores are not in descending order")
    return problems


def main(url, key):
    global MODEL
    MODEL = MODEL or served_model(url, key)
    print(f"rerank-server at {url}{' (with API key)' if key else ''}, model {MODEL}\nquery: {QUERY}")
    rankings, failures = {}, []
    for label, dist, endpoint, run in CLIENTS:
        print(f"\n{label}  ({dist} {version(dist)}, {endpoint})")
        try:
            ranking = run(url, key or "unused")
        except Exception as e:  # report and go on with the next client
            detail = f"HTTP {e.status_code}: {e.body}" if getattr(e, "status_code", None) else str(e)
            print(f"  FAILED: {type(e).__name__}: {detail}")
            failures.append(f"{label}: {type(e).__name__}")
            continue
        for rank, (i, score, text) in enumerate(ranking, 1):
            print(f"  {rank}. [{i}] {score:.6f}  {text}" if isinstance(score, (int, float)) else f"  {rank}. [{i}] {score!r}  {text}")
        failures += [f"{label}: {p}" for p in check(ranking)]
        rankings[label] = ranking

    if rankings:
        reference_label, reference = next(iter(rankings.items()))
        for label, ranking in rankings.items():
            if [i for i, _, _ in ranking] != [i for i, _, _ in reference]:
                failures.append(f"{label}: order {[i for i, _, _ in ranking]} differs from {reference_label}'s "
                                f"{[i for i, _, _ in reference]}")
            by_index = {i: s for i, s, _ in reference}
            worst = max((abs(s - by_index.get(i, float("inf"))) for i, s, _ in ranking
                         if isinstance(s, (int, float))), default=0.0)
            if worst > TOLERANCE:
                failures.append(f"{label}: scores differ from {reference_label}'s by up to {worst:.3g}")

    print()
    if failures:
        print("DISAGREEMENT OR FAILURE:\n  " + "\n  ".join(failures))
        return 1
    print(f"all {len(CLIENTS)} clients agree: order {[i for i, _, _ in reference]}, scores within {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:50051", os.environ.get("RERANK_API_KEY")))
