"""The paged decode C kernel equals ``paged_decode_reference``, ignores table padding, falls back where it
must, and is what ``PagedBatch(impl="kernel")`` runs by default."""

from __future__ import annotations

import pytest
import torch

from llmlab.nn import paged_decode
from llmlab.nn.cpu_kernels import cpu_has_avx2, find_compiler
from llmlab.nn.paged_attention import PagedBatch, paged_decode_reference
from tests.test_paged_attention import _contiguous_logits, _model, _pool

BUILD = paged_decode.kernel_build()
KERNEL = paged_decode.paged_decode_kernel()


@pytest.fixture
def kernel():
    """The kernel. Where a compiler and AVX2/FMA exist, a failed build is a failure; elsewhere a skip."""
    if KERNEL is None:
        if find_compiler() is not None and cpu_has_avx2():
            pytest.fail(f"a C compiler and AVX2/FMA/F16C are here, yet {BUILD.status}")
        pytest.skip(BUILD.status)
    return KERNEL


def _case(H, hkv, D, bs, ctx, seed=0, share=False, poison=True):
    """Random q and pool; one sequence per ``ctx`` entry on scattered blocks. Blocks no sequence reads
    (and the unread tail of each last block) hold NaN and 1e30 when ``poison``: the reference is given a
    clean copy of the pool (it multiplies masked values by 0, and 0 * NaN = NaN), the kernel the poisoned
    one, so equal outputs show the kernel never reads past ctx_len."""
    g = torch.Generator().manual_seed(seed)
    n = len(ctx)
    need = [-(-c // bs) for c in ctx]
    mb = max(need) + 2  # padding columns for every sequence
    n_blocks = sum(need) + need[0] + 8  # + the shared prefix, the garbage block, spares
    k = torch.randn(n_blocks, hkv, bs, D, generator=g)
    v = torch.randn(n_blocks, hkv, bs, D, generator=g)
    free = torch.randperm(n_blocks, generator=g).tolist()
    tables = torch.empty(n, mb, dtype=torch.int32)
    used = torch.zeros(n_blocks, bs, dtype=torch.bool)  # positions some sequence reads
    shared = [free.pop() for _ in range(need[0])] if share else None
    garbage = free.pop()  # never read: the padding entries point at it
    for i, c in enumerate(ctx):
        blocks = [free.pop() for _ in range(need[i])]
        if share:  # a common prefix: every sequence's first blocks are the first sequence's
            m = min(need[i], len(shared))
            blocks[:m] = shared[:m]
        tables[i] = torch.tensor(blocks + [garbage] * (mb - need[i]), dtype=torch.int32)
        for p in range(c):
            used[blocks[p // bs], p % bs] = True
    q = torch.randn(n, H, D, generator=g)
    clean_k, clean_v = k.clone(), v.clone()
    if poison:
        unread = ~used[:, None, :, None].expand_as(k)  # (n_blocks, Hkv, bs, D)
        k[unread], v[unread] = float("nan"), 1e30
        clean_k[unread], clean_v[unread] = 0.0, 0.0
    return q, (k, v), (clean_k, clean_v), tables, torch.tensor(ctx, dtype=torch.int32)


@pytest.mark.parametrize("H,hkv", [(4, 4), (9, 3), (8, 2)])  # GQA rep 1, 3, 4
@pytest.mark.parametrize("D", [64, 20])
@pytest.mark.parametrize("bs", [1, 16, 32])
def test_kernel_matches_reference(H, hkv, D, bs, kernel):
    ctx = [1, bs, bs + 1, 300, 77]
    q, (k, v), (ck, cv), tables, ctx_t = _case(H, hkv, D, bs, ctx, seed=H * 100 + D + bs)
    got = kernel(q, k, v, tables, ctx_t, 0.125)
    want = paged_decode_reference(q, ck, cv, tables, ctx_t, 0.125)
    assert got.shape == (len(ctx), H, D) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bs", [1, 16])
def test_sequences_sharing_blocks(bs, kernel):
    q, (k, v), (ck, cv), tables, ctx_t = _case(9, 3, 64, bs, [200, 130, 260, 5], seed=7, share=True)
    assert (tables[1, :2] == tables[0, :2]).all()  # they really share
    got = kernel(q, k, v, tables, ctx_t, 0.125)
    torch.testing.assert_close(got, paged_decode_reference(q, ck, cv, tables, ctx_t, 0.125), atol=1e-5, rtol=1e-5)


def test_large_scores_keep_the_softmax_stable(kernel):
    """Scores ~ +-1000: only an online max subtracted before exp keeps them finite."""
    q, (k, v), (ck, cv), tables, ctx_t = _case(9, 3, 64, 16, [300, 40], seed=3)
    got = kernel(q * 30, k, v, tables, ctx_t, 1.0)
    torch.testing.assert_close(got, paged_decode_reference(q * 30, ck, cv, tables, ctx_t, 1.0), atol=1e-5, rtol=1e-5)


def test_unhandled_inputs_fall_back_to_the_reference(monkeypatch, kernel):
    """Other dtypes, non-contiguous tensors, int64 tables, refused arguments: the reference's answer."""
    q, _, (k, v), tables, ctx_t = _case(9, 3, 64, 16, [40, 17], seed=5, poison=False)
    calls = []
    monkeypatch.setattr(paged_decode, "paged_decode_reference",
                        lambda *a: calls.append(1) or paged_decode_reference(*a))
    kb, vb = k.bfloat16(), v.bfloat16()
    out = kernel(q.bfloat16(), kb, vb, tables, ctx_t, 0.125)
    torch.testing.assert_close(out, paged_decode_reference(q.bfloat16(), kb, vb, tables, ctx_t, 0.125))
    q_strided = torch.randn(9, 2, 64).transpose(0, 1)  # (2, 9, 64), not contiguous
    out = kernel(q_strided, k, v, tables, ctx_t, 0.125)
    torch.testing.assert_close(out, paged_decode_reference(q_strided, k, v, tables, ctx_t, 0.125))
    kernel(q, k, v, tables.long(), ctx_t, 0.125)
    assert len(calls) == 3
    bad = tables.clone()
    bad[0, 0] = 10_000  # a block outside the pool: the kernel refuses before reading, the reference raises
    with pytest.raises(IndexError):
        kernel(q, k, v, bad, ctx_t, 0.125)
    assert len(calls) == 4
    kernel(q, k, v, tables, ctx_t, 0.125)
    assert len(calls) == 4  # the plain case ran in C


def test_negative_control_a_wrong_kernel_fails_the_parity_check(tmp_path, kernel):
    """The same comparison with a kernel that forgets the scale must fail: the test above can fail."""
    src = paged_decode._SRC.read_text()
    old = "score_group(nr, kp, nt, q + r0 * D, D, scale, s + r0 * TILE);"
    assert src.count(old) == 1
    path = tmp_path / "paged_decode_broken.c"
    path.write_text(src.replace(old, old.replace("scale", "1.0f")))
    broken = paged_decode.build(path, cache_dir=tmp_path / "cache")
    assert broken.fn is not None, broken.status
    q, (k, v), (ck, cv), tables, ctx_t = _case(9, 3, 64, 16, [1, 17, 300], seed=11)
    got = paged_decode._make(broken.fn)(q, k, v, tables, ctx_t, 0.125)
    want = paged_decode_reference(q, ck, cv, tables, ctx_t, 0.125)
    assert not torch.allclose(got[1:], want[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0])  # one key: softmax = 1 whatever the scale


def test_kernel_paged_step_runs_the_kernel_and_matches_contiguous(monkeypatch, kernel):
    """Three sequences prefilled on scattered blocks, then decoded together for a few steps with
    ``PagedBatch(impl="kernel")`` and no explicit kernel: the C kernel runs every decode row, and every
    position's logits equal the plain forward's."""
    calls = []
    monkeypatch.setattr(paged_decode, "_kernel_callable",
                        lambda: lambda *a: calls.append(a[0].shape[0]) or KERNEL(*a))
    monkeypatch.setattr(paged_decode, "paged_decode_reference",
                        lambda *a: pytest.fail("the kernel fell back to the reference"))
    model = _model()
    pool = _pool(model)
    g = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (11, 5, 8)]
    prompt = [7, 3, 5]  # then one token a step
    free = torch.randperm(64, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-len(s) // 4))] for s in seqs]
    got = [[] for _ in seqs]
    done = [0, 0, 0]
    while any(d < len(s) for d, s in zip(done, seqs)):
        rows = [(i, prompt[i] if done[i] == 0 else 1) for i in range(3) if done[i] < len(seqs[i])]
        ids = [t for i, n in rows for t in seqs[i][done[i]:done[i] + n]]
        pos = [p for i, n in rows for p in range(done[i], done[i] + n)]
        batch = PagedBatch(pool, [n for _, n in rows], [done[i] + n for i, n in rows],
                           [tables[i] for i, _ in rows])
        with torch.no_grad():
            logits = model(torch.tensor([ids]), cache=batch, position_ids=torch.tensor([pos]))[0]
        r = 0
        for i, n in rows:
            got[i].extend(logits[r:r + n])
            r += n
            done[i] += n
    assert sum(calls) == sum(len(s) - p for s, p in zip(seqs, prompt)) * model.config.n_layers
    for i, s in enumerate(seqs):
        torch.testing.assert_close(torch.stack(got[i]), _contiguous_logits(model, s), atol=1e-4, rtol=1e-4)


def test_without_a_kernel_the_kernel_path_is_the_batched_gather(monkeypatch):
    monkeypatch.setattr(paged_decode, "_kernel_callable", lambda: None)
    model = _model()
    batch = PagedBatch(_pool(model), [1], [3], [[0]])
    assert batch.decode_kernel is None
    assert PagedBatch(_pool(model), [1], [3], [[0]], impl="reference").decode_kernel is None
    assert "\n" not in paged_decode.paged_decode_status()
