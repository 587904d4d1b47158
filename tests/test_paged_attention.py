"""Paged attention: a step over block tables gives the logits of a contiguous KV cache, on both paths."""

from __future__ import annotations

import pytest
import torch

from llmlab.models import build_model, get_preset
from llmlab.nn.paged_attention import PagedBatch, PagedKVPool, paged_decode_reference


def _model():
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _pool(model, n_blocks=64, bs=4):
    c = model.config
    return PagedKVPool(c.n_layers, n_blocks, bs, c.n_kv_heads, c.head_dim)


def _contiguous_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]  # (T, V)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_chunked_prefill_and_decode_match_contiguous(impl):
    """Three sequences, scattered (non-contiguous, shuffled) blocks, prompts fed in chunks of different
    sizes mixed with other sequences' decode steps: every position's logits equal the plain forward."""
    model = _model()
    pool = _pool(model)
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (13, 6, 9)]
    free = torch.randperm(64, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-len(s) // 4))] for s in seqs]
    done = [0, 0, 0]
    got = [[None] * len(s) for s in seqs]
    plan = [[5, 2, 3], [4, 1, 1], [99, 99, 99]]  # new tokens per step, per sequence (the last: the rest)
    for step in range(3):
        rows = [(i, plan[step][i]) for i in range(3) if done[i] < len(seqs[i])]
        rows = [(i, min(n, len(seqs[i]) - done[i])) for i, n in rows]
        ids = [t for i, n in rows for t in seqs[i][done[i]:done[i] + n]]
        pos = [p for i, n in rows for p in range(done[i], done[i] + n)]
        batch = PagedBatch(pool, [n for _, n in rows], [done[i] + n for i, n in rows], [tables[i] for i, _ in rows],
                           impl=impl)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), cache=batch, position_ids=torch.tensor([pos]))[0]
        r = 0
        for i, n in rows:
            for p in range(done[i], done[i] + n):
                got[i][p] = logits[r]
                r += 1
            done[i] += n
    for i, s in enumerate(seqs):
        assert done[i] == len(s)
        want = _contiguous_logits(model, s)
        torch.testing.assert_close(torch.stack(got[i]), want, atol=1e-4, rtol=1e-4)


def test_decode_reference_matches_per_sequence_attention():
    torch.manual_seed(0)
    n_blocks, hkv, bs, D, H = 10, 2, 4, 8, 6
    k_layer, v_layer = torch.randn(n_blocks, hkv, bs, D), torch.randn(n_blocks, hkv, bs, D)
    tables = torch.tensor([[3, 7, 1], [9, 0, 0]], dtype=torch.int32)
    ctx = torch.tensor([11, 3], dtype=torch.int32)
    q = torch.randn(2, H, D)
    out = paged_decode_reference(q, k_layer, v_layer, tables, ctx, 0.3)
    for i in range(2):
        n = int(ctx[i])
        k = k_layer[tables[i].long()].transpose(0, 1).reshape(hkv, -1, D)[:, :n]  # (Hkv, n, D)
        v = v_layer[tables[i].long()].transpose(0, 1).reshape(hkv, -1, D)[:, :n]
        k, v = k.repeat_interleave(H // hkv, 0), v.repeat_interleave(H // hkv, 0)
        want = torch.softmax(q[i][:, None] @ k.transpose(1, 2) * 0.3, -1) @ v  # (H, 1, D)
        torch.testing.assert_close(out[i], want[:, 0], atol=1e-5, rtol=1e-5)


def test_bad_step_is_refused():
    model = _model()
    pool = _pool(model)
    with pytest.raises(ValueError, match="bad paged step"):
        PagedBatch(pool, [5], [5], [[0]])  # 5 positions do not fit one block of 4


def test_copy_block_on_write():
    pool = PagedKVPool(2, 4, 4, 1, 2)
    pool.k[:, 1] = 1.0
    pool.copy_block_(1, 2, upto=3)
    assert pool.k[:, 2, :, :3].eq(1).all() and pool.k[:, 2, :, 3].eq(0).all()
