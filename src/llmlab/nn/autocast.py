"""Mixed-precision autocast, with an emulated path for CPUs that have no bf16/fp16 matmul units.

``torch.autocast`` runs matrix products in bf16/fp16 (Micikevicius et al. 2018, arXiv:1710.03740;
bf16: Kalamkar et al. 2019, arXiv:1905.12322). On CPUs without AVX512-BF16/AMX (e.g. AVX2-only
machines) oneDNN then falls back to slow code: measured on the project's 2-core AVX2 machines, a
2048x384 @ 384x1536 bf16 product took 133 ms against 17 ms in fp32, and the 50304-wide LM-head
input gradient 69 s against 0.43 s.

A bf16 x bf16 product is exact in fp32, and bf16 kernels accumulate in fp32, so the same numbers come
from fp32 units: round both operands to bf16, multiply in fp32, round the result to bf16. That is what
``EmulatedAutocast`` does (a ``TorchFunctionMode`` around the ops ``torch.autocast`` lowers: linear,
matmul, mm, bmm, addmm, baddbmm, scaled-dot-product attention); the rounding is differentiable, so
gradients flowing through these ops are rounded the same way. Storage stays fp32 and elementwise ops
run in fp32 on bf16-valued inputs (real autocast runs some of them in bf16), so results agree with
``torch.autocast`` to bf16 precision (tested), not bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@functools.cache
def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has bf16 / fp16 matmul support in oneDNN (AVX512-BF16, AMX, AVX512-FP16)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown build: trust torch.autocast
    return True


_ACTIVE = threading.local()  # .modes: the EmulatedAutocast contexts entered on this thread, innermost last


def active_emulation() -> EmulatedAutocast | None:
    """The innermost EmulatedAutocast entered on this thread and not paused, or None."""
    modes = getattr(_ACTIVE, "modes", [])
    return modes[-1] if modes and not modes[-1].paused else None


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back: the value a ``dtype`` kernel would see or produce."""
    return x.to(dtype).to(x.dtype)


def _round(x, dtype: torch.dtype):
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x.to(dtype).to(torch.float32)
    return x


class EmulatedAutocast(TorchFunctionMode):
    LOWERED = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
               torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm,
               F.scaled_dot_product_attention}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.paused = False

    def __enter__(self):
        _ACTIVE.__dict__.setdefault("modes", []).append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.modes.pop()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def pause(self):
        """Matmuls pass through unrounded inside: for code that rounds its operands itself, once, rather than
        once per product (``nn/linear_ce.py`` reuses one rounded gradient in two products)."""
        self.paused, was = True, self.paused
        try:
            yield
        finally:
            self.paused = was

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or func not in self.LOWERED:
            return func(*args, **kwargs)
        args = tuple(_round(a, self.dtype) for a in args)
        kwargs = {k: _round(v, self.dtype) for k, v in kwargs.items()}
        return _round(func(*args, **kwargs), self.dtype)


def autocast(device: torch.device, dtype: str | torch.dtype, emulate: bool | None = None):
    """A context for mixed precision: ``torch.autocast`` where the hardware has the dtype's matmul
    units, the emulated path on CPUs without them (``emulate=None`` decides), nothing for float32."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if emulate is None:
        emulate = device.type == "cpu" and not cpu_has_native(dtype)
    return EmulatedAutocast(dtype) if emulate else torch.autocast(device.type, dtype=dtype)


class UpcastMatmuls(TorchFunctionMode):
    """Inference with bf16/fp16 weights on a CPU without their matmul units: the matrix products run on fp32
    units (operands converted up, exact for bf16/fp16 values; the result rounded back), everything else stays
    as it is. For compute-bound calls (a prefill): measured on the 2-core AVX2 machine, a 128-token SmolLM2
    prefill in bf16 took 1.72 s against 0.46 s in fp32. Decode steps are memory-bound and faster in native
    bf16 (20.7 vs 14.0 tok/s), so ``generate`` uses this around the prompt only."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in EmulatedAutocast.LOWERED:
            return func(*args, **kwargs)

        def up(x):
            return x.float() if isinstance(x, torch.Tensor) and x.dtype == self.dtype else x

        out = func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
        return out.to(self.dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def upcast_matmuls(device: torch.device, dtype: torch.dtype):
    """UpcastMatmuls where ``dtype`` is bf16/fp16 on a CPU without its matmul units, else nothing."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native(dtype):
        return UpcastMatmuls(dtype)
    return contextlib.nullcontext()
