"""A built-in long-context QA set for prompt compression: needles in a haystack of Python's help topics.

Each item hides one made-up fact ("The access code of the 'with' section is 4821.") at a random sentence boundary
of one of ``docs`` help-topic excerpts (``pydoc_data.topics``, shipped with every Python) and asks for it; an
answer is right when it contains the number (the needle-in-a-haystack test of Kamradt 2023, as used by
LongLLMLingua's evaluation, Jiang et al. 2023, arXiv:2310.06839). ``evaluate`` answers every item with the prompt
compressed to each ratio by each method (``infer/lingua.py``; ratio 1 = uncompressed) and reports accuracy and
the ratio reached; ``evaluate_rag`` answers through ``infer/rag.py`` over an index of all the items' documents,
with and without compressing the retrieved sources.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

from llmlab.common import LlmlabError
from llmlab.infer.lingua import compress

FACTS = ("access code", "room number", "ticket number", "badge number", "locker number", "build number")
INSTRUCTION = "Answer the question from the documents below, with the answer only."


@dataclass
class Item:
    documents: list[str]
    question: str
    answer: str


def needle_set(n: int = 12, docs: int = 4, chars: int = 500, seed: int = 0) -> list[Item]:
    """``n`` items of ``docs`` help-topic excerpts (at most ``chars`` characters each, cut at a line end)."""
    from pydoc_data.topics import topics

    if n < 1 or docs < 1 or chars < 40:
        raise LlmlabError(f"--limit {n}, --docs {docs}, --chars {chars}: give at least 1 item, 1 document and "
                          "40 characters")
    rng = random.Random(seed)
    names = sorted(k for k, v in topics.items() if len(v) >= chars)
    items = []
    for _ in range(n):
        chosen = rng.sample(names, docs)
        texts = []
        for name in chosen:
            text = topics[name][:chars]
            texts.append(text[:text.rfind("\n")].strip() if "\n" in text[chars // 2:] else text.strip())
        target, fact, number = rng.randrange(docs), rng.choice(FACTS), str(rng.randrange(1000, 10000))
        topic = chosen[target]
        ends = [m.end() for m in re.finditer(r"[.:]\s", texts[target])] or [len(texts[target])]
        at = rng.choice(ends)
        texts[target] = f"{texts[target][:at]}The {fact} of the '{topic}' section is {number}. {texts[target][at:]}"
        items.append(Item(texts, f"What is the {fact} of the '{topic}' section?", number))
    return items


def _ask(llm, prompt: str, max_new_tokens: int) -> str:
    return llm.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)


def evaluate(llm, items: list[Item], ratios: list[float], methods: list[str], max_new_tokens: int = 32,
             window: int = 200) -> list[dict]:
    """One row per (method, ratio): accuracy, the mean ratio reached, mean compression seconds; ratio 1.0 is the
    uncompressed prompt (method "none")."""
    rows = []
    plans = [("none", 1.0)] if 1.0 in ratios else []
    plans += [(m, r) for m in methods for r in ratios if r < 1.0]
    for method, ratio in plans:
        right, reached, seconds = 0, 0.0, 0.0
        for item in items:
            prompt, got = "\n\n".join([INSTRUCTION, *item.documents, item.question]), 1.0
            if method != "none":
                t = time.perf_counter()
                c = compress(llm.model, llm.tokenizer, item.documents, ratio, question=item.question,
                             instruction=INSTRUCTION, method=method, window=window)
                seconds += time.perf_counter() - t
                prompt, got = c.text, c.ratio
            reached += got
            right += item.answer in _ask(llm, prompt, max_new_tokens)
        n = len(items)
        rows.append({"method": method, "ratio": ratio, "reached": reached / n, "accuracy": right / n,
                     "seconds": 0.0 if method == "none" else seconds / n, "n": n})
    return rows


def evaluate_rag(llm, items: list[Item], index_folder, ratios: list[float], k: int = 3,
                 max_new_tokens: int = 32) -> list[dict]:
    """RAG over an index of every item's documents (built in ``index_folder``): accuracy without compression
    (ratio 1) and with the retrieved sources compressed by LongLLMLingua to each ratio."""
    from pathlib import Path

    from llmlab.common import write_text_atomic
    from llmlab.infer.index import IndexConfig, VectorStore, add_files, open_encoder
    from llmlab.infer.lingua import compress_sources
    from llmlab.infer.rag import answer, retrieve

    folder = Path(index_folder)
    docs = folder / "docs"
    for i, item in enumerate(items):
        for j, text in enumerate(item.documents):
            write_text_atomic(docs / f"item{i:03d}_{j}.txt", text)
    config = IndexConfig()
    encoder = open_encoder(config)
    with VectorStore.create(folder / "index", config, encoder.fingerprint) as store:
        add_files(store, encoder, [str(docs)], {})
        retrieved = [retrieve(store, encoder, item.question, k=k) for item in items]
    rows = []
    for ratio in ratios:
        right, reached = 0, 0.0
        for item, sources in zip(items, retrieved):
            before = sum(len(llm.tokenizer.encode(s.text, add_bos=False)) for s in sources)
            if ratio < 1.0:
                sources = compress_sources(llm.model, llm.tokenizer, item.question, sources, ratio)
            after = sum(len(llm.tokenizer.encode(s.text, add_bos=False)) for s in sources)
            reached += after / max(1, before)
            reply = answer(item.question, sources, lambda m: llm.chat(m, max_new_tokens=max_new_tokens))
            right += item.answer in reply.answer
        rows.append({"method": "rag" if ratio == 1.0 else "rag+longllmlingua", "ratio": ratio,
                     "reached": reached / len(items), "accuracy": right / len(items), "n": len(items)})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| method | target ratio | ratio reached | accuracy | compress s/prompt |", "|---|---|---|---|---|"]
    for r in rows:
        secs = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        lines.append(f"| {r['method']} | {r['ratio']:.2f} | {r['reached']:.2f} | {r['accuracy']:.2f} "
                     f"({round(r['accuracy'] * r['n'])}/{r['n']}) | {secs} |")
    return "\n".join(lines)
