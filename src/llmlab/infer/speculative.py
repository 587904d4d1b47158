"""Speculative decoding: a cheap drafter proposes ``gamma`` tokens, the target model checks them all
in one forward pass, and the accepted prefix plus one target token is kept (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding", arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318).

Greedy: a draft token is accepted while it equals the target's argmax, so the output is token-identical
to plain greedy decoding. Sampling: draft token x (drafter probability q(x)) is accepted with
probability min(1, p(x)/q(x)); on rejection the token is drawn from norm(max(0, p - q)). This makes the
output distribution exactly the target's (tested statistically). Drafters:

- ``ModelDrafter``: any model with the same vocabulary (a smaller model, a quantized or layer-skipped
  copy), run autoregressively on its own KV cache;
- ``NgramDrafter``: prompt lookup (Saxena 2023, "Prompt Lookup Decoding"): find the earlier occurrence of the
  sequence's tail with the longest match (up to ``max_ngram`` tokens) and propose what followed it. No model at
  all; q is one-hot.

One target call per iteration: the last emitted token (not yet in the cache) and its k drafts go through the model
together, 1 + k rows, so a verification is one call of the native C step (``models/native_step.py``; a row's
numbers do not depend on the rows beside it, so greedy stays token-identical) and k = 0 is exactly a plain decode
step. The draft length adapts (``DraftLength``): with a per-token acceptance rate a, k drafts yield
(1 - a^(k+1)) / (1 - a) tokens per call (Leviathan et al., eq. 1) for about 1 + c k decode steps of work (c: one
verification row against a one-row step, ~0.35 on the packed path), so k is the best ratio over [0, gamma] and
speculation falls back to plain steps where drafts are being rejected.

Rolling back rejected tokens is free with a static KV cache: only ``cache.length`` moves back, the stale
slots are overwritten later and never read (attention reads positions < length + new tokens).
Shapes: one sequence (batch 1); logits (1, T, V).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmlab.infer.generate import prefill_logits
from llmlab.infer.sample import SamplingParams, sampling_probs
from llmlab.models.native_step import enable_native_step_
from llmlab.nn.cpu_kernels import kernel_threads_for_native_step


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0
    rows: int = 0  # target rows computed after the prompt (a plain greedy run computes one per new token)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(T, V) logits -> (T, V) probabilities of the (warped) sampling distribution; one-hot if greedy."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return sampling_probs(logits, params)


class NgramDrafter:
    """Prompt lookup: the continuation of the earlier occurrence of the sequence's tail that matches the most
    tokens (``min_ngram`` to ``max_ngram``; the most recent among equally long matches)."""

    cost_per_token = 0.0  # drafting costs no model call

    def __init__(self, max_ngram: int = 8, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seq: list[int], gamma: int, params: SamplingParams, generator=None):
        L = len(seq)
        if L < 2 or gamma < 1:
            return [], None
        last, best, best_len = seq[-1], -1, 0
        for i in range(L - 2, -1, -1):  # every earlier position of the last token, newest first
            if seq[i] != last:
                continue
            n = 1  # seq[i] == seq[L - 1]: extend the match backwards
            while n < self.max_ngram and i - n >= 0 and seq[i - n] == seq[L - 1 - n]:
                n += 1
            if n > best_len:
                best, best_len = i, n
                if n == self.max_ngram:
                    break
        if best_len < self.min_ngram:
            return [], None
        return seq[best + 1:best + 1 + gamma], None  # q is one-hot on the draft

    def rollback(self, length: int) -> None:
        pass


class ModelDrafter:
    """A smaller model with the same vocabulary, decoding on its own cache."""

    def __init__(self, model, max_len: int, cost_per_token: float = 0.5):
        self.model = model
        self.cache = model.new_cache(1, max_len)
        self.device = next(model.parameters()).device
        self.cost_per_token = cost_per_token  # one draft token's time in target decode steps (adaptive length)

    def propose(self, seq: list[int], gamma: int, params: SamplingParams, generator=None):
        pending = seq[self.cache.length:]  # tokens the drafter has not seen yet (>= 1)
        logits = self.model(torch.tensor([pending], device=self.device), cache=self.cache)[0, -1:]
        draft, qs = [], []
        for i in range(gamma):
            q = target_probs(logits, params)[0]  # (V,)
            tok = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=generator))
            draft.append(tok)
            qs.append(q)
            if i < gamma - 1:
                logits = self.model(torch.tensor([[tok]], device=self.device), cache=self.cache)[0, -1:]
        return draft, torch.stack(qs)

    def rollback(self, length: int) -> None:
        self.cache.length = min(self.cache.length, length)


class DraftLength:
    """Adaptive draft length: with a per-token acceptance probability a, k drafts yield 1 + a + ... + a^k tokens
    per target call (the accepted prefix plus the target's own token) for a cost of 1 + (row_cost + draft_cost) k
    decode steps (a verification row costs ``row_cost`` of a one-row step); ``next`` picks the k in [0, gamma]
    with the most tokens per step, 0 (a plain step) when speculation would not pay. a is estimated from recent
    outcomes, each older one weighted ``decay`` times less: accepted drafts / (accepted + rejected)."""

    def __init__(self, gamma: int, row_cost: float = 0.35, draft_cost: float = 0.0, decay: float = 0.7):
        self.gamma, self.cost, self.decay = gamma, row_cost + draft_cost, decay
        self.hits, self.misses = 1.0, 1.0  # prior: a = 0.5

    @property
    def rate(self) -> float:
        return self.hits / (self.hits + self.misses)

    def observe(self, accepted: int, rejected: bool) -> None:
        self.hits = self.decay * self.hits + accepted
        self.misses = self.decay * self.misses + rejected

    def next(self) -> int:
        a, best, best_k, tokens = self.rate, 1.0, 0, 1.0
        for k in range(1, self.gamma + 1):
            tokens += a ** k
            if tokens / (1.0 + self.cost * k) > best:
                best, best_k = tokens / (1.0 + self.cost * k), k
        return best_k


PROBE = 8  # plain steps before a drafter that costs time is tried again (its acceptance is only seen when checked);
#             doubled after each probe that is rejected


@torch.inference_mode()
@kernel_threads_for_native_step
def speculative_generate(model, prompt: list[int], max_new_tokens: int, drafter, *, gamma: int = 4,
                         params: SamplingParams | None = None, stop_ids: set[int] | None = None,
                         on_token: Callable[[int], None] | None = None, adaptive: bool = True,
                         row_cost: float = 0.35) -> tuple[list[int], SpecStats]:
    """Up to ``gamma`` draft tokens per target call (fewer with ``adaptive``: ``DraftLength``, ``row_cost`` its
    cost of one verification row in decode steps). Each call scores the last emitted token and the draft
    together, (1 + k) rows: one call per iteration, the same work as plain decoding when k = 0."""
    params = (params or SamplingParams()).validate()
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty or params.logit_bias:
        raise ValueError("speculative decoding supports temperature/top-k/top-p/min-p, not penalties or bias")
    if gamma < 1:
        raise ValueError(f"gamma (draft tokens per step) must be >= 1, got {gamma}")
    stop_ids = set(stop_ids or ())
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.config.max_seq_len - len(prompt))
    if budget < 1:
        raise ValueError("the prompt fills the context")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    cache = model.new_cache(1, len(prompt) + budget + gamma + 1)
    stats = SpecStats()
    seq = list(prompt)
    out: list[int] = []
    length = DraftLength(gamma, row_cost, getattr(drafter, "cost_per_token", 0.0)) if adaptive else None
    free_draft = getattr(drafter, "cost_per_token", 0.0) == 0.0
    hint: int | None = None  # a free drafter's first proposal when it was not checked (k = 0): compared for free
    plain_steps, probe_every = 0, PROBE

    def emit(tok: int) -> bool:
        out.append(tok)
        seq.append(tok)
        if on_token is not None:
            on_token(tok)
        return tok in stop_ids or len(out) >= budget

    def pick(p_row: torch.Tensor) -> int:
        return int(p_row.argmax()) if params.greedy else int(torch.multinomial(p_row, 1, generator=generator))

    logits = prefill_logits(model, torch.tensor([prompt], device=device), cache=cache)  # (1, V) for the next token
    stats.target_calls += 1
    tok = int(logits.argmax()) if params.greedy else pick(target_probs(logits, params)[0])
    finished = emit(tok)
    while not finished:
        # seq ends with tok, not yet in the cache: the cache holds seq[:base]
        base = len(seq) - 1
        room = budget - len(out)
        k = min(gamma, room - 1) if length is None else min(length.next(), room - 1)
        if length is not None and not free_draft:  # a costly drafter is tried again after probe_every plain steps
            plain_steps = plain_steps + 1 if k == 0 else 0
            if plain_steps > probe_every:
                k, plain_steps = min(1, room - 1), 0
        draft, q = [], None
        if k > 0:
            draft, q = drafter.propose(seq, k, params, generator)
        elif length is not None and free_draft and room > 1:
            hint = (drafter.propose(seq, 1, params, generator)[0] or [None])[0]
        rows = model(torch.tensor([[tok] + draft], device=device), cache=cache, start=base)[0]  # (1 + g, V)
        stats.target_calls += 1
        stats.rows += rows.shape[0]
        stats.drafted += len(draft)
        n_ok = 0
        if params.greedy:  # the draft is accepted while it equals the target's argmax
            target = rows.argmax(-1).tolist()  # (1 + g,)
            while n_ok < len(draft) and draft[n_ok] == target[n_ok]:
                n_ok += 1
            p = None
        else:
            p = target_probs(rows, params)  # (1 + g, V)
            for i, d in enumerate(draft):
                q_tok = 1.0 if q is None else float(q[i, d])
                if not float(torch.rand((), generator=generator, device=device)) < min(1.0, float(p[i, d]) / q_tok):
                    break
                n_ok += 1
        stats.accepted += n_ok
        if length is not None and draft:
            length.observe(n_ok, n_ok < len(draft))
            probe_every = PROBE if n_ok else 2 * probe_every  # a failed probe: wait twice as long for the next
        for d in draft[:n_ok]:
            if emit(d):
                finished = True
                break
        if finished:
            break
        # One token from the target: the correction after a rejection, or the bonus after full acceptance.
        if params.greedy:
            tok = target[n_ok]
        elif n_ok < len(draft):
            residual = p[n_ok].clone()
            if q is None:
                residual[draft[n_ok]] = 0.0
            else:
                residual = (residual - q[n_ok]).clamp(min=0)
            tok = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        else:
            tok = pick(p[n_ok])
        if hint is not None:  # what the unchecked draft would have scored
            length.observe(int(hint == tok), hint != tok)
            hint = None
        # Roll back the rejected draft positions: the cache keeps seq up to the last accepted token.
        cache.length = base + 1 + n_ok
        drafter.rollback(base + 1 + n_ok)
        finished = emit(tok)
    return out, stats


def layer_skip_draft(model, keep_every: int = 2):
    """A draft that shares the target's weights but runs only every ``keep_every``-th layer (and the
    last): no extra memory, same vocabulary. Self-speculative decoding (Zhang et al. 2023, arXiv:2309.08168)."""
    import copy

    from torch import nn

    n = len(model.layers)
    keep = sorted(set(range(0, n, keep_every)) | {n - 1})
    draft = copy.copy(model)  # shallow: parameters shared
    draft._modules = dict(model._modules)
    draft.layers = nn.ModuleList([model.layers[i] for i in keep])
    draft.config = copy.copy(model.config)
    draft.config.n_layers = len(keep)
    if getattr(model, "native_step", None) is not None:  # the kept blocks in C too (the target's is for all of them)
        enable_native_step_(draft)
    return draft
