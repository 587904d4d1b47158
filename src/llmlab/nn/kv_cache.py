"""A static (pre-allocated) key/value cache for incremental decoding.

Prefill writes the prompt's keys/values once; each decode step appends one position and attends to
everything so far, so a step costs O(T) instead of recomputing O(T^2).

Storage: k, v (n_layers, B, H_kv, max_len, D).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far (advanced by the model after the last layer)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H_kv, T, D) at positions [start, start+T); return the cache up to there."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer, :, :, start:end] = k  # rounded to the cache's dtype (a float16 cache for float32 k, v)
        self.v[layer, :, :, start:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H_kv, end, D)
        return keys.to(k.dtype), values.to(v.dtype)  # read back exactly in the model's dtype

    def reset(self) -> None:
        self.length = 0

    def copy_rows_from(self, other: StaticKVCache, rows: torch.Tensor) -> None:
        """Sequence i of this cache := sequence ``rows[i]`` of ``other``, every position (a prefix-tuned model keeps
        its virtual tokens in front of the real ones), and other's length: one prefill shared by every copy of a
        prompt (``infer/generate``, ``infer/beam``)."""
        if other.k.shape[2:] != self.k.shape[2:] or other.k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV caches differ in shape: {tuple(other.k.shape)} and {tuple(self.k.shape)}")
        self.k.copy_(other.k[:, rows])  # (L, B, H_kv, max_len, D)
        self.v.copy_(other.v[:, rows])
        self.length = other.length
