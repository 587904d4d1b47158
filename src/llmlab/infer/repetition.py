"""A guard against runaway loops: stop when the tail of a generation repeats one block of tokens.

Small models decoded greedily (and sometimes sampled) fall into loops — SmolLM2-135M answers "Write a
haiku about autumn." with the same seven-token phrase some 80 times. Holtzman et al. ("The Curious
Case of Neural Text Degeneration", 2019, arXiv:1904.09751) measure this degeneration; sampling with
nucleus / repetition penalties makes it rarer but not impossible, so a chat also stops a turn that has
clearly looped instead of spending its whole budget on it.

The rule: the last ``period * repeats`` tokens are one block of ``period`` tokens (1 <= period <=
``max_period``) repeated ``repeats`` times, where ``repeats >= min_repeats`` and the repeated span covers
at least ``min_tokens`` tokens — so "ha ha ha" or a short list does not trip it, while a sentence said
three times in a row does. Only the newest token can complete a loop, so checking after each token
costs O(max_period) comparisons in the common case (the first mismatch ends each period's scan).

Shapes: plain lists of token ids; no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Repeat:
    period: int  # tokens in the repeated block
    repeats: int  # how many times the block stands at the tail, back to back
    start: int  # index of the first token of the first copy

    @property
    def keep(self) -> int:
        """Index just past the first copy: ``ids[:keep]`` is the text with the repeats removed."""
        return self.start + self.period


@dataclass(frozen=True)
class RepetitionGuard:
    max_period: int = 64
    min_repeats: int = 3
    min_tokens: int = 24

    def __post_init__(self) -> None:
        if self.max_period < 1 or self.min_repeats < 2 or self.min_tokens < 1:
            raise ValueError("RepetitionGuard needs max_period >= 1, min_repeats >= 2, min_tokens >= 1")

    def find(self, ids: list[int]) -> Repeat | None:
        """The loop standing at the tail of ``ids``, or None. The shortest qualifying period wins."""
        n = len(ids)
        for period in range(1, min(self.max_period, n // self.min_repeats) + 1):
            # Count how far back the tail stays periodic: ids[i] == ids[i - period].
            i = n - 1
            while i >= period and ids[i] == ids[i - period]:
                i -= 1
            span = n - 1 - i + period  # tokens covered by whole-or-partial copies of the block
            repeats = span // period
            if repeats >= self.min_repeats and repeats * period >= self.min_tokens:
                return Repeat(period, repeats, n - repeats * period)
        return None
