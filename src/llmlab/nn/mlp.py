"""Feed-forward blocks.

- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202), used by Llama:
  down(silu(gate(x)) * up(x)).
- The classic GELU MLP of GPT-2 / BERT: down(gelu(up(x))), with biases.

Shapes: (B, T, dim) -> (B, T, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, bias: bool = True, approximate: str = "none"):
        super().__init__()
        self.up_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=bias)
        self.approximate = approximate  # "tanh" for GPT-2's gelu_new, "none" for BERT's erf GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


def make_mlp(kind: str, dim: int, ffn_dim: int, bias: bool) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, ffn_dim, bias)
    if kind == "gelu_tanh":
        return GeluMLP(dim, ffn_dim, bias, approximate="tanh")
    if kind == "gelu":
        return GeluMLP(dim, ffn_dim, bias, approximate="none")
    raise ValueError(f"unknown mlp kind {kind!r}")
