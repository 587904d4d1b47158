"""A linear layer stored as two thin ones: W (out, in) ~= B A with A (r, in), B (out, r).

``LowRankLinear`` runs ``up(down(x))``: ``down`` maps the ``in`` features to ``r``, ``up`` maps ``r`` to ``out``
and carries the original bias. Both are ordinary ``nn.Linear`` layers, or frozen ``QuantLinear`` layers when
the factors are quantized (``compress/lowrank.py``). For r < in * out / (in + out) it holds fewer weights
than the dense layer and costs fewer multiply-adds per token: r * (in + out) instead of in * out.

Shapes: x (..., in) -> (..., r) -> (..., out).
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        if down.out_features != up.in_features:
            raise ValueError(f"LowRankLinear: down gives {down.out_features} features, up takes {up.in_features}")
        self.down, self.up = down, up
        self.in_features, self.rank, self.out_features = down.in_features, down.out_features, up.out_features

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """A (r, in), B (out, r), bias (out,) -> the layer computing x A^T B^T + bias, in float32."""
        r, k = a.shape
        n = b.shape[0]
        down = nn.Linear(k, r, bias=False)
        up = nn.Linear(r, n, bias=bias is not None)
        with torch.no_grad():
            down.weight.copy_(a)
            up.weight.copy_(b)
            if bias is not None:
                up.bias.copy_(bias)
        return cls(down, up)

    @staticmethod
    def saves(rank: int, in_features: int, out_features: int) -> bool:
        """Whether rank ``rank`` stores fewer weights than the dense (out, in) matrix."""
        return rank * (in_features + out_features) < in_features * out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., r) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"
