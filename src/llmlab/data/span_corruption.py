"""Span corruption, T5's pretraining objective (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer", arXiv:1910.10683, section 3.1.4 and 3.3.4).

Of a window of ``n`` tokens, ``round(n * noise_density)`` (15%) are dropped in ``round(noise / mean_span)``
spans (mean length 3). Span lengths are a uniformly random composition of the noise count into that many
positive parts, and the kept tokens likewise, interleaved kept-first, so every span is preceded by kept text
(as ``random_spans_noise_mask`` in google-research/text-to-text-transfer-transformer). The input keeps the
kept tokens and puts one sentinel where each span was; the target lists each sentinel followed by the span
it stands for; both end with EOS:

    tokens   The cute dog walks in the park
    input    The <X> walks in <Y> park </s>        sentinels: <X> = vocab-1, <Y> = vocab-2, ... (T5's
    target   <X> cute dog <Y> the </s>             <extra_id_0>, <extra_id_1>, ...: the top of the vocabulary)

The counts depend on ``n`` only, so every window of one length gives inputs and targets of one length
(``corrupted_lengths``) and a batch needs no padding.

Shapes: tokens (n,) -> input (n - noise + spans + 1,), target (noise + spans + 1,); ``corrupt_batch`` stacks rows.
"""

from __future__ import annotations

import torch


def noise_counts(n: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) for a window of ``n`` tokens (at least one of each, some text kept)."""
    if n < 2:
        raise ValueError(f"span corruption needs windows of >= 2 tokens, got {n}")
    noise = min(max(round(n * noise_density), 1), n - 1)
    spans = max(round(noise / mean_span), 1)
    return noise, min(spans, noise, n - noise)


def corrupted_lengths(n: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(input length, target length) of a corrupted window of ``n`` tokens, EOS included."""
    noise, spans = noise_counts(n, noise_density, mean_span)
    return n - noise + spans + 1, noise + spans + 1


def _segment(total: int, parts: int, g: torch.Generator) -> torch.Tensor:
    """A uniformly random composition of ``total`` into ``parts`` positive integers (parts,)."""
    cuts = torch.randperm(total - 1, generator=g)[:parts - 1].sort().values + 1  # distinct cut points in 1..total-1
    edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([total])])
    return edges.diff()


def noise_mask(n: int, g: torch.Generator, noise_density: float = 0.15, mean_span: float = 3.0) -> torch.Tensor:
    """(n,) bool, True = dropped: kept and noise spans interleaved, kept first."""
    noise, spans = noise_counts(n, noise_density, mean_span)
    lengths = torch.stack([_segment(n - noise, spans, g), _segment(noise, spans, g)], dim=1).reshape(-1)  # (2*spans,)
    is_noise = torch.arange(2 * spans) % 2 == 1
    return is_noise.repeat_interleave(lengths)


def corrupt(tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int,
            eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (n,), mask (n,) -> (input, target): each noise span -> one sentinel (vocab-1, vocab-2, ...) in the
    input; the target is each sentinel followed by its span."""
    before = torch.cat([torch.zeros(1, dtype=torch.bool), mask[:-1]])  # (n,) was the previous token dropped?
    starts = mask & ~before  # (n,) the first token of each span
    spans_so_far = torch.cumsum(starts.long(), 0)  # (n,) spans begun up to here
    eos = torch.tensor([eos_id])
    inp = torch.where(starts, vocab_size - spans_so_far, tokens)[~mask | starts]  # span i -> vocab-1-i
    # The target is the same picture with the roles swapped (t5's nonnoise_span_to_unique_sentinel): each kept
    # run -> one sentinel, numbered by the spans before it, so the span after sentinel i is span i.
    kept_starts = ~mask & torch.cat([torch.ones(1, dtype=torch.bool), mask[:-1]])
    tgt = torch.where(kept_starts, vocab_size - 1 - spans_so_far, tokens)[mask | kept_starts]
    return torch.cat([inp, eos]), torch.cat([tgt, eos])


def corrupt_batch(windows: torch.Tensor, vocab_size: int, eos_id: int, g: torch.Generator,
                  noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """windows (B, n) -> inputs (B, n - noise + spans + 1), targets (B, noise + spans + 1)."""
    pairs = [corrupt(row, noise_mask(windows.shape[1], g, noise_density, mean_span), vocab_size, eos_id)
             for row in windows]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def reconstruct(inp: torch.Tensor, tgt: torch.Tensor, n_sentinels_from: int) -> list[int]:
    """The original tokens from an input and its target (EOS dropped): each sentinel (ids >= ``n_sentinels_from``)
    in the input replaced by what follows the same sentinel in the target."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in tgt[:-1].tolist():
        if t >= n_sentinels_from:
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in inp[:-1].tolist():
        out.extend(spans.get(t, []) if t >= n_sentinels_from else [t])
    return out
