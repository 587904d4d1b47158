"""Scores for generated text against references: exact match and token F1, BLEU, chrF, ROUGE; and Spearman's rho.

- Exact match and F1 as SQuAD scores them (Rajpurkar et al. 2016, "SQuAD", arXiv:1606.05250; the official
  evaluation script): both texts are normalised (lower case, punctuation and the articles a/an/the removed,
  whitespace collapsed); F1 is over the bag of normalised words. With several references an example takes its
  best one. Means over examples.
- BLEU (Papineni et al. 2002) as sacreBLEU computes it (Post 2018, "A Call for Clarity in Reporting BLEU Scores",
  arXiv:1804.08771): corpus-level, the ``13a`` tokenizer (mteval-v13a's), clipped n-gram counts for n = 1..4
  (a hypothesis n-gram counts at most as often as in the reference that has it most), the reference length
  closest to each hypothesis (the shorter on a tie), brevity penalty exp(1 - r/c) when c < r, and the
  ``exp`` smoothing (a precision with no match becomes 1 / (2^k * total), k counting such orders).
- chrF (Popovic 2015, "chrF: character n-gram F-score for automatic MT evaluation") as sacreBLEU computes it:
  character n-grams of the text with whitespace removed, n = 1..6, plus word n-grams for chrF++ (``word_order``
  2, Popovic 2017; punctuation split from word ends); per example, the reference with the best F wins; the
  corpus statistics are summed, each order's precision and recall averaged over the orders that occur, and
  F-beta (beta = 2: recall twice as important) taken of the averages.
- ROUGE-N and ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries") as Google's
  ``rouge-score`` computes them: words are the runs of [a-z0-9] of the lower-cased text (optionally Porter
  stems of words longer than 3 letters: ``text/porter.py``, NLTK's stems), ROUGE-N is the F1 of clipped n-gram
  counts, ROUGE-L the F1 of the longest common subsequence; the best reference per example by F; means over
  examples.

All scores are on a 0-100 scale. Equal to sacrebleu's and rouge-score's numbers (tests/test_eval_metrics.py).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

from llmlab.text.rouge import f_measure, rouge_l, rouge_tokens

# ---- SQuAD: exact match and token F1 ------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return 100.0 * max(normalize_answer(prediction) == normalize_answer(r) for r in references)


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)  # both empty: a match; one empty: nothing in common
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    return 100.0 * max(_f1(prediction, r) for r in references)


# ---- BLEU -----------------------------------------------------------------------------------------------------

_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols and most punctuation
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or followed by one
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]  # dash after a digit


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a's tokenization, as sacreBLEU's default ``13a`` tokenizer does it."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
    """Corpus BLEU of ``predictions`` against ``references`` (one list of reference strings per prediction)."""
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        hyp = tokenize_13a(pred.rstrip())
        ref_toks = [tokenize_13a(r.rstrip()) for r in refs]
        ref_max: Counter = Counter()  # each n-gram's largest count in any one reference
        for toks in ref_toks:
            for n in range(1, max_order + 1):
                for g, c in ngrams(toks, n).items():
                    ref_max[g] = max(ref_max[g], c)
        sys_len += len(hyp)
        ref_len += min((len(t) for t in ref_toks), key=lambda r: (abs(len(hyp) - r), r))
        for n in range(1, max_order + 1):
            for g, c in ngrams(hyp, n).items():
                total[n - 1] += c
                correct[n - 1] += min(c, ref_max[g])
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    precisions, smooth = [0.0] * max_order, 1.0
    for n in range(max_order):
        if total[n] == 0:
            break  # no n-grams of this order at all: its precision stays 0 (log floors the score to 0)
        if correct[n] == 0:
            smooth *= 2  # 'exp' smoothing (NIST's): 1 / (2^k * total)
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log_sum = sum(math.log(p) if p > 0 else -9999999999 for p in precisions)  # sacreBLEU's floored log
    return bp * math.exp(log_sum / max_order)


# ---- chrF / chrF++ ----------------------------------------------------------------------------------------------

_CHRF_PUNCT = set(string.punctuation)


def _chrf_words(text: str) -> list[str]:
    """Words with one punctuation mark split off the end (else the start), as chrF++ counts them."""
    out = []
    for w in text.split():
        if len(w) > 1 and w[-1] in _CHRF_PUNCT:
            out += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in _CHRF_PUNCT:
            out += [w[0], w[1:]]
        else:
            out.append(w)
    return out


def _chrf_counters(text: str, char_order: int, word_order: int) -> list[Counter]:
    chars = "".join(text.split())
    grams = [Counter(chars[i:i + n] for i in range(len(chars) - n + 1)) for n in range(1, char_order + 1)]
    words = _chrf_words(text) if word_order else []
    return grams + [ngrams(words, n) for n in range(1, word_order + 1)]


def _chrf_f(stats: list[int], beta: float) -> float:
    """stats: (hyp count, ref count, matches) per order, flattened -> F-beta of the averaged precision and recall."""
    factor, prec_sum, rec_sum, orders = beta ** 2, 0.0, 0.0, 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i:i + 3]
        if n_hyp > 0 and n_ref > 0:  # only orders that occur on both sides count
            prec_sum, rec_sum, orders = prec_sum + n_match / n_hyp, rec_sum + n_match / n_ref, orders + 1
    if orders == 0 or prec_sum + rec_sum == 0:
        return 0.0
    p, r = prec_sum / orders, rec_sum / orders
    return 100.0 * (1 + factor) * p * r / (factor * p + r)


def corpus_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]], char_order: int = 6,
                word_order: int = 0, beta: float = 2.0) -> float:
    """Corpus chrF (``word_order=2``: chrF++)."""
    totals = [0] * (3 * (char_order + word_order))
    for pred, refs in zip(predictions, references):
        hyp = _chrf_counters(pred, char_order, word_order)
        best, best_f = None, -1.0
        for ref in refs:
            stats = []
            for h, r in zip(hyp, _chrf_counters(ref, char_order, word_order)):
                stats += [sum(h.values()) if r else 0, sum(r.values()), sum(min(c, r[g]) for g, c in h.items())]
            f = _chrf_f(stats, beta)
            if f > best_f:
                best, best_f = stats, f
        totals = [a + b for a, b in zip(totals, best)]
    return _chrf_f(totals, beta)


# ---- ROUGE --------------------------------------------------------------------------------------------------------

def rouge_pair(prediction: str, reference: str, kind: str, stem: bool = False) -> float:
    """ROUGE F1 (0-1) of one prediction against one reference; ``kind`` is rouge1, rouge2, ... or rougeL."""
    pred, ref = rouge_tokens(prediction, stem), rouge_tokens(reference, stem)
    if kind == "rougeL":
        return rouge_l(pred, ref)
    n = int(kind[len("rouge"):])
    p, r = ngrams(pred, n), ngrams(ref, n)
    return f_measure(sum((p & r).values()), sum(p.values()), sum(r.values()))


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]], kind: str = "rougeL",
          stem: bool = False) -> float:
    """Mean over examples of the best reference's ROUGE F1, 0-100."""
    scores = [max(rouge_pair(p, r, kind, stem) for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


# ---- Spearman's rank correlation (STS) ----------------------------------------------------------------------------


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of the values in ``x`` (N,), tied values sharing the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks, x and y (N,) with N >= 2."""
    rx, ry = average_ranks(x.double()), average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else 0.0
