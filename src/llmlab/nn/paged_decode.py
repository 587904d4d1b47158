"""The C kernel for paged decode attention: one new query per sequence against its cache, read in place
from the block pool (PagedAttention: Kwon et al. 2023, arXiv:2309.06180).

``paged_decode_reference`` (``nn/paged_attention.py``) gathers every sequence's blocks into a padded
(n, H_kv, S, D) copy and masks the padding: per decode step that copies the whole cache of the batch.
``csrc/paged_decode.c`` walks each sequence's block table instead, so it reads each cached key and value
once and writes nothing but the output. Per (sequence, kv head) pair it scores the H / H_kv query heads
that share the kv head against each key loaded once (AVX2/FMA), and keeps an online softmax (running
max and sum, rescaled when the max grows: Milakov & Gimelshein 2018, arXiv:1805.02867) so no score row
is stored; the kernels' thread pool (csrc/pool.h) spreads the pairs over threads. It equals the reference up
to float32 summation order (tested in ``tests/test_paged_decode.py``).

Built like ``nn/packed_linear.py``'s GEMV (system C compiler on first use, library cached by source hash,
called through ctypes); where it cannot be built, ``paged_decode_kernel()`` is None and
``paged_decode_status()`` says why in one line.

Shapes: q (n, H, D) float32; k_layer, v_layer (n_blocks, H_kv, bs, D) float32 (one layer of the pool);
tables (n, max_blocks) int32, entries past a sequence's ctx_len ignored; ctx_lens (n,) int32
-> (n, H, D) float32. Anything else (another dtype or device, a non-contiguous tensor, autograd) goes to
the reference.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from llmlab.common import log
from llmlab.nn.cpu_kernels import KernelBuild, build_kernel, kernel_threads
from llmlab.nn.paged_attention import paged_decode_reference

_SRC = Path(__file__).with_name("csrc") / "paged_decode.c"
# paged_decode(q, k, v, tables, ctx_lens, out, n, H, Hkv, D, bs, n_blocks, max_blocks, scale, nthreads)
ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]


def build(src: Path = _SRC, cache_dir: Path | None = None) -> KernelBuild:
    """Compile (or reuse) ``src`` and load its ``paged_decode``; never raises (see ``build_kernel``)."""
    return build_kernel(src, "paged_decode", ARGTYPES, "avx2", cache_dir)


@lru_cache(maxsize=1)
def kernel_build() -> KernelBuild:
    """This process's build, made once; a failed compile is warned about once, in one line."""
    b = build()
    if b.failed:
        log.warning("llmlab: the paged decode C kernel is unavailable, %s", b.status)
    return b


def paged_decode_status() -> str:
    """One line: the C kernel that runs paged decode attention here, or why the reference runs."""
    return kernel_build().status


def _handles(q, k_layer, v_layer, tables, ctx_lens) -> bool:
    """True when the C kernel takes these tensors as they are (else the caller uses the reference).
    Runs once per layer and step, so it is written for speed: plain attribute tests, cheapest first."""
    if not (q.dtype == k_layer.dtype == v_layer.dtype == torch.float32):
        return False  # a float16/bfloat16 pool: the kernel reads float32 only
    if not (tables.dtype == ctx_lens.dtype == torch.int32):
        return False
    if not (q.is_cpu and k_layer.is_cpu and v_layer.is_cpu and tables.is_cpu and ctx_lens.is_cpu):
        return False
    if not (q.is_contiguous() and k_layer.is_contiguous() and v_layer.is_contiguous() and tables.is_contiguous()
            and ctx_lens.is_contiguous()):
        return False
    if (q.requires_grad or k_layer.requires_grad or v_layer.requires_grad) and torch.is_grad_enabled():
        return False  # no backward in C; the reference keeps the graph
    if q.dim() != 3 or k_layer.dim() != 4 or v_layer.shape != k_layer.shape or tables.dim() != 2:
        return False
    n, H, D = q.shape
    return (k_layer.shape[3] == D and H % k_layer.shape[1] == 0 and tables.shape[0] == n
            and ctx_lens.shape == (n,) and tables.shape[1] >= 1)


def _make(fn: Callable[..., int]) -> Callable[..., torch.Tensor]:
    def paged_decode(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, tables: torch.Tensor,
                     ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """``paged_decode_reference`` in C: q (n, H, D), k/v_layer (n_blocks, H_kv, bs, D),
        tables (n, max_blocks) int32, ctx_lens (n,) int32 -> (n, H, D)."""
        if not _handles(q, k_layer, v_layer, tables, ctx_lens):
            return paged_decode_reference(q, k_layer, v_layer, tables, ctx_lens, scale)
        n, H, D = q.shape
        n_blocks, hkv, bs, _ = k_layer.shape
        out = torch.empty_like(q)  # (n, H, D)
        rc = fn(q.data_ptr(), k_layer.data_ptr(), v_layer.data_ptr(), tables.data_ptr(), ctx_lens.data_ptr(),
                out.data_ptr(), n, H, hkv, D, bs, n_blocks, tables.shape[1], float(scale), kernel_threads())
        if rc != 0:
            # refused before reading anything (a ctx_len of 0 or past the table, a block id outside the
            # pool): the reference gives its own answer or its own error for these
            return paged_decode_reference(q, k_layer, v_layer, tables, ctx_lens, scale)
        return out

    return paged_decode


@lru_cache(maxsize=1)
def _kernel_callable() -> Callable[..., torch.Tensor] | None:
    fn = kernel_build().fn
    return None if fn is None else _make(fn)


def paged_decode_kernel() -> Callable[..., torch.Tensor] | None:
    """A callable with ``paged_decode_reference``'s signature running the C kernel, or None where it
    cannot be built here (no compiler, no AVX2/FMA, a failed compile: see ``paged_decode_status``)."""
    return _kernel_callable()
