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
  positions, so the next window is conditioned on the compressed prefix. (Here: at the front of the next window's
  forward, so each window costs one forward; the kept tokens before a window's first dropped one are already in
  the cache at their final positions and are not run again.)
- *distribution alignment* (section 3.3: instruction-tuning the small LM on the target LLM's outputs) is not done:
  here the compressor and the answering model are the same SmolLM2, already aligned.

LongLLMLingua (Jiang, Wu, Luo, Li, Lin, Yang, Qiu 2023, "LongLLMLingua: Accelerating and Enhancing LLMs in Long
Context Scenarios via Prompt Compression", arXiv:2310.06839) makes each step question-aware:

- *coarse-grained ranking* (Eq. 2): document ``k``'s score is ``r_k = mean_i log p(x_que,i | x_doc_k)``, the
  question followed by the restrictive statement "We can get the answer to this question in the given documents."
  (one forward of document + blank line + question + statement from position 0, as the package's
  ``get_condition_ppl(..., "after")``); documents are kept best first within the budget;
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

Speed (issue 16; ``benchmarks/lingua.py``): every forward's cost is its rows, so rows are not spent twice. When
the budget holds every document but the shortest and nothing is reordered or given its own ratio (LLMLingua),
the budget controller keeps them all whatever their scores, so no ranking forward runs. Otherwise the
documents' ranking forwards run batched (right-padded, at most an eighth padding) from position 0, and the first
kept document's forward (its cache row and hidden states; for LongLLMLingua the document + blank line before the
question) is the start of the plain stream's cache, so the first window runs only the tokens after it; the output
head (a fifth of SmolLM2's weights) runs only on rows whose next token is scored, and a surprisal is
``logsumexp(logits) - logit`` without a (T, V) log-softmax. Same scores as recomputing (tested to 1e-5). The
compressor computes in what it was loaded with: ``fast_compute()`` picks the packed int8 path (the GGUF's own
Q8_0 blocks, the decoder blocks in C; the plain int8 kernel: generation's default int8r, an option here, takes
1.44x int8's time for its residual blocks, and keeps 1.00 / 0.97 of fp32's tokens for LLMLingua / LongLLMLingua
against int8's 0.98 / 0.91) where its kernel builds, else bf16 where the CPU has bf16 units, else fp32.

Shapes: a window (1, T) int64 -> hidden (1, T, dim) -> log-probs (T, V) -> surprisals (T,).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmlab.common import LlmlabError
from llmlab.infer.rag import Source

METHODS = ("llmlingua", "longllmlingua")
COMPUTES = ("auto", "int8", "int8r", "bf16", "fp32")  # the compressor's arithmetic: see fast_compute
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


def fast_compute() -> str:
    """The compressor's fastest path on this CPU: "int8" where the packed int8 kernel builds (the GGUF's own Q8_0
    blocks, ``nn/packed_linear.py``, and the decoder blocks in C, ``models/native_step.py``: AVX512-VNNI or
    AVX2 builds, ``nn/cpu_kernels.py``), else "bf16" where oneDNN has bf16 matmuls, else "fp32"."""
    from llmlab.nn.autocast import cpu_has_native
    from llmlab.nn.packed_linear import kernel

    if kernel("int8") is not None:
        return "int8"
    return "bf16" if cpu_has_native(torch.bfloat16) else "fp32"


def load_options(compute: str = "auto") -> dict:
    """``llmlab.load`` keyword arguments for a compressor computing in ``compute`` (COMPUTES; "auto":
    ``fast_compute()``)."""
    if compute not in COMPUTES:
        raise LlmlabError(f"--compute {compute!r}: choose one of {', '.join(COMPUTES)}")
    compute = fast_compute() if compute == "auto" else compute
    if compute in ("int8", "int8r"):  # int8r: generation's residual blocks, 1.44x int8's time, closer to fp32
        return {"packed": True, "packed_kernel": compute, "dtype": "float32"}
    return {"packed": False, "dtype": "bfloat16" if compute == "bf16" else "float32"}


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


@torch.inference_mode()
def surprisals(head, hidden: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """-log p(targets[i] | row i) for hidden rows (R, dim) -> (R,): the output head on these rows only, and
    ``logsumexp - logit`` instead of a (R, V) log-softmax. ``head`` None: the rows are already logits."""
    logits = (hidden if head is None else head(hidden)).float()  # (R, V)
    picked = logits.gather(-1, torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None])[:, 0]  # (R,)
    return logits.logsumexp(-1) - picked


def _head(model):
    return getattr(model, "lm_head", None)


@torch.inference_mode()
def _hidden(model, x: torch.Tensor, cache, start: int) -> torch.Tensor:
    """x (B, T) at positions [start, start + T) after ``cache`` -> final-norm hidden states (B, T, dim), or the
    logits (B, T, V) for a model without a separate ``lm_head``."""
    if _head(model) is None:
        return model(x, cache=cache, start=start)
    return model(x, cache=cache, start=start, return_hidden=True)


@dataclass
class Ranked:
    """One sequence of the coarse ranking, run alone from position 0: ``ids`` (T,), its row in ``cache`` (a
    batch's StaticKVCache, positions [0, T)), final hidden states (T, dim) and the surprisals computed so far
    of tokens 1..len(known) (``known[i]`` is token i + 1's)."""
    ids: list[int]
    cache: object
    row: int
    hidden: torch.Tensor
    known: torch.Tensor


@torch.inference_mode()
def run_alone(model, seqs: list[list[int]], max_rows: int = 512) -> list[Ranked]:
    """Each sequence through the model on its own, batched: longest first, as many per forward as fit
    ``max_rows`` rows (B * T_max) with at most an eighth of them padding (right-padded: causal attention keeps
    the padding out of the real rows; on the CPU a padded row costs as much as a real one)."""
    out: list[Ranked | None] = [None] * len(seqs)
    todo = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
    while todo:
        width, group = len(seqs[todo[0]]), todo[:1]
        for k in todo[1:]:  # join while the batch fits and padding stays under an eighth of its rows
            rows = (len(group) + 1) * width
            if rows > max_rows or 8 * (rows - len(seqs[k]) - sum(len(seqs[g]) for g in group)) > rows:
                break
            group.append(k)
        todo = todo[len(group):]
        device = next(model.parameters()).device
        x = torch.tensor([seqs[k] + [seqs[k][-1]] * (width - len(seqs[k])) for k in group], device=device)  # (B, T)
        cache = model.new_cache(len(group), max_len=width)
        hidden = _hidden(model, x, cache, 0)  # (B, T, dim)
        for b, k in enumerate(group):
            out[k] = Ranked(seqs[k], cache, b, hidden[b, :len(seqs[k])], torch.empty(0))
    return out


@torch.inference_mode()
def perplexity_scores(model, docs: list[list[int]]) -> tuple[list[float], list[Ranked]]:
    """Mean surprisal (log perplexity) of each document on its own (a one-token document scores 0), and the
    forwards (each document's token surprisals in ``known``)."""
    runs = run_alone(model, docs)
    scores = []
    for ids, r in zip(docs, runs):
        r.known = surprisals(_head(model), r.hidden[:-1], ids[1:]) if len(ids) > 1 else torch.empty(0)
        scores.append(float(r.known.mean()) if len(ids) > 1 else 0.0)
    return scores, runs


@torch.inference_mode()
def question_scores(model, docs: list[list[int]], sep: list[int], question: list[int]) -> tuple[list[float],
                                                                                                 list[Ranked]]:
    """LongLLMLingua's Eq. 2 for each document: mean log p(question tokens | document, separator), one forward of
    document + separator + question each (the document cut from the left to fit the context); the head runs on
    the question's rows only."""
    limit = model.config.max_seq_len
    seqs = [(d + sep)[-max(1, limit - len(question)):] + question for d in docs]
    runs = run_alone(model, seqs)
    scores = []
    for seq, r in zip(seqs, runs):
        a = len(seq) - len(question)  # the first question token
        scores.append(-float(surprisals(_head(model), r.hidden[a - 1:-1], question).mean()))
    return scores, runs


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
    """A KV cache holding ``prefix`` + the compressed text so far, one forward per window.

    Final tokens (the prefix, a window's kept tokens) are not run when they are chosen: they wait in ``pending``
    and go through the model at the front of the next window's forward, at their positions in the compressed
    text (Eq. 5's condition on the compressed prefix), the window's trial tokens after them. A window's kept
    tokens that precede its first dropped one are already in the cache at their final positions with their final
    context, so they are not run again. Optionally ``seed``: a cache already holding the text's first tokens
    (``Ranked``: the coarse step's forward of the first document)."""

    @torch.inference_mode()
    def __init__(self, model, prefix: list[int], capacity: int, seed: Ranked | None = None, text: list[int] = ()):
        self.model, self.head = model, _head(model)
        self.cache = model.new_cache(1, max_len=len(prefix) + capacity + 1)
        self.length = 0  # final tokens in the cache
        self.pending = list(prefix)  # final tokens not run yet
        self.tail = None  # the last final token
        self.known = None  # (T,) surprisals of the text's first tokens, from ``seed``
        self.cached = 0  # how many of the last window's tokens the cache holds at their trial positions
        if seed is not None and not prefix:
            n = 0  # the text's tokens the seed's forward ran, from position 0
            while n < min(len(text), len(seed.ids)) and text[n] == seed.ids[n]:
                n += 1
            if n:
                for a, b in ((self.cache.k, seed.cache.k), (self.cache.v, seed.cache.v)):
                    a[:, 0, :, :n] = b[:, seed.row, :, :n]
                m = min(n, len(text) - 1)  # tokens 1..m are predicted by the seed's rows 0..m-1
                rest = surprisals(self.head, seed.hidden[len(seed.known):m], text[len(seed.known) + 1:m + 1])
                inf = torch.tensor([float("inf")], device=rest.device)
                self.known = torch.cat([inf, seed.known[:m].to(rest.device), rest])  # (m + 1,)
                self.seeded = n

    @torch.inference_mode()
    def surprisals(self, window: list[int]) -> torch.Tensor:
        """-log p of each window token given the stream (inf for the first token of an empty stream), (T,)."""
        if self.known is not None:  # the first window, seeded: the known scores, then the rest run after the seed
            known, self.known = self.known, None
            if len(window) <= len(known):
                self.cached = min(len(window), self.seeded)
                return known[:len(window)]
            a = len(known) - 1  # == self.seeded: run from the first token the seed did not
            x = torch.tensor([window[a:]], device=self.cache.k.device)
            hidden = _hidden(self.model, x, self.cache, a)[0]  # (T - a, dim)
            self.cached = len(window)
            return torch.cat([known, surprisals(self.head, hidden[:-1], window[a + 1:])])
        run, start = self.pending, self.length
        if not run and self.tail is not None:
            run, start = [self.tail], self.length - 1  # its row predicts the window's first token (same entry)
        x = torch.tensor([run + window], device=self.cache.k.device)
        hidden = _hidden(self.model, x, self.cache, start)[0]  # (P + T, dim)
        self.length, self.pending, self.cached = start + len(run), [], len(window)
        P = len(run)
        if P:
            return surprisals(self.head, hidden[P - 1:-1], window)
        first = torch.tensor([float("inf")], device=hidden.device)
        return torch.cat([first, surprisals(self.head, hidden[:-1], window[1:])])

    def keep(self, window: list[int], kept: list[bool]) -> None:
        """The window's kept tokens become final: the ones before its first dropped token are in the cache
        already; the rest wait for the next forward."""
        j = 0
        while j < min(len(window), self.cached) and kept[j]:
            j += 1
        self.length += j
        self.pending = [t for t, k in zip(window[j:], kept[j:]) if k]
        final = self.pending or window[:j]
        if final:
            self.tail = final[-1]


@torch.inference_mode()
def compress_tokens(model, docs: list[list[int]], ratios: list[float], window: int = 200,
                    separator: list[int] | None = None, question: list[int] | None = None,
                    seed: Ranked | None = None) -> list[list[int]]:
    """Iterative token-level compression of the documents (already in prompt order, each with its own ratio): the
    positions kept in each. ``separator`` tokens between documents are kept and conditioned on; with ``question``
    the score is LongLLMLingua's contrastive surprisal. ``seed``: a forward from position 0 whose ids begin like
    the text (the coarse step's run of the first document), reused as the start of the plain stream's cache."""
    if window < 1:
        raise LlmlabError(f"--window {window}: give at least 1 token per compression window")
    separator = separator or []
    seq = []  # (token, document or -1 for a separator, position in the document)
    for k, ids in enumerate(docs):
        if k and separator:
            seq += [(t, -1, 0) for t in separator]
        seq += [(t, k, i) for i, t in enumerate(ids)]
    text = [t for t, _, _ in seq]
    plain = _Stream(model, [], len(seq), seed, text)
    cond = _Stream(model, question, len(seq)) if question else None
    kept: list[list[int]] = [[] for _ in docs]
    seen, taken = [0] * len(docs), [0] * len(docs)
    for a in range(0, len(seq), window):
        part = seq[a:a + window]
        tokens = text[a:a + window]
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
        for r, (_, k, i) in enumerate(part):
            if keep[r] and k >= 0:
                kept[k].append(i)
        for stream in (plain, cond):
            if stream is not None:
                stream.keep(tokens, keep)
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
    order, seed = list(range(len(ids))), None
    if len(ids) > 1 and not reorder and not delta and sum(lengths) - min(lengths) <= target + slack:
        rank, offsets = dict.fromkeys(order, 0), [0.0]  # every document is kept whatever its score: no ranking
    elif len(ids) > 1:
        if long:
            restrictive = tokenizer.encode(question + RESTRICTIVE, add_bos=False)
            scores, runs = question_scores(model, ids, sep, restrictive)
        else:
            scores, runs = perplexity_scores(model, ids)
        ranked = select_documents(lengths, scores, target + slack)
        order = ranked if reorder else sorted(ranked)
        rank = {k: r for r, k in enumerate(ranked)}
        offsets = dynamic_offsets(len(ranked), delta)
        seed = runs[order[0]]  # its forward is the start of the plain stream's
    else:
        rank, offsets = {0: 0}, [0.0]
    tau = min(1.0, target / max(1, sum(lengths[k] for k in order)))
    ratios = [min(1.0, max(0.0, tau + offsets[rank[k]])) for k in order]
    kept = compress_tokens(model, [ids[k] for k in order], ratios, window, sep,
                           (q_ids + sep) if long else None, seed)
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
