"""Bag-of-words, TF-IDF and n-gram features: documents -> a sparse (n_docs, n_features) matrix.

A document is analysed into terms: word n-grams (words from ``split_words`` with scikit-learn's default
pattern, stop words removed, optionally Porter-stemmed, then joined by one space) or character n-grams (the
normalised text with runs of two or more white-space characters made one space). Fitting keeps the terms whose
document frequency ``df`` lies in [min_df, max_df * n_docs] and numbers them in sorted order. A row holds

    tf(t, d)                   how often term t occurs in document d (1 if ``weighting="binary"``),
                               1 + ln tf with ``sublinear_tf``,
    tf * idf(t)                with ``weighting="tfidf"``, idf(t) = ln((1 + n) / (1 + df(t))) + 1 when
                               ``smooth_idf`` (as if one extra document held every term once), else
                               ln(n / df(t)) + 1,

scaled to unit L2 or L1 norm (``norm``). These are the definitions of Salton & Buckley, "Term-weighting
approaches in automatic text retrieval" (1988), in the variant scikit-learn's ``TfidfVectorizer`` computes, and
the matrices equal its output on the same options to 1e-12 (tests/test_text_features.py).

Shapes: ``transform(docs)`` -> torch sparse COO (coalesced), float64, (len(docs), len(vocabulary)); ``idf`` (V,).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from llmlab.common import LlmlabError
from llmlab.text.normalize import VECTOR_WORDS, normalize, split_words
from llmlab.text.porter import PorterStemmer
from llmlab.text.stopwords import ENGLISH_STOP_WORDS

_WHITE_RUNS = re.compile(r"\s\s+")


@dataclass
class FeatureConfig:
    analyzer: str = field(default="word", metadata={"help": "terms are word n-grams or character n-grams",
                                                    "choices": ["word", "char"]})
    ngram_min: int = field(default=1, metadata={"help": "shortest n-gram, in words or characters"})
    ngram_max: int = field(default=1, metadata={"help": "longest n-gram, in words or characters"})
    weighting: str = field(default="tfidf", metadata={
        "help": "count: term counts; binary: 1 if present; tfidf: counts times inverse document frequency",
        "choices": ["count", "binary", "tfidf"]})
    sublinear_tf: bool = field(default=False, metadata={"help": "use 1 + ln(count) instead of the count"})
    smooth_idf: bool = field(default=True, metadata={"help": "idf = ln((1+n)/(1+df)) + 1 instead of ln(n/df) + 1"})
    norm: str = field(default="l2", metadata={"help": "scale each row to unit norm", "choices": ["l2", "l1", "none"]})
    min_df: int = field(default=1, metadata={"help": "keep terms found in at least this many documents"})
    max_df: float = field(default=1.0, metadata={"help": "keep terms found in at most this fraction of documents"})
    lowercase: bool = field(default=True, metadata={"help": "lower-case the text first"})
    strip_accents: bool = field(default=False, metadata={"help": "drop accents (cafe for café)"})
    stop_words: bool = field(default=False, metadata={"help": "drop English stop words (word analyzer)"})
    stem: bool = field(default=False, metadata={"help": "Porter-stem each word (word analyzer)"})

    def check(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise LlmlabError(f"--ngram-min {self.ngram_min} / --ngram-max {self.ngram_max}: need "
                              "1 <= ngram-min <= ngram-max")
        if self.min_df < 1 or not 0.0 < self.max_df <= 1.0:
            raise LlmlabError(f"--min-df {self.min_df} / --max-df {self.max_df}: min-df is a document count >= 1, "
                              "max-df a fraction in (0, 1]")


class Vectorizer:
    """``fit(docs)`` learns the vocabulary and idf; ``transform(docs)`` gives the weighted sparse matrix."""

    def __init__(self, cfg: FeatureConfig | None = None) -> None:
        self.cfg = cfg or FeatureConfig()
        self.cfg.check()
        self.vocabulary: dict[str, int] = {}
        self.idf: torch.Tensor | None = None
        self._stemmer = PorterStemmer()

    def analyze(self, doc: str) -> list[str]:
        """The terms of one document, in order, repeats kept."""
        c = self.cfg
        text = normalize(doc, form=None, lowercase=c.lowercase, accents=not c.strip_accents, collapse_spaces=False)
        if c.analyzer == "char":
            text = _WHITE_RUNS.sub(" ", text)
            units: list[str] = list(text)
            joiner = ""
        else:
            units = split_words(text, VECTOR_WORDS)
            if c.stop_words:
                units = [w for w in units if w not in ENGLISH_STOP_WORDS]
            if c.stem:
                units = [self._stemmer.stem(w) for w in units]
            joiner = " "
        return [joiner.join(units[i:i + n]) for n in range(c.ngram_min, c.ngram_max + 1)
                for i in range(len(units) - n + 1)]

    def fit(self, docs: list[str]) -> Vectorizer:
        c = self.cfg
        if not docs:
            raise LlmlabError("no documents to fit: the corpus is empty (give files with text)")
        df: Counter[str] = Counter()
        for doc in docs:
            df.update(set(self.analyze(doc)))
        if not df:
            raise LlmlabError(f"the {len(docs)} documents hold no {c.analyzer} terms (only stop words, "
                              "punctuation or one-letter words?): give more text or turn off --stop-words")
        max_count = c.max_df * len(docs)
        kept = sorted(t for t, n in df.items() if c.min_df <= n <= max_count)
        if not kept:
            raise LlmlabError(f"--min-df {c.min_df} / --max-df {c.max_df} leave no terms of {len(df)} "
                              f"(document frequencies {min(df.values())}..{max(df.values())} in {len(docs)} "
                              "documents): lower --min-df or raise --max-df")
        self.vocabulary = {t: i for i, t in enumerate(kept)}
        smooth = int(c.smooth_idf)
        self.idf = torch.tensor([math.log((len(docs) + smooth) / (df[t] + smooth)) + 1.0 for t in kept],
                                dtype=torch.float64)
        return self

    def transform(self, docs: list[str]) -> torch.Tensor:
        if self.idf is None:
            raise LlmlabError("transform before fit: call fit(docs) first")
        c = self.cfg
        crow, cols, vals = [0], [], []
        for doc in docs:
            counts = Counter(t for t in self.analyze(doc) if t in self.vocabulary)
            row = sorted((self.vocabulary[t], n) for t, n in counts.items())
            cols.extend(j for j, _ in row)
            vals.extend(1.0 if c.weighting == "binary" else float(n) for _, n in row)
            crow.append(len(cols))
        col = torch.tensor(cols, dtype=torch.int64)
        val = torch.tensor(vals, dtype=torch.float64)
        if c.sublinear_tf:
            val = 1.0 + torch.log(val)
        if c.weighting == "tfidf":
            val = val * self.idf[col]
        rows = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(crow).diff())  # (nnz,) each value's row
        if c.norm != "none":
            per_row = torch.zeros(len(docs), dtype=torch.float64)
            per_row.index_add_(0, rows, val * val if c.norm == "l2" else val.abs())
            scale = per_row.sqrt() if c.norm == "l2" else per_row
            val = val / scale[rows]  # rows with no terms hold no values, so no 0/0
        # Rows in order, columns sorted within a row: already coalesced, so no sort or sum is needed.
        return torch.sparse_coo_tensor(torch.stack([rows, col]), val, size=(len(docs), len(self.vocabulary)),
                                       is_coalesced=True, check_invariants=False)

    def fit_transform(self, docs: list[str]) -> torch.Tensor:
        return self.fit(docs).transform(docs)

    def feature_names(self) -> list[str]:
        return sorted(self.vocabulary, key=self.vocabulary.__getitem__)


def run_tfidf(docs: list[str], cfg: FeatureConfig, query: str | None = None, show: int = 3,
              top: int = 8) -> dict:
    """Fit on ``docs``; the ``show`` documents most similar to ``query`` (dot product of the rows, the cosine
    under the L2 norm), or without a query the ``top`` highest-weighted terms of the first ``show`` documents."""
    if show < 0 or top < 0:
        raise LlmlabError(f"--show {show} / --top {top}: counts must be >= 0")
    vec = Vectorizer(cfg)
    x = vec.fit_transform(docs)
    names = vec.feature_names()
    out: dict = {"documents": len(docs), "terms": len(names), "stored": x.values().numel(), "examples": []}
    if query is not None:
        q = vec.transform([query]).to_dense()[0]  # (V,)
        if not q.any():
            raise LlmlabError(f"--query {query!r}: none of its terms is in the vocabulary; try other words")
        scores = torch.sparse.mm(x, q[:, None])[:, 0]  # (N,)
        best = scores.topk(min(show, len(docs)))
        out["examples"] = [{"score": s, "document": docs[i]}
                           for s, i in zip(best.values.tolist(), best.indices.tolist())]
        return out
    dense_rows = x.to_dense()[:show]  # (show, V): a few rows only
    for i, row in enumerate(dense_rows):
        k = min(top, int((row != 0).sum()))
        best = row.topk(k)
        out["examples"].append({"document": docs[i], "terms": [(names[j], w) for w, j in
                                                                 zip(best.values.tolist(), best.indices.tolist())]})
    return out
