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
- ``NgramDrafter``: prompt lookup (Saxena 2023): find the latest earlier occurrence of the last n tokens
  and propose what followed it. No model at all; q is one-hot.

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


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0

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
    """Propose the continuation of the most recent earlier match of the last ``n`` tokens (n = max..min)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seq: list[int], gamma: int, params: SamplingParams, generator=None):
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(seq) <= n:
                continue
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start:start + n] == tail:
                    draft = seq[start + n:start + n + gamma]
                    if draft:
                        return draft, None  # q is one-hot on the draft
        return [], None

    def rollback(self, length: int) -> None:
        pass


class ModelDrafter:
    """A smaller model with the same vocabulary, decoding on its own cache."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.cache = model.new_cache(1, max_len)
        self.device = next(model.parameters()).device

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


@torch.inference_mode()
def speculative_generate(model, prompt: list[int], max_new_tokens: int, drafter, *, gamma: int = 4,
                         params: SamplingParams | None = None, stop_ids: set[int] | None = None,
                         on_token: Callable[[int], None] | None = None) -> tuple[list[int], SpecStats]:
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
    logits = prefill_logits(model, torch.tensor([prompt], device=device), cache=cache)  # (1, V) for the next token
    stats.target_calls += 1
    out: list[int] = []

    def emit(tok: int) -> bool:
        out.append(tok)
        seq.append(tok)
        if on_token is not None:
            on_token(tok)
        return tok in stop_ids or len(out) >= budget

    while True:
        room = budget - len(out)
        draft, q = drafter.propose(seq, min(gamma, room - 1), params, generator) if room > 1 else ([], None)
        base = len(seq)  # cache holds seq[:base-1]... plus last token pending in `logits`
        if draft:
            # Score the draft: logits for positions after seq[-1], d1, ..., d_gamma.
            more = model(torch.tensor([draft], device=device), cache=cache, start=base)[0]  # (g, V)
            stats.target_calls += 1
            all_logits = torch.cat([logits, more])  # (g+1, V)
        else:
            all_logits = logits
        p = target_probs(all_logits, params)  # (g+1, V)
        stats.drafted += len(draft)
        finished = False
        n_ok = 0
        for i, tok in enumerate(draft):
            if params.greedy:
                ok = int(p[i].argmax()) == tok
            else:
                q_tok = 1.0 if q is None else float(q[i, tok])
                ok = float(torch.rand((), generator=generator, device=device)) < min(1.0, float(p[i, tok]) / q_tok)
            if not ok:
                break
            n_ok += 1
            if emit(tok):
                finished = True
                break
        stats.accepted += n_ok
        if finished:
            break
        # One token from the target: the correction after a rejection, or the bonus after full acceptance.
        if n_ok < len(draft):
            if params.greedy:
                tok = int(p[n_ok].argmax())
            else:
                residual = p[n_ok].clone()
                if q is None:
                    residual[draft[n_ok]] = 0.0
                else:
                    residual = (residual - q[n_ok]).clamp(min=0)
                tok = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        else:
            tok = int(p[n_ok].argmax()) if params.greedy else int(torch.multinomial(p[n_ok], 1, generator=generator))
        # Roll back the rejected draft positions: the cache keeps seq up to the last accepted token.
        cache.length = base + n_ok
        drafter.rollback(base + n_ok)
        if emit(tok):
            break
        logits = model(torch.tensor([[tok]], device=device), cache=cache)[0, -1:]
        stats.target_calls += 1
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
    return draft
