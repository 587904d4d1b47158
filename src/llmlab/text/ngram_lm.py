"""An n-gram language model with interpolated Kneser-Ney smoothing, and its perplexity.

Papers: R. Kneser & H. Ney, "Improved backing-off for M-gram language modeling", ICASSP 1995; S. F. Chen &
J. Goodman, "An empirical study of smoothing techniques for language modeling", TR-10-98, Harvard 1998
(section 3.5, eq. 17: the interpolated form). With one discount D, a context c of k words, and w a word:

    highest order (k = n-1):  P(w | c) = max(N(c w) - D, 0) / N(c .)     + D * N1+(c .) / N(c .)     * P(w | c')
    lower orders   (0<k<n-1): P(w | c) = max(N1+(. c w) - D, 0) / N1+(. c .) + D * N1+(c .) / N1+(. c .) * P(w | c')
    unigrams:                 P(w)     = N1+(. w) / N1+(. .)

where c' is c without its first word, N counts occurrences, N1+(. c w) counts the distinct words seen just
before "c w" (the *continuation* count: a word that follows many different contexts is a likely novel
continuation, the idea of Kneser & Ney), N1+(c .) the distinct words seen after c, and a context never seen in
training passes all its mass down (P(w | c) = P(w | c')). These are NLTK's ``KneserNeyInterpolated`` formulas
(scores equal to 1e-12 on the same counts, tests/test_text_ngram.py). They sum to one over the vocabulary,
except after contexts made only of ``<s>``: there N1+(c .) counts the pad that follows a pad at the start of
each sentence, which has no left neighbour and so no continuation count (a quirk kept for parity; such
contexts only ever predict the first word).

Each sentence is padded with n-1 ``<s>`` on the left and one ``</s>`` on the right, and every k-gram
(k = 1..n) of the padded sentence is counted. The lowest order has no uniform floor, so every scored word must
be in the vocabulary: training words seen fewer than ``min_count`` times, and unknown words at scoring time,
become ``<unk>``. Perplexity is 2 ** (mean -log2 P) over every word and each ``</s>``.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from llmlab.common import LlmlabError
from llmlab.text.normalize import tokenize_sentences

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclass
class NgramConfig:
    order: int = field(default=3, metadata={"help": "n: predict each word from the n-1 words before it"})
    discount: float = field(default=0.75, metadata={"help": "Kneser-Ney discount D, in (0, 1]"})
    min_count: int = field(default=2, metadata={"help": "training words seen fewer times become <unk>"})

    def check(self) -> None:
        if self.order < 2:
            raise LlmlabError(f"--order {self.order}: Kneser-Ney needs order >= 2 (its unigrams count bigrams)")
        if not 0.0 < self.discount <= 1.0:
            raise LlmlabError(f"--discount {self.discount}: the discount must lie in (0, 1]")
        if self.min_count < 1:
            raise LlmlabError(f"--min-count {self.min_count}: must be >= 1")


def pad(sentence: list[str], order: int) -> list[str]:
    return [BOS] * (order - 1) + sentence + [EOS]


class KneserNeyLM:
    """``fit(sentences)`` counts; ``score(word, context)`` is P(word | context); ``perplexity(sentences)``."""

    def __init__(self, cfg: NgramConfig | None = None) -> None:
        self.cfg = cfg or NgramConfig()
        self.cfg.check()
        self.vocab: set[str] = set()
        # counts[c][w] = N(c w) for every context c of 0..n-1 words.
        self.counts: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        # left[(c, w)] = N1+(. c w); left_total[c] = N1+(. c .), for contexts of 0..n-2 words.
        self.left: Counter[tuple[tuple[str, ...], str]] = Counter()
        self.left_total: Counter[tuple[str, ...]] = Counter()

    def fit(self, sentences: list[list[str]]) -> KneserNeyLM:
        """Count ``sentences`` (lists of words), replacing whatever an earlier ``fit`` counted."""
        n = self.cfg.order
        self.counts, self.left, self.left_total = defaultdict(Counter), Counter(), Counter()
        freq = Counter(w for s in sentences for w in s)
        if not freq:
            raise LlmlabError("no words to train on: the corpus is empty (give files with text)")
        self.vocab = {w for w, c in freq.items() if c >= self.cfg.min_count} | {BOS, EOS, UNK}
        if len(self.vocab) == 3:
            raise LlmlabError(f"--min-count {self.cfg.min_count} leaves no words (the most frequent is seen "
                              f"{max(freq.values())} times): lower --min-count or give more text")
        for sentence in sentences:
            words = pad(self.lookup(sentence), n)
            for k in range(1, n + 1):
                for i in range(len(words) - k + 1):
                    self.counts[tuple(words[i:i + k - 1])][words[i + k - 1]] += 1
        # A (k+2)-gram type (x, c, w) adds one distinct left neighbour x to "c w" and to "c .".
        for context, followers in list(self.counts.items()):
            if len(context) >= 1:
                for w in followers:
                    self.left[(context[1:], w)] += 1
                    self.left_total[context[1:]] += 1
        return self

    def lookup(self, words: list[str] | tuple[str, ...]) -> list[str]:
        return [w if w in self.vocab else UNK for w in words]

    def score(self, word: str, context: tuple[str, ...] = ()) -> float:
        """P(word | the last n-1 words of context); unknown words are scored as <unk>."""
        n = self.cfg.order
        context = tuple(self.lookup(context[len(context) - (n - 1):] if len(context) >= n - 1 else context))
        return self._interpolate(self.lookup([word])[0], context)

    def _interpolate(self, word: str, context: tuple[str, ...]) -> float:
        if not context:
            return self.left[((), word)] / self.left_total[()]
        followers = self.counts.get(context)
        if not followers:
            return self._interpolate(word, context[1:])  # unseen context: all mass to the shorter one
        d = self.cfg.discount
        if len(context) == self.cfg.order - 1:
            seen, total = followers[word], sum(followers.values())
        else:
            seen, total = self.left[(context, word)], self.left_total[context]
        alpha = max(seen - d, 0.0) / total
        gamma = d * len(followers) / total
        return alpha + gamma * self._interpolate(word, context[1:])

    def sentence_log2(self, sentence: list[str]) -> tuple[float, int]:
        """(sum of log2 P over the sentence's words and its </s>, how many were scored)."""
        n = self.cfg.order
        words = pad(self.lookup(sentence), n)
        total = 0.0
        for i in range(n - 1, len(words)):
            p = self._interpolate(words[i], tuple(words[i - n + 1:i]))
            total += math.log2(p) if p > 0 else -math.inf
        return total, len(words) - (n - 1)

    def perplexity(self, sentences: list[list[str]]) -> float:
        log2, count = 0.0, 0
        for s in sentences:
            lp, k = self.sentence_log2(s)
            log2, count = log2 + lp, count + k
        if count == 0:
            raise LlmlabError("no words to score: the held-out text is empty")
        return 2.0 ** (-log2 / count)

    def sample(self, rng: random.Random, max_words: int = 40) -> list[str]:
        """One sentence drawn word by word from P(w | the previous n-1 words), until </s> or ``max_words``."""
        words = sorted(self.vocab - {BOS})
        history = [BOS] * (self.cfg.order - 1)
        out: list[str] = []
        while len(out) < max_words:
            context = tuple(history[len(history) - self.cfg.order + 1:])
            w = rng.choices(words, weights=[self._interpolate(v, context) for v in words])[0]
            if w == EOS:
                break
            out.append(w)
            history.append(w)
        return out


def run_ngram_lm(train_text: str, heldout_text: str | None, cfg: NgramConfig, samples: int = 0,
                 seed: int = 0) -> dict:
    """Train on ``train_text`` and measure perplexity on ``heldout_text`` (None: every tenth sentence of the
    training text is held out instead)."""
    start = time.perf_counter()
    train = [s for s in tokenize_sentences(train_text) if s]
    if heldout_text is None:
        heldout, train = train[9::10], [s for i, s in enumerate(train) if i % 10 != 9]
    else:
        heldout = [s for s in tokenize_sentences(heldout_text) if s]
    if heldout_text is None and not heldout:
        raise LlmlabError(f"{len(train)} sentences: too few to hold every tenth out; give --heldout FILE or more text")
    lm = KneserNeyLM(cfg).fit(train)
    rng = random.Random(seed)
    words = sum(len(s) for s in heldout)
    unknown = sum(w not in lm.vocab for s in heldout for w in s)
    return {"order": cfg.order, "train_sentences": len(train), "train_words": sum(len(s) for s in train),
            "vocab": len(lm.vocab), "heldout_sentences": len(heldout), "heldout_words": words,
            "heldout_unknown": unknown, "perplexity": lm.perplexity(heldout),
            "samples": [" ".join(lm.sample(rng)) for _ in range(samples)],
            "seconds": round(time.perf_counter() - start, 2)}
