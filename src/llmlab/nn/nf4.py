"""4-bit NormalFloat (NF4) weights with double quantization, and a frozen linear layer that stores them.

Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs", 2023,
arXiv:2305.14314. Pretrained weights are close to normally distributed, so the 16 code values are
(normalised) quantiles of N(0, 1) instead of evenly spaced levels: each code is used about equally often,
which lowers the error against int4 absmax for the same 4 bits (tested).

The algorithm, as published and as bitsandbytes implements it:

1. Flatten the weight and cut it into blocks of ``block_size`` (64) values. Each block is scaled by its
   absolute maximum ``absmax`` into [-1, 1] and every value becomes the index of the nearest code value
   (ties go to the lower code: bucketize against the midpoints). Two 4-bit indices are packed per byte,
   the first one in the high nibble.
2. Double quantization: the fp32 ``absmax`` constants (one per 64 weights = 0.5 bit per weight) are
   quantized again: subtract their mean (they are all positive, so centring uses the signed code better),
   cut them into blocks of 256 and quantize each block by its own absmax to 8 bits with the signed
   "dynamic" 8-bit code (Dettmers 2015, arXiv:1511.04561 -- what the paper calls 8-bit floats), keeping one
   fp32 constant per 256 blocks. Cost: 8/64 + 32/(64*256) = 0.127 bit per weight, so 4.127 bits in all.
3. Dequantize: absmax = dynamic_code[q2] * scale2 + mean; weight = NF4_CODE[q] * absmax.

A last partial block is quantized by the absmax of the values it has (zero padding cannot change it).

Shapes: ``quantize_nf4(w)`` takes any float tensor of N values and gives an ``NF4Weight`` holding
``codes`` (ceil(N/2),) uint8, ``absmax_codes`` (ceil(N/64),) uint8, ``absmax_scales`` (ceil(N/64/256),)
fp32 and ``absmax_mean`` () fp32 (or ``absmax`` (ceil(N/64),) fp32 without double quantization).
``NF4Linear``: x (..., in) -> (..., out), weight (out, in) dequantized on the fly in the compute dtype.

Backward (``NF4Matmul``): only the input gets a gradient, grad_x = grad_y @ W, and W is dequantized again
in backward rather than saved by forward -- as bitsandbytes' ``MatMul4Bit`` does -- so a QLoRA step does
not keep a compute-dtype copy of every frozen weight alive between forward and backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError

BLOCK_SIZE = 64  # weights per NF4 absmax constant (the paper's choice)
ABSMAX_BLOCK_SIZE = 256  # absmax constants per second-level fp32 constant

# The published NF4 code (QLoRA appendix E; bitsandbytes' table): 8 positive and 7 negative normal
# quantiles normalised to [-1, 1], plus an exact zero so that zero weights (padding) stay zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_code_8bit(signed: bool = True) -> torch.Tensor:
    """The dynamic 8-bit code (256 sorted values in [-1, 1], or [0, 1] unsigned) of Dettmers et al. 2022,
    used for the second quantization here and for the 8-bit optimizer states (``train/adamw8bit.py``).

    One sign bit, then a run of zero bits whose length is the decimal exponent (10^-6 .. 10^0), then the
    remaining bits as a linear fraction in (0.1, 1]: fine steps near zero, coarse ones near one. The
    unsigned code spends the sign bit on one more fraction bit: 2^(e+1) levels at exponent e, not 2^e.
    """
    values: list[float] = []
    for e in range(7):  # decimal exponent -6 .. 0
        levels = 2 ** e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1, levels + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0 * 10 ** (e - 6)).tolist()
        values += mids + ([-m for m in mids] if signed else [])
    values += [0.0, 1.0]  # signed 2 * 127 + 2, unsigned 254 + 2 = 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten and zero-pad to whole blocks: (N,) -> (ceil(N/block), block)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block)  # (n_blocks, block)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` for each element (ties to the lower index)."""
    mids = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, mids.to(scaled.device)).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization onto a sorted code in [-1, 1]: (N,) -> codes (N,) uint8, absmax (n_blocks,)."""
    n = x.numel()
    blocks = _blocks(x.float(), block)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # multiply by the reciprocal (not divide), as bitsandbytes does, so that the codes agree bit for bit
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)  # (n_blocks, block)
    return _nearest(scaled.reshape(-1)[:n], code), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of ``quantize_blockwise``: (N,) uint8 codes -> (N,) fp32 values."""
    n = codes.numel()
    values = _blocks(code.to(codes.device)[codes.long()], block)  # (n_blocks, block)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(N,) uint8 codes < 16 -> (ceil(N/2),) bytes, the first code of each pair in the high nibble."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    pairs = codes.view(-1, 2)  # (N/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2),) bytes -> (n,) uint8 codes."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]  # (2 * bytes,) -> (n,)


@dataclass
class NF4Weight:
    """A weight quantized to NF4. ``absmax`` is set without double quantization; with it, the three
    ``absmax_*`` fields hold the 8-bit constants, their fp32 scales and the subtracted mean."""

    codes: torch.Tensor  # (ceil(N/2),) uint8, two NF4 indices per byte
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE
    absmax: torch.Tensor | None = None  # (n_blocks,) fp32
    absmax_codes: torch.Tensor | None = None  # (n_blocks,) uint8, dynamic 8-bit code indices
    absmax_scales: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32
    absmax_mean: torch.Tensor | None = None  # () fp32
    absmax_block_size: int = ABSMAX_BLOCK_SIZE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """The first-level constants, (n_blocks,) fp32 (dequantized when double-quantized)."""
        if self.absmax is not None:
            return self.absmax
        code = dynamic_code_8bit().to(self.absmax_codes.device)
        return dequantize_blockwise(self.absmax_codes, self.absmax_scales, code, self.absmax_block_size) \
            + self.absmax_mean

    def storage_bits(self) -> int:
        """Bits stored for this weight: packed codes, constants and second-level constants."""
        parts = (self.codes, self.absmax, self.absmax_codes, self.absmax_scales, self.absmax_mean)
        return sum(t.numel() * t.element_size() * 8 for t in parts if t is not None)

    def bits_per_param(self) -> float:
        return self.storage_bits() / self.numel


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                 absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> NF4Weight:
    """Quantize a float tensor of any shape to NF4 (see the module docstring for the steps)."""
    if not w.is_floating_point():
        raise LlmlabError(f"NF4 quantizes floating-point weights, not {w.dtype}")
    if block_size <= 0 or absmax_block_size <= 0:
        raise LlmlabError(f"NF4 block sizes must be positive, got {block_size} and {absmax_block_size}")
    codes, absmax = quantize_blockwise(w.detach(), NF4_CODE, block_size)
    out = NF4Weight(pack_4bit(codes), tuple(w.shape), block_size, absmax_block_size=absmax_block_size)
    if not double_quant:
        out.absmax = absmax
        return out
    mean = absmax.mean()
    out.absmax_codes, out.absmax_scales = quantize_blockwise(absmax - mean, dynamic_code_8bit(), absmax_block_size)
    out.absmax_mean = mean
    return out


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4Weight -> the float tensor of its original shape (computed in fp32, then cast to ``dtype``)."""
    n = q.numel
    idx = unpack_4bit(q.codes, n)  # (N,)
    values = dequantize_blockwise(idx, q.block_absmax().float(), NF4_CODE, q.block_size)  # (N,) fp32
    return values.view(q.shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 and dequantized in ``forward``.

    The quantized weight lives in buffers (moved by ``.to(device)``, saved in ``state_dict``), so nothing
    here is a parameter: wrap it in a ``LoRALinear`` to train an adapter on top (QLoRA). The input is cast
    to ``compute_dtype`` (fp32 or bf16), multiplied, and the result cast back to the input's dtype;
    gradients flow to the input through the dequantized weight.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(weight.shape) != 2:
            raise LlmlabError(f"NF4Linear needs a 2-D (out, in) weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.shape = weight.shape
        self.block_size, self.absmax_block_size = weight.block_size, weight.absmax_block_size
        self.double_quant = weight.absmax is None
        self.compute_dtype = compute_dtype
        self.register_buffer("codes", weight.codes)
        if self.double_quant:
            self.register_buffer("absmax_codes", weight.absmax_codes)
            self.register_buffer("absmax_scales", weight.absmax_scales)
            self.register_buffer("absmax_mean", weight.absmax_mean)
        else:
            self.register_buffer("absmax", weight.absmax)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32,
                    block_size: int = BLOCK_SIZE, double_quant: bool = True) -> NF4Linear:
        q = quantize_nf4(linear.weight.detach(), block_size, double_quant)
        return cls(q, linear.bias, compute_dtype)

    def nf4_weight(self) -> NF4Weight:
        if self.double_quant:
            return NF4Weight(self.codes, self.shape, self.block_size, None, self.absmax_codes,
                             self.absmax_scales, self.absmax_mean, self.absmax_block_size)
        return NF4Weight(self.codes, self.shape, self.block_size, self.absmax, absmax_block_size=self.absmax_block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, (out, in), in ``dtype`` (default: the compute dtype)."""
        return dequantize_nf4(self.nf4_weight(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)  # (..., in)
        if torch.is_grad_enabled() and xc.requires_grad:
            return NF4Matmul.apply(xc, self).to(x.dtype)  # (..., out)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(xc, self.dequantize(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


class NF4Matmul(torch.autograd.Function):
    """x (..., in) in the compute dtype -> x W^T + b (..., out) for an NF4Linear's frozen W (out, in).

    Saves nothing for backward: grad_x = grad_y @ W with W dequantized again (the weight and bias are
    buffers, so they get no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer  # the module, not a tensor
        bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
        return F.linear(x, layer.dequantize(), bias)  # the dequantized W is freed on return

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        w = ctx.layer.dequantize()  # (out, in), freed when backward returns
        return grad_y.to(w.dtype) @ w, None  # (..., out) @ (out, in) -> (..., in)


def quantize_linears_nf4_(model: nn.Module, compute_dtype: torch.dtype = torch.float32,
                          skip: tuple[str, ...] = ("lm_head",), block_size: int = BLOCK_SIZE,
                          double_quant: bool = True) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` for an ``NF4Linear`` in place, except the modules named in
    ``skip`` (full module paths; the output head by default, as QLoRA does). Returns the swapped names."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name not in skip]
    for name, m in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, NF4Linear.from_linear(m, compute_dtype, block_size, double_quant))
    return [name for name, _ in targets]
