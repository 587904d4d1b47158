"""The generation loop: prefill each prompt once, then one token per step on a static KV cache.

Per step the model sees only the newest token (B, 1) and attends to the cached keys/values, so a step
costs O(T) rather than re-running the O(T^2) prefix. Prompts of different lengths are left-padded; a
key mask hides the padding and per-row positions start at 0, so every row gives the text it gives alone. A
prompt given several times (GRPO's groups of replies, n samples) is prefilled once, its cache rows copied.
Stops on EOS / end-of-turn ids, on stop strings (also when one spans several tokens), or on the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmlab.infer.repetition import RepetitionGuard
from llmlab.infer.sample import SamplingParams, make_generator, select
from llmlab.models.decoder import DecoderLM
from llmlab.nn.autocast import upcast_matmuls
from llmlab.nn.cpu_kernels import kernel_threads_for_native_step
from llmlab.nn.kv_cache import StaticKVCache


@dataclass
class Completion:
    ids: list[int]  # generated ids, stop token / stop string tokens included
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "repetition" (the guard stopped a loop)
    text: str | None = None  # decoded text, cut before a stop string (when a tokenizer was given)


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # ChatML, Llama 3, Phi-3, Gemma


def chat_stop_ids(config, tokenizer) -> set[int]:
    """Ids that end a reply: EOS (config and tokenizer) and the chat formats' end-of-turn tokens."""
    ids = {i for i in (config.eos_token_id, getattr(tokenizer, "eos_id", None)) if i is not None}
    for name in END_OF_TURN:
        tid = tokenizer.special_tokens.get(name)
        if tid is not None:
            ids.add(tid)
    return ids


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T) left-padded, mask (B, T) bool (True = real token)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, device=device)
        mask[i, T - len(p):] = True
    return ids, mask


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """-> (the index of each distinct prompt's first occurrence, in order; for each prompt, the position of its
    distinct prompt in that list)."""
    seen: dict[tuple[int, ...], int] = {}
    first: list[int] = []
    rows = []
    for i, p in enumerate(prompts):
        key = tuple(p)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        rows.append(seen[key])
    return first, rows


def find_stop(text: str, stops: list[str] | None) -> int:
    """Where the earliest of the (non-empty) ``stops`` starts in ``text``; -1 when none occurs."""
    hits = [text.find(s) for s in stops or () if s and s in text]
    return min(hits) if hits else -1


def cut_at_stop(text: str, stops: list[str] | None) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = find_stop(text, stops)
    return text[:cut] if cut >= 0 else text


def prefill_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The prompt through the model, logits (B, V) of the last position only: a ``DecoderLM`` runs its output
    head on one row per sequence instead of every prompt position (the head is a fifth of SmolLM2's weights).
    Other models (prompt-tuned wrappers) return every position's logits and the last is taken. bf16/fp16 weights on
    a CPU without their matmul units multiply on fp32 units here (``nn/autocast.UpcastMatmuls``)."""
    weight = next(model.parameters())
    with upcast_matmuls(weight.device, weight.dtype):  # a bf16 prompt on a CPU without bf16 units: fp32 units
        if isinstance(model, DecoderLM):
            hidden = model(ids, return_hidden=True, **kwargs)[:, -1]  # (B, dim), after the final norm
            return model.lm_head(hidden)
        return model(ids, **kwargs)[:, -1]


@torch.inference_mode()
@kernel_threads_for_native_step
def generate(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams | None = None, *,
             stop_ids: set[int] | None = None, stop_strings: list[str] | None = None, tokenizer=None,
             on_token: Callable[[int, int], None] | None = None,
             repetition_guard: RepetitionGuard | None = None,
             constraint: Callable[[int, list[int], int], torch.Tensor] | None = None) -> list[Completion]:
    """Generate for a batch of prompts (lists of ids). ``on_token(row, id)`` streams each new token.
    With a ``repetition_guard``, a row whose newest tokens repeat one block (see ``infer/repetition.py``)
    stops with finish reason "repetition". With a ``constraint`` (``(row, ids so far, tokens left) -> (V,) bool``,
    e.g. ``infer/json_constraint.TokenConstraint.allowed``), tokens it masks out get -inf logits."""
    params = (params or SamplingParams()).validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty")
    B, T = len(prompts), max(len(p) for p in prompts)
    max_len = model.config.max_seq_len
    budget = min(max_new_tokens, max_len - T)
    if budget < 1:
        raise ValueError(f"the prompt has {T} tokens and fills the {max_len}-token context")
    stop_ids = set(stop_ids or ())
    stop_strings = [s for s in (stop_strings or []) if s]
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    device = next(model.parameters()).device
    V = model.config.vocab_size
    ids, mask = left_pad(prompts, 0, device)
    ragged = not bool(mask.all())
    full_mask = torch.cat([mask, torch.ones(B, budget, dtype=torch.bool, device=device)], dim=1)  # (B, T+budget)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from 0
    cache = model.new_cache(B, T + budget)
    first, rows = distinct_prompts(prompts)
    if len(first) < B and isinstance(model, DecoderLM) and isinstance(cache, StaticKVCache):
        # The same prompt several times (GRPO's groups, n samples of a prompt): each distinct prompt is prefilled
        # once and its keys and values copied to every row that repeats it (vLLM's prefix caching, whole prompts).
        u, r = torch.tensor(first, device=device), torch.tensor(rows, device=device)  # (U,), (B,)
        head = model.new_cache(len(first), T + budget)
        logits = prefill_logits(model, ids[u], cache=head, attention_mask=full_mask[u, :T] if ragged else None,
                                position_ids=positions[u])[r]  # (B, V)
        cache.copy_rows_from(head, r)
        del head
    else:
        logits = prefill_logits(model, ids, cache=cache, attention_mask=full_mask[:, :T] if ragged else None,
                                position_ids=positions)  # (B, V)
    next_pos = positions[:, -1:] + 1  # (B, 1)

    need_seen = params.repetition_penalty != 1.0
    seen = torch.zeros(B, V, dtype=torch.bool, device=device) if need_seen else None
    if seen is not None:
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
    counts = torch.zeros(B, V, device=device) if (params.frequency_penalty or params.presence_penalty) else None
    # One generator per row when seeded: a row samples the same tokens in a batch as alone.
    gens = [make_generator(params.seed, device) for _ in range(B)] if params.seed is not None else None

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    reasons = ["length"] * B
    texts: list[str | None] = [None] * B
    for step in range(budget):
        if constraint is not None:
            allowed = torch.stack([constraint(i, out[i], budget - step) for i in range(B)]).to(device)  # (B, V)
            logits = logits.masked_fill(~allowed, float("-inf"))
        if gens is None:
            nxt = select(logits, params, None, seen, counts)  # (B,)
        else:
            nxt = torch.cat([select(logits[i:i + 1], params, gens[i], None if seen is None else seen[i:i + 1],
                                    None if counts is None else counts[i:i + 1]) for i in range(B)])
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            out[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok in stop_ids:
                done[i], reasons[i] = True, "stop"
            elif repetition_guard is not None and repetition_guard.find(out[i]) is not None:
                done[i], reasons[i] = True, "repetition"
            elif stop_strings:
                text = tokenizer.decode(out[i])
                cut = find_stop(text, stop_strings)
                if cut >= 0:
                    done[i], reasons[i], texts[i] = True, "stop", text[:cut]
        if all(done) or step == budget - 1:
            break
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        if counts is not None:
            counts[torch.arange(B, device=device), nxt] += 1
        logits = model(nxt[:, None], cache=cache, attention_mask=full_mask[:, :T + step + 1] if ragged else None,
                       position_ids=next_pos)[:, -1]
        next_pos = next_pos + 1
    results = []
    for i in range(B):
        text = texts[i]
        if text is None and tokenizer is not None:
            text = tokenizer.decode([t for t in out[i] if t not in stop_ids], skip_special=True)
        results.append(Completion(out[i], reasons[i], text))
    return results


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, *, stop_ids: set[int] | None = None,
                    on_token: Callable[[int], None] | None = None) -> list[int]:
    """One prompt, greedy: the generated ids (a stop id, if hit, included)."""
    cb = (lambda _row, tok: on_token(tok)) if on_token is not None else None
    return generate(model, [prompt_ids], max_new_tokens, stop_ids=stop_ids, on_token=cb)[0].ids
