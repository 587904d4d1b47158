"""Retrieval-augmented generation with numbered, cited sources (Lewis et al. 2020, "Retrieval-Augmented
Generation for Knowledge-Intensive NLP Tasks", arXiv:2005.11401).

    question -> retrieve k chunks from an index (dense, BM25 or hybrid: ``infer/index.py``)
             -> optionally re-rank them by the chat model's log-likelihood of the question given each chunk,
                log p(question | chunk) (the unsupervised passage re-ranker of Sachan et al. 2022, arXiv:2204.07496)
             -> a grounded prompt: the chunks numbered [1]..[k] with their source paths, the instruction to answer
                from them only and to cite them by number
             -> the chat model's answer; the citations it makes are parsed and checked against the sources.

With no index, ``builtin_index`` builds one over the Python language reference that ships with every Python
(``pydoc_data.topics``: the help topics, 79 documents), so ``llmlab rag`` runs out of the box.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.common import LlmlabError, write_text_atomic

SYSTEM = ("You answer questions using only the numbered sources given, in at most three sentences. After each "
          "sentence, cite the sources it uses by number in square brackets, like [1]. If the sources do not contain "
          "the answer, say that they do not.")
CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Source:
    """One retrieved chunk as the prompt numbers it."""
    number: int
    path: str
    text: str
    score: float
    start: int = 0
    end: int = 0


@dataclass
class RagAnswer:
    question: str
    answer: str
    sources: list[Source]
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites, in order of first use
    invalid: list[int] = field(default_factory=list)  # numbers cited that are not sources

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "cited": self.cited, "invalid": self.invalid,
                "sources": [vars(s) for s in self.sources]}


def builtin_documents(folder: Path) -> Path:
    """Write the Python help topics (``pydoc_data.topics``) as one text file each into ``folder``."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(topics.items()):
        path = folder / f"{name}.txt"
        if not path.exists():
            write_text_atomic(path, text)
    return folder


def grounded_messages(question: str, sources: list[Source]) -> list[dict]:
    """The chat turn: numbered sources, then the question."""
    if not question.strip():
        raise LlmlabError("the question is empty: ask something")
    blocks = [f"[{s.number}] ({Path(s.path).name})\n{' '.join(s.text.split())}" for s in sources]
    user = "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question.strip()}\nAnswer, citing the sources:"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def citations(answer: str, n_sources: int) -> tuple[list[int], list[int]]:
    """(valid source numbers cited, in order of first use; numbers cited that are not sources)."""
    valid, invalid = [], []
    for m in CITATION.finditer(answer):
        k = int(m[1])
        target = valid if 1 <= k <= n_sources else invalid
        if k not in target:
            target.append(k)
    return valid, invalid


@torch.no_grad()
def question_loglik(model, tokenizer, question: str, passages: list[str], max_tokens: int = 512) -> list[float]:
    """Mean log p(question tokens | "Passage: ... Question:") under a causal LM, one value per passage."""
    q_ids = tokenizer.encode(" " + question.strip(), add_bos=False)
    scores = []
    device = next(model.parameters()).device
    for passage in passages:
        ctx = tokenizer.encode(f"Passage: {' '.join(passage.split())}\nQuestion:")
        ctx = ctx[-max(1, max_tokens - len(q_ids)):]
        ids = torch.tensor([ctx + q_ids], device=device)  # (1, T)
        logp = model(ids[:, :-1]).float().log_softmax(-1)  # (1, T-1, V)
        targets = ids[0, len(ctx):]  # the question's tokens
        picked = logp[0, len(ctx) - 1:].gather(-1, targets[:, None])[:, 0]
        scores.append(float(picked.mean()))
    return scores


def retrieve(store, encoder, question: str, k: int = 4, mode: str = "hybrid",
             rerank: Callable[[str, list[str]], list[float]] | None = None, candidates: int = 12) -> list[Source]:
    """The k sources for a question, numbered 1..k; with ``rerank``, the best k of ``candidates`` hits by its
    score."""
    if k < 1:
        raise LlmlabError(f"--k must be at least 1, got {k}")
    hits = store.search(question, encoder, k=max(k, candidates) if rerank else k, mode=mode)
    if not hits:
        raise LlmlabError(f"{store.folder}: the index returned nothing for this question (is it empty?)")
    scores = [h.score for h in hits]
    if rerank is not None:
        scores = rerank(question, [h.text for h in hits])
        order = sorted(range(len(hits)), key=lambda i: -scores[i])[:k]
        hits, scores = [hits[i] for i in order], [scores[i] for i in order]
    return [Source(i + 1, h.path, h.text, float(s), h.start, h.end) for i, (h, s) in enumerate(zip(hits, scores))]


def answer(question: str, sources: list[Source], chat: Callable[[list[dict]], str]) -> RagAnswer:
    """Ask ``chat`` (messages -> reply) the grounded question; parse the citations."""
    reply = chat(grounded_messages(question, sources)).strip()
    valid, invalid = citations(reply, len(sources))
    return RagAnswer(question, reply, sources, valid, invalid)
