"""Building blocks: attention paths agree, RMSNorm and RoPE against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.nn.attention import DECODE_MAX_T, Attention
from llmlab.nn.kv_cache import StaticKVCache
from llmlab.nn.norm import RMSNorm
from llmlab.nn.rope import RotaryEmbedding, apply_rope


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_reference_and_sdpa_attention_agree(causal, n_kv):
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv, 8, bias=True, causal=causal)
    x = torch.randn(3, 10, 32)
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[1, 7:] = False
    for km in (None, key_mask):
        attn.impl = "sdpa"
        sdpa = attn(x, key_mask=km)
        attn.impl = "reference"
        ref = attn(x, key_mask=km)
        assert (sdpa - ref).abs().max() < 1e-5


def test_attention_with_cache_both_paths():
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8, causal=True)
    x = torch.randn(1, 9, 32)
    full = attn(x)
    for impl in ("sdpa", "reference"):
        attn.impl = impl
        cache = StaticKVCache(1, 1, 2, 16, 8)
        a = attn(x[:, :5], cache=cache, start=0)
        b = attn(x[:, 5:], cache=cache, start=5)  # a multi-token chunk after a prefix
        assert (torch.cat([a, b], 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("new", [1, 3, 4, 5])
def test_decode_path_agrees_with_reference(n_kv, new):
    """With a cache and <= DECODE_MAX_T new tokens, "sdpa" runs grouped_attention (no k/v copies per head);
    with one more it runs SDPA. Either way: the reference's numbers, padding included."""
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv, 8, causal=True)
    x = torch.randn(2, 6 + new, 32)
    key_mask = torch.ones(2, 6 + new, dtype=torch.bool)
    key_mask[1, :2] = False  # row 1 is left-padded
    outs = {}
    for impl in ("sdpa", "reference"):
        attn.impl = impl
        cache = StaticKVCache(1, 2, n_kv, 16, 8)
        attn(x[:, :6], cache=cache, start=0, key_mask=key_mask[:, :6])
        assert attn.path(new, 6 + new, 6, key_mask, cache) == (
            "reference" if impl == "reference" else "decode" if new <= DECODE_MAX_T else "sdpa-mask")
        outs[impl] = attn(x[:, 6:], cache=cache, start=6, key_mask=key_mask)
    assert (outs["sdpa"] - outs["reference"]).abs().max() < 1e-5


def test_reference_attention_is_textbook():
    torch.manual_seed(0)
    attn = Attention(8, 1, 1, 8, causal=False, impl="reference")
    x = torch.randn(1, 4, 8)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    expected = attn.o_proj(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1) @ v)
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_rmsnorm_formula():
    x = torch.randn(2, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_rope_rotates_and_preserves_relative_positions():
    rope = RotaryEmbedding(8, theta=10000.0)
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 1, 8)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]), torch.float32)
        ck, sk = rope(torch.tensor([[n]]), torch.float32)
        qr, _ = apply_rope(q, q, cq, sq)
        kr, _ = apply_rope(k, k, ck, sk)
        return (qr * kr).sum().item()

    # <R_m q, R_n k> depends only on m - n (RoFormer eq. 16); norms are preserved.
    assert abs(score(3, 1) - score(10, 8)) < 1e-4
    cos, sin = rope(torch.tensor([[5]]), torch.float32)
    qr, _ = apply_rope(q, q, cos, sin)
    assert abs(qr.norm() - q.norm()) < 1e-5
