"""word2vec: skip-gram and CBOW with negative sampling; fastText's subword model on the same trainer.

Papers: T. Mikolov, K. Chen, G. Corrado & J. Dean, "Efficient Estimation of Word Representations in Vector
Space", 2013, arXiv:1301.3781 (the CBOW and skip-gram architectures, the dynamic window); T. Mikolov,
I. Sutskever, K. Chen, G. Corrado & J. Dean, "Distributed Representations of Words and Phrases and their
Compositionality", NIPS 2013, arXiv:1310.4546 (negative sampling, the unigram^0.75 noise distribution,
subsampling of frequent words); P. Bojanowski et al., "Enriching Word Vectors with Subword Information", TACL
2017, arXiv:1607.04606 (fastText: a word's input vector built from its character n-grams, ``fasttext.py``).

Each word w has an input vector v_w (a row of ``W``) and an output vector u_w (a row of ``W_out``). A training
example is a hidden vector h and a target word o: skip-gram takes h = v_centre and o = one word of its window;
CBOW takes h = the mean of the window's input vectors and o = the centre word. Negative sampling draws k noise
words n_1..n_k from P_n (``vectors.noise_distribution``, through word2vec.c's unigram table, ``noise_table``) and
maximises

    log sigmoid(u_o . h) + sum_i log sigmoid(-u_{n_i} . h)          (arXiv:1310.4546, eq. 4)

by plain SGD whose rate falls linearly from ``lr`` to ``min_lr`` over the whole run. Each epoch first thins
frequent words (``vectors.keep_probabilities``), then gives every position a window of r words each side, r
drawn uniformly from 1..window, so near words count more (arXiv:1301.3781, section 3.2). Noise words equal to
the target are skipped, as in the reference code.

fastText: a word's input vector is the mean of its own row and the rows of its n-gram buckets; ``W`` holds the
word rows, then one row per bucket some vocabulary word uses (buckets no word uses never train and take no
memory). word2vec is the same trainer with one row per word.

Updates are vectorised: ``batch`` consecutive text positions at a time give every (h, o) example of their
windows (skip-gram: up to 2 * window per position) and all k noise words at once; the gradients of examples
that share a row are summed with ``index_add_`` (the reference updates one example at a time, so a row's later
examples see its earlier updates; with small rates the two agree closely, see the README's comparison with
gensim). As in word2vec.c, fastText and gensim, every input row of h receives the full error of h, not divided
by the number of rows averaged (the factor folds into the learning rate); ``sgns_loss`` is the reference path
and ``sgns_grads`` the hand-written gradient used here (tests/test_word_vectors.py: equal to autograd's).

Shapes: P examples, K = 1 + k targets each (the true one first), D = dim, C input words per example (1 for
skip-gram, 2 * window for CBOW), U distinct input words in a batch, R rows behind them (U for word2vec; fastText:
each word's own row and its n-gram rows).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from llmlab.text.fasttext import ngram_buckets
from llmlab.text.vectors import (
    VectorConfig,
    WordVectors,
    build_vocab,
    config_record,
    encode,
    keep_probabilities,
    noise_distribution,
)


def sgns_loss(h: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The negative-sampling loss summed over examples: h (P, D), out (P, K, D) with the true target's output
    vector first, mask (P, K) 0 for skipped noise words. Reference path (autograd)."""
    scores = torch.einsum("pd,pkd->pk", h, out)  # (P, K)
    signs = torch.ones_like(scores)
    signs[:, 1:] = -1  # the true target is pulled towards h, the noise words pushed away
    return -(F.logsigmoid(signs * scores) * mask).sum()


def sgns_grads(h: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d sgns_loss / d h (P, D) and d sgns_loss / d out (P, K, D), written out: with labels y = (1, 0, ..., 0),
    d/ds of -log sigmoid(+-s) is sigmoid(s) - y."""
    scores = torch.einsum("pd,pkd->pk", h, out)  # (P, K)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1
    g = (torch.sigmoid(scores) - labels) * mask  # (P, K)
    return torch.einsum("pk,pkd->pd", g, out), g[:, :, None] * h[:, None, :]


def noise_table(counts: torch.Tensor, size: int = 1_000_000) -> torch.Tensor:
    """word2vec.c's unigram table: ``size`` slots, word w filling P_n(w) * size of them (the cumulative
    distribution rounded to whole slots), so a uniform slot is a draw from P_n in O(1). word2vec.c uses 1e8 slots;
    1e6 (resolution 1e-6) keeps the table in cache, and a rarer word's share is rounded to whole slots. (size,)"""
    edges = (noise_distribution(counts).cumsum(0) * size).round().long()  # (V,) the last edge is ``size``
    return torch.repeat_interleave(torch.arange(len(counts)), torch.diff(edges, prepend=edges.new_zeros(1)))


def subword_rows(words: list[str], cfg: VectorConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat, n_rows, buckets): the rows of ``W`` whose mean is each word's input vector, word after word in one
    flat (T,) int64 list (no padding: one long identifier has ~100 n-grams, the average word ~15); n_rows (V,)
    how many belong to each word; buckets (B,) the bucket of each n-gram row (rows V .. V+B-1). word2vec: each
    word its own row, no buckets."""
    V = len(words)
    if cfg.method != "fasttext":
        return torch.arange(V), torch.ones(V, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    row_of: dict[int, int] = {}  # bucket -> row, numbered in order of first use
    lists = [[i] + [V + row_of.setdefault(b, len(row_of)) for b in ngram_buckets(w, cfg.min_n, cfg.max_n,
                                                                                  cfg.bucket)]
             for i, w in enumerate(words)]
    flat = torch.tensor([r for rows in lists for r in rows], dtype=torch.int64)
    buckets = torch.tensor(sorted(row_of, key=row_of.get), dtype=torch.int64)
    return flat, torch.tensor([len(r) for r in lists]), buckets


class Word2Vec:
    """Trains the vectors of ``cfg`` (method word2vec or fasttext) on a list of sentences (lists of words)."""

    def __init__(self, sentences: list[list[str]], cfg: VectorConfig) -> None:
        self.cfg = cfg.check()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.vocab = build_vocab(sentences, cfg.min_count)
        self.ids, self.sent = encode(sentences, self.vocab)  # (N,), (N,)
        self.flat, self.n_rows, self.buckets = subword_rows(self.vocab.words, cfg)  # (T,), (V,), (B,)
        self.starts = self.n_rows.cumsum(0) - self.n_rows  # (V,) where each word's rows begin in ``flat``
        V, D = len(self.vocab.words), cfg.dim
        # word2vec.c's initialisation: inputs uniform in [-0.5/D, 0.5/D), outputs zero.
        self.W = (torch.rand(V + len(self.buckets), D, generator=self.gen) - 0.5) / D  # (V + B, D)
        self.W_out = torch.zeros(V, D)
        self.noise_table = noise_table(self.vocab.counts)  # (T,) word ids, each P_n(w) * T times
        self.keep = keep_probabilities(self.vocab.counts, cfg.sample)  # (V,) float64
        self.words_done = 0

    def noise_words(self, n: int) -> torch.Tensor:
        """(n, k) words drawn from P_n: uniform slots of the noise table."""
        slots = torch.randint(len(self.noise_table), (n, self.cfg.negative), generator=self.gen)
        return self.noise_table.index_select(0, slots.reshape(-1)).view(n, self.cfg.negative)

    def rows_of(self, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U,) word ids -> (rows (R,), the word of each row (R,) as 0..U-1, where each word's rows begin (U,))."""
        n = self.n_rows[words]  # (U,)
        begin = n.cumsum(0) - n  # (U,) offsets in the output
        seg = torch.repeat_interleave(torch.arange(len(words)), n)  # (R,)
        pos = torch.arange(len(seg)) - begin[seg] + self.starts[words][seg]  # (R,) positions in ``flat``
        return self.flat[pos], seg, begin

    def input_vectors(self, words: torch.Tensor) -> torch.Tensor:
        """(U,) word ids -> (U, D): the mean of each word's rows (its own; fastText: and its n-grams')."""
        rows, _, begin = self.rows_of(words)
        return F.embedding_bag(rows, self.W, begin, mode="mean")  # (U, D)

    def step_(self, inputs: torch.Tensor, in_mask: torch.Tensor | None, targets: torch.Tensor, lr: float) -> None:
        """One SGD update on P examples predicting ``targets`` (P,) against fresh noise words. Skip-gram:
        ``inputs`` (P,) and h = its input vector; CBOW: ``inputs`` (P, C) and h = the mean of the input vectors
        where ``in_mask`` (P, C)."""
        P, D = len(targets), self.cfg.dim
        if P == 0:  # a batch whose windows hold no pair (one-word sentences)
            return
        uniq, inv = torch.unique(inputs, return_inverse=True)  # (U,), (P,) or (P, C)
        vec = self.input_vectors(uniq)  # (U, D)
        if in_mask is None:
            h = F.embedding(inv, vec)  # (P, D): a row gather, faster than advanced indexing
        else:
            m = in_mask.to(vec.dtype)[:, :, None]  # (P, C, 1)
            h = (F.embedding(inv, vec) * m).sum(1) / m.sum(1)  # (P, C, D) -> (P, D)
        noise = self.noise_words(P)  # (P, k)
        tgt = torch.cat([targets[:, None], noise], 1)  # (P, K)
        mask = torch.ones(tgt.shape)
        mask[:, 1:] = (noise != targets[:, None]).float()
        grad_h, grad_out = sgns_grads(h, F.embedding(tgt, self.W_out), mask)  # (P, D), (P, K, D)
        self.W_out.index_add_(0, tgt.reshape(-1), grad_out.reshape(-1, D), alpha=-lr)
        # Every input word of an example takes the full error of h; a word's error goes to each of its rows.
        err = torch.zeros(len(uniq), D)  # (U, D)
        if in_mask is None:
            err.index_add_(0, inv, grad_h)
        else:
            err.index_add_(0, inv[in_mask], grad_h[:, None, :].expand(-1, inv.shape[1], -1)[in_mask])
        if self.cfg.method == "fasttext":
            rows, seg, _ = self.rows_of(uniq)  # (R,), (R,)
            self.W.index_add_(0, rows, err[seg], alpha=-lr)
        else:  # word2vec: one row per word
            self.W.index_add_(0, uniq, err, alpha=-lr)

    def epoch_(self, epoch: int, bar=None) -> None:
        cfg, W = self.cfg, self.cfg.window
        kept = torch.rand(len(self.ids), generator=self.gen, dtype=torch.float64) < self.keep[self.ids]
        ids, sent = self.ids[kept], self.sent[kept]  # (n,): the thinned stream
        n = len(ids)
        reach = torch.randint(1, W + 1, (n,), generator=self.gen)  # the dynamic window of each position
        offsets = torch.cat([torch.arange(-W, 0), torch.arange(1, W + 1)])  # (2W,)
        lr0, total = cfg.resolved_lr(), cfg.epochs * max(n, 1)
        for s in range(0, n, cfg.batch):
            pos = torch.arange(s, min(s + cfg.batch, n))  # (b,)
            lr = max(cfg.min_lr, lr0 - (lr0 - cfg.min_lr) * (epoch * n + s) / total)
            ctx = pos[:, None] + offsets  # (b, 2W)
            inside = (ctx >= 0) & (ctx < n)
            ctx = ctx.clamp(0, n - 1)
            valid = inside & (offsets.abs() <= reach[pos, None]) & (sent[ctx] == sent[pos, None])  # (b, 2W)
            centre, context = ids[pos], ids[ctx]  # (b,), (b, 2W)
            if cfg.arch == "sg":
                # h = v_centre, one example per (centre, context word) pair.
                src = centre[:, None].expand_as(valid)[valid]  # (P,)
                self.step_(src, None, context[valid], lr)
            else:
                has = valid.any(1)  # a position whose window is empty has nothing to average
                self.step_(context[has], valid[has], centre[has], lr)
            if bar is not None:
                done = round(len(self.ids) * (epoch + (s + len(pos)) / n))
                bar.update(done - self.words_done)
                self.words_done = done

    def train(self, progress: bool = False) -> WordVectors:
        from tqdm import tqdm

        bar = tqdm(total=self.cfg.epochs * len(self.ids), desc=f"{self.cfg.method} {self.cfg.arch}", unit="word",
                   unit_scale=True, disable=not progress, dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        with torch.no_grad():
            for epoch in range(self.cfg.epochs):
                self.epoch_(epoch, bar)
        bar.close()
        seconds = time.perf_counter() - start
        return self.vectors(seconds)

    def vectors(self, seconds: float = 0.0) -> WordVectors:
        V = len(self.vocab.words)
        record = config_record(self.cfg) | {"words": len(self.ids), "vocab": V, "seconds": round(seconds, 3),
                                            "words_per_second": round(self.cfg.epochs * len(self.ids) /
                                                                      max(seconds, 1e-9))}
        vectors = self.input_vectors(torch.arange(V))  # (V, D)
        if self.cfg.method != "fasttext":
            return WordVectors(self.vocab.words, vectors, self.vocab.counts.tolist(), record)
        return WordVectors(self.vocab.words, vectors, self.vocab.counts.tolist(), record,
                           ngram_buckets=self.buckets, ngram_vectors=self.W[V:].clone())


def train_word2vec(sentences: list[list[str]], cfg: VectorConfig, progress: bool = False) -> WordVectors:
    """Skip-gram or CBOW (``cfg.arch``) with negative sampling; fastText subwords when ``cfg.method`` says so."""
    return Word2Vec(sentences, cfg).train(progress)
