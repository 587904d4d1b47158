"""A built-in multi-hop question set over the exception classes that ship with Python, and the measurement of
knowledge-graph retrieval (``infer/kg.py``) against plain RAG (``infer/rag.py``) and both combined.

Questions are made from the running Python's class hierarchy, which is also what the documents state (one
``class X(Base) in module M`` file per class, ``infer/kg.builtin_documents``): "What is the base class of the base
class of ZeroDivisionError?" (2 hops: ZeroDivisionError -> ArithmeticError -> Exception) and the 3-hop form. Only
single-inheritance chains whose first base is not Exception/BaseException are asked, so each answer is one exact
class name that no single document states. The split is fixed: CRC-32 of the question id mod 3 == 0 is "dev", the
rest "test".

Per question and context (kg | rag | both):
- retrieval recall: every hop of the gold path is in the context (kg: the triple (X, Y) among the lines; rag: the
  document of X among the chunks; both: either);
- answer accuracy: the gold class name appears in the chat model's grounded answer as a whole word.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmlab.infer.kg import SUBCLASS, GraphStore, exception_classes, kg_sources
from llmlab.infer.rag import Source, answer

MODES = ("kg", "rag", "both")
_TRIVIAL = ("Exception", "BaseException")


@dataclass
class Question:
    id: str
    question: str
    answer: str
    path: list[tuple[str, str]]  # the gold hops (subclass, base)
    split: str


def builtin_questions(split: str | None = None) -> list[Question]:
    """The multi-hop questions ("dev" or "test" split; None: all), in a fixed order."""
    classes = exception_classes()
    names = {c: n for n, c in classes.items()}
    out = []
    for name, cls in sorted(classes.items()):
        chain, c = [name], cls
        while len(chain) < 4 and len(c.__bases__) == 1 and c.__bases__[0] in names:
            c = c.__bases__[0]
            chain.append(names[c])
        if len(chain) < 3 or chain[1] in _TRIVIAL:
            continue
        for hops in (2, 3):
            if len(chain) > hops:
                qid = f"{name}/{hops}"
                text = "What is " + "the base class of " * hops + f"{name}? Answer with the class name."
                out.append(Question(qid, text, chain[hops], list(zip(chain[:hops], chain[1:hops + 1])),
                                    "dev" if zlib.crc32(qid.encode()) % 3 == 0 else "test"))
    return [q for q in out if split is None or q.split == split]


def mentions(reply: str, name: str) -> bool:
    """``name`` as a whole word in ``reply`` (case-insensitive; "OSError" is not found in "OSErrors")."""
    return re.search(r"(?<![\w.])" + re.escape(name.lower()) + r"(?![\w])", reply.lower()) is not None


def kg_recall(q: Question, sources: list[Source]) -> bool:
    lines = {s.text for s in sources}
    return all(f"{a} {SUBCLASS} {b}." in lines for a, b in q.path)


def rag_recall(q: Question, sources: list[Source]) -> bool:
    docs = {Path(s.path).stem for s in sources}
    return all(a in docs for a, _ in q.path)


def both_recall(q: Question, sources: list[Source]) -> bool:
    lines, docs = {s.text for s in sources}, {Path(s.path).stem for s in sources}
    return all(f"{a} {SUBCLASS} {b}." in lines or a in docs for a, b in q.path)


def contexts(q: Question, graph: GraphStore, rag_sources: Callable[[str], list[Source]], hops: int = 3,
             max_triples: int = 12) -> dict[str, tuple[list[Source], bool]]:
    """mode -> (sources, whether the graph linked an entity); kg falls back to the RAG sources when none links."""
    seeds = graph.link(q.question)
    triples = kg_sources(graph.neighbourhood(seeds, hops, max_triples)) if seeds else []
    rag = rag_sources(q.question)
    kg = triples or rag
    both = triples + [Source(len(triples) + s.number, s.path, s.text, s.score) for s in rag]
    return {"kg": (kg, bool(seeds)), "rag": (rag, True), "both": (both, bool(seeds))}


def evaluate(questions: list[Question], graph: GraphStore, rag_sources: Callable[[str], list[Source]],
             chat: Callable[[list[dict]], str] | None, hops: int = 3, max_triples: int = 12,
             progress: Callable[[int], None] | None = None) -> dict:
    """Recall and (with ``chat``) accuracy per mode, over ``questions``; also the per-question records."""
    recall_of = {"kg": kg_recall, "rag": rag_recall, "both": both_recall}
    totals = {m: {"recall": 0, "correct": 0, "answer_in_context": 0} for m in MODES}
    records, unlinked = [], 0
    for i, q in enumerate(questions):
        ctx = contexts(q, graph, rag_sources, hops, max_triples)
        unlinked += not ctx["kg"][1]
        rec = {"id": q.id, "answer": q.answer, "linked": ctx["kg"][1]}
        for mode in MODES:
            sources = ctx[mode][0]
            hit = recall_of[mode](q, sources)
            in_ctx = any(mentions(s.text, q.answer) for s in sources)
            totals[mode]["recall"] += hit
            totals[mode]["answer_in_context"] += in_ctx
            rec[mode] = {"recall": hit, "answer_in_context": in_ctx}
            if chat is not None:
                reply = answer(q.question, sources, chat).answer
                ok = mentions(reply, q.answer)
                totals[mode]["correct"] += ok
                rec[mode].update(reply=reply, correct=ok)
        records.append(rec)
        if progress is not None:
            progress(i + 1)
    n = max(1, len(questions))
    table = {m: {"recall": t["recall"] / n, "answer_in_context": t["answer_in_context"] / n,
                 **({"accuracy": t["correct"] / n} if chat is not None else {})} for m, t in totals.items()}
    return {"questions": len(questions), "unlinked": unlinked, "modes": table, "records": records}


def format_table(result: dict) -> str:
    has_acc = "accuracy" in result["modes"]["kg"]
    head = f"{'context':<8} {'recall':>7} {'answer in ctx':>14}" + (f" {'accuracy':>9}" if has_acc else "")
    rows = [head]
    for mode, m in result["modes"].items():
        rows.append(f"{mode:<8} {m['recall']:>7.1%} {m['answer_in_context']:>14.1%}"
                    + (f" {m['accuracy']:>9.1%}" if has_acc else ""))
    return "\n".join(rows)
