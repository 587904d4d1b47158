"""Greedy generation on a static KV cache: prefill the prompt once, then one token per step.

Per step the model sees only the newest token (B, 1) and attends to the cached keys/values, so the
step costs O(T) rather than re-running the whole O(T^2) prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.inference_mode()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, *, stop_ids: set[int] | None = None,
                    on_token: Callable[[int], None] | None = None) -> list[int]:
    """Return the generated ids (without the prompt); stops after a stop id (included) or the budget."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    max_len = model.config.max_seq_len
    budget = min(max_new_tokens, max_len - len(prompt_ids))
    if budget < 1:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens and fills the {max_len}-token context")
    device = next(model.parameters()).device
    cache = model.new_cache(1, len(prompt_ids) + budget)
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    logits = model(ids, cache=cache)[:, -1]  # (1, V)
    out: list[int] = []
    for step in range(budget):
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if (stop_ids and nxt in stop_ids) or step == budget - 1:
            break
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[:, -1]
    return out
