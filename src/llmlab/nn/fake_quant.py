"""Quantization-aware training (QAT): a linear layer that keeps a trainable float weight and computes with that
weight rounded onto a b-bit grid ("fake quantization"), so the float weights learn to sit well on the grid.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam, Kalenichenko, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", 2018, arXiv:1712.05877: simulate the integer grid in the forward
pass, keep float weights for the updates. Rounding has a zero gradient almost everywhere, so the backward
pass uses the straight-through estimator (Bengio, Leonard, Courville, "Estimating or Propagating Gradients
Through Stochastic Neurons for Conditional Computation", 2013, arXiv:1308.3432): the rounding is treated as
the identity. LLM-QAT (Liu, Oguz, Zhao, Chang, Stock, Mehdad, Shi, Krishnamoorthi, Chandra, "LLM-QAT:
Data-Free Quantization Aware Training for Large Language Models", 2023, arXiv:2305.17888) applies this to
LLMs with per-channel symmetric MinMax weights and per-token activations (and a fake-quantized KV cache,
not done here).

The grid is the weight's own, recomputed in every forward pass exactly as round-to-nearest quantization
computes it (``compress/quantize.py``, ``quantize_rtn_layer``): per group of input columns (``group_size``;
0 = per output channel, -1 = per tensor), ``minmax_grid`` (the range [min(w, 0), max(w, 0)], symmetric about
0 when asked) with the scale rounded to float16 first. The grid is not learned and carries no gradient, as
LLM-QAT's MinMax ranges and Jacob et al.'s weight ranges: the weights move and the grid follows them. (Learned
scales over frozen codes are PEQA, ``QuantLinear.train_scales_``.) So a freshly wrapped layer computes exactly
what round-to-nearest quantization of its weight computes, and training starts from the RTN model.

    forward    w_q = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z)
    backward   dL/dw = dL/dw_q   where w / s + z lies in [-1/2, 2^b - 1/2] (w rounds to a code of the grid)
               dL/dw = 0         elsewhere (clamped values: moving them does not move w_q)

That is ``fake_quantize`` on a given grid. ``FakeQuantLinear`` passes every weight's gradient (``clip=False``,
as LLM-QAT's quantizer inside its clip range): its MinMax grid is built to hold the weights, and the only
ones that land past an end code are the range's own extremes, pushed out by a fraction of a step when the zero
point and the float16 scale are rounded; they must stay free to move, or the range could never shrink.

Activations (``act_bits`` > 0): each token's input row is rounded onto its own absmax grid before the product
(``quantize_tokens``, as ``QuantLinear(act="token")``; LLM-QAT's per-token activations, e.g. W4A8), with the
input's gradient passed straight through.

``to_quant_linear()`` returns the frozen ``QuantLinear`` (integer codes, float16 scales) holding exactly the
weight the forward pass used: the same outputs, bit for bit (``tests/test_qat.py``).

Shapes: x (..., K) -> (..., N); weight (N, K); groups (N, K / group, group); scale, zero (N, K / group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.nn.quant_linear import QuantLinear, group_view, minmax_grid, quantize_to_grid, quantize_tokens


def straight_through(value: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``x`` (times ``mask``) in the backward pass.

    Written as value + (x - x) so the forward result is ``value`` exactly (x - x.detach() is exactly 0); the
    usual x + (value - x).detach() would round twice and differ from ``value`` in the last bit."""
    delta = x - x.detach()
    return value.detach() + (delta if mask is None else delta * mask)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  clip: bool = True) -> torch.Tensor:
    """x (..., n) rounded onto the grid (scale, zero: (...,)) and dequantized, with the straight-through gradient:
    zero where x is clamped when ``clip``, x's own everywhere otherwise (module docstring). The grid gets no
    gradient."""
    xd, scale, zero = x.detach(), scale.detach(), zero.detach()
    codes = quantize_to_grid(xd, scale, zero, bits)  # (..., n) in 0 .. 2^b - 1
    s, z = scale[..., None], zero[..., None]  # (..., 1)
    value = (codes - z) * s  # the same product QuantLinear.dequantized computes
    if not clip:
        return straight_through(value, x)
    pos = xd / s + z  # where x falls on the code axis before rounding and clamping
    return straight_through(value, x, (pos >= -0.5) & (pos <= 2 ** bits - 0.5))


class FakeQuantLinear(nn.Module):
    """A trainable linear layer computing with its weight fake-quantized (module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int = 4,
                 group_size: int = 0, symmetric: bool = False, act_bits: int = 0):
        super().__init__()
        n, k = weight.shape
        if not 2 <= bits <= 8:
            raise ValueError(f"FakeQuantLinear bits must be 2..8, got {bits}")
        if act_bits and not 2 <= act_bits <= 8:
            raise ValueError(f"FakeQuantLinear act_bits must be 0 (off) or 2..8, got {act_bits}")
        group_view(torch.empty(n, k, device="meta"), group_size)  # validates the group size
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.in_features, self.out_features = k, n
        self.bits, self.group_size, self.symmetric, self.act_bits = bits, group_size, symmetric, act_bits

    @classmethod
    def from_linear(cls, layer: nn.Linear, **grid) -> FakeQuantLinear:
        return cls(layer.weight, layer.bias, **grid)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of the current weight, each (rows, groups): ``minmax_grid`` with float16 scales."""
        g = group_view(self.weight.detach(), self.group_size)  # (rows, groups, group)
        return minmax_grid(g, self.bits, self.symmetric, torch.float16)

    def quantized_weight(self) -> torch.Tensor:
        """(N, K) float32: the weight on its grid, differentiable through the straight-through estimator."""
        scale, zero = self.grid()
        g = group_view(self.weight, self.group_size)  # (rows, groups, group), a view: gradients reach weight
        return fake_quantize(g, scale, zero, self.bits, clip=False).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the arithmetic of QuantLinear.forward, step for step, so to_quant_linear() gives the same bits
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        if self.act_bits:
            x2 = straight_through(quantize_tokens(x2.detach(), self.act_bits), x2)
        y = F.linear(x2, self.quantized_weight())  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The frozen integer layer with the codes and float16 scales this layer's forward pass uses now."""
        scale, zero = self.grid()
        g = group_view(self.weight.detach(), self.group_size)
        codes = quantize_to_grid(g, scale, zero, self.bits).reshape(self.out_features, self.in_features)
        act = {"act": "token", "act_bits": self.act_bits} if self.act_bits else {}
        return QuantLinear.from_codes(codes, scale.half(), zero, self.bits, self.group_size, self.symmetric,
                                      self.bias, **act)

    def extra_repr(self) -> str:
        group = {0: "per channel", -1: "per tensor"}.get(self.group_size, f"group {self.group_size}")
        act = f", activations {self.act_bits}-bit per token" if self.act_bits else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fake {self.bits}-bit "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, {group}{act}")
