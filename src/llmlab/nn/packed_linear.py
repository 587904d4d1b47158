"""Linear layers that multiply by GGML-packed weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) without unpacking them.

Batch-1 decoding is memory-bound: every weight is read once per token. SmolLM2-135M in float32 is
540 MB a token; its GGUF's packed Q4_1 blocks are 84 MB. Three ways to multiply (``impl``), which agree
(tested):

- ``"int8"``: ``csrc/qgemm.c`` quantizes the activations once per call to Q8 blocks (32 int8
  values and a scale, as llama.cpp) and multiplies them with the weight blocks in integer arithmetic
  (vpmaddubsw on AVX2, vpdpbusd on AVX-VNNI / AVX512-VNNI, plain C elsewhere; the build is chosen from
  the CPU's features, ``nn/cpu_kernels.py``) on a copy of the blocks repacked once (``PackedLinear.repacked``:
  8 output rows interleaved, so one broadcast of 4 activation bytes feeds 8 outputs, 16 in the AVX-512 build, which
  multiplies pairs of such groups, and each unpacked weight vector serves a tile of 4 to 6 rows; the copy is as large
  as the blocks). Up to ``INT8_MAX_ROWS`` rows a call
  (batched decoding of many streams, speculative verification, chunked prefill); a longer input goes to
  dequantize + ``F.linear``. The activations' rounding moves logits slightly: one large value in a block (an
  outlier feature, Dettmers et al. 2022, arXiv:2208.07339) leaves the block's other values a few steps of its
  scale (``benchmarks/quality.py``, 1164 tokens: perplexity +0.6%, the top token the same at 97.5% of positions);
- ``"int8r"`` (the default of ``api.load`` and the CLI): the same kernel plus, for each block of activations with
  an outlier (max|x| > ``RESIDUAL_T`` mean|x|), a second Q8 block holding its rounding error, multiplied in the
  same tile with the weights already unpacked (``quantize_rows`` / ``group_tile``), so only the flagged share of
  the integer work is added and no weight is read twice: perplexity +0.1%, the top token the same at 99.4%
  (T = 4 chosen by the sweep in ``benchmarks/quality.py``; costs in ``benchmarks/int8r_cost.py``);
- ``"int8x2"``: the residual for every block, so the activations keep about 15 bits: the top token the same at
  100% of the positions, for about 1.5x int8's integer work at batch 8 and more;
- ``"float"``: ``csrc/ggml_gemv.c`` (AVX2 + FMA + F16C) expands each block to floats in registers and
  multiplies float activations: the dequantized product up to summation order, for up to
  ``GEMV_MAX_ROWS`` rows;
- ``"reference"``: dequantize + ``F.linear``, the readable definition (and the path wherever no kernel
  builds: ``kernel_status()``, shown by ``llmlab info``, says which runs and why).

Gradients (QLoRA on the GGUF's own blocks, Dettmers et al. 2023, arXiv:2305.14314): the packed weight is
a frozen buffer, but dL/dx flows through it. ``PackedMatmul`` (an autograd Function) keeps the forward's
kernel / dequantize dispatch and in backward dequantizes the blocks again, grad_x = grad_y @ W, so no
float32 copy of W stays alive between forward and backward (``F.linear`` would save it for backward).
Both directions dequantize at most ``DEQUANT_CHUNK`` weights (whole rows) at a time, so a wide layer
(a tied 49152 x 576 head) never holds its whole float32 weight and the dequantizer's temporaries.

Shapes: x (..., in) -> (..., out); packed weights (out, in / 32 * block bytes) uint8.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import log
from llmlab.nn.cpu_kernels import CSRC, KernelBuild, best_variant, build_kernel, kernel_threads
from llmlab.nn.ggml_quants import GGML_TYPES, dequantize, quantize_q8_0

BLOCK_BYTES = {8: 34, 2: 18, 3: 20, 6: 22, 7: 24}  # ggml type id -> bytes per 32 weights
FLOAT_TYPES = (8, 2, 3)  # the types the float-activation GEMV reads (Q8_0, Q4_0, Q4_1)
GEMV_MAX_ROWS = 64  # the float GEMV's limit; beyond it that impl dequantizes + F.linear
# Beyond this many rows the int8 kernel hands over to dequantize + F.linear. The repacked int8 tiles beat it at 512
# rows on both CPU kinds' builds (AVX512-VNNI machine, 1 thread: gate 576->1536 4.9 vs 17.0 ms, its avx2 build 6.3 ms;
# benchmarks/int8_kernels.py).
INT8_MAX_ROWS = 512
DEQUANT_CHUNK = 1 << 21  # weights dequantized at once by the F.linear path (8 MB of float32 temporaries)
IMPLS = ("int8r", "int8", "int8x2", "float", "reference")
# A block of activations gets a residual Q8 block (int8r) when max|x| > RESIDUAL_T * mean|x| (benchmarks/quality.py)
RESIDUAL_T = 4.0
# the integer impls -> qgemm.c quantize_rows' ``resid``: no residual blocks, one for every block, or for the flagged
ACT_RESIDUAL = {"int8": -1.0, "int8x2": 0.0, "int8r": RESIDUAL_T}

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# qlinear(kind, x, w, y, M, N, K, nthreads) and ggml_gemv(...): the same signature
LINEAR_ARGTYPES = [ctypes.c_int, _PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int]
# qlinear_repacked(kind, x, w, y, M, N, K, nthreads, resid)
REPACKED_ARGTYPES = LINEAR_ARGTYPES + [ctypes.c_float]
REPACK_ARGTYPES = [ctypes.c_int, _PTR, _I64, _I64, _PTR]  # qrepack(kind, w, N, K, out)


@cache
def kernel_build(impl: str = "int8") -> KernelBuild:
    """The kernel of ``impl`` in this process, built once (``"int8"`` for both integer impls). A failed compile is
    warned about once, in one line."""
    if impl in ACT_RESIDUAL:
        build = build_kernel(CSRC / "qgemm.c", "qlinear", LINEAR_ARGTYPES, best_variant())
        if build.fn is not None:
            build.lib.qlinear_repacked.restype, build.lib.qlinear_repacked.argtypes = ctypes.c_int, REPACKED_ARGTYPES
            build.lib.qrepack.restype, build.lib.qrepack.argtypes = ctypes.c_int, REPACK_ARGTYPES
            build.lib.qrepack_bytes.restype, build.lib.qrepack_bytes.argtypes = _I64, [ctypes.c_int, _I64, _I64]
    else:
        build = build_kernel(CSRC / "ggml_gemv.c", "ggml_gemv", LINEAR_ARGTYPES, "avx2")
    if build.failed:
        log.warning("llmlab: the packed-weight %s kernel is unavailable, %s", impl, build.status)
    return build


def kernel(impl: str = "int8"):
    """The compiled kernel of ``impl`` (ctypes function), or None when it cannot be built or run here."""
    return kernel_build("int8" if impl in ACT_RESIDUAL else impl).fn if impl != "reference" else None


def kernel_status() -> str:
    """One line: which kernel variant runs packed linears on this machine, or why none does."""
    return f"int8: {kernel_build('int8').status}; float: {kernel_build('float').status}"


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's in-place write counter (-1 for an inference tensor, which has none)."""
    return -1 if t.is_inference() else t._version


class PackedMatmul(torch.autograd.Function):
    """x2 (M, K) float32 -> x2 @ W^T (M, N) for a PackedLinear's frozen packed W (out N, in K).

    Only the input gets a gradient: grad_x = grad_y @ W (M, K), with W dequantized again in backward
    instead of saved, so a training step holds at most one layer's float32 W at a time."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer  # the module, not a tensor: nothing is saved for backward
        return layer.matmul(x2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        layer = ctx.layer
        grad_y = grad_y.float()  # (M, N)
        grad_x = None
        for lo, hi in layer.row_chunks():
            w = layer.dequantized(lo, hi).to(grad_y.device)  # (hi - lo, K), freed each chunk
            part = grad_y[:, lo:hi] @ w  # (M, K)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


class PackedLinear(nn.Module):
    def __init__(self, packed: torch.Tensor, ggml_type: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, impl: str = "int8"):
        super().__init__()
        if ggml_type not in BLOCK_BYTES or in_features % 32:
            raise ValueError(f"cannot pack type {ggml_type} with in_features={in_features}")
        if impl not in IMPLS:
            raise ValueError(f"PackedLinear impl must be one of {IMPLS}, got {impl!r}")
        row_bytes = in_features // 32 * BLOCK_BYTES[ggml_type]
        self.register_buffer("packed", packed.reshape(out_features, row_bytes).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.ggml_type, self.in_features, self.out_features = ggml_type, in_features, out_features
        self.impl = impl
        self.dense: torch.Tensor | None = None  # float32 weight kept by keep_dense_ for many-row products
        self.dense_min_rows = 0
        # (packed's (pointer, version), the build's variant), copy
        self._repacked: tuple[tuple[int, int, str], torch.Tensor] | None = None

    def repacked(self) -> torch.Tensor:
        """The int8 kernel's copy of the blocks, 8 output rows interleaved (``csrc/qgemm.c`` qrepack: the same
        bytes, permuted; the AVX-512 build pairs groups of 8 rows, so each build repacks its own), made on first use
        and again whenever ``packed`` is replaced or written in place (its version counter) or the kernel build
        changes. Needs the int8 kernel (``kernel("int8")`` not None)."""
        build = kernel_build("int8")
        key = (self.packed.data_ptr(), tensor_version(self.packed), build.variant)
        if self._repacked is None or self._repacked[0] != key:
            lib = build.lib
            out = torch.empty(lib.qrepack_bytes(self.ggml_type, self.out_features, self.in_features), dtype=torch.uint8)
            rc = lib.qrepack(self.ggml_type, self.packed.data_ptr(), self.out_features, self.in_features,
                             out.data_ptr())
            if rc != 0:
                raise RuntimeError(f"qrepack failed with code {rc}")
            self._repacked = (key, out)
        return self._repacked[1]

    def dequantized(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) of the weight (default all), (hi - lo, in) float32."""
        hi = self.out_features if hi is None else hi
        return dequantize(self.packed[lo:hi].reshape(-1), self.ggml_type, self.in_features * (hi - lo)).reshape(
            hi - lo, self.in_features)

    def row_chunks(self) -> list[tuple[int, int]]:
        """[lo, hi) row ranges of at most DEQUANT_CHUNK weights each (one range for most layers)."""
        step = max(1, DEQUANT_CHUNK // self.in_features)
        return [(lo, min(lo + step, self.out_features)) for lo in range(0, self.out_features, step)]

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) float32 contiguous -> (M, N) without bias: the C kernel of ``impl`` on CPU where it runs
        (the float GEMV for <= GEMV_MAX_ROWS rows), else dequantize + ``F.linear``. No autograd here."""
        if self.dense is not None and x2.shape[0] >= self.dense_min_rows:
            return F.linear(x2, self.dense)
        fn = kernel(self.impl) if self.impl != "reference" and x2.device.type == "cpu" else None
        if self.impl == "float" and (x2.shape[0] > GEMV_MAX_ROWS or self.ggml_type not in FLOAT_TYPES):
            fn = None
        if self.impl in ACT_RESIDUAL and x2.shape[0] > INT8_MAX_ROWS:
            fn = None
        if fn is None:
            chunks = self.row_chunks()
            if len(chunks) == 1:
                return F.linear(x2, self.dequantized().to(x2.device))
            y = torch.empty(x2.shape[0], self.out_features, device=x2.device)  # (M, N)
            for lo, hi in chunks:
                y[:, lo:hi] = F.linear(x2, self.dequantized(lo, hi).to(x2.device))
            return y
        y = torch.empty(x2.shape[0], self.out_features)
        w = self.packed
        args = (x2.shape[0], self.out_features, self.in_features, kernel_threads())
        if self.impl in ACT_RESIDUAL:  # the kernel reads the interleaved copy
            fn, w = kernel_build("int8").lib.qlinear_repacked, self.repacked()
            args += (ACT_RESIDUAL[self.impl],)
        rc = fn(self.ggml_type, x2.data_ptr(), w.data_ptr(), y.data_ptr(), *args)
        if rc != 0:
            raise RuntimeError(f"packed {self.impl} kernel failed with code {rc}")
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (M, K)
        if torch.is_grad_enabled() and x2.requires_grad:
            y = PackedMatmul.apply(x2, self)  # (M, N), gradient to x through the frozen blocks
        else:
            y = self.matmul(x2)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{GGML_TYPES[self.ggml_type][0]}, impl={self.impl}")


def set_impl_(model: nn.Module, impl: str) -> nn.Module:
    """Switch every PackedLinear of ``model`` to ``impl`` (one of IMPLS)."""
    if impl not in IMPLS:
        raise ValueError(f"PackedLinear impl must be one of {IMPLS}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.impl = impl
    return model


def keep_dense_(model: nn.Module, min_rows: int = 8) -> nn.Module:
    """Keep a float32 copy of every packed weight and multiply by it when a product has ``min_rows`` rows or
    more. The packed GEMV wins while few rows share each weight read (decoding one or a few sequences is
    memory-bound); a float32 GEMM wins once many rows do (a serving step over many sequences, prefill),
    and dequantizing per call would cost more than the product. Memory: 4 bytes per weight on top of the
    blocks. The two paths agree up to summation order and the blocks' rounding (``tests/test_packed.py``)."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.dense, m.dense_min_rows = m.dequantized(), min_rows
    return model


def pack_linears_q8_0_(model: nn.Module, impl: str = "int8") -> nn.Module:
    """Quantize every ``nn.Linear`` whose input size is a multiple of 32 to Q8_0 (weight-only, one f16
    scale per 32 weights, round-half-away like llama.cpp) and swap in a PackedLinear. For models that
    do not come from a packed GGUF file; a tied ``lm_head`` gets its own packed copy."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % 32 == 0:
                packed = quantize_q8_0(child.weight.detach().float().cpu())
                setattr(module, name, PackedLinear(packed, 8, child.in_features, child.out_features,
                                                   child.bias, impl))
    return model
