"""Model FLOPs utilisation (MFU) against the peak of the matmul units a run really uses.

MFU = achieved model FLOP/s / peak FLOP/s (Chowdhery et al. 2022, PaLM, arXiv:2204.02311, appendix B), with
model FLOPs per token = 6 N + 12 L T d (N the parameters doing matmul work, L layers, T context, d width;
Kaplan et al. 2020, arXiv:2001.08361). The peak must be the one of the arithmetic the run used: dividing a bf16
run on AVX512-BF16 / AMX units by an fp32 matmul peak gave "MFU 126%" on one of this project's machines.

=====================  ===========================================  =========================================
run                    machine                                      peak measured with
=====================  ===========================================  =========================================
float32                any                                          float32 matmuls
bf16 / fp16 autocast   CPU with the dtype's units (oneDNN reports   matmuls in that dtype (``torch.autocast``)
                       them: AVX512-BF16, AMX, AVX512-FP16)
bf16 / fp16 autocast   CPU without them (AVX2-only)                 float32 matmuls: llmlab's emulated autocast
                                                                    (``nn/autocast.py``) runs on fp32 units
bf16 / fp16 autocast   CUDA                                         matmuls in that dtype
=====================  ===========================================  =========================================

A peer that runs real bf16 kernels on a CPU without bf16 units (``torch.autocast`` there) is still divided by
the machine's best peak for that run's dtype path, which is what the hardware could have given it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llmlab.models.config import ModelConfig
from llmlab.nn.autocast import cpu_has_native


@dataclass(frozen=True)
class MatmulPath:
    """Which arithmetic a run's matrix products use: ``dtype`` on ``device``; ``label`` says why."""
    dtype: torch.dtype
    label: str


def matmul_path(device: torch.device, autocast_dtype: torch.dtype) -> MatmulPath:
    """The units a training run with ``autocast_dtype`` (float32 = none) uses for its matmuls."""
    name = str(autocast_dtype).removeprefix("torch.")
    if autocast_dtype == torch.float32:
        return MatmulPath(torch.float32, "float32 matmuls")
    if device.type != "cpu":
        return MatmulPath(autocast_dtype, f"{name} matmuls on {device.type}")
    if cpu_has_native(autocast_dtype):
        return MatmulPath(autocast_dtype, f"{name} matmuls (this CPU has {name} units)")
    return MatmulPath(torch.float32, f"float32 matmuls ({name} emulated on fp32 units: the CPU has no {name} units)")


def measure_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] | None = None,
                 repeats: int = 5) -> float:
    """The best matmul rate (FLOP/s) of square ``dtype`` products on ``device``, over ``sizes`` and ``repeats``
    (the maximum, since a peak is what the units can do, not what they usually do). On a GPU the products are
    larger (4096, 8192) and timed ten at a time: one 2048-wide product takes ~20 us on an H100, about what a
    launch and a synchronisation cost, which would understate the peak and overstate the MFU."""
    cpu = device.type == "cpu"
    sizes = sizes or ((1024, 2048) if cpu else (4096, 8192))
    inner = 1 if cpu else 10
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            for _ in range(inner):
                a @ b
            _sync(device)
            best = max(best, inner * 2 * n**3 / (time.perf_counter() - t))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N + 12 L T d: forward + backward FLOPs per trained token of a dense model. N leaves out what is looked
    up rather than multiplied: learned position embeddings, and the token embedding unless it is tied to the
    output head."""
    if cfg.n_experts:
        raise ValueError("flops_per_token counts dense models; a mixture of experts uses a share of its experts")
    n = cfg.num_params() - (0 if cfg.arch == "llama" else cfg.max_seq_len * cfg.dim)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim
    return 6 * n + 12 * cfg.n_layers * seq_len * cfg.dim


def mfu(tokens_per_s: float, flops_token: float, peak: float) -> float:
    """Achieved / peak, as a fraction. Above 1 means the peak was measured on the wrong units: an error."""
    if peak <= 0:
        raise ValueError(f"peak must be positive, got {peak}")
    value = tokens_per_s * flops_token / peak
    if value > 1.0:
        raise ValueError(f"MFU {100 * value:.1f}% is above 100%: the peak ({peak / 1e9:.0f} GFLOP/s) was not "
                         "measured on the units the run used")
    return value
