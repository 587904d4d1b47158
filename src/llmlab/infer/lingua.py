"""Prompt compression with a small causal LM's token surprisals: LLMLingua and LongLLMLingua.

LLMLingua (Jiang, Wu, Lin, Yang, Qiu 2023, "LLMLingua: Compressing Prompts for Accelerated Inference of Large
Language Models", arXiv:2310.05736) keeps the tokens a small LM finds surprising:

- *budget controller* (section 3.1): the prompt is instruction + documents (demonstrations) + question; the token
  budget for the documents is, as in the ``llmlingua`` package, ``target = ratio * (L_ins + L_que + sum L_k) -
  L_ins - L_que`` (instruction and question are kept whole). With several documents, they are ranked by their
  perplexity ``PPL(x_k) = exp(mean_i -log p(x_k,i | x_k,<i))`` (highest first) and kept while the budget
  (plus ``slack`` tokens, the package's ``context_budget="+100"``) lasts; the kept ones stay in their order.
- *iterative token-level compression* (section 3.2, Eq. 5): the kept documents are cut into windows of
  ``window`` tokens; in window ``j`` every token's surprisal ``s_i = -log p(x_i | x~_<j, x_j,<i)`` is computed
  given the *already compressed* text before the window (a KV cache holds it) and the window's own earlier tokens,
  and the tokens with ``s_i > gamma_j`` are kept, ``gamma_j`` set so the window keeps the ratio
  ``tau = target / sum L_kept`` of its tokens (here: exactly the top ``round(tau * n)`` surprisals, counted per
  document so every document meets its ratio). The kept tokens are then run through the model again at their new
  positions, so the next window is conditioned on the compressed prefix.
- *distribution alignment* (section 3.3: instruction-tuning the small LM on the target LLM's outputs) is not done:
  here the compressor and the answering model are the same SmolLM2, already aligned.

LongLLMLingua (Jiang, Wu, Luo, Li, Lin, Yang, Qiu 2023, "LongLLMLingua: Accelerating and Enhancing LLMs in Long
Context Scenarios via Prompt Compression", arXiv:2310.06839) makes each step question-aware:

- *coarse-grained ranking* (Eq. 2): document ``k``'s score is ``r_k = mean_i log p(x_que,i | x_doc_k)``, the
  question followed by the restrictive statement "We can get the answer to this question in the given documents."
  (``infer/rag.question_loglik``); documents are kept best first within the budget;
- *fine-grained contrastive perplexity* (Eq. 3): ``s_i = -log p(x_i | x_<i) + log p(x_i | x_que, x_<i)``, the
  gain the question brings to each token (a second KV cache holds question + compressed prefix);
- *document reordering* (section 4.2): the kept documents in rank order, most relevant first;
- *dynamic compression ratios* (Eq. 4): the document of rank ``r`` (0 = best) of ``N`` kept gets
  ``tau_r = clip(tau + delta * (1 - 2r / (N - 1)), 0, 1)``, linear from ``tau + delta`` to ``tau - delta``.
  (Subsequence recovery, section 4.4, post-processes the answer and is not part of compression.)

Differences from the ``llmlingua`` package (0.2.2), which ``benchmarks/lingua.py`` runs on the same model: its
threshold is a quantile of *all* surprisals so far (the kept earlier windows too), not of the window's; it keeps
token ``i`` when the surprisal of token ``i + 1`` passes it (``need_idx = concat([loss > threshold, ...])``
aligns ``loss[i]``, the loss of token ``i + 1``, with token ``i``), where Eq. 5 and this module use token ``i``'s
own; and it compresses the blank lines between documents, which are kept here. So the kept tokens differ; the
benchmark reports how much the two compressed prompts overlap and the answer accuracy of each.

Shapes: a window (1, T) int64 -> hidden (1, T, dim) -> log-probs (T, V) -> surprisals (T,).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmlab.common import LlmlabError
from llmlab.infer.rag import Source, question_loglik

METHODS = ("llmlingua", "longllmlingua")
RESTRICTIVE = " We can get the answer to this question in the given documents."  # LongLLMLingua's Eq. 2 suffix
SEPARATOR = "\n\n"  # between instruction, documents and question, as the llmlingua package joins them


@dataclass
class Compressed:
    """A compressed prompt: ``text`` = instruction, the kept documents' kept tokens, question (blank-line joined)."""
    text: str
    documents: list[str]  # the kept documents after token-level compression, in prompt order
    order: list[int]  # their indices among the documents given
    origin_tokens: int  # tokens of the uncompressed prompt
    compressed_tokens: int  # tokens of ``text``
    kept: list[list[int]] = field(default_factory=list)  # per kept document, the positions of its kept tokens

    @property
    def ratio(self) -> float:
        """Achieved ratio: compressed tokens / original tokens (the ``rate`` of the llmlingua package)."""
        return self.compressed_tokens / max(1, self.origin_tokens)

    def to_json(self) -> dict:
        return {"compressed_prompt": self.text, "origin_tokens": self.origin_tokens,
                "compressed_tokens": self.compressed_tokens, "ratio": round(self.ratio, 4),
                "documents": self.order}


def check_ratio(ratio: float, flag: str = "--ratio") -> None:
    if not 0 < ratio <= 1:
        raise LlmlabError(f"{flag} {ratio}: give the fraction of the prompt's tokens to keep, in (0, 1] (e.g. 0.5)")


@torch.inference_mode()
def window_logprobs(model, ids: list[int], cache=None, start: int = 0, last: bool = False) -> torch.Tensor:
    """Log-probs (T, V) of the next token after each of ``ids``, placed at positions [start, start + T) after
    whatever ``cache`` holds below ``start`` (the cache then holds them too); ``last``: only the last row, (1, V)
    (the output head, a fifth of SmolLM2's weights, runs on that row alone)."""
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    if hasattr(model, "lm_head"):
        hidden = model(x, cache=cache, start=start, return_hidden=True)[0]  # (T, dim)
        logits = model.lm_head(hidden[-1:] if last else hidden)  # (T, V) or (1, V)
    else:
        logits = model(x, cache=cache, start=start)[0][-1:] if last else model(x, cache=cache, start=start)[0]
    return logits.float().log_softmax(-1)


def perplexity_scores(model, docs: list[list[int]]) -> list[float]:
    """Mean surprisal (log perplexity) of each document on its own; a one-token document scores 0."""
    out = []
    for ids in docs:
        if len(ids) < 2:
            out.append(0.0)
            continue
        logp = window_logprobs(model, ids)  # (T, V)
        out.append(float(-logp[:-1].gather(-1, torch.tensor(ids[1:], device=logp.device)[:, None]).mean()))
    return out


def dynamic_offsets(n: int, delta: float) -> list[float]:
    """LongLLMLingua's Eq. 4 offsets for ranks 0..n-1: linear from +delta (best) to -delta (worst)."""
    return [delta * (1 - 2 * r / (n - 1)) if n > 1 else 0.0 for r in range(n)]


def select_documents(lengths: list[int], scores: list[float], budget: float) -> list[int]:
    """The budget controller: walk the documents best score first, keep each until the budget is spent (the one
    that crosses it is kept, as the llmlingua package does). Returns their indices best first."""
    chosen = []
    for k in sorted(range(len(lengths)), key=lambda k: (-scores[k], k)):
        chosen.append(k)
        budget -= lengths[k]
        if budget < 0:
            break
    return chosen


class _Stream:
    """A KV cache holding ``prefix`` + the compressed text so far, and the log-probs after its last token."""

    def __init__(self, model, prefix: list[int], capacity: int):
        self.model = model
        self.cache = model.new_cache(1, max_len=len(prefix) + capacity + 1)
        self.length, self.last = 0, None
        if prefix:
            self.extend(prefix)

    def surprisals(self, window: list[int]) -> torch.Tensor:
        """-log p of each window token given the stream (inf for the first token of an empty stream), (T,)."""
        logp = window_logprobs(self.model, window, self.cache, self.length)  # (T, V)
        ids = torch.tensor(window, device=logp.device)
        s = torch.empty(len(window), device=logp.device)
        s[0] = float("inf") if self.last is None else -self.last[window[0]]
        s[1:] = -logp[:-1].gather(-1, ids[1:, None])[:, 0]
        return s

    def extend(self, kept: list[int]) -> None:
        """Append tokens at the next positions (overwriting the window's trial entries)."""
        if kept:
            self.last = window_logprobs(self.model, kept, self.cache, self.length, last=True)[0]
            self.length += len(kept)


@torch.inference_mode()
def compress_tokens(model, docs: list[list[int]], ratios: list[float], window: int = 200,
                    separator: list[int] | None = None, question: list[int] | None = None) -> list[list[int]]:
    """Iterative token-level compression of the documents (already in prompt order, each with its own ratio): the
    positions kept in each. ``separator`` tokens between documents are kept and conditioned on; with ``question``
    the score is LongLLMLingua's contrastive surprisal."""
    if window < 1:
        raise LlmlabError(f"--window {window}: give at least 1 token per compression window")
    separator = separator or []
    seq = []  # (token, document or -1 for a separator, position in the document)
    for k, ids in enumerate(docs):
        if k and separator:
            seq += [(t, -1, 0) for t in separator]
        seq += [(t, k, i) for i, t in enumerate(ids)]
    plain = _Stream(model, [], len(seq))
    cond = _Stream(model, question, len(seq)) if question else None
    kept: list[list[int]] = [[] for _ in docs]
    seen, taken = [0] * len(docs), [0] * len(docs)
    for a in range(0, len(seq), window):
        part = seq[a:a + window]
        tokens = [t for t, _, _ in part]
        score = plain.surprisals(tokens)  # (T,)
        if cond is not None:
            score = score - cond.surprisals(tokens)  # Eq. 3: the question's gain, +inf where plain has no context
        keep = [k < 0 for _, k, _ in part]  # separators stay
        for k in sorted({k for _, k, _ in part if k >= 0}):
            rows = [r for r, (_, d, _) in enumerate(part) if d == k]
            seen[k] += len(rows)
            n = max(0, min(len(rows), round(ratios[k] * seen[k]) - taken[k]))  # the document's running budget
            best = sorted(rows, key=lambda r: (-float(score[r]), r))[:n]
            for r in best:
                keep[r] = True
            taken[k] += n
        survivors = [part[r] for r in range(len(part)) if keep[r]]
        for _, k, i in survivors:
            if k >= 0:
                kept[k].append(i)
        for stream in (plain, cond):
            if stream is not None:
                stream.extend([t for t, _, _ in survivors])
    return kept


def compress(model, tokenizer, documents: list[str] | str, ratio: float = 0.5, *, question: str = "",
             instruction: str = "", method: str = "llmlingua", window: int = 200, slack: int = 100,
             delta: float | None = None, reorder: bool | None = None) -> Compressed:
    """Compress a prompt (instruction + documents + question) to about ``ratio`` of its tokens.

    ``method``: "llmlingua" (perplexity) or "longllmlingua" (question-aware; needs ``question``). ``delta``: the
    dynamic ratio spread (default 0.3 for LongLLMLingua, 0 for LLMLingua); ``reorder``: kept documents best first
    (default: on for LongLLMLingua)."""
    check_ratio(ratio)
    if method not in METHODS:
        raise LlmlabError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(documents, str):
        documents = [documents]
    documents = [d.strip() for d in documents if d.strip()]
    if not documents:
        raise LlmlabError("the prompt is empty: give some text to compress")
    question, instruction = question.strip(), instruction.strip()
    if method == "longllmlingua" and not question:
        raise LlmlabError("--method longllmlingua ranks the text by a question: give --question")
    if not getattr(model.config, "is_causal", True):
        raise LlmlabError("prompt compression needs a causal LM's next-token probabilities; this model is an encoder")
    long = method == "longllmlingua"
    delta = (0.3 if long else 0.0) if delta is None else delta
    reorder = long if reorder is None else reorder

    ids = [tokenizer.encode(d, add_bos=False) for d in documents]
    sep = tokenizer.encode(SEPARATOR, add_bos=False)
    q_ids = tokenizer.encode(question, add_bos=False) if question else []
    i_len = len(tokenizer.encode(instruction, add_bos=False)) if instruction else 0
    original = SEPARATOR.join([t for t in (instruction, *documents, question) if t])
    origin_tokens = len(tokenizer.encode(original, add_bos=False))
    limit = model.config.max_seq_len
    if origin_tokens + len(q_ids) + len(sep) > limit:
        raise LlmlabError(f"the prompt is {origin_tokens} tokens and the compressor's context holds {limit}: "
                          "split it into parts, or compress its documents in several calls")
    lengths = [len(x) for x in ids]
    target = max(0.0, ratio * (i_len + len(q_ids) + sum(lengths)) - i_len - len(q_ids))
    order = list(range(len(ids)))
    if len(ids) > 1:
        if long:
            scores = question_loglik(model, tokenizer, question + RESTRICTIVE, documents, max_tokens=limit)
        else:
            scores = perplexity_scores(model, ids)
        ranked = select_documents(lengths, scores, target + slack)
        order = ranked if reorder else sorted(ranked)
        rank = {k: r for r, k in enumerate(ranked)}
        offsets = dynamic_offsets(len(ranked), delta)
    else:
        rank, offsets = {0: 0}, [0.0]
    tau = min(1.0, target / max(1, sum(lengths[k] for k in order)))
    ratios = [min(1.0, max(0.0, tau + offsets[rank[k]])) for k in order]
    kept = compress_tokens(model, [ids[k] for k in order], ratios, window, sep,
                           (q_ids + sep) if long else None)
    texts = [tokenizer.decode([ids[k][i] for i in pos]).strip() for k, pos in zip(order, kept)]
    text = SEPARATOR.join([t for t in (instruction, *texts, question) if t])
    return Compressed(text, texts, order, origin_tokens, len(tokenizer.encode(text, add_bos=False)), kept)


def compress_sources(model, tokenizer, question: str, sources: list[Source], ratio: float,
                     method: str = "longllmlingua") -> list[Source]:
    """RAG's retrieved chunks compressed together (``llmlab rag --compress``): the kept ones, renumbered 1..m in
    the compressor's order, each holding its compressed text."""
    c = compress(model, tokenizer, [s.text for s in sources], ratio, question=question, method=method)
    return [Source(n + 1, sources[k].path, text, sources[k].score, sources[k].start, sources[k].end)
            for n, (k, text) in enumerate(zip(c.order, c.documents))]


def paragraphs(text: str) -> list[str]:
    """Split a text into documents at blank lines (the unit of the coarse, document-level step)."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks
