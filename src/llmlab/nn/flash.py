"""FlashAttention as readable PyTorch: tiled attention with an online softmax, forward and backward
(Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
arXiv:2205.14135, Algorithms 1 and 2; the row-sum trick of FlashAttention-2, arXiv:2307.08691).

The (T, S) score matrix is never materialised. Queries are processed in blocks of ``block_q`` rows
and keys/values in blocks of ``block_k`` columns; per query row we carry the running maximum ``m``,
the running softmax denominator ``l`` and the unnormalised output ``o``:

    s = q_blk k_blk^T * scale                      (Bq, Bk) scores of one tile
    m_new = max(m, rowmax(s));  p = exp(s - m_new)
    l = l * exp(m - m_new) + rowsum(p);  o = o * exp(m - m_new) + p v_blk

and at the end ``out = o / l``. Forward saves only ``out`` and ``lse = m + log(l)`` (one number per
row), so memory is O(T) instead of O(T S). The backward pass recomputes each tile's probabilities
from ``lse`` (p = exp(s - lse)) and uses D = rowsum(dO * O):

    dV += p^T dO;  dP = dO V^T;  dS = p * (dP - D);  dQ += dS K * scale;  dK += dS^T Q * scale

This is the algorithm, not the fast kernel: on CPU/GPU ``torch.nn.functional.scaled_dot_product_attention``
is the fast path (``Attention(impl="sdpa")``); this module is checked against naive attention in
tests/test_flash.py (values and gradients). Shapes: q (B, H, T, D), k/v (B, H, S, D) -> (B, H, T, D).
Causal masking aligns the last query with the last key (query i sees keys <= i + S - T).
"""

from __future__ import annotations

import math

import torch


def _tile_scores(q_blk, k_blk, scale, causal, q0, k0, offset):
    """Scores of one tile (B, H, Bq, Bk) with -inf where a query may not see a key."""
    s = (q_blk @ k_blk.transpose(-2, -1)) * scale
    if causal:
        qi = torch.arange(q0, q0 + q_blk.shape[-2], device=s.device)[:, None] + offset
        kj = torch.arange(k0, k0 + k_blk.shape[-2], device=s.device)[None, :]
        s = s.masked_fill(kj > qi, float("-inf"))
    return s


def flash_forward(q, k, v, causal: bool, scale: float, block_q: int, block_k: int):
    """Returns out (B, H, T, D) and lse (B, H, T) in float32 accumulators."""
    B, H, T, D = q.shape
    S = k.shape[-2]
    offset = S - T
    acc = acc_dtype = torch.promote_types(q.dtype, torch.float32)  # float32 accumulators (float64 stays)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=acc_dtype)
    for q0 in range(0, T, block_q):
        q_blk = q[:, :, q0:q0 + block_q].to(acc)  # (B, H, Bq, D)
        Bq = q_blk.shape[-2]
        m = torch.full((B, H, Bq, 1), float("-inf"), device=q.device, dtype=acc_dtype)
        l = torch.zeros(B, H, Bq, 1, device=q.device, dtype=acc_dtype)
        o = torch.zeros(B, H, Bq, D, device=q.device, dtype=acc_dtype)
        k_end = min(S, q0 + Bq + offset) if causal else S  # later key blocks are fully masked
        for k0 in range(0, k_end, block_k):
            k_blk = k[:, :, k0:k0 + block_k].to(acc)
            v_blk = v[:, :, k0:k0 + block_k].to(acc)
            s = _tile_scores(q_blk, k_blk, scale, causal, q0, k0, offset)  # (B, H, Bq, Bk)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
            p = torch.exp(s - m_safe)
            corr = torch.exp(m - m_safe)
            l = l * corr + p.sum(-1, keepdim=True)
            o = o * corr + p @ v_blk
            m = m_new
        l_safe = torch.where(l == 0, torch.ones_like(l), l)  # a row that sees no key outputs zeros
        out[:, :, q0:q0 + Bq] = (o / l_safe).to(q.dtype)
        lse[:, :, q0:q0 + Bq] = (torch.where(torch.isinf(m), torch.zeros_like(m), m) + torch.log(l_safe))[..., 0]
    return out, lse


def flash_backward(q, k, v, out, lse, dout, causal: bool, scale: float, block_q: int, block_k: int):
    B, H, T, D = q.shape
    S = k.shape[-2]
    offset = S - T
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, device=q.device, dtype=acc)
    dk = torch.zeros(k.shape, device=q.device, dtype=acc)
    dv = torch.zeros(v.shape, device=q.device, dtype=acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (B, H, T, 1) = rowsum(dO * O)
    for q0 in range(0, T, block_q):
        q_blk = q[:, :, q0:q0 + block_q].to(acc)
        do_blk = dout[:, :, q0:q0 + block_q].to(acc)
        lse_blk = lse[:, :, q0:q0 + block_q, None]
        d_blk = delta[:, :, q0:q0 + block_q]
        Bq = q_blk.shape[-2]
        k_end = min(S, q0 + Bq + offset) if causal else S
        for k0 in range(0, k_end, block_k):
            k_blk = k[:, :, k0:k0 + block_k].to(acc)
            v_blk = v[:, :, k0:k0 + block_k].to(acc)
            s = _tile_scores(q_blk, k_blk, scale, causal, q0, k0, offset)
            p = torch.exp(s - lse_blk)  # (B, H, Bq, Bk): the softmax probabilities, recomputed
            dv[:, :, k0:k0 + block_k] += p.transpose(-2, -1) @ do_blk
            dp = do_blk @ v_blk.transpose(-2, -1)
            ds = p * (dp - d_blk)
            dq[:, :, q0:q0 + Bq] += (ds @ k_blk) * scale
            dk[:, :, k0:k0 + block_k] += (ds.transpose(-2, -1) @ q_blk) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_q, block_k):
        out, lse = flash_forward(q, k, v, causal, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, out, lse, dout, *ctx.args)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    scale: float | None = None, block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Exact attention by tiles. q (B, H, T, D), k/v (B, H, S, D) with the same H -> (B, H, T, D)."""
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if block_q < 1 or block_k < 1:
        raise ValueError("flash_attention: block sizes must be >= 1")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _FlashAttention.apply(q, k, v, causal, scale, block_q, block_k)
