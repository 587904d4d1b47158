"""MiniLLM's full objective: reverse KL over the sequences the student writes, optimised by policy gradient (Gu,
Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models", 2023, arXiv:2306.08543, section 2.2
and Algorithm 1). ``train/distill.py`` runs it as ``--loss minillm``; ``--loss reverse-kl`` is its single-step
term alone (the ablation).

The sequence-level loss is L(theta) = KL(q_theta || p) = E_{y ~ q_theta}[log q_theta(y | x) - log p(y | x)] over
continuations y = y_1..y_T of a prefix x (q_theta the student, p the teacher). With the per-token reward
``r_t = log p(y_t | y_<t, x) - log q_theta(y_t | y_<t, x)`` and the reward-to-go ``R_t = sum_{t' >= t} r_t'``,
the policy gradient (eq. 2) is ``grad L = -E_{y ~ q}[sum_t (R_t - 1) grad log q_theta(y_t | y_<t, x)]``. The -1
has zero mean (``E_{y_t ~ q}[grad log q_theta(y_t)] = 0``), and is dropped here. Split at t (eqs. 3-4):

- single-step: ``-E[sum_t grad E_{y_t ~ q_theta(t)}[r_t]] = E[sum_t grad KL(q_theta(. | y_<t) || p(. | y_<t))]``,
  the exact reverse KL over the vocabulary at each sampled position (``distill_losses.reverse_kl`` per
  position); the gradient flows through the distribution at t, not through the sampled prefix;
- long-term: ``-E[sum_t R_{t+1} grad log q_theta(y_t | y_<t, x)]``, REINFORCE with the later tokens' rewards
  held fixed: the surrogate ``-sum_t sg(R_{t+1}) log q_theta(y_t)`` (sg: no gradient);
- length normalisation (``length_norm``): ``R_{t+1}`` is replaced by the mean of the later rewards,
  ``R^Norm_{t+1} = (1 / (T - t)) sum_{t' = t+1}^{T} r_t'`` (T - t terms for 1-based t; the paper writes the
  count as T - t - 1 with its own indexing), 0 at the last token, so a long continuation's sum does not swamp
  its first tokens;
- teacher-mixed sampling (eq. 5-6): y_t ~ p~ = alpha p + (1 - alpha) q_theta (alpha = 0.2 in the paper) and
  each position's two terms are multiplied by the importance weight. The exact weight of position t's terms is
  a product of ratios ``q_theta(y_t') / p~(y_t')`` over the continuation (``importance="sequence"``: the whole
  continuation's product, unbiased and high-variance); the paper approximates it by the position's own ratio
  ``w_t = q_theta(y_t | y_<t, x) / p~(y_t | y_<t, x)`` (``importance="token"``, the default), which is biased
  for T > 1 (``tests/test_minillm.py`` computes the bias by hand for T = 2).

- a baseline (``baseline``): from each row's R_{t+1} the mean of the other rows' R_{t+1} at the same position is
  subtracted (leave-one-out, as RLOO, Ahmadian et al. 2024, arXiv:2402.14740; the authors' code whitens the
  advantages over the batch instead). It is independent of the row's own sample, so the estimator stays unbiased
  (``E[w_t b grad log q_theta(y_t)] = b E_q[grad log q_theta] = 0``) and its variance falls: without it every
  reward is negative early on (the student is far from the teacher) and the long-term term mostly pushes down
  whatever was sampled.
- whitening (``whiten``, off by default), as the authors' code treats its advantages: the long-term rewards
  (after the baseline, when on) minus their mean over every position of the batch, over their standard deviation,
  ``A = (R - mean(R)) / sqrt(var(R) + 1e-8)`` (unbiased variance over the B x N values). It fixes the long-term
  term's scale at about one nat per token whatever the rewards' size; the batch mean includes the row's own
  sample, so it is slightly biased (by 1 / (B N)).

Not built: the paper's PPO-style ratio clipping (each sample here updates the student once, so the ratio is 1
and clipping never acts). The optional pretraining loss L_PT is ``--ce-weight`` on the data windows
(``train/distill.py``).

Shapes: logits (B, N, V) at the N positions that predicted the sampled tokens, tokens (B, N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError
from llmlab.infer.generate import prefill_logits

IMPORTANCE = ("token", "sequence")


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise LlmlabError(f"--teacher-mix {alpha} is outside [0, 1): it is the teacher's share alpha of the "
                          "sampling mixture alpha p + (1 - alpha) q; use e.g. 0.2 (the paper) or 0 (the student alone)")


@dataclass
class MiniLLMTerms:
    loss: torch.Tensor  # the surrogate whose gradient is the estimator, mean over the B x N positions
    single: float  # the single-step term, mean of w_t KL_t
    long: float  # the long-term surrogate, mean of -w_t R_{t+1} log q(y_t)
    reward: float  # mean per-token reward r_t (nats)
    weight_mean: float  # importance weights: mean, min, max
    weight_min: float
    weight_max: float


def rewards_to_go(r: torch.Tensor, length_norm: bool) -> torch.Tensor:
    """R_{t+1} = sum_{t' > t} r_t' for each position t of r (B, N) -> (B, N); with ``length_norm`` divided by the
    number of later tokens (N - 1 - t for 0-based t), 0 at the last position."""
    later = r.flip(-1).cumsum(-1).flip(-1) - r  # (B, N): R_t - r_t
    if not length_norm:
        return later
    n = r.shape[-1]
    count = torch.arange(n - 1, -1, -1, device=r.device, dtype=r.dtype).clamp_min(1)  # (N,): N-1-t, 1 at the end
    return later / count


def leave_one_out(future: torch.Tensor) -> torch.Tensor:
    """The baseline b (B, N) of each row: the mean of the other rows' values at the same position (0 for B = 1)."""
    B = future.shape[0]
    if B < 2:
        return torch.zeros_like(future)
    return (future.sum(0, keepdim=True) - future) / (B - 1)


def whiten(future: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(future - mean) / sqrt(var + eps) over every value of future (B, N), var the unbiased variance -> (B, N);
    a single value has no variance and whitens to 0."""
    if future.numel() < 2:
        return torch.zeros_like(future)
    var, mean = torch.var_mean(future)
    return (future - mean) * torch.rsqrt(var + eps)


def importance_weights(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float, importance: str) -> torch.Tensor:
    """The sampled tokens' weights (B, N) from log q_theta(y_t), log p(y_t) (B, N): ``token``: w_t = q / p~ with
    p~ = alpha p + (1 - alpha) q; ``sequence``: the product of every w_t of the row, at every position."""
    if importance not in IMPORTANCE:
        raise LlmlabError(f"importance {importance!r}: use one of {', '.join(IMPORTANCE)}")
    check_alpha(alpha)
    if alpha == 0.0:
        return torch.ones_like(log_q)
    log_mix = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))  # (B, N): log p~(y_t)
    log_w = log_q - log_mix
    if importance == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    return log_w.exp()


def minillm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                 alpha: float = 0.2, length_norm: bool = True, importance: str = "token",
                 baseline: bool = False, whitened: bool = False) -> MiniLLMTerms:
    """The MiniLLM surrogate on sampled continuations: mean over positions of
    ``w_t KL(q_t || p_t) - w_t sg(R_{t+1} - b_t) log q_theta(y_t)`` (b_t the leave-one-out baseline with
    ``baseline``, else 0; with ``whitened`` the R_{t+1} - b_t are whitened over the batch); student_logits (B, N, V)
    carry the gradient,
    teacher_logits (B, N, V) none, tokens (B, N) the sampled ids (position n's logits predicted tokens[:, n])."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32, or float64 when given
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)  # (B, N, V)
    log_p = F.log_softmax(teacher_logits.to(dtype), dim=-1).detach()  # (B, N, V)
    lq = log_q.gather(-1, tokens[..., None]).squeeze(-1)  # (B, N): log q_theta(y_t), with gradient
    lp = log_p.gather(-1, tokens[..., None]).squeeze(-1)  # (B, N): log p(y_t)
    r = lp - lq.detach()  # (B, N): r_t
    future = rewards_to_go(r, length_norm)  # (B, N): R_{t+1} (normalised)
    if baseline:
        future = future - leave_one_out(future)
    if whitened:
        future = whiten(future)
    w = importance_weights(lq.detach(), lp, alpha, importance)  # (B, N)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, N): KL(q_t || p_t), the single-step term
    single = w * kl
    long = -w * future * lq
    return MiniLLMTerms(loss=(single + long).mean(), single=float(single.mean().detach()),
                        long=float(long.mean().detach()), reward=float(r.mean()), weight_mean=float(w.mean()),
                        weight_min=float(w.min()), weight_max=float(w.max()))


@torch.no_grad()
def sample_mixed(student, teacher, prefix: torch.Tensor, n: int, alpha: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Continue every row of ``prefix`` (B, P) by n tokens, each drawn from alpha p + (1 - alpha) q at temperature
    1, both models decoding on their own KV cache; -> (B, P + n). Rows have equal length (no padding)."""
    check_alpha(alpha)
    B, P = prefix.shape
    caches = [m.new_cache(B, P + n) for m in (student, teacher)]
    logits = [prefill_logits(m, prefix, cache=c) for m, c in zip((student, teacher), caches)]  # 2 x (B, V)
    out = [prefix]
    for i in range(n):
        mix = (1 - alpha) * logits[0].float().softmax(-1) + alpha * logits[1].float().softmax(-1)  # (B, V)
        tok = torch.multinomial(mix, 1, generator=generator)  # (B, 1)
        out.append(tok)
        if i < n - 1:
            logits = [m(tok, cache=c)[:, -1] for m, c in zip((student, teacher), caches)]
    return torch.cat(out, dim=1)  # (B, P + n)
