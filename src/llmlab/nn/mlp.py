"""Feed-forward blocks.

- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202), used by Llama:
  down(silu(gate(x)) * up(x)).
- The classic GELU MLP of GPT-2 / BERT: down(gelu(up(x))), with biases.

SwiGLU's gating h = silu(a) * b (a = gate(x), b = up(x), both (..., F)) is one autograd node here
(``swiglu``), the memory-efficient form Liger-Kernel (Hsu et al. 2024, arXiv:2410.10989) and unsloth use: it
keeps a and b for the backward pass and recomputes the sigmoid there,

    s = sigmoid(a),  silu(a) = a s,  dh/db = a s,  dh/da = b s (1 + a (1 - s)),

where autograd's two nodes keep a (for silu), silu(a) and b (for the product). When the down projection is a
plain linear layer in float32 / float64 (full fine-tuning or pretraining, no autocast), it joins the node
(``swiglu_down``): its weight gradient needs h, which is recomputed from a and b in backward too, so h is not
kept for it either. Per block, 2 of autograd's 4 (..., F) tensors are kept (SmolLM2-135M's DPO step: 30 blocks
x (232 tokens, 1536) in float32 is 43 MB per tensor), 3 with an adapted, hooked or autocast down projection.
Outside autograd and under ``torch.compile`` (whose partitioner recomputes such elementwise ops itself) both
are the plain expressions.

Shapes: (B, T, dim) -> (B, T, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.nn.autocast import active_emulation


def _gating_grads(ctx, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple:
    """d/da, d/db of h = silu(a) * b given grad = dL/dh (..., F) (None where not needed)."""
    s = torch.sigmoid(a)
    grad_b = grad * a * s if ctx.needs_input_grad[1] else None  # dh/db = silu(a) = a s
    grad_a = None
    if ctx.needs_input_grad[0]:
        grad_a = (1 - s).mul_(a).add_(1).mul_(s).mul_(grad).mul_(b)  # dh/da = b s (1 + a (1 - s))
    return grad_a, grad_b


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):  # (..., F), (..., F)
        ctx.save_for_backward(a, b)
        return F.silu(a) * b  # (..., F)

    @staticmethod
    def backward(ctx, grad):  # (..., F)
        return _gating_grads(ctx, grad, *ctx.saved_tensors)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weight, bias):  # (..., F), (..., F), (D, F), (D,) or None
        ctx.save_for_backward(a, b, weight)
        return F.linear(F.silu(a) * b, weight, bias)  # (..., D)

    @staticmethod
    def backward(ctx, grad):  # (..., D)
        a, b, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, D)
        grad_w = g.t().mm((F.silu(a) * b).reshape(g.shape[0], -1)) if ctx.needs_input_grad[2] else None  # (D, F)
        grad_bias = g.sum(0) if ctx.needs_input_grad[3] else None  # (D,)
        return *_gating_grads(ctx, grad.matmul(weight), a, b), grad_w, grad_bias  # dL/dh (..., F) = grad W


def _autograd_wanted(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts) and not torch.compiler.is_compiling()


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b (..., F), keeping only a and b for backward (module docstring)."""
    return _SwiGLU.apply(a, b) if _autograd_wanted(a, b) else F.silu(a) * b


def swiglu_down(a: torch.Tensor, b: torch.Tensor, down: nn.Module) -> torch.Tensor:
    """down(silu(a) * b) -> (..., D): with a plain linear ``down`` in float32 / float64 and no autocast, one node
    keeping a and b only (module docstring); otherwise ``down(swiglu(a, b))``."""
    plain = (type(down) is nn.Linear and not (down._forward_hooks or down._forward_pre_hooks)
             and a.dtype == b.dtype == down.weight.dtype and a.dtype in (torch.float32, torch.float64)
             and not torch.is_autocast_enabled(a.device.type) and active_emulation() is None)
    if plain and _autograd_wanted(a, b, down.weight):
        return _SwiGLUDown.apply(a, b, down.weight, down.bias)
    return down(swiglu(a, b))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_down(self.gate_proj(x), self.up_proj(x), self.down_proj)


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
