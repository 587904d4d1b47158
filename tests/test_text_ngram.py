"""Interpolated Kneser-Ney n-gram LM: scores and perplexity equal to NLTK's KneserNeyInterpolated on the same
counts (with a negative control), a hand-computed case, normalisation, and bad input."""

from __future__ import annotations

from collections import Counter

import pytest

from llmlab.common import LlmlabError
from llmlab.text.ngram_lm import BOS, EOS, UNK, KneserNeyLM, NgramConfig, pad
from llmlab.text.normalize import normalize, split_sentences, split_words
from llmlab.text.tasks import lm_corpus


@pytest.fixture(scope="module")
def corpus():
    train, heldout = lm_corpus()
    # NLTK recounts continuations over every n-gram type for each score: a small slice keeps it to seconds.
    def sents(text):
        return [split_words(normalize(s)) for s in split_sentences(text)]
    return sents(train)[:150], sents(heldout)[:40]


def nltk_model(ours: KneserNeyLM, sentences):
    lm = pytest.importorskip("nltk.lm")
    from nltk.util import everygrams

    n = ours.cfg.order
    padded = [pad(ours.lookup(s), n) for s in sentences]
    ref = lm.KneserNeyInterpolated(n, discount=ours.cfg.discount)
    ref.fit([list(everygrams(p, max_len=n)) for p in padded], [w for p in padded for w in p])
    return ref


def scored_ngrams(ours: KneserNeyLM, sentences):
    n = ours.cfg.order
    return [tuple(p[i - n + 1:i + 1]) for s in sentences for p in [pad(ours.lookup(s), n)]
            for i in range(n - 1, len(p))]


@pytest.mark.parametrize("order,discount", [(2, 0.1), (3, 0.75), (4, 0.5), (5, 1.0)])
def test_kneser_ney_equals_nltk(corpus, order, discount):
    train, heldout = corpus
    ours = KneserNeyLM(NgramConfig(order=order, discount=discount, min_count=2)).fit(train)
    ref = nltk_model(ours, train)
    ngrams = scored_ngrams(ours, heldout)
    assert len(ngrams) > 500
    for g in ngrams[:300]:
        assert ours.score(g[-1], g[:-1]) == pytest.approx(ref.score(g[-1], g[:-1]), rel=1e-12, abs=0)
    # Short and unseen contexts (all mass passed down), unknown words, and the unigram level.
    for g in [("parser",), (EOS, "the"), ("the", EOS, "of"), ("zzz", "value"), (EOS, EOS, EOS, "zzz")]:
        if len(g) <= order:
            expected = ref.score(*ours.lookup(g[-1:]), tuple(ours.lookup(g[:-1])))
            assert ours.score(g[-1], g[:-1]) == pytest.approx(expected, rel=1e-12, abs=0)
    assert ours.perplexity(heldout) == pytest.approx(ref.perplexity(ngrams), rel=1e-9, abs=0)


def test_kneser_ney_negative_control(corpus):
    """Raw counts instead of continuation counts at the lower orders (plain absolute discounting): the
    comparison with NLTK must fail."""
    train, heldout = corpus
    ours = KneserNeyLM(NgramConfig(order=3, discount=0.75)).fit(train)
    ref = nltk_model(ours, train)
    ours.left, ours.left_total = Counter(), Counter()
    for context, followers in ours.counts.items():
        if len(context) < 2:
            for w, c in followers.items():
                ours.left[(context, w)] += c
                ours.left_total[context] += c
    assert ours.perplexity(heldout) != pytest.approx(ref.perplexity(scored_ngrams(ours, heldout)), rel=1e-3)


def test_kneser_ney_by_hand():
    """Bigrams over "a b" and "a c", D = 0.5: P(b | a) = (1 - .5)/2 + .5 * 2/2 * P_cont(b)."""
    lm = KneserNeyLM(NgramConfig(order=2, discount=0.5, min_count=1)).fit([["a", "b"], ["a", "c"]])
    # Bigram types: <s> a, a b, b </s>, a c, c </s>  ->  N1+(. b) = 1 of 5.
    assert lm.score("b", ("a",)) == pytest.approx(0.25 + 0.5 * 1 / 5)
    assert lm.score(EOS, ("b",)) == pytest.approx(0.5 + 0.5 * 2 / 5)
    assert lm.score("b") == pytest.approx(1 / 5)
    assert lm.score("a", ("zzz",)) == lm.score("a", (UNK,)) == pytest.approx(1 / 5)  # unseen context


def test_kneser_ney_sums_to_one(corpus):
    train, heldout = corpus
    lm = KneserNeyLM(NgramConfig(order=3)).fit(train)
    words = sorted(lm.vocab)  # <s> included: the lower orders give it continuation mass
    for context in [("the", "value"), ("of", "the"), ("zzz", "zzz"), (EOS, "the"), (BOS, "the")]:
        assert sum(lm.score(w, context) for w in words) == pytest.approx(1.0, abs=1e-12)
    assert sum(lm.score(w) for w in words) == pytest.approx(1.0, abs=1e-12)


def test_refit_replaces_the_counts(corpus):
    train, heldout = corpus
    lm = KneserNeyLM(NgramConfig(order=3)).fit(heldout)
    once = KneserNeyLM(NgramConfig(order=3)).fit(train).perplexity(heldout)
    assert lm.fit(train).perplexity(heldout) == once
    assert lm.fit(train).perplexity(heldout) == once


def test_perplexity_falls_with_order(corpus):
    train, heldout = corpus
    ppl = [KneserNeyLM(NgramConfig(order=n)).fit(train).perplexity(heldout) for n in (2, 3)]
    assert ppl[1] < ppl[0]


def test_ngram_bad_input():
    with pytest.raises(LlmlabError, match="corpus is empty"):
        KneserNeyLM().fit([[], []])
    with pytest.raises(LlmlabError, match="--min-count 5 leaves no words"):
        KneserNeyLM(NgramConfig(min_count=5)).fit([["a", "b"], ["a"]])
    with pytest.raises(LlmlabError, match="order >= 2"):
        KneserNeyLM(NgramConfig(order=1))
    with pytest.raises(LlmlabError, match="discount"):
        KneserNeyLM(NgramConfig(discount=0.0))
    with pytest.raises(LlmlabError, match="held-out text is empty"):
        KneserNeyLM().fit([["a", "a"]]).perplexity([])
