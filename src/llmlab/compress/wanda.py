"""Wanda: pruning by weights and activations, without any weight update.

A Simple and Effective Pruning Approach for Large Language Models (Sun, Liu, Bair, Kolter, 2023,
arXiv:2306.11695). The score of weight W_ij is its magnitude times the norm of the input feature it multiplies,

    S_ij = |W_ij| * ||X_j||_2        (X: every calibration token's input to the layer, (tokens, K))

and the lowest scores are zeroed *per output row* (each output keeps the same number of inputs), or in every
group of M inputs for N:M sparsity. The norm makes a small weight on a large activation (LLMs have a few
input features with huge magnitudes) count as much as the output it moves. Like the paper's reference code
(locuslab/wanda, ``prune_wanda``), ``InputNorms`` keeps ||X_j||^2 / n as a running average over n sequences,
and the score uses its square root: a common factor per layer, which changes no comparison.

Shapes: W (N, K); x (..., K); norms (K,).
"""

from __future__ import annotations

import torch

from llmlab.compress.sparsity import Pattern, mask_lowest, mask_n_m


class InputNorms:
    """sum over tokens of x_j^2 / n, (K,) float32, n counting sequences (batch rows; 1 for a 2-D input)."""

    def __init__(self, k: int, device: torch.device):
        self.sq = torch.zeros(k, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        b = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).t().float()  # (K, tokens): each feature's values in one row
        self.sq *= self.n / (self.n + b)
        self.n += b
        self.sq += torch.linalg.vector_norm(x, dim=1) ** 2 / self.n


def wanda_scores(w: torch.Tensor, norms: InputNorms) -> torch.Tensor:
    """|W| * ||X|| per weight, (N, K)."""
    return w.abs().float() * torch.sqrt(norms.sq).reshape(1, -1)  # (N, K) * (1, K)


def wanda_mask(w: torch.Tensor, norms: InputNorms, sparsity: float, pattern: Pattern, per_row: bool = True
               ) -> torch.Tensor:
    """The weights Wanda zeroes, (N, K) bool: the lowest scores per output row (``per_row=False``: of the whole
    layer, the paper's ablation), or per N:M group."""
    scores = wanda_scores(w, norms)
    if pattern.structured:
        return mask_n_m(scores, pattern.n, pattern.m)
    return mask_lowest(scores, sparsity, dim=1 if per_row else None)
