"""Integer-quantized linear layers: b-bit weight codes with scales per tensor, per output channel or per
group of input columns, and optionally quantized activations (W8A8) or LLM.int8()'s outlier decomposition.

One module holds what every post-training method here produces (``llmlab.compress``: absmax, zero-point,
round-to-nearest, GPTQ, LLM.int8(), SmoothQuant, ZeroQuant), so saving, loading and the fast path are written
once:

    symmetric   w = s * q            q signed, in [-2^(b-1), 2^(b-1) - 1]   (int8 ``qweight``, no zeros)
    asymmetric  w = s * (q - z)      q, z unsigned, in [0, 2^b - 1]       (uint8 ``qweight`` and ``zeros``)

``scales`` / ``zeros`` are (N, K / group) (per channel: (N, 1); per tensor: (1, 1)). Scales are float16
where the layer can run on the packed GGML kernels (``to_packed``: the codes become Q4_0 / Q4_1 / Q5_0 /
Q5_1 / Q8_0 blocks with the same values, llama.cpp's layouts) and float32 otherwise.

Activations (``act``):
- ``"none"``: weight-only; the product is x @ dequantized(W)^T.
- ``"token"``: each token's activations quantized to ``act_bits`` with its own absmax scale before the product
  (W8A8 with per-token dynamic activations: SmoothQuant, Xiao et al. 2022, arXiv:2211.10438; ZeroQuant,
  Yao et al. 2022, arXiv:2206.01861). Simulated: the integer codes times their scales, multiplied in float
  (the integer product is exact up to float32 summation), as the SmoothQuant repository evaluates W8A8.
- ``"llm-int8"``: LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339): input columns holding any value with
  |x| >= ``threshold`` are multiplied in float with the dequantized weight columns; the rest of x is
  quantized per token (absmax after zeroing the outliers) and multiplied with the int8 weights. The same
  arithmetic as bitsandbytes' reference ops (tested against them).

Shapes: x (..., K) -> (..., N); qweight (N, K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTS = ("none", "token", "llm-int8")


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, K / group, group): the rows of each quantization group. ``group_size`` 0 = per channel,
    -1 = per tensor ((1, 1, N * K))."""
    n, k = w.shape
    if group_size == -1:
        return w.reshape(1, 1, n * k)
    g = k if group_size == 0 else group_size
    if k % g:
        raise ValueError(f"group size {g} does not divide the layer's {k} input features")
    return w.reshape(n, k // g, g)


def expand_groups(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per-group (rows, groups) scales or zeros -> (n, k), each group's value repeated over its columns."""
    rows, groups = t.shape
    return t.repeat_interleave(k // groups, dim=1).expand(n, k)


def minmax_grid(x: torch.Tensor, bits: int, symmetric: bool, scale_dtype=torch.float32):
    """The uniform grid of GPTQ's reference quantizer (Frantar et al. 2022, arXiv:2210.17323) for the groups
    x (..., n): the range [min(x, 0), max(x, 0)], symmetric about 0 when asked, mapped onto 0 .. 2^b - 1.
    Returns (scale, zero) of shape (...): scale rounded to ``scale_dtype`` first, so codes are computed with
    the scale that is stored. Symmetric grids put zero at 2^(b-1)."""
    maxq = 2 ** bits - 1
    lo = x.amin(dim=-1).clamp(max=0)
    hi = x.amax(dim=-1).clamp(min=0)
    if symmetric:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    both0 = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both0, -1.0, lo), torch.where(both0, 1.0, hi)
    scale = ((hi - lo) / maxq).to(scale_dtype).float()
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-lo / scale)
    return scale, zero


def quantize_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x (..., n) with scale, zero (...,) -> unsigned codes clamp(round(x / s) + z, 0, 2^b - 1), as float."""
    return torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1)


def absmax_scale(x: torch.Tensor, bits: int, scale_dtype=torch.float32) -> torch.Tensor:
    """Absmax (symmetric, zero-free) scale of the groups x (..., n): max|x| / (2^(b-1) - 1); an all-zero group
    gets scale 1 (its codes are 0 either way)."""
    amax = x.abs().amax(dim=-1)
    scale = (amax / (2 ** (bits - 1) - 1)).to(scale_dtype).float()
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_tokens(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token dynamic fake quantization (SmoothQuant's W8A8 evaluation): x (..., K) rounded onto the grid
    absmax / (2^(b-1) - 1) of its own row and scaled back."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


class QuantLinear(nn.Module):
    """A frozen linear layer over integer codes (module docstring). Build with ``from_codes`` or the methods
    of ``llmlab.compress``."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, bias: torch.Tensor | None = None, act: str = "none", act_bits: int = 8,
                 threshold: float = 6.0):
        super().__init__()
        n, k = qweight.shape
        if not 2 <= bits <= 8:
            raise ValueError(f"QuantLinear bits must be 2..8, got {bits}")
        if act not in ACTS:
            raise ValueError(f"QuantLinear act must be one of {ACTS}, got {act!r}")
        group_view(torch.empty(n, k, device="meta"), group_size)  # validates the group size
        self.register_buffer("qweight", qweight.to(torch.int8 if zeros is None else torch.uint8).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zeros", None if zeros is None else zeros.to(torch.uint8).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.in_features, self.out_features = k, n
        self.bits, self.group_size, self.act, self.act_bits, self.threshold = bits, group_size, act, act_bits, threshold
        self.last_outliers = 0  # LLM.int8(): outlier columns in the latest call (reported per layer)
        self.dense: tuple[torch.Tensor, torch.Tensor | None] | None = None  # keep_dense_: (weight, float codes)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   group_size: int, symmetric: bool, bias=None, **act) -> QuantLinear:
        """Unsigned grid codes (N, K) with scale / zero (rows, groups) from ``minmax_grid`` (``zero`` None for
        absmax codes that are already signed) -> the layer; symmetric codes are stored signed (q - z)."""
        if zero is not None and symmetric:
            codes = codes - expand_groups(zero, *codes.shape)
            zero = None
        return cls(codes.round().to(torch.int16).to(torch.int8 if zero is None else torch.uint8), scale,
                   zero, bits, group_size, bias, **act)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def train_scales_(self) -> QuantLinear:
        """Make ``scales`` a float32 parameter (PEQA, Kim et al. 2023, arXiv:2305.14152: the integer codes stay
        frozen, the scales learn); gradients reach it through ``dequantized``."""
        scales = self.scales.detach().float().clone()
        del self.scales
        self.scales = nn.Parameter(scales)
        self.scales.no_weight_decay = True  # train/optim.param_groups: AdamW must not shrink the scales
        self.dense = None
        return self

    def keep_dense_(self) -> QuantLinear:
        """Inference on a layer no GGML block type holds (8-bit asymmetric codes, W8A8, LLM.int8()): keep the
        dequantized float32 weight (and, for LLM.int8(), the codes as float) instead of dequantizing in every
        call, at 4 (8) more bytes per weight. The outputs are the same; ``load(..., packed=True)`` does this for
        the layers it cannot pack. Dropped by ``train_scales_`` / ``freeze_scales_``; ``.to()`` moves it."""
        self.dense = (self.dequantized(), self.qweight.float() if self.act == "llm-int8" else None)
        return self

    def freeze_scales_(self, dtype: torch.dtype = torch.float16) -> QuantLinear:
        """Back to a frozen ``scales`` buffer in ``dtype`` (float16 keeps the layer packable)."""
        self.dense = None
        scales = self.scales.detach().to(dtype).clone()
        del self.scales
        self.register_buffer("scales", scales)
        return self

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` moves the codes, scales and zeros but keeps their dtypes: float16 scales are part of the
        format (they make the layer packable), and a bfloat16 model must not round them."""
        dtypes = {n: b.dtype for n, b in self._buffers.items() if b is not None}
        out = super()._apply(fn, recurse)
        for n, dt in dtypes.items():
            if self._buffers[n].dtype != dt:
                self._buffers[n] = self._buffers[n].to(dt)
        if self.dense is not None:  # float32 stays float32; it follows the codes' device
            self.dense = tuple(None if t is None else t.to(self.qweight.device) for t in self.dense)
        return out

    def dequantized(self) -> torch.Tensor:
        """(N, K) float32 weight."""
        n, k = self.out_features, self.in_features
        q = self.qweight.float()
        if self.zeros is not None:
            q = q - expand_groups(self.zeros.float(), n, k)
        return q * expand_groups(self.scales.float(), n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        w = self.dense[0] if self.dense is not None else self.dequantized()  # (N, K)
        if self.act == "token":
            y = F.linear(quantize_tokens(x2, self.act_bits), w)
        elif self.act == "llm-int8":
            y = self._llm_int8(x2, w)
        else:
            y = F.linear(x2, w)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def _llm_int8(self, x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # threshold 0 turns the decomposition off, as in bitsandbytes (outliers only when threshold > 0)
        outliers = (x2.abs() >= self.threshold) if self.threshold > 0 else torch.zeros_like(x2, dtype=torch.bool)
        cols = outliers.any(dim=0).nonzero().flatten()  # (n_outlier_columns,)
        self.last_outliers = int(cols.numel())
        inliers = x2.masked_fill(outliers, 0.0)
        row = inliers.abs().amax(dim=1, keepdim=True)  # (M, 1) absmax without the outliers
        q = torch.round(inliers * (127.0 / row)).nan_to_num(0.0)  # an all-zero row has codes 0
        if x2.shape[0] > 1:
            q[:, cols] = 0.0
        # integer product (exact as float up to 2^24) scaled by both absmaxes, as bitsandbytes' int8_mm_dequant
        codes = self.dense[1] if self.dense is not None else self.qweight.float()  # (N, K)
        y = (q @ codes.t()) * (row * self.scales.float().reshape(1, -1) / 127.0)
        if cols.numel():
            y = y + x2[:, cols] @ w[:, cols].t()
        return y

    def packed_type(self) -> str | None:
        """The GGML block type with exactly this layer's values, or None (activation quantization, a group
        that is not whole 32-blocks, 6-8-bit asymmetric codes)."""
        if self.act != "none" or self.in_features % 32:
            return None
        if self.group_size > 0 and self.group_size % 32:
            return None
        if self.symmetric:
            return "Q4_0" if self.bits <= 4 else "Q5_0" if self.bits == 5 else "Q8_0"
        return "Q4_1" if self.bits <= 4 else "Q5_1" if self.bits == 5 else None

    def packed_blocks(self) -> tuple[torch.Tensor, str] | None:
        """(GGML block bytes (N, K / 32 * block bytes) uint8, type name), or None (see ``packed_type``).
        Symmetric codes are exact (scales are float16 already); an asymmetric block's min, -s * z, is rounded to
        float16 (at most 2^-11 of it: ``tests/test_quant_linear.py`` bounds the difference)."""
        from llmlab.nn.ggml_quants import pack_blocks

        name = self.packed_type()
        if name is None or self.scales.dtype != torch.float16:
            return None
        n, k = self.out_features, self.in_features
        per_block = lambda t: expand_groups(t.float(), n, k)[:, ::32].reshape(-1)  # noqa: E731  (N * K/32,)
        q = self.qweight.long().reshape(-1, 32)  # (N * K / 32, 32)
        d = per_block(self.scales)
        if self.symmetric:
            offset = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}[name]
            raw = pack_blocks(name, q + offset, d.half())
        else:
            raw = pack_blocks(name, q, d.half(), (-d * per_block(self.zeros)).half())  # min m = -s * z
        return raw.reshape(n, -1), name

    def extra_repr(self) -> str:
        group = {0: "per channel", -1: "per tensor"}.get(self.group_size, f"group {self.group_size}")
        act = "" if self.act == "none" else f", act={self.act}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, {group}{act}")
