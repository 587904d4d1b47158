"""Rotary position embeddings (Su et al. 2021, "RoFormer", arXiv:2104.09864).

We use the "rotate half" layout of Hugging Face Llama: the head dimension is split into two halves
that are rotated as (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). GGUF files store Q/K weights
permuted for the interleaved layout; the GGUF loader un-permutes them so both agree.

Shapes: q, k (B, H, T, D); cos, sin (B, T, D) or (T, D).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def llama3_scale_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                          high_freq_factor: float, original_max_pos: int) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths are divided by ``factor``, short ones kept,
    and the band in between interpolated smoothly."""
    low_wavelen = original_max_pos / low_freq_factor
    high_wavelen = original_max_pos / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions; no parameters, so it survives any state-dict load."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling and scaling.get("rope_type") == "llama3":
            inv_freq = llama3_scale_inv_freq(
                inv_freq, scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                scaling["original_max_position_embeddings"])
        elif scaling and scaling.get("rope_type") == "linear":
            inv_freq = inv_freq / scaling["factor"]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B, T) int -> cos, sin (B, T, D); computed in float32 for accuracy at long range.
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
