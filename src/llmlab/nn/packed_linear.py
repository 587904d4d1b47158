"""Linear layers that multiply by GGML-packed weights (Q8_0, Q4_0, Q4_1) without unpacking them in memory.

Batch-1 decoding is memory-bound: every weight is read once per token. SmolLM2-135M in float32 is
540 MB a token; its GGUF's packed Q4_1 blocks are 84 MB. ``csrc/ggml_gemv.c`` (AVX2 + FMA + F16C,
OpenMP over rows) expands each 32-weight block in registers and multiplies it with float32 activations,
so the result equals the dequantized float32 product up to summation order (tested). It is compiled
with the system C compiler on first use (~0.5 s) into ~/.cache/llmlab and called through ctypes.

For many rows at once (prefill, M > ``GEMV_MAX_ROWS``) arithmetic dominates, so the block is
dequantized and multiplied with ``F.linear``: that is also the reference path (``impl="reference"``;
``impl="kernel"``, the default, uses the C GEMV where it can).
Where no compiler or AVX2 is available, the reference path is used; ``kernel_status()`` (shown by
``llmlab info``) says which ran, and a failed compile is warned about once with the compiler's message.

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
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import log
from llmlab.nn.ggml_quants import dequantize, quantize_q8_0

_SRC = Path(__file__).with_name("csrc") / "ggml_gemv.c"
BLOCK_BYTES = {8: 34, 2: 18, 3: 20}  # ggml type id -> bytes per 32 weights (Q8_0, Q4_0, Q4_1)
GEMV_MAX_ROWS = 64  # the kernel's limit; beyond it (prefill) dequantize + F.linear
DEQUANT_CHUNK = 1 << 21  # weights dequantized at once by the F.linear path (8 MB of float32 temporaries)
IMPLS = ("kernel", "reference")  # the C GEMV on packed blocks | dequantize + F.linear


VARIANT = "avx2-fma-f16c"  # the one build of the C kernel; the name tests and ``llmlab info`` report


def cpu_has_avx2() -> bool:
    """True where the CPU reports AVX2, FMA and F16C (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@dataclass(frozen=True)
class KernelBuild:
    """The outcome of building the C kernel: the function, or ``None`` and the reason in ``status``."""

    fn: Callable[..., int] | None
    status: str  # one line: which variant runs, or why none does (with the compiler's message)
    variant: str | None = None
    compiler_output: str = ""
    failed: bool = False  # compiler and CPU were there, yet no kernel: a bug to report, not a missing tool


# ggml_gemv(kind, x, w, y, M, N, K, nthreads)
_GEMV_ARGTYPES = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int]


def build_kernel(src: Path = _SRC, cache_dir: Path | None = None, symbol: str = "ggml_gemv",
                 argtypes: list | None = None) -> KernelBuild:
    """Compile ``src`` with the system C compiler (or reuse the cached library) and load ``symbol`` (an
    ``int``-returning function taking ``argtypes``, default ggml_gemv's) from it with ctypes. Other
    kernels (``nn/paged_decode.py``) reuse this with their own source, symbol and argtypes.

    Never raises: a missing compiler or CPU feature, a failed compile or a failed load give a KernelBuild
    without a function whose ``status`` says why, keeping the compiler's own message."""
    cc = find_compiler()
    if cc is None:
        return KernelBuild(None, "reference path: no C compiler found (set CC or install gcc)")
    if not cpu_has_avx2():
        return KernelBuild(None, "reference path: this CPU lacks AVX2/FMA/F16C")
    code = src.read_bytes()
    tag = hashlib.sha256(code).hexdigest()[:16]
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmlab" / "kernels"
    lib = cache_dir / f"{src.stem}-{tag}.so"
    output = ""
    if not lib.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
        os.close(fd)
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-o", tmp, str(src)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            done = subprocess.CompletedProcess(cmd, 1, "", str(e))
        output = (done.stderr or done.stdout).strip()
        if done.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            return KernelBuild(None, f"reference path: {Path(cc).name} failed to compile {src.name}: "
                                     f"{_first_error(output)}", compiler_output=output, failed=True)
        os.replace(tmp, lib)
    try:
        fn = getattr(ctypes.CDLL(str(lib)), symbol)
    except (OSError, AttributeError) as e:
        return KernelBuild(None, f"reference path: cannot load {lib}: {e}", compiler_output=output,
                           failed=True)
    fn.restype = ctypes.c_int
    fn.argtypes = _GEMV_ARGTYPES if argtypes is None else argtypes
    return KernelBuild(fn, f"C kernel {VARIANT} ({lib})", VARIANT, output)


def _first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no message"])[0][:300]


@lru_cache(maxsize=1)
def kernel_build() -> KernelBuild:
    """The kernel of this process, built once. A failed compile is warned about once, in one line."""
    build = build_kernel()
    if build.failed:
        log.warning("llmlab: the packed-weight C kernel is unavailable, %s", build.status)
    return build


def kernel():
    """The compiled kernel (ctypes function), or None when it cannot be built or run here."""
    return kernel_build().fn


def kernel_status() -> str:
    """One line: which kernel variant runs packed linears on this machine, or why none does."""
    return kernel_build().status


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
                 bias: torch.Tensor | None = None, impl: str = "kernel"):
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
        """x2 (M, K) float32 contiguous -> (M, N) without bias: the C GEMV for <= GEMV_MAX_ROWS rows on CPU,
        else (or with ``impl="reference"``) dequantize + ``F.linear``. No autograd here."""
        if self.dense is not None and x2.shape[0] >= self.dense_min_rows:
            return F.linear(x2, self.dense)
        fn = kernel() if self.impl == "kernel" and x2.device.type == "cpu" else None
        if fn is None or x2.shape[0] > GEMV_MAX_ROWS:
            chunks = self.row_chunks()
            if len(chunks) == 1:
                return F.linear(x2, self.dequantized().to(x2.device))
            y = torch.empty(x2.shape[0], self.out_features, device=x2.device)  # (M, N)
            for lo, hi in chunks:
                y[:, lo:hi] = F.linear(x2, self.dequantized(lo, hi).to(x2.device))
            return y
        y = torch.empty(x2.shape[0], self.out_features)
        rc = fn(self.ggml_type, x2.data_ptr(), self.packed.data_ptr(), y.data_ptr(), x2.shape[0],
                self.out_features, self.in_features, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"ggml_gemv failed with code {rc}")
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
        names = {8: "Q8_0", 2: "Q4_0", 3: "Q4_1"}
        return f"in_features={self.in_features}, out_features={self.out_features}, {names[self.ggml_type]}"


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


def pack_linears_q8_0_(model: nn.Module, impl: str = "kernel") -> nn.Module:
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
