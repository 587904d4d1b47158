"""Retrieval evaluation as BEIR / MTEB report it (Thakur et al. 2021, "BEIR", arXiv:2104.08663): each query
ranks the whole corpus by cosine similarity, and the ranking is scored against the query's relevant documents
(binary relevance):

    precision@k = |relevant in top k| / k            recall@k = |relevant in top k| / |relevant|
    MRR@k       = 1 / rank of the first relevant hit in the top k (0 if none)
    nDCG@k      = sum_{i<=k} rel_i / log2(i + 1)  /  sum_{i<=min(k, |relevant|)} 1 / log2(i + 1)
    MAP@k       = sum over relevant hits in the top k of precision at that rank  /  min(k, |relevant|)

each averaged over the queries. The definitions, MAP's denominator and the tie order (equal scores rank by
ascending document id) are those of sentence-transformers' ``InformationRetrievalEvaluator``, and the numbers
equal it to 1e-6 (tests/test_retrieval.py).

``evaluate_search`` scores the vector store (``infer/index.py``) instead: the corpus chunked and indexed, each query
answered densely, by BM25 and by both fused, a document ranked where its best chunk is.

Shapes: query embeddings (Q, D), corpus embeddings (N, D) -> scores (Q, N) -> top-k document indices (Q, k).
"""

from __future__ import annotations

import math

import torch

from llmlab.common import LlmlabError, read_jsonl_objects
from llmlab.infer.embed import MAX_TOKENS, check_dim, check_texts, embed_texts, truncate
from llmlab.text.retrieval_set import RetrievalSet

METRICS = ("ndcg", "recall", "mrr", "map", "precision")
DEFAULT_KS = {"ndcg": (10,), "recall": (1, 10), "mrr": (10,), "map": (100,), "precision": (1, 10)}
SEARCH_KS = {"ndcg": (10,), "recall": (1, 10), "mrr": (10,)}


def check_set(rset: RetrievalSet) -> None:
    """Every query and document has text, every query has relevant documents, and they are in the corpus."""
    if not rset.queries or not rset.corpus:
        raise LlmlabError("the retrieval set has no queries or no documents: give both")
    check_texts(list(rset.queries.values()), "query")
    check_texts(list(rset.corpus.values()), "document")
    for qid in rset.queries:
        rel = rset.relevant.get(qid)
        if not rel:
            raise LlmlabError(f"query {qid!r} has no relevant documents: list at least one corpus id")
        missing = sorted(rel - rset.corpus.keys())
        if missing:
            raise LlmlabError(f"query {qid!r}: relevant document {missing[0]!r} is not in the corpus")


def rank(scores: torch.Tensor, corpus_ids: list[str], k: int) -> torch.Tensor:
    """Scores (Q, N) -> indices (Q, min(k, N)) of the best documents, best first; equal scores rank by
    ascending document id, so the result does not depend on the corpus order."""
    by_id = sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__)
    perm = torch.tensor(by_id, dtype=torch.long)  # column j of scores[:, perm] is the j-th smallest id
    order = torch.sort(scores[:, perm], dim=1, descending=True, stable=True).indices[:, :k]
    return perm[order]


def dcg(relevances: list[int], k: int) -> float:
    return sum(r / math.log2(i + 2) for i, r in enumerate(relevances[:k]))


def score_ranking(top: list[list[str]], relevant: list[set[str]],
                  ks: dict[str, tuple[int, ...]] = DEFAULT_KS) -> dict[str, float]:
    """Ranked document ids per query and each query's relevant ids -> {"ndcg@10": ..., ...}, means over queries."""
    sums: dict[str, float] = {f"{m}@{k}": 0.0 for m in METRICS for k in ks.get(m, ())}
    for hits, rel in zip(top, relevant):
        for k in ks.get("precision", ()):
            sums[f"precision@{k}"] += sum(h in rel for h in hits[:k]) / k
        for k in ks.get("recall", ()):
            sums[f"recall@{k}"] += sum(h in rel for h in hits[:k]) / len(rel)
        for k in ks.get("mrr", ()):
            first = next((i for i, h in enumerate(hits[:k]) if h in rel), None)
            sums[f"mrr@{k}"] += 0.0 if first is None else 1.0 / (first + 1)
        for k in ks.get("ndcg", ()):
            sums[f"ndcg@{k}"] += dcg([int(h in rel) for h in hits], k) / dcg([1] * len(rel), k)
        for k in ks.get("map", ()):
            found, precisions = 0, 0.0
            for i, h in enumerate(hits[:k]):
                if h in rel:
                    found += 1
                    precisions += found / (i + 1)
            sums[f"map@{k}"] += precisions / min(k, len(rel))
    return {name: total / len(top) for name, total in sums.items()}


def evaluate_embeddings(query_emb: torch.Tensor, corpus_emb: torch.Tensor, rset: RetrievalSet,
                        ks: dict[str, tuple[int, ...]] = DEFAULT_KS) -> dict[str, float]:
    """Embeddings (Q, D) and (N, D), rows in the order of ``rset.queries`` and ``rset.corpus`` -> metrics.
    Scores are cosine similarities."""
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    d = torch.nn.functional.normalize(corpus_emb.float(), dim=-1)
    corpus_ids = list(rset.corpus)
    k = max(v for vals in ks.values() for v in vals)
    top = rank(q @ d.T, corpus_ids, k).tolist()  # (Q, k)
    return score_ranking([[corpus_ids[j] for j in row] for row in top], [rset.relevant[qid] for qid in rset.queries],
                         ks)


def evaluate_model(model, tokenizer, rset: RetrievalSet, dims: list[int], *, pooling: str = "mean",
                   batch_size: int = 32, max_tokens: int = MAX_TOKENS, ks: dict[str, tuple[int, ...]] = DEFAULT_KS,
                   precision: str = "float32") -> dict[int, dict[str, float]]:
    """Embed the queries and the corpus once (``precision``: ``infer/embed.embed_texts``), score the truncations to
    each of ``dims`` -> {dim: metrics}."""
    check_set(rset)
    full = model.config.dim
    for dim in dims:
        check_dim(dim, full)
    kw = dict(batch_size=batch_size, pooling=pooling, max_tokens=max_tokens, precision=precision)
    q = embed_texts(model, tokenizer, list(rset.queries.values()), **kw)
    d = embed_texts(model, tokenizer, list(rset.corpus.values()), **kw)
    return {dim: evaluate_embeddings(truncate(q, dim), truncate(d, dim), rset, ks) for dim in dims}


def limit_set(rset: RetrievalSet, n: int) -> RetrievalSet:
    """The first ``n`` queries, their relevant documents and ``n`` other documents (corpus order): a small budget."""
    qids = list(rset.queries)[:n]
    relevant = set().union(*(rset.relevant[q] for q in qids))
    keep = relevant | set([d for d in rset.corpus if d not in relevant][:n])
    return RetrievalSet({q: rset.queries[q] for q in qids}, {d: t for d, t in rset.corpus.items() if d in keep},
                        {q: rset.relevant[q] for q in qids})


def evaluate_search(rset: RetrievalSet, encoder, config, folder, modes: tuple[str, ...] = ("dense", "bm25", "hybrid"),
                    depth: int = 100, ks: dict[str, tuple[int, ...]] = SEARCH_KS) -> dict[str, dict[str, float]]:
    """Index ``rset.corpus`` in a new vector store at ``folder`` (``infer/index.py``: chunked, embedded by
    ``encoder``, BM25 postings), answer every query by each of ``modes`` -> {mode: metrics}. A document ranks where
    its best chunk does, among the ``depth`` best chunks."""
    from llmlab.infer.index import VectorStore, prepare

    check_set(rset)
    store = VectorStore.create(folder, config, encoder.fingerprint)
    try:
        store.write(prepare([(doc_id, text, {}) for doc_id, text in rset.corpus.items()], encoder, config), [],
                    encoder.fingerprint)
        qids = list(rset.queries)
        vectors = encoder.embed([rset.queries[q] for q in qids])  # (Q, D)
        k = max(v for vals in ks.values() for v in vals)
        results = {}
        for mode in modes:
            top = []
            for qid, vec in zip(qids, vectors):
                hits = store.search(rset.queries[qid], encoder, k=depth, mode=mode, query_vector=vec, depth=depth)
                top.append(list(dict.fromkeys(h.path for h in hits))[:k])  # chunks -> documents, best first
            results[mode] = score_ranking(top, [rset.relevant[q] for q in qids], ks)
    finally:
        store.close()
    return results


def format_search_table(results: dict[str, dict[str, float]],
                        metrics: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@1", "mrr@10")) -> str:
    """{mode: metrics} -> a Markdown table, one row per search mode."""
    lines = ["| search | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    lines += [f"| {mode} | " + " | ".join(f"{m[k]:.4f}" for k in metrics) + " |" for mode, m in results.items()]
    return "\n".join(lines)


def format_table(results: dict[str, dict[int, dict[str, float]]],
                 metrics: tuple[str, ...] = ("ndcg@10", "recall@10", "mrr@10")) -> str:
    """{model name: {dim: metrics}} -> a Markdown table, one row per (model, dim), and each model's share of its
    full-size nDCG@10 at each size."""
    lines = ["| model | dim | " + " | ".join(metrics) + " | share of full nDCG@10 |",
             "|---|---:|" + "---:|" * (len(metrics) + 1)]
    for name, by_dim in results.items():
        full = by_dim[max(by_dim)]["ndcg@10"]
        for dim in sorted(by_dim, reverse=True):
            m = by_dim[dim]
            share = f"{100 * m['ndcg@10'] / full:.1f}%" if full > 0 else "-"
            lines.append(f"| {name} | {dim} | " + " | ".join(f"{m[k]:.4f}" for k in metrics) + f" | {share} |")
    return "\n".join(lines)


# ---- user files ----------------------------------------------------------------------------------------------


def read_retrieval_files(queries_path: str, corpus_path: str) -> RetrievalSet:
    """A corpus JSONL (``{"id": ..., "text": ...}`` per line) and a queries JSONL (``{"id": ..., "query": ...,
    "relevant": [corpus ids]}`` per line) -> a checked RetrievalSet."""
    corpus: dict[str, str] = {}
    for _, row in read_jsonl_objects(corpus_path, ("id", "text")):
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise LlmlabError(f"{corpus_path}: document {row['id']!r} is empty: give every document some text")
        corpus[str(row["id"])] = row["text"]
    queries, relevant = {}, {}
    for _, row in read_jsonl_objects(queries_path, ("id", "query", "relevant")):
        qid = str(row["id"])
        if not isinstance(row["query"], str) or not row["query"].strip():
            raise LlmlabError(f"{queries_path}: query {qid!r} is empty: give every query some text")
        rel = row["relevant"]
        if not isinstance(rel, list) or not rel:
            raise LlmlabError(f"{queries_path}: query {qid!r}: 'relevant' must be a non-empty list of corpus ids")
        queries[qid], relevant[qid] = row["query"], {str(r) for r in rel}
    rset = RetrievalSet(queries, corpus, relevant)
    check_set(rset)
    return rset
