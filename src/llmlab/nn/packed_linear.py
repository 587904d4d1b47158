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


def build_kernel(src: Path = _SRC, cache_dir: Path | None = None) -> KernelBuild:
    """Compile ``src`` with the system C compiler (or reuse the cached library) and load it with ctypes.

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
        fn = ctypes.CDLL(str(lib)).ggml_gemv
    except (OSError, AttributeError) as e:
        return KernelBuild(None, f"reference path: cannot load {lib}: {e}", compiler_output=output,
                           failed=True)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
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

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.packed.reshape(-1), self.ggml_type, self.in_features * self.out_features).reshape(
            self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (M, K)
        fn = kernel() if self.impl == "kernel" and x2.device.type == "cpu" else None
        if fn is None or x2.shape[0] > GEMV_MAX_ROWS:
            y = F.linear(x2, self.dequantized().to(x2.device))
        else:
            y = torch.empty(x2.shape[0], self.out_features)
            rc = fn(self.ggml_type, x2.data_ptr(), self.packed.data_ptr(), y.data_ptr(), x2.shape[0],
                    self.out_features, self.in_features, torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"ggml_gemv failed with code {rc}")
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        names = {8: "Q8_0", 2: "Q4_0", 3: "Q4_1"}
        return f"in_features={self.in_features}, out_features={self.out_features}, {names[self.ggml_type]}"


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
