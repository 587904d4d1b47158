"""Sparsity patterns and the masks that pick which weights of a linear layer become zero.

A pruning method gives every weight a score (smaller = less important: |W| for magnitude pruning, |W| * ||X||
for Wanda); a *mask* marks the weights to zero. Where the scores are compared decides the pattern:

- unstructured, per layer: the ``floor(S * N * K)`` lowest scores of the whole matrix (the magnitude baseline
  of Wanda's and SparseGPT's papers);
- unstructured, per output row: the ``floor(S * K)`` lowest scores of each row (Wanda's comparison group,
  Sun et al. 2023, arXiv:2306.11695, Section 3);
- N:M semi-structured: in every group of M consecutive input weights of a row, keep the N highest scores and
  zero the other M - N (2:4 is what NVIDIA's sparse tensor cores run, Mishra et al. 2021, arXiv:2104.08378).

Every mask zeroes exactly the stated count (ties broken by position, lower index first), so the sparsity
achieved equals the target: per row, per group or per layer. The reference repositories threshold with
``score <= sorted[k]`` in their per-layer and SparseGPT masks, which zeroes one weight more (k + 1) plus ties;
``sparsegpt.py`` says how its parity test accounts for that.

Shapes: scores and masks (N, K) = (out_features, in_features); a mask is bool, True = prune.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from llmlab.common import LlmlabError


@dataclass(frozen=True)
class Pattern:
    """``n == 0``: unstructured; else keep ``n`` of every ``m`` consecutive input weights."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.n > 0

    @property
    def sparsity(self) -> float:
        """The fraction an N:M pattern zeroes (1 - N/M)."""
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(text: str) -> Pattern:
    """``unstructured`` or ``N:M`` with 1 <= N < M (e.g. 2:4, 4:8)."""
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) < int(match[2]):
        raise LlmlabError(f"--pattern {text!r}: use 'unstructured' or N:M with 1 <= N < M (keep N of every M "
                          "consecutive input weights), e.g. 2:4 or 4:8")
    return Pattern(int(match[1]), int(match[2]))


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise LlmlabError(f"--sparsity {sparsity}: use the fraction of weights to zero, in [0, 1) (e.g. 0.5)")


def check_width(name: str, in_features: int, pattern: Pattern) -> None:
    """An N:M pattern needs whole groups of M along the input features."""
    if pattern.structured and in_features % pattern.m:
        raise LlmlabError(f"--pattern {pattern}: {name} has {in_features} input features, not a multiple of "
                          f"{pattern.m}: use an M that divides every layer's width, or --pattern unstructured")


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a sparsity zeroes: floor(S * total), robust to 0.29 * 100 = 28.999..."""
    return math.floor(sparsity * total + 1e-9)


def mask_lowest(scores: torch.Tensor, sparsity: float, dim: int | None) -> torch.Tensor:
    """True at the ``prune_count`` lowest scores of each row (``dim=1``) or of the whole matrix (``dim=None``),
    (N, K) bool: the first k of a stable ascending sort (of equal scores the lower index is pruned first), found
    without sorting: everything below the k-th lowest value, then as many of the values equal to it as are still
    needed, left to right (a selection is linear, a sort of a 1536 x 576 layer several times slower)."""
    flat = scores if dim is not None else scores.reshape(1, -1)  # (rows compared, items per row)
    k = prune_count(flat.shape[1], sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(flat, k, dim=1, keepdim=True).values  # (rows, 1)
    below, ties = flat < kth, flat == kth  # (rows, items)
    need = k - below.sum(dim=1, keepdim=True)  # (rows, 1): ties still to prune
    mask = below | (ties & (torch.cumsum(ties, dim=1) <= need))
    return mask.reshape(scores.shape)


def mask_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the M - N lowest scores of every group of ``m`` consecutive columns, (N, K) bool."""
    rows, k = scores.shape
    groups = scores.reshape(rows, k // m, m)  # (N, K / M, M)
    low = torch.topk(groups, m - n, dim=2, largest=False)[1]  # (N, K / M, M - N)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, low, True)
    return mask.reshape(rows, k)


def zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()
