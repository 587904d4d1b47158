"""MiniLLM's full objective (train/minillm.py): the estimator's expected gradient against the exact gradient of
the sequence-level KL(q || p), by enumerating every continuation of a tiny vocabulary (V = 3, T = 1..3) with
logit tables for student and teacher, in float64; the per-token importance weights' bias by hand at T = 2; the
leave-one-out baseline unbiased over every pair of continuations; the reward-to-go, length normalisation,
weights and baseline by hand; bad parameters. On tiny models inside ``llmlab distill`` (test_distill.py, sharing
its fixtures): the teacher-mixed sampler against a loop without a KV cache, a training step recomputed from the
two models, bad flags."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.train.minillm import importance_weights, leave_one_out, minillm_loss, rewards_to_go, whiten

V = 3


def _tables(T: int, seed: int = 0):
    """Logit tables indexed by the prefix: student (trainable) and teacher, one row of V logits per prefix of
    length 0..T-1, float64."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
    index = {p: i for i, p in enumerate(prefixes)}
    student = (1.5 * torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = 1.5 * torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)
    return student, teacher, index


def _logits(table, index, y):
    return table[[index[tuple(y[:n])] for n in range(len(y))]]  # (T, V): position n predicts y[n]


def _seq_logprob(table, index, y):
    return sum(torch.log_softmax(_logits(table, index, y), -1)[n, t] for n, t in enumerate(y))


def exact_kl_grad(student, teacher, index, T):
    """grad of KL(q || p) = sum_y q(y) (log q(y) - log p(y)) over all V^T continuations, by autograd."""
    kl = 0.0
    for y in itertools.product(range(V), repeat=T):
        lq, lp = _seq_logprob(student, index, y), _seq_logprob(teacher, index, y)
        kl = kl + lq.exp() * (lq - lp)
    (g,) = torch.autograd.grad(kl, student)
    return g


def expected_estimator_grad(student, teacher, index, T, alpha, length_norm=False, importance="token"):
    """sum_y p~(y) grad(T x minillm_loss(y)): the estimator's gradient averaged over every continuation weighted
    by its probability under the sampling distribution p~ = alpha p + (1 - alpha) q (per token)."""
    total = 0.0  # sum_y p~(y) x surrogate(y), p~(y) a constant: its gradient is the expectation's
    for y in itertools.product(range(V), repeat=T):
        s, t = _logits(student, index, y), _logits(teacher, index, y)  # (T, V)
        with torch.no_grad():
            mix = alpha * t.softmax(-1) + (1 - alpha) * s.softmax(-1)  # (T, V)
            prob = math.prod(float(mix[n, tok]) for n, tok in enumerate(y))
        tokens = torch.tensor([y])
        total = total + prob * T * minillm_loss(s[None], t[None], tokens, alpha, length_norm, importance).loss
    (g,) = torch.autograd.grad(total, student)  # T x the mean over positions = the sum over t
    return g


@pytest.mark.parametrize("T", [1, 2, 3])
def test_estimator_is_unbiased_on_policy(T):
    """alpha = 0, no length normalisation: E_{y ~ q}[grad of the surrogate] = grad KL(q || p), to 1e-10."""
    student, teacher, index = _tables(T, seed=T)
    want = exact_kl_grad(student, teacher, index, T)
    got = expected_estimator_grad(student, teacher, index, T, alpha=0.0)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_teacher_mixed_sampling_with_sequence_weights_is_unbiased(T, alpha):
    student, teacher, index = _tables(T, seed=10 + T)
    want = exact_kl_grad(student, teacher, index, T)
    got = expected_estimator_grad(student, teacher, index, T, alpha, importance="sequence")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_per_token_weights_exact_at_one_token_and_their_bias_by_hand_at_two():
    """The paper's w_t = q(y_t) / p~(y_t): exact for T = 1. For T = 2 its expectation is, by hand,
    grad KL_1 + sum_{y1} p~(y1) grad KL_2(y1) - sum_{y1} q(y1) grad log q(y1) sum_{y2} p~(y2|y1) r_2(y1, y2):
    the second token's single-step term and the first token's future reward are averaged under the mixture,
    where the exact gradient has q(y1) and q(y2|y1)."""
    alpha = 0.3
    student, teacher, index = _tables(1, seed=5)
    torch.testing.assert_close(expected_estimator_grad(student, teacher, index, 1, alpha),
                               exact_kl_grad(student, teacher, index, 1), rtol=0, atol=1e-10)
    student, teacher, index = _tables(2, seed=6)

    def dist(table, prefix):
        return torch.log_softmax(table[index[prefix]], -1)  # (V,)

    def kl(prefix):
        lq, lp = dist(student, prefix), dist(teacher, prefix)
        return (lq.exp() * (lq - lp)).sum()

    def mix(prefix):
        return alpha * dist(teacher, prefix).exp() + (1 - alpha) * dist(student, prefix).exp().detach()

    hand = kl(())
    for y1 in range(V):
        lq1 = dist(student, ())[y1]
        hand = hand + float(mix(())[y1]) * kl((y1,))
        lq2, lp2 = dist(student, (y1,)).detach(), dist(teacher, (y1,))
        future = float((mix((y1,)) * (lp2 - lq2)).sum())  # sum_{y2} p~(y2|y1) r_2
        hand = hand - float(lq1.detach().exp()) * lq1 * future
    (want,) = torch.autograd.grad(hand, student)
    got = expected_estimator_grad(student, teacher, index, 2, alpha)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    bias = (got - exact_kl_grad(student, teacher, index, 2)).abs().max()
    assert bias > 1e-3  # the approximation is biased for T > 1


@pytest.mark.parametrize("alpha", [0.3])
def test_leave_one_out_baseline_keeps_the_estimator_unbiased(alpha):
    """Two rows, T = 2, every pair of continuations: with the baseline (each row's R_{t+1} minus the other row's) the
    expected gradient is still 2 x grad KL(q || p) (sequence weights when alpha > 0)."""
    T = 2
    student, teacher, index = _tables(T, seed=21)
    want = 2 * exact_kl_grad(student, teacher, index, T)
    seqs = list(itertools.product(range(V), repeat=T))
    total = 0.0
    for a, b in itertools.product(seqs, seqs):
        s = torch.stack([_logits(student, index, a), _logits(student, index, b)])  # (2, T, V)
        t = torch.stack([_logits(teacher, index, a), _logits(teacher, index, b)])
        with torch.no_grad():
            mix = alpha * t.softmax(-1) + (1 - alpha) * s.softmax(-1)  # (2, T, V)
            prob = math.prod(float(mix[i, n, y[n]]) for i, y in enumerate((a, b)) for n in range(T))
        loss = 2 * T * minillm_loss(s, t, torch.tensor([a, b]), alpha, False, "sequence", baseline=True).loss
        total = total + prob * loss
    torch.testing.assert_close(torch.autograd.grad(total, student)[0], want, rtol=0, atol=1e-10)


def test_rewards_to_go_and_weights_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, -4.0]], dtype=torch.float64)
    assert rewards_to_go(r, False).tolist() == [[1.0, -1.0, -4.0, 0.0]]  # R_{t+1} = sum of the later rewards
    assert rewards_to_go(r, True).tolist() == [[1.0 / 3, -1.0 / 2, -4.0, 0.0]]  # their mean over T - t tokens
    lq = torch.log(torch.tensor([[0.5, 0.1]]))
    lp = torch.log(torch.tensor([[0.25, 0.9]]))
    w = importance_weights(lq, lp, 0.2, "token")  # q / (0.2 p + 0.8 q)
    torch.testing.assert_close(w, torch.tensor([[0.5 / 0.45, 0.1 / 0.26]]))
    torch.testing.assert_close(importance_weights(lq, lp, 0.2, "sequence"), torch.full((1, 2), 0.5 / 0.45 * 0.1 / 0.26))
    assert importance_weights(lq, lp, 0.0, "token").tolist() == [[1.0, 1.0]]
    future = torch.tensor([[1.0, 2.0], [3.0, -2.0], [5.0, 0.0]])
    assert leave_one_out(future).tolist() == [[4.0, -1.0], [3.0, 1.0], [2.0, 0.0]]  # the other rows' mean
    assert leave_one_out(future[:1]).tolist() == [[0.0, 0.0]]


def test_loss_value_terms_and_reduction_to_reverse_kl():
    """The surrogate's value is the mean of w KL - w R_{t+1} log q; with one token per row (no later tokens) and
    alpha 0 it is the single-step term alone, distill_losses.reverse_kl."""
    from llmlab.train.distill_losses import reverse_kl

    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    tokens = torch.randint(0, 5, (2, 4))
    terms = minillm_loss(s, t, tokens, 0.2, True, "token")
    assert terms.loss.item() == pytest.approx(terms.single + terms.long, rel=1e-6)
    assert 0 < terms.weight_min <= terms.weight_mean <= terms.weight_max
    one = minillm_loss(s[:, :1], t[:, :1], tokens[:, :1], 0.0)
    assert one.long == 0.0 and one.loss.item() == pytest.approx(reverse_kl(s[:, 0], t[:, 0]).item(), rel=1e-6)


def test_whitening_by_hand_and_in_the_loss():
    """whiten: minus the mean over the batch, over the unbiased standard deviation (the authors' code's advantages);
    in the loss it replaces R_{t+1} in the long-term term, the single-step term unchanged."""
    future = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=torch.float64)  # mean 4, variance (9 + 1 + 1 + 9) / 3
    want = torch.tensor([[-3.0, -1.0], [1.0, 3.0]], dtype=torch.float64) / math.sqrt(20 / 3 + 1e-8)
    torch.testing.assert_close(whiten(future), want, rtol=0, atol=1e-12)
    assert whiten(torch.tensor([[2.0]])).tolist() == [[0.0]]
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    tokens = torch.randint(0, 5, (2, 3))
    lq = s.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # (2, 3)
    r = t.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1) - lq
    future = torch.stack([r[:, 1] + r[:, 2], r[:, 2], torch.zeros(2, dtype=torch.float64)], 1)  # R_{t+1}, no norm
    a = (future - future.mean()) / (future.var() + 1e-8).sqrt()
    plain = minillm_loss(s, t, tokens, 0.0, False, "token")
    white = minillm_loss(s, t, tokens, 0.0, False, "token", whitened=True)
    assert white.single == plain.single and white.long == pytest.approx(float(-(a * lq).mean()), rel=1e-12)
    assert plain.long == pytest.approx(float(-(future * lq).mean()), rel=1e-12)


@pytest.mark.parametrize("call,message", [
    (lambda: importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), 1.0, "token"), "--teacher-mix 1.0 is outside"),
    (lambda: importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), -0.1, "token"), "--teacher-mix -0.1 is outside"),
    (lambda: importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), 0.2, "row"), "importance 'row'"),
])
def test_bad_parameters(call, message):
    with pytest.raises(LlmlabError, match=message):
        call()
