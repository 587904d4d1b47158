"""The fused, chunked output head + cross-entropy equals the plain ``F.cross_entropy(F.linear(...))``: value and
gradients, exactly in float64, to bf16 rounding under autocast (native and emulated), with ignored rows, label
smoothing, a bias, a tied weight, and under no_grad; the per-row losses (``reduction="none"``, minus the
targets' log-probabilities) with a per-row incoming gradient, for a frozen and for a trainable weight."""

from __future__ import annotations

import pytest
import torch

from llmlab.nn.autocast import EmulatedAutocast
from llmlab.nn.linear_ce import linear_cross_entropy, plain_linear_cross_entropy


def _data(dtype, N=150, D=24, V=301, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100
    return x, w, b, y


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 37, 0, 1000])
def test_float64_equals_plain(label_smoothing, reduction, chunk_rows):
    x, w, b, y = _data(torch.float64)
    got = linear_cross_entropy(x, w, y, b, label_smoothing=label_smoothing, reduction=reduction,
                               chunk_rows=chunk_rows)
    want = plain_linear_cross_entropy(x, w, y, b, label_smoothing=label_smoothing, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got * 2.5, (x, w, b))  # a non-unit incoming gradient is multiplied in
    g_want = torch.autograd.grad(want * 2.5, (x, w, b))
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [37, 0])
@pytest.mark.parametrize("trainable", ["x", "x,w,b"])
def test_rows_float64_equal_plain(label_smoothing, chunk_rows, trainable):
    """Per-row losses and the gradients of a weighted sum of them (DPO's use: a different incoming gradient per
    row): "x" is a frozen head (gradients formed in the forward), "x,w,b" a trainable one (recomputed)."""
    x, w, b, y = _data(torch.float64)
    w.requires_grad_("w" in trainable)
    b.requires_grad_("b" in trainable)
    got = linear_cross_entropy(x, w, y, b, label_smoothing=label_smoothing, reduction="none", chunk_rows=chunk_rows)
    want = plain_linear_cross_entropy(x, w, y, b, label_smoothing=label_smoothing, reduction="none")
    assert got.shape == (x.shape[0],) and float(got[::7].detach().abs().max()) == 0.0  # ignored rows: 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = [t for t in (x, w, b) if t.requires_grad]
    for a, c in zip(torch.autograd.grad((got * weights).sum(), inputs),
                    torch.autograd.grad((want * weights).sum(), inputs)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["emulated", "native"])
def test_rows_bf16_autocast_match_plain_under_the_same_autocast(mode):
    """The recomputing backward runs its products under the forward's autocast / rounding."""
    x, w, _, y = _data(torch.float32, N=64, D=64, V=500, bias=False)
    weights = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(3))

    def ctx():
        return EmulatedAutocast(torch.bfloat16) if mode == "emulated" else torch.autocast("cpu", dtype=torch.bfloat16)

    with ctx():
        got = linear_cross_entropy(x, w, y, reduction="none", chunk_rows=16)
        want = plain_linear_cross_entropy(x, w, y, reduction="none")
        g_got = torch.autograd.grad((got * weights).sum(), (x, w))
        g_want = torch.autograd.grad((want * weights).sum(), (x, w))
    fp32 = plain_linear_cross_entropy(x, w, y, reduction="none")
    g_fp32 = torch.autograd.grad((fp32 * weights).sum(), (x, w))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert float((got - fp32).detach().abs().max()) > 1e-5  # bf16 rounding really happened
    for a, c, f in zip(g_got, g_want, g_fp32):
        err, bf16 = float((a - c).abs().max()), float((f - c).abs().max())
        assert err <= 0.5 * bf16, (err, bf16)


def test_plain_reference_is_pytorch_cross_entropy():
    x, w, b, y = _data(torch.float64)
    logits = x @ w.T + b
    keep = y != -100
    manual = (torch.logsumexp(logits[keep], -1) - logits[keep].gather(1, y[keep, None]).squeeze(1)).mean()
    torch.testing.assert_close(plain_linear_cross_entropy(x, w, y, b), manual)


def test_tied_weight_gradient_accumulates_both_uses():
    """GPT-2 ties the head to the embedding: the weight's gradient is the sum over both uses."""
    x, w, _, y = _data(torch.float64, bias=False)
    ids = torch.randint(0, w.shape[0], (x.shape[0],))
    for fn in (linear_cross_entropy, plain_linear_cross_entropy):
        w.grad = None
        (fn(x + w[ids], w, y)).backward()
        if fn is linear_cross_entropy:
            fused = w.grad.clone()
    torch.testing.assert_close(fused, w.grad)


@pytest.mark.parametrize("mode", ["emulated", "native"])
def test_bf16_autocast_matches_plain_under_the_same_autocast(mode):
    """The chunk products go through the active autocast: the same bf16 rounding as the unfused head."""
    x, w, _, y = _data(torch.float32, N=200, D=64, V=500, bias=False)

    def ctx():
        return EmulatedAutocast(torch.bfloat16) if mode == "emulated" else torch.autocast("cpu", dtype=torch.bfloat16)

    with ctx():
        got = linear_cross_entropy(x, w, y, chunk_rows=64)
    g_got = torch.autograd.grad(got, (x, w))
    with ctx():
        want = plain_linear_cross_entropy(x, w, y)
    g_want = torch.autograd.grad(want, (x, w))
    fp32 = plain_linear_cross_entropy(x, w, y)
    g_fp32 = torch.autograd.grad(fp32, (x, w))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(float(got.detach() - fp32.detach())) > 1e-5  # bf16 rounding really happened (not vacuous)
    # the input gradient: each row's product spans the whole vocabulary in one chunk, as in the plain head
    err_x, bf16_x = float((g_got[0] - g_want[0]).abs().max()), float((g_fp32[0] - g_want[0]).abs().max())
    assert err_x <= 0.01 * bf16_x, (err_x, bf16_x)
    # the weight gradient sums per-chunk products, each rounded to bf16 (the plain head rounds once)
    err_w, bf16_w = float((g_got[1] - g_want[1]).abs().max()), float((g_fp32[1] - g_want[1]).abs().max())
    assert err_w <= 0.5 * bf16_w, (err_w, bf16_w)


def test_no_grad_gives_the_loss_only():
    x, w, b, y = _data(torch.float32)
    with torch.no_grad():
        got = linear_cross_entropy(x, w, y, b, chunk_rows=16)
    assert not got.requires_grad
    torch.testing.assert_close(got, plain_linear_cross_entropy(x, w, y, b).detach())


def test_all_rows_ignored_is_zero_with_zero_gradients():
    x, w, b, y = _data(torch.float64)
    y[:] = -100
    loss = linear_cross_entropy(x, w, y, b)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(label_smoothing=1.0), "label_smoothing must be in"),
    (dict(reduction="max"), "reduction must be"),
])
def test_bad_arguments(kwargs, needle):
    x, w, b, y = _data(torch.float32)
    with pytest.raises(ValueError, match=needle):
        linear_cross_entropy(x, w, y, b, **kwargs)
    with pytest.raises(ValueError, match="target must have shape"):
        linear_cross_entropy(x, w, y[:-1])
    with pytest.raises(ValueError, match=r"x \(N, D\) and weight \(V, D\)"):
        linear_cross_entropy(x[:, :-1], w, y)
