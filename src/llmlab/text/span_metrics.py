"""Scores for token classification and extractive question answering, as their reference scripts compute them.

Entity F1 (CoNLL-2000/2003 shared tasks, Tjong Kim Sang & De Meulder 2003, arXiv:cs/0306050; the ``conlleval``
script, and seqeval's default mode): tags are BIO (``B-PER``, ``I-PER``, ``O``); an entity is a maximal run that
starts at a B- tag, at an I- tag after ``O`` or after another type, and ends before the next B-, ``O`` or change of
type. A predicted entity counts when its type, start and end all equal a true one; micro precision / recall / F1
over all entities of all sentences (``entity_scores``; equal to ``seqeval.metrics`` in tests/test_bert_tasks.py).

SQuAD EM / F1 (Rajpurkar et al. 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text",
arXiv:1606.05250; the official ``evaluate-v1.1.py``): answers are normalised (lower case, punctuation and the
articles a / an / the removed, white space collapsed); EM is 1 when the prediction equals a gold answer, F1 is the
bag-of-tokens overlap F1; each question takes its best gold answer, and the scores are means over questions, in
percent.
"""

from __future__ import annotations

import re
import string
from collections import Counter


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ("B", "PER"); ``"O"`` -> ("O", "")."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """The (type, first, last) entities of one sentence's BIO tags (conlleval's chunk rules)."""
    found: set[tuple[str, int, int]] = set()
    start, kind = -1, ""
    for i, tag in enumerate([*tags, "O"]):  # a trailing O closes the last entity
        prefix, k = split_tag(tag)
        ends = start >= 0 and (prefix in ("B", "O") or k != kind)
        if ends:
            found.add((kind, start, i - 1))
            start = -1
        if prefix == "B" or (prefix == "I" and start < 0):
            start, kind = i, k
    return found


def entity_scores(true: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro entity precision, recall and F1 (fractions in [0, 1]) over sentences of BIO tags."""
    if len(true) != len(pred) or any(len(t) != len(p) for t, p in zip(true, pred)):
        raise ValueError("true and predicted tags must have the same sentences and lengths")
    n_true = n_pred = n_hit = 0
    for t, p in zip(true, pred):
        te, pe = entities(t), entities(p)
        n_true, n_pred, n_hit = n_true + len(te), n_pred + len(pe), n_hit + len(te & pe)
    precision = n_hit / n_pred if n_pred else 0.0
    recall = n_hit / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean exact match and F1 (percent) of each prediction against its best gold answer."""
    if len(predictions) != len(golds) or any(not g for g in golds):
        raise ValueError("one prediction and at least one gold answer per question")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = sum(max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(predictions, golds))
    f1 = sum(max(answer_f1(p, g) for g in gs) for p, gs in zip(predictions, golds))
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}
