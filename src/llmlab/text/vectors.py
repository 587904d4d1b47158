"""Word vectors: the corpus, the vocabulary, the sampling distributions word2vec uses, and the trained vectors
(nearest neighbours, similarity, analogies, files).

The trainers live beside this module: ``word2vec.py`` (skip-gram and CBOW with negative sampling; fastText's
subword model is the same trainer with n-gram rows, ``fasttext.py``) and ``glove.py``; ``vector_eval.py`` scores
and plots the result. This module holds what they share:

- the built-in corpus: the Python help topics (``pydoc_data.topics``, the language reference as plain text) and
  the docstrings of the classification task's 19 standard-library modules, about 107,000 words; or any text;
- the vocabulary: words seen at least ``min_count`` times, most frequent first (ties in the order gensim gives
  them: the word seen first comes last); rarer words are dropped from the text before any window is taken;
- the noise distribution of negative sampling, P(w) = c(w)^0.75 / sum_v c(v)^0.75 (Mikolov et al. 2013,
  "Distributed Representations of Words and Phrases and their Compositionality", arXiv:1310.4546, section 2.2);
- frequent-word subsampling. The paper (section 2.3) discards a word with probability 1 - sqrt(t / f(w)),
  f(w) = c(w) / total. The reference word2vec.c, and gensim after it, keep a word with probability
  (sqrt(c / (t * total)) + 1) * (t * total) / c, capped at 1; we use the reference formula, so rare words are
  always kept and the frequent ones thinned a little less than the paper's formula says.

Files (``WordVectors.save``; ``llmlab vectors train --out DIR``), written to a temporary folder and renamed into
place:

    vectors.safetensors   "vectors" (V, D) float32, row i the vector of vocab word i; fastText adds
                          "ngram_buckets" (B,) int64 and "ngram_vectors" (B, D): the trained n-gram rows
    vocab.json            {"words": [...], "counts": [...]}, most frequent first
    config.json           the resolved VectorConfig, the method and the n-gram settings
    vectors.txt           the same vectors in word2vec's text format ("V D", then "word v1 ... vD" lines)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmlab.common import LlmlabError, temp_dir_beside
from llmlab.text.fasttext import ngram_buckets
from llmlab.text.normalize import normalize, split_sentences, split_words

VECTOR_TOKENS = r"(?u)\b[^\W\d]\w*\b"  # words and identifiers; numbers carry no meaning a window can learn
METHODS = ("word2vec", "glove", "fasttext")


@dataclass
class VectorConfig:
    method: str = field(default="word2vec", metadata={"help": "word2vec, GloVe or fastText (word2vec + subwords)",
                                                      "choices": list(METHODS)})
    arch: str = field(default="sg", metadata={"help": "word2vec / fastText architecture: skip-gram or CBOW "
                                                      "(also --sg / --cbow)", "choices": ["sg", "cbow"]})
    dim: int = field(default=100, metadata={"help": "vector size"})
    window: int = field(default=5, metadata={"help": "largest distance between a word and its context word"})
    min_count: int = field(default=3, metadata={"help": "drop words seen fewer times"})
    negative: int = field(default=5, metadata={"help": "noise words per (word, context) pair (word2vec, fastText)"})
    epochs: int = field(default=10, metadata={"help": "passes over the corpus"})
    sample: float = field(default=1e-3, metadata={"help": "subsampling threshold t for frequent words; 0 = off "
                                                          "(word2vec, fastText)"})
    lr: float | None = field(default=None, metadata={"help": "initial learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "word2vec / fastText learning rate at the end (it falls "
                                                          "linearly)"})
    batch: int = field(default=512, metadata={"help": "text positions per update (word2vec, fastText; larger runs "
                                                      "faster on staler vectors: fastText stops learning at 2048 on "
                                                      "the built-in corpus) or co-occurrence entries / 16 (GloVe)"})
    min_n: int = field(default=3, metadata={"help": "shortest character n-gram (fastText)"})
    max_n: int = field(default=6, metadata={"help": "longest character n-gram (fastText)"})
    bucket: int = field(default=200_000, metadata={"help": "hash buckets for the n-grams (fastText)"})
    x_max: float = field(default=100.0, metadata={"help": "GloVe weighting: counts above this weigh 1"})
    weight_power: float = field(default=0.75, metadata={"help": "GloVe weighting f(x) = (x / x_max) ** this"})
    seed: int = field(default=1, metadata={"help": "random seed"})

    def resolved_lr(self) -> float:
        """gensim's 0.025 for word2vec and fastText, glove.c's 0.05 for GloVe, unless set."""
        if self.lr is not None:
            return self.lr
        return 0.05 if self.method == "glove" else 0.025

    def check(self) -> VectorConfig:
        for name in ("dim", "window", "min_count", "epochs", "batch"):
            if getattr(self, name) < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.method not in METHODS:
            raise LlmlabError(f"--method {self.method}: use one of {', '.join(METHODS)}")
        if self.negative < 1 and self.method != "glove":
            raise LlmlabError(f"--negative {self.negative}: negative sampling needs >= 1 noise word")
        if not 0 <= self.sample < 1:
            raise LlmlabError(f"--sample {self.sample}: the subsampling threshold lies in [0, 1)")
        if self.resolved_lr() <= 0 or self.min_lr < 0:
            raise LlmlabError("--lr must be > 0 and --min-lr >= 0")
        if self.method == "fasttext" and not 1 <= self.min_n <= self.max_n:
            raise LlmlabError(f"--min-n {self.min_n} / --max-n {self.max_n}: need 1 <= min-n <= max-n")
        if self.bucket < 1 or self.x_max <= 0:
            raise LlmlabError("--bucket must be >= 1 and --x-max > 0")
        return self


def builtin_documents() -> list[str]:
    """The Python help topics and the docstrings of the classification task's modules (training and held-out)."""
    import pydoc_data.topics

    from llmlab.text.tasks import docstring_task

    task = docstring_task()
    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)] + task.train_texts + task.test_texts


def vector_sentences(documents: list[str]) -> list[list[str]]:
    """Documents -> sentences -> lower-cased words (``VECTOR_TOKENS``); windows never cross a sentence."""
    sentences = []
    for doc in documents:
        for s in split_sentences(doc):
            words = split_words(normalize(s), VECTOR_TOKENS)
            if words:
                sentences.append(words)
    return sentences


@dataclass
class Vocab:
    words: list[str]
    counts: torch.Tensor  # (V,) int64, falling
    index: dict[str, int]


def build_vocab(sentences: list[list[str]], min_count: int) -> Vocab:
    """The words seen at least ``min_count`` times, most frequent first; ties latest-first-seen first, the order
    gensim gives them (so the two vocabularies list the same words in the same order)."""
    freq = Counter(w for s in sentences for w in s)  # a Counter keeps first-appearance order
    if not freq:
        raise LlmlabError("no words to train on: the corpus is empty (give files with text)")
    kept = [(w, c) for w, c in freq.items() if c >= min_count]
    kept = [kept[i] for i in sorted(range(len(kept)), key=lambda i: (-kept[i][1], -i))]
    if not kept:
        raise LlmlabError(f"--min-count {min_count} leaves no words (the most frequent word occurs "
                          f"{max(freq.values())} times): lower it or give more text")
    words = [w for w, _ in kept]
    return Vocab(words, torch.tensor([c for _, c in kept], dtype=torch.int64), {w: i for i, w in enumerate(words)})


def encode(sentences: list[list[str]], vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as one stream: word ids (N,) int64 of the vocabulary words, and the sentence of each (N,)."""
    ids, sent = [], []
    for s_id, s in enumerate(sentences):
        row = [vocab.index[w] for w in s if w in vocab.index]
        ids.extend(row)
        sent.extend([s_id] * len(row))
    if not ids:
        raise LlmlabError("the corpus has no vocabulary words: lower --min-count or give more text")
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(sent, dtype=torch.int64)


def noise_distribution(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """P_n(w) = c(w)^power / sum c^power, float64 (V,): the distribution negative samples are drawn from."""
    p = counts.double() ** power
    return p / p.sum()


def keep_probabilities(counts: torch.Tensor, sample: float) -> torch.Tensor:
    """word2vec.c's probability of keeping each occurrence of a word, float64 (V,); all ones when sample = 0."""
    if sample <= 0:
        return torch.ones(len(counts), dtype=torch.float64)
    threshold = sample * counts.sum().double()
    c = counts.double()
    return (((c / threshold).sqrt() + 1) * threshold / c).clamp(max=1.0)


class WordVectors:
    """Trained vectors with their words. ``vectors`` (V, D) float32; fastText also keeps the trained n-gram rows
    (``ngram_vectors`` (B, D) for the buckets ``ngram_buckets`` (B,)) to build vectors for unseen words."""

    def __init__(self, words: list[str], vectors: torch.Tensor, counts: list[int] | None = None,
                 config: dict | None = None, ngram_buckets: torch.Tensor | None = None,
                 ngram_vectors: torch.Tensor | None = None) -> None:
        self.words = list(words)
        self.vectors = vectors.float().contiguous()
        self.counts = list(counts) if counts is not None else [0] * len(words)
        self.config = dict(config or {})
        self.index = {w: i for i, w in enumerate(self.words)}
        self.ngram_buckets = ngram_buckets
        self.ngram_vectors = ngram_vectors
        self._row = ({int(b): i for i, b in enumerate(ngram_buckets.tolist())} if ngram_buckets is not None else {})
        norms = self.vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.unit = self.vectors / norms  # (V, D) unit rows: a dot product is a cosine

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index or self.oov_vector(word) is not None

    def oov_vector(self, word: str) -> torch.Tensor | None:
        """fastText: the mean of the trained rows of ``word``'s n-grams (None if none was trained or no subwords)."""
        if self.ngram_vectors is None:
            return None
        c = self.config
        rows = [self._row[b] for b in ngram_buckets(word, c["min_n"], c["max_n"], c["bucket"]) if b in self._row]
        return self.ngram_vectors[rows].mean(0) if rows else None

    def vector(self, word: str) -> torch.Tensor:
        """The (D,) vector of ``word``: its row, or (fastText) one built from its n-grams."""
        if word in self.index:
            return self.vectors[self.index[word]]
        v = self.oov_vector(word)
        if v is None:
            hint = " or any of its character n-grams" if self.ngram_vectors is not None else ""
            raise LlmlabError(f"{word!r} is not in the vocabulary{hint} ({len(self.words):,} words, e.g. "
                              f"{', '.join(self.words[:5])}): check the spelling (words are lower-cased) or train "
                              "with a lower --min-count")
        return v

    def similarity(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        return float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-12))

    def nearest(self, query: torch.Tensor, k: int, exclude: set[str] = frozenset()) -> list[tuple[str, float]]:
        """The ``k`` vocabulary words with the largest cosine to ``query`` (D,), skipping ``exclude``."""
        scores = self.unit @ (query / query.norm().clamp_min(1e-12))  # (V,)
        for w in exclude:
            if w in self.index:
                scores[self.index[w]] = -math.inf
        top = scores.topk(min(k, len(self.words) - len(exclude & self.index.keys())))
        return [(self.words[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def neighbors(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        return self.nearest(self.vector(word), k, {word})

    def analogy(self, a: str, b: str, c: str, k: int = 1) -> list[tuple[str, float]]:
        """a : b :: c : ?  by 3CosAdd (Mikolov et al. 2013, arXiv:1301.3781): the word nearest to
        b - a + c over unit vectors, a, b and c themselves excluded."""
        unit = [v / v.norm().clamp_min(1e-12) for v in (self.vector(a), self.vector(b), self.vector(c))]
        return self.nearest(unit[1] - unit[0] + unit[2], k, {a, b, c})

    # -- files --------------------------------------------------------------------------------------------
    def save(self, out: str | os.PathLike) -> Path:
        """Write the folder described in the module docstring: built in a temporary folder, then renamed."""
        from safetensors.torch import save

        out = Path(out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "vocab.json").exists())):
            raise LlmlabError(f"{out}: exists and is not a vectors folder; choose another --out")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(out)
        try:
            tensors = {"vectors": self.vectors}
            if self.ngram_vectors is not None:
                tensors |= {"ngram_buckets": self.ngram_buckets.long(), "ngram_vectors": self.ngram_vectors.float()}
            (tmp / "vectors.safetensors").write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
            (tmp / "vocab.json").write_text(json.dumps({"words": self.words, "counts": self.counts}) + "\n")
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
            with open(tmp / "vectors.txt", "w", encoding="utf-8") as f:
                f.write(f"{len(self.words)} {self.vectors.shape[1]}\n")
                for w, row in zip(self.words, self.vectors.tolist()):
                    f.write(w + " " + " ".join(f"{x:.6g}" for x in row) + "\n")
            if out.exists():
                old = temp_dir_beside(out)
                old.rmdir()
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike) -> WordVectors:
        """Read a folder written by ``save``; anything missing, truncated or inconsistent is a one-line error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from llmlab.common import read_json

        folder = Path(folder)
        if not folder.is_dir():
            raise LlmlabError(f"{folder}: no such folder (train one with 'llmlab vectors train --out {folder}')")
        config = read_json(folder / "config.json", missing="a vectors folder has one; retrain it")
        vocab = read_json(folder / "vocab.json", missing="a vectors folder has one; retrain it")
        path = folder / "vectors.safetensors"
        if not path.is_file():
            raise LlmlabError(f"{folder}: no vectors.safetensors (a vectors folder has one; retrain it)")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise LlmlabError(f"{path}: not a readable safetensors file ({e}); retrain it") from None
        words = vocab.get("words") if isinstance(vocab, dict) else None
        v = tensors.get("vectors")
        if not isinstance(words, list) or v is None or v.dim() != 2 or v.shape[0] != len(words) or not words:
            raise LlmlabError(f"{folder}: vocab.json and vectors.safetensors disagree (corrupt folder); retrain it")
        nb, nv = tensors.get("ngram_buckets"), tensors.get("ngram_vectors")
        bad_ngrams = nv is not None and (nv.shape[0] != nb.shape[0] or nv.shape[1] != v.shape[1])
        if (nb is None) != (nv is None) or bad_ngrams:
            raise LlmlabError(f"{path}: n-gram tensors missing or mis-shaped (corrupt folder); retrain it")
        if nv is not None and not all(k in config for k in ("min_n", "max_n", "bucket")):
            raise LlmlabError(f"{folder}/config.json: fastText vectors need min_n, max_n and bucket; retrain it")
        return cls(words, v, vocab.get("counts"), config, nb, nv)


def config_record(cfg: VectorConfig) -> dict:
    return asdict(cfg) | {"lr": cfg.resolved_lr()}
