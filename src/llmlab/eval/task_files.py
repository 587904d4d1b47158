"""Evaluation data from local JSONL files, in the shapes the public datasets are published in.

Multiple choice (one JSON object per line; the prompts are lm-evaluation-harness's):

==========  ==========================================================  ==========================================
shape       fields                                                      context -> each choice's continuation
==========  ==========================================================  ==========================================
hellaswag   ctx, endings (list), label (index); activity_label optional  "{activity_label}: {ctx}" -> " {ending}"
arc         question, choices {"text": [...], "label": [...]},          "Question: {question}\\nAnswer:" -> " {text}"
            answerKey (one of the labels)
mmlu        question, choices (list), answer (index or letter);        "{question}\\nA. ..\\nB. ..\\nAnswer:"
            subject optional (a header line names it)                   -> " A", " B", ...
==========  ==========================================================  ==========================================

Generation: ``prompt`` and ``answer`` (a string, or a list of acceptable strings). Sentence similarity (STS):
``sentence1``, ``sentence2``, ``score`` (a number). Every problem is a one-line error naming ``file:line``.

Each multiple-choice item also carries its *content-free* context -- the same prompt with the example's text
replaced by "N/A" -- for contextual calibration (Zhao et al. 2021, arXiv:2102.09690).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.common import LlmlabError, read_jsonl_objects

MC_SHAPES = {"hellaswag": ("ctx", "endings", "label"), "arc": ("question", "choices", "answerKey"),
             "mmlu": ("question", "choices", "answer")}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NA = "N/A"


@dataclass
class ChoiceItem:
    context: str  # the prompt the choices continue
    choices: list[str]  # continuations, each with its leading space
    gold: int
    content_free: str  # the context with the example's text replaced by "N/A"
    description: str = ""  # a header put once before any few-shot examples (MMLU's subject line)


@dataclass
class GenItem:
    prompt: str
    answers: list[str]


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LlmlabError(f"{where}: {field!r} must be non-empty text")
    return value


def _choices(value, where: str, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise LlmlabError(f"{where}: {field!r} must be a list of non-empty strings")
    if len(value) < 2:
        raise LlmlabError(f"{where}: {field!r} has {len(value)} choice; a multiple-choice item needs at least 2")
    return value


def _index(value, n: int, where: str, field: str, letters: bool = False) -> int:
    if letters and isinstance(value, str) and len(value) == 1 and value.upper() in LETTERS[:n]:
        return LETTERS.index(value.upper())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise LlmlabError(f"{where}: {field!r} is {value!r}; give the index 0..{n - 1} of the right choice"
                          + (" or its letter" if letters else ""))
    return value


def _hellaswag(row: dict, where: str) -> ChoiceItem:
    ctx, endings = _text(row["ctx"], where, "ctx"), _choices(row["endings"], where, "endings")
    label = row.get("activity_label")
    head = f"{label}: " if isinstance(label, str) and label.strip() else ""
    return ChoiceItem(head + ctx, [" " + e for e in endings], _index(row["label"], len(endings), where, "label"),
                      head + NA)


def _arc(row: dict, where: str) -> ChoiceItem:
    question, ch = _text(row["question"], where, "question"), row["choices"]
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
        raise LlmlabError(f"{where}: 'choices' must be an object {{\"text\": [...], \"label\": [...]}}")
    texts, labels = _choices(ch["text"], where, "choices.text"), ch["label"]
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise LlmlabError(f"{where}: 'choices.label' must list one label per choice ({len(texts)})")
    if row["answerKey"] not in labels:
        raise LlmlabError(f"{where}: answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return ChoiceItem(f"Question: {question}\nAnswer:", [" " + t for t in texts], labels.index(row["answerKey"]),
                      f"Question: {NA}\nAnswer:")


def _mmlu(row: dict, where: str) -> ChoiceItem:
    question, texts = _text(row["question"], where, "question"), _choices(row["choices"], where, "choices")
    if len(texts) > len(LETTERS):
        raise LlmlabError(f"{where}: {len(texts)} choices; at most {len(LETTERS)} can be lettered")
    gold = _index(row["answer"], len(texts), where, "answer", letters=True)
    letters = LETTERS[:len(texts)]
    subject = row.get("subject")
    description = (f"The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n") if isinstance(subject, str) and subject.strip() else ""

    def prompt(q: str, options: list[str]) -> str:
        return q.strip() + "".join(f"\n{a}. {t}" for a, t in zip(letters, options)) + "\nAnswer:"

    return ChoiceItem(prompt(question, texts), [" " + a for a in letters], gold, prompt(NA, [NA] * len(texts)),
                      description)


_READERS = {"hellaswag": _hellaswag, "arc": _arc, "mmlu": _mmlu}


def read_choice_file(path: str, shape: str) -> list[ChoiceItem]:
    """A multiple-choice JSONL file of one of ``MC_SHAPES``."""
    if shape not in MC_SHAPES:
        raise LlmlabError(f"unknown multiple-choice shape {shape!r}: use one of {', '.join(MC_SHAPES)}")
    return [_READERS[shape](row, f"{path}:{n}") for n, row in read_jsonl_objects(path, MC_SHAPES[shape])]


def read_gen_file(path: str) -> list[GenItem]:
    items = []
    for n, row in read_jsonl_objects(path, ("prompt", "answer")):
        where = f"{path}:{n}"
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise LlmlabError(f"{where}: 'answer' must be a string or a non-empty list of strings")
        items.append(GenItem(_text(row["prompt"], where, "prompt"), answers))
    return items


def read_sts_file(path: str) -> list[tuple[str, str, float]]:
    rows = []
    for n, row in read_jsonl_objects(path, ("sentence1", "sentence2", "score")):
        where = f"{path}:{n}"
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise LlmlabError(f"{where}: 'score' must be a number, got {score!r}")
        rows.append((_text(row["sentence1"], where, "sentence1"), _text(row["sentence2"], where, "sentence2"),
                     float(score)))
    if len(rows) < 2:
        raise LlmlabError(f"{path}: {len(rows)} pair; a rank correlation needs at least 2")
    return rows
