"""Built-in data for token classification (NER) and extractive question answering, and readers for the user's own.

NER (``ner_task``): generated sentences whose entities are people (PER), cities (LOC), organisations (ORG) and
Python standard-library modules (MOD), tagged BIO per word, e.g. ``Ada Lovelace imported asyncio in Lisbon .`` ->
``B-PER I-PER O B-MOD O B-LOC O``. The sentences come from fixed seeds, each once. The split is by name: a name is
held out when the CRC-32 of it (of a person's surname) is 0 mod 5 (``tasks.is_held_out``); test sentences use only
held-out names and training sentences none, so a model must recognise entities it never saw, from their context
and spelling.

QA (``qa_task``): questions about the Python help topics (``pydoc_data.topics``, what ``help("assert")`` prints,
shipped with every Python). A help-topic sentence that quotes a name (``Assignments to "__debug__" are
illegal.``) becomes a question per quoted name, the name replaced by *what* (``Assignments to what are
illegal?``); the answer is the name, a span of the context, which is the sentence's paragraph and its neighbours
(often longer than a model window: the reader slides over it). A whole topic is held out or not (CRC-32 of its
key), so no test paragraph is seen in training. Counts depend on the Python version.

User files (JSONL): NER ``{"tokens": [...], "tags": [...]}``; QA ``{"question", "context", "answer"}`` with an
optional ``answer_start`` (character index; else the first occurrence). Tags outside the label set and answers that
are not spans of their context are counted and reported as one error.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from llmlab.common import LlmlabError, read_jsonl_objects
from llmlab.text.span_metrics import split_tag
from llmlab.text.tasks import is_held_out

# ---- NER ---------------------------------------------------------------------------------------------------------

NER_TYPES = ("PER", "LOC", "ORG", "MOD")
_FIRST = ("Ada", "Alan", "Grace", "Guido", "Barbara", "Donald", "Edsger", "Frances", "John", "Margaret", "Ken",
          "Dennis", "Linus", "Radia", "Tim", "Sophie", "Niklaus", "Leslie", "Carol", "Raymond", "Yukihiro", "Anders")
_LAST = ("Lovelace", "Turing", "Hopper", "van Rossum", "Liskov", "Knuth", "Dijkstra", "Allen", "McCarthy",
         "Hamilton", "Thompson", "Ritchie", "Torvalds", "Perlman", "Peters", "Wilson", "Wirth", "Lamport", "Shaw",
         "Hettinger", "Matsumoto", "Hejlsberg")
_CITIES = ("Lisbon", "Paris", "Amsterdam", "New York", "San Francisco", "Tokyo", "Berlin", "Nairobi", "Lagos",
           "Buenos Aires", "Oslo", "Mumbai", "Seoul", "Cape Town", "Mexico City", "Helsinki", "Zurich", "Montreal")
_ORGS = ("the Python Software Foundation", "Acme Corp", "Initech", "Globex", "the Apache Software Foundation",
         "Red Hat", "Mozilla", "the Linux Foundation", "Stark Industries", "Wayne Enterprises", "Hooli",
         "Pied Piper", "Umbrella Labs", "Cyberdyne Systems")
_MODULES = ("asyncio", "argparse", "collections", "datetime", "decimal", "functools", "itertools", "json", "logging",
            "pathlib", "sqlite3", "subprocess", "threading", "typing", "unittest", "zipfile", "re", "socket")
_TEMPLATES = (
    "{PER} imported {MOD} in {LOC} .", "{PER} works for {ORG} in {LOC} .", "{ORG} hired {PER} last year .",
    "In {LOC} , {PER} gave a talk about {MOD} .", "{PER} and {PER} rewrote {MOD} for {ORG} .",
    "Why does {ORG} still use {MOD} ?", "{PER} moved from {LOC} to {LOC} .", "The {MOD} module was fixed by {PER} .",
    "{ORG} opened an office in {LOC} .", "{PER} met {PER} at {ORG} .", "Nobody in {LOC} likes {MOD} .",
    "After the meeting in {LOC} , {ORG} dropped {MOD} .", "{PER} said that {MOD} is fast enough .",
    "A team at {ORG} ported {MOD} to {LOC} servers .", "{PER} visited {LOC} and {LOC} in May .",
    "Is {MOD} better than {MOD} , {PER} asked .", "{ORG} and {ORG} signed a deal in {LOC} .",
    "Yesterday {PER} left {ORG} .", "The talk by {PER} on {MOD} was recorded in {LOC} .",
    "We read the {MOD} docs on the train to {LOC} .",
)
NER_SENTENCES = 1500  # training sentences drawn (repeats dropped); a quarter as many test sentences


@dataclass
class TaggedSentences:
    """Word-level BIO tags, a fixed train / test split, and the label set (``O`` first)."""
    labels: list[str]
    train: list[tuple[list[str], list[str]]] = field(default_factory=list)
    test: list[tuple[list[str], list[str]]] = field(default_factory=list)


def bio_labels(types) -> list[str]:
    return ["O", *[f"{p}-{t}" for t in types for p in "BI"]]


def _fill(template: str, rng: random.Random, pools: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for slot in template.split():
        m = re.fullmatch(r"\{(\w+)\}", slot)
        if not m:
            words.append(slot)
            tags.append("O")
            continue
        kind = m.group(1)
        value = rng.choice(pools[kind]).split()
        if kind == "ORG" and value[0] == "the":  # the article is not part of the name
            words.append(value.pop(0))
            tags.append("O")
        words.extend(value)
        tags.extend([f"B-{kind}"] + [f"I-{kind}"] * (len(value) - 1))
    words[0] = words[0][0].upper() + words[0][1:]
    return words, tags


def _pools(test: bool) -> dict[str, list[str]]:
    """The entity names of one split: a name is a test name when the CRC-32 of it is 0 mod 5 (people: of the
    surname), so no test entity occurs in training."""
    def side(names):
        return [n for n in names if is_held_out(n.split()[-1]) == test]

    people = [f"{f} {last}" for f in _FIRST for last in side(_LAST)]
    return {"PER": people, "LOC": side(_CITIES), "ORG": side(_ORGS), "MOD": side(_MODULES)}


@functools.lru_cache(maxsize=1)
def ner_task() -> TaggedSentences:
    """The built-in NER set (module docstring)."""
    task = TaggedSentences(bio_labels(NER_TYPES))
    for test, count, out in ((False, NER_SENTENCES, task.train), (True, NER_SENTENCES // 4, task.test)):
        rng, pools, seen = random.Random(17 + test), _pools(test), set()
        for _ in range(count):
            words, tags = _fill(rng.choice(_TEMPLATES), rng, pools)
            if " ".join(words) not in seen:
                seen.add(" ".join(words))
                out.append((words, tags))
    return task


def check_tags(tags: list[str], labels: list[str], where: str) -> list[str]:
    """Problems of one tag sequence: tags not in ``labels`` or not BIO (``B-X``, ``I-X``, ``O``)."""
    bad = [t for t in tags if t not in labels or split_tag(t)[0] not in "BIO" or (t != "O" and not split_tag(t)[1])]
    return [f"{where}: tag {t!r}" for t in bad]


def read_tagged(path: str, labels: list[str] | None = None) -> TaggedSentences:
    """NER sentences from JSONL (``tokens``, ``tags``); ``labels``: the allowed tags (default: every BIO tag the
    file uses). Held out by the CRC-32 of the sentence, as the built-in set."""
    rows = read_jsonl_objects(path, ("tokens", "tags"))
    sentences, problems = [], []
    for n, row in rows:
        words, tags = row["tokens"], row["tags"]
        if not (isinstance(words, list) and isinstance(tags, list) and words and len(words) == len(tags)
                and all(isinstance(w, str) and w.strip() for w in words) and all(isinstance(t, str) for t in tags)):
            raise LlmlabError(f"{path}:{n}: need 'tokens' and 'tags', lists of the same non-zero length of "
                              "non-empty strings")
        sentences.append((n, words, tags))
    if labels is None:
        types = sorted({split_tag(t)[1] for _, _, tags in sentences for t in tags if split_tag(t)[1]})
        labels = bio_labels(types)
    for n, _, tags in sentences:
        problems += check_tags(tags, labels, f"line {n}")
    if problems:
        raise LlmlabError(f"{path}: {len(problems)} tag(s) outside the label set {labels} ({'; '.join(problems[:3])}"
                          f"{' ...' if len(problems) > 3 else ''}): fix the tags or give --labels")
    task = TaggedSentences(labels)
    for _, words, tags in sentences:
        (task.test if is_held_out(" ".join(words)) else task.train).append((words, tags))
    return task


# ---- QA ----------------------------------------------------------------------------------------------------------

QA_MIN_WORDS = 6  # words in a question sentence
QA_CONTEXT_CHARS = 1200  # neighbouring paragraphs are added to the context up to about this size


@dataclass
class QAExample:
    key: str
    question: str
    context: str
    answer_start: int  # character index of the answer in the context
    answer: str


@dataclass
class QASet:
    train: list[QAExample] = field(default_factory=list)
    test: list[QAExample] = field(default_factory=list)


def _prose_paragraphs(text: str) -> list[str]:
    """A help topic's paragraphs of prose: no title underlines, no indented code or grammar."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip() or para.startswith(" ") or re.search(r"^[*=\-]{3,}$", para, re.M):
            continue
        out.append(" ".join(para.split()))
    return out


@functools.lru_cache(maxsize=1)
def qa_task() -> QASet:
    """The built-in QA set (module docstring)."""
    import pydoc_data.topics

    qa = QASet()
    for topic in sorted(pydoc_data.topics.topics):
        paras = _prose_paragraphs(pydoc_data.topics.topics[topic])
        seen = set()
        for i, para in enumerate(paras):
            context, j = para, i + 1
            while j < len(paras) and len(context) + len(paras[j]) < QA_CONTEXT_CHARS:
                context, j = context + "\n\n" + paras[j], j + 1
            offset = 0
            for text in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", para):  # sentences
                sent_start, offset = context.index(text, offset), offset + len(text)
                if len(text.split()) < QA_MIN_WORDS or text in seen:
                    continue
                seen.add(text)
                names = set()
                for m in re.finditer(r'"([A-Za-z_][\w.]*)"(?!\w)', text):  # one question per quoted name
                    if m.group(1) in names:
                        continue
                    names.add(m.group(1))
                    question = (text[:m.start()] + "what" + text[m.end():]).rstrip(".!?") + "?"
                    ex = QAExample(f"{topic}:{len(seen)}:{len(names)}", question, context, sent_start + m.start(1),
                                   m.group(1))
                    (qa.test if is_held_out(topic) else qa.train).append(ex)
    return qa


def read_qa(path: str) -> QASet:
    """QA examples from JSONL (``question``, ``context``, ``answer``, optional ``answer_start``); every answer must
    be a span of its context. Held out by the CRC-32 of the context."""
    rows = read_jsonl_objects(path, ("question", "context", "answer"))
    qa, bad = QASet(), []
    for n, row in rows:
        q, c, a = row["question"], row["context"], row["answer"]
        if not all(isinstance(x, str) and x.strip() for x in (q, c, a)):
            raise LlmlabError(f"{path}:{n}: 'question', 'context' and 'answer' must be non-empty strings")
        start = row.get("answer_start", c.find(a))
        if not isinstance(start, int) or start < 0 or c[start:start + len(a)] != a:
            bad.append(n)
            continue
        (qa.test if is_held_out(c) else qa.train).append(QAExample(f"{path}:{n}", q, c, start, a))
    if bad:
        raise LlmlabError(f"{path}: {len(bad)} of {len(rows)} answers are not spans of their context (lines "
                          f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}): give each answer as "
                          "it appears in the context, with its answer_start")
    return qa
