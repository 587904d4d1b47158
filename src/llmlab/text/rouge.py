"""ROUGE's words and its longest common subsequence (Lin 2004, "ROUGE: A Package for Automatic Evaluation of
Summaries", section 3: ROUGE-L), as Google's ``rouge-score`` computes them.

Words (``rouge_tokens``) are the runs of [a-z0-9] of the lower-cased text, optionally Porter stems of words
longer than 3 letters (``text/porter.py``). For a prediction of m words and a reference of n words sharing a
longest common subsequence of length LCS:

    P = LCS / m,   R = LCS / n,   ROUGE-L F1 = 2 P R / (P + R)

Here, in ``text``, so that both the evaluation harness (``eval/text_metrics.py``: ROUGE-N/L scores) and the
Self-Instruct novelty filter (``data/self_instruct.py``) use one copy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llmlab.text.porter import porter_stem

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str, stem: bool = False) -> list[str]:
    words = _NON_ALNUM.sub(" ", text.lower()).split()
    return [porter_stem(w) if stem and len(w) > 3 else w for w in words]


def f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    """F1 of ``overlap`` matched units out of ``n_pred`` predicted and ``n_ref`` reference units (0 if none)."""
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row at a time."""
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: Sequence[str], ref: Sequence[str]) -> float:
    """ROUGE-L F1 (0-1) of two word lists (``rouge_tokens``); 0 when either is empty."""
    return f_measure(lcs_length(ref, pred), len(pred), len(ref)) if pred and ref else 0.0
