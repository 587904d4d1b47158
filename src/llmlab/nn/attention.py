"""Multi-head attention with grouped-query heads (Vaswani et al. 2017, arXiv:1706.03762;
GQA: Ainslie et al. 2023, arXiv:2305.13245). ``Attention(impl=...)`` picks one of three paths, which
must agree (tested):

- ``reference``: softmax(Q K^T / sqrt(D) + mask) V written out, easy to read and to step through;
- ``sdpa`` (the default): ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels), except for decode steps: with a KV cache and at most ``DECODE_MAX_T`` new queries it runs
  ``grouped_attention`` instead (see ``Attention.path``);
- ``flash``: ``llmlab.nn.flash``, the FlashAttention algorithm written in PyTorch (for reading and
  for tests; padded batches fall back to ``sdpa``).

Shapes: x (B, T, dim) -> (B, T, dim); q (B, H, T, D); k, v (B, H_kv, S, D), S = cached + T.
Masks are boolean, True = may attend, broadcastable to (B, 1, T, S). ``key_mask`` is either (B, S), real
(True) vs padding keys, or (B, T, S), a full per-query mask (packed SFT rows: block-diagonal, so no token
attends across the examples sharing a row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.nn.flash import flash_attention
from llmlab.nn.kv_cache import StaticKVCache
from llmlab.nn.rope import apply_rope


def build_mask(T: int, S: int, start: int, causal: bool, key_mask: torch.Tensor | None,
               device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, T, S) or None when every query sees every key.

    Query i sits at absolute position start+i; with ``causal`` it sees keys 0..start+i.
    ``key_mask`` (B, S) marks real (True) vs padding (False) keys; a (B, T, S) ``key_mask`` is a full
    per-query mask (ANDed with the causal one).
    """
    mask = None
    if causal and not (T == 1 and start + 1 == S):
        q_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if key_mask is not None and key_mask.dim() == 3:
        km = key_mask[:, None, :, :S].bool()  # (B, 1, T, S)
        return km if mask is None else mask & km
    if key_mask is not None:
        km = key_mask[:, None, None, :S].bool()  # (B, 1, 1, S)
        mask = km if mask is None else mask & km
        # A padding query would see no key at all (softmax of all -inf = NaN, which then leaks into later
        # layers' padded keys); let every query see itself. Real queries already do.
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        mask = mask | (torch.arange(S, device=device)[None, :] == q_pos)[None, None]
    return mask


def reference_attention(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The textbook formula. q (B, H, T, D), k/v (B, H, S, D) -> (B, H, T, D)."""
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    # A query row with every key masked (padding) gives NaN; make it attend to nothing instead.
    probs = torch.nan_to_num(probs, nan=0.0)
    return probs @ v


def grouped_attention(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Same result as ``reference_attention`` for GQA without copying k/v per query head: the ``rep``
    query heads that share a key/value head are stacked as extra query rows of that head.

    q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D). Used for decode steps (small T), where the CPU
    flash kernel's fixed cost (~2 ms a call, measured) dwarfs the arithmetic.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    qg = q.reshape(B, Hkv, rep * T, D)  # (B, Hkv, rep*T, D): head h = group h // rep, row (h % rep, t)
    scores = (qg @ k.transpose(-2, -1)) * scale  # (B, Hkv, rep*T, S)
    if mask is not None:
        m = mask.expand(mask.shape[0], 1, T, mask.shape[-1])  # (B|1, 1, T, S)
        m = m.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(m.shape[0], 1, rep * T, m.shape[-1])
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v).reshape(B, H, T, D)


IMPLS = ("sdpa", "reference", "flash")
DECODE_MAX_T = 4  # up to this many new queries on a KV cache, "sdpa" takes the decode path


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool = False,
                 out_bias: bool | None = None, causal: bool = True, impl: str = "sdpa"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal = causal
        self.impl = impl
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias if out_bias is None else out_bias)

    def forward(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None, cache: StaticKVCache | None = None,
                layer: int = 0, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        scale = 1.0 / math.sqrt(self.head_dim)
        if getattr(cache, "owns_attention", False):
            # A paged step (nn/paged_attention.PagedBatch): many sequences' new tokens side by side in T,
            # each attending to its own block table; the cache stores k, v and runs the attention.
            out = cache.attend(layer, q, k, v, scale)  # (1, H, N, D)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, S, D)
        S = k.shape[2]
        path = self.path(T, S, start, key_mask, cache)
        if path == "decode":
            # GQA without copying k/v per query head; see grouped_attention.
            out = grouped_attention(q, k, v, build_mask(T, S, start, self.causal, key_mask, x.device), scale)
        else:
            if self.n_kv_heads != self.n_heads:
                # GQA: each group of H/Hkv query heads shares one key/value head.
                rep = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(rep, dim=1)  # (B, H, S, D)
                v = v.repeat_interleave(rep, dim=1)
            if path == "reference":
                out = reference_attention(q, k, v, build_mask(T, S, start, self.causal, key_mask, x.device), scale)
            elif path == "flash":
                out = flash_attention(q, k, v, causal=self.causal, scale=scale)  # queries end-aligned with keys
            elif path == "sdpa-causal":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            else:  # "sdpa-mask"
                mask = build_mask(T, S, start, self.causal, key_mask, x.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)

    def path(self, T: int, S: int, start: int, key_mask: torch.Tensor | None,
             cache: StaticKVCache | None) -> str:
        """Which computation a call runs (T new queries, S keys including the cache):

        - "reference": ``impl="reference"``, always;
        - "decode": ``impl="sdpa"`` with a KV cache and T <= DECODE_MAX_T (a generation step, or a
          speculative verification of a few draft tokens). At this size a call's fixed cost dominates:
          SDPA's CPU kernel costs ~2 ms a call (measured) and GQA's ``repeat_interleave`` copies the whole
          cache, so ``grouped_attention`` (two small matmuls on the cache as it is) is faster; same result
          as "reference" (tested);
        - "flash": ``impl="flash"`` without padding;
        - "sdpa-causal": causal, no padding, no cached prefix: SDPA's own causal mask, no mask tensor;
        - "sdpa-mask": otherwise (padding, a chunk after a cached prefix, an encoder): SDPA with a built mask.
        """
        if self.impl == "reference":
            return "reference"
        if self.impl == "sdpa" and cache is not None and T <= DECODE_MAX_T:
            return "decode"
        if self.impl == "flash" and key_mask is None:
            return "flash"
        if self.causal and key_mask is None and start == 0 and S == T:
            return "sdpa-causal"
        return "sdpa-mask"


def attention_scores(attn: Attention, x: torch.Tensor, rope=None) -> torch.Tensor:
    """The unnormalised scores q k^T / sqrt(D) that ``attn`` forms from its input x (B, T, dim), no KV cache and
    no mask, float32, (B, H, T, T); each grouped key/value head is shared by its query heads (GQA). With autograd:
    the attention maps (``eval/attention_maps.py``) and TinyBERT's attention loss (``train/encoder_distill.py``)
    both start here."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    if rope is not None:
        q, k = apply_rope(q, k, *rope)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # (B, H, T, D): GQA groups
    return (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(attn.head_dim)  # (B, H, T, T)
