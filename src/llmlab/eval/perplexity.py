"""Perplexity of a causal language model on a text: exp of the mean next-token negative log-likelihood.

The text is cut into consecutive windows of ``window`` tokens; each window is scored on its own (no context
carried across windows, as lm-evaluation-harness's rolling log-likelihood with no overlap and GPTQ's
WikiText2 evaluation do), every token but each window's first is predicted. Bits per byte divide the total
NLL (in bits) by the text's UTF-8 bytes, a figure independent of the tokenizer.

Shapes: ids (N,) int64 -> windows (n_windows, window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    bits_per_byte: float | None = None


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, n_bytes: int | None = None,
               batch: int = 4) -> Perplexity:
    """``ids`` (N,) token ids; a last partial window is dropped. ``n_bytes``: the UTF-8 size of the text the
    scored windows cover, for bits per byte."""
    if ids.ndim != 1 or ids.numel() < 2:
        raise ValueError("perplexity needs a 1-D sequence of at least 2 token ids")
    window = min(window, ids.numel())
    n = ids.numel() // window
    windows = ids[: n * window].reshape(n, window)  # (n_windows, window)
    total, count = 0.0, 0
    for s in range(0, n, batch):
        x = windows[s:s + batch]
        logits = model(x).float()  # (b, window, V)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    mean = total / count
    bpb = None if not n_bytes else total / math.log(2) / n_bytes
    return Perplexity(math.exp(mean), mean, count, bpb)
