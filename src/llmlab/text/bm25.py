"""Okapi BM25: a sparse, exact-word relevance score (Robertson & Zaragoza 2009, "The Probabilistic Relevance
Framework: BM25 and Beyond", Foundations and Trends in Information Retrieval 3(4), section 3).

For a query q (terms, repeats counted) and a document d of |d| terms in a collection of N documents of mean
length avgdl, where n(t) documents contain t and tf is t's count in d:

    score(q, d) = sum_{t in q} idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln((N - n(t) + 0.5) / (n(t) + 0.5))

The idf is negative for a term in more than half the documents, which would make containing it a penalty; like
``rank_bm25.BM25Okapi`` (the reference the scores equal, tests/test_index.py) such a term gets
``epsilon * mean idf`` instead, the mean taken over every term of the collection. k1 = 1.5, b = 0.75, epsilon =
0.25 are rank_bm25's defaults.

Terms (``bm25_terms``): NFKC lower case, words of two or more word characters (scikit-learn's token pattern, so
``os.path.join`` gives os / path / join), English stop words removed, Porter stems. ``BM25`` scores an in-memory
collection; the vector store (``infer/index.py``) keeps the same counts in SQLite and calls ``idf`` and
``term_weight`` per posting.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from llmlab.text.normalize import VECTOR_WORDS, normalize, split_words
from llmlab.text.porter import PorterStemmer
from llmlab.text.stopwords import ENGLISH_STOP_WORDS

K1, B, EPSILON = 1.5, 0.75, 0.25
_STEMMER = PorterStemmer()


def bm25_terms(text: str) -> list[str]:
    """Text -> index terms: lower-cased words of 2+ word characters, stop words removed, Porter-stemmed."""
    return [_STEMMER.stem(w) for w in split_words(normalize(text), VECTOR_WORDS) if w not in ENGLISH_STOP_WORDS]


def idf(n_docs: int, df: int) -> float:
    """ln((N - n + 0.5) / (n + 0.5)): the Robertson / Sparck Jones weight with no relevance information."""
    return math.log(n_docs - df + 0.5) - math.log(df + 0.5)


def mean_idf(n_docs: int, dfs: Iterable[int]) -> float:
    """The mean idf over every term of the collection (what a negative idf is floored to, times epsilon)."""
    total, count = 0.0, 0
    for df in dfs:
        total += idf(n_docs, df)
        count += 1
    return total / count if count else 0.0


def floored_idf(n_docs: int, df: int, mean: float, epsilon: float = EPSILON) -> float:
    w = idf(n_docs, df)
    return epsilon * mean if w < 0 else w


def term_weight(tf: int, doc_len: int, avgdl: float, k1: float = K1, b: float = B) -> float:
    """The saturating term-frequency part: tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))."""
    return tf * (k1 + 1) / (tf + k1 * (1 - b + b * doc_len / avgdl))


class BM25:
    """An in-memory collection of term lists -> ``scores(query_terms)``, one per document."""

    def __init__(self, docs: list[list[str]], k1: float = K1, b: float = B, epsilon: float = EPSILON) -> None:
        if not docs:
            raise ValueError("BM25 needs at least one document")
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.tfs = [Counter(d) for d in docs]
        self.lengths = [len(d) for d in docs]
        self.avgdl = sum(self.lengths) / len(docs)
        self.df = Counter(t for tf in self.tfs for t in tf)
        self.mean_idf = mean_idf(len(docs), self.df.values())

    def scores(self, query: list[str]) -> list[float]:
        out = [0.0] * len(self.tfs)
        for t in query:
            if t not in self.df:
                continue
            w = floored_idf(len(self.tfs), self.df[t], self.mean_idf, self.epsilon)
            for i, tf in enumerate(self.tfs):
                if t in tf:
                    out[i] += w * term_weight(tf[t], self.lengths[i], self.avgdl, self.k1, self.b)
        return out
