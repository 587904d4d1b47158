"""FlashAttention-style tiled attention (nn/flash.py) against naive attention: values and gradients."""

import math

import pytest
import torch

from llmlab.nn.attention import Attention
from llmlab.nn.flash import flash_attention


def naive(q, k, v, causal):
    T, S = q.shape[-2], k.shape[-2]
    mask = None
    if causal:
        mask = (torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T))[None, None]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # the textbook formula, in q's dtype
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,S,bq,bk", [(37, 37, 16, 8), (64, 64, 64, 64), (5, 29, 4, 7), (1, 17, 64, 5)])
def test_forward_and_backward_match_naive(causal, T, S, bq, bk):
    torch.manual_seed(0)
    q = torch.randn(2, 3, T, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, S, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, S, 16, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 3, T, 16, dtype=torch.float64)
    ref = naive(q, k, v, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out = flash_attention(q, k, v, causal=causal, block_q=bq, block_k=bk)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert (out - ref).abs().max() < 1e-10
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() < 1e-10


def test_gradcheck_small():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal=True, block_q=4, block_k=3),
                                    (q, k, v))


def test_attention_module_flash_path_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(64, 4, 2, 16, causal=True, impl="sdpa")
    x = torch.randn(2, 40, 64, requires_grad=True)
    y_sdpa = attn(x)
    attn.impl = "flash"
    y_flash = attn(x)
    assert (y_sdpa - y_flash).abs().max() < 1e-5
    g1 = torch.autograd.grad(y_sdpa.sum(), x)[0]
    g2 = torch.autograd.grad(y_flash.sum(), x)[0]
    assert (g1 - g2).abs().max() < 1e-5


def test_bad_shapes_are_clear():
    with pytest.raises(ValueError, match="do not match"):
        flash_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
