"""Knowledge-distillation losses between a teacher's and a student's next-token distributions, and the
hidden-state matching term, as plain formulas (``train/distill.py`` runs them).

- Forward KL with temperature (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015,
  arXiv:1503.02531): ``kd = tau^2 KL(p_T^tau || p_S^tau)`` with ``p^tau = softmax(z / tau)``; the tau^2 keeps the
  gradient's size independent of tau (the paper, section 2). DistilBERT (Sanh et al. 2019, arXiv:1910.01108)
  uses the same term as the first of its three losses.
- Reverse KL ``KL(p_S || p_T)``: mode-seeking, the objective of MiniLLM (Gu, Dong, Wei, Huang, "MiniLLM:
  Knowledge Distillation of Large Language Models", 2023, arXiv:2306.08543), there optimised over sequences
  the student samples.
- Generalized Jensen-Shannon divergence (Agarwal et al., "On-Policy Distillation of Language Models: Learning
  from Self-Generated Mistakes" (GKD), 2023, arXiv:2306.13649, eq. 1), in TRL's convention (``GKDTrainer.
  generalized_jsd_loss``): with the mixture ``M = beta p_T + (1 - beta) p_S``,
  ``JSD(beta) = beta KL(p_T || M) + (1 - beta) KL(p_S || M)``; beta = 0 is forward KL, beta = 1 reverse KL
  (the two ends are taken as those KLs exactly, as TRL does).
- Hidden-state matching with a learned projection (TinyBERT, Jiao et al. 2020, arXiv:1909.10351, eq. 7):
  ``MSE(h_S W, h_T)``; here divided by the teacher layer's mean square (see ``hidden_mse``); and TinyBERT's
  attention loss (eq. 6): ``1/h sum_i MSE(A_i^S, A_i^T)`` over the h heads' unnormalised scores ``A = Q K^T /
  sqrt(d)`` (``attention_mse``).
- DistilBERT's cosine embedding loss (Sanh, Debut, Chaumond, Wolf 2019, arXiv:1910.01108, section 3): ``L_cos =
  mean_n (1 - cos(h_S^n, h_T^n))``, aligning the directions of the student's and teacher's hidden states
  (``cosine_embedding``; torch's ``F.cosine_embedding_loss`` with target +1).

``F.kl_div(input, target)`` takes the *log-probabilities of the second argument of KL* as ``input``: KL(P || Q)
is ``kl_div(log Q, log P, log_target=True)``; every sum below is written out with the same order.

Shapes: logits (N, V) for N token positions (callers flatten (B, T, V) and select the scored positions); every
loss is the mean over the N positions of the per-position divergence (TRL's and ``F.kl_div(reduction=
"batchmean")``'s reduction on (N, V) inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError


def check_temperature(tau: float) -> None:
    if not (tau > 0 and math.isfinite(tau)):
        raise LlmlabError(f"--temperature must be a positive number, got {tau}: use e.g. 1.0 or 2.0")


def check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise LlmlabError(f"--beta {beta} is outside [0, 1]: GKD's beta interpolates forward KL (0) and reverse "
                          "KL (1); use e.g. 0.5")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row: sum_v p_v (log p_v - log q_v), (N, V) -> (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's soft-target loss: tau^2 mean_n KL(p_T^tau || p_S^tau); teacher_logits carry no gradient."""
    check_temperature(temperature)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    return temperature ** 2 * _kl(t, s).mean()


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 mean_n KL(p_S^tau || p_T^tau): the exact expectation over the vocabulary at each position."""
    check_temperature(temperature)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    return temperature ** 2 * _kl(s, t).mean()


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's JSD(beta) = beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S, at
    temperature tau (no tau^2 factor: TRL's definition), mean over positions."""
    check_beta(beta)
    check_temperature(temperature)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    if beta == 0.0:
        return _kl(t, s).mean()
    if beta == 1.0:
        return _kl(s, t).mean()
    # log M by logsumexp: p_T and p_S can both underflow where log-probabilities do not.
    log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)  # (N, V)
    return (beta * _kl(t, log_m) + (1 - beta) * _kl(s, log_m)).mean()


def hidden_mse(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """TinyBERT's hidden loss MSE(h_S W, h_T), divided by mean(h_T^2): the residual stream of a deep Llama grows
    with depth (SmolLM2-135M's RMS: 0.1 at the embeddings, about 200 in the middle blocks, single channels above
    20,000), so raw MSE would be decided by a few teacher layers alone; normalised, every matched layer counts the
    same and 1.0 is the loss of predicting zeros. projected, teacher (N, D_T)."""
    t = teacher.float()
    return F.mse_loss(projected.float(), t) / t.pow(2).mean().clamp_min(1e-12)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform mapping g(m) = m L_T / L_S, rounded, for m = 0 (embeddings) .. L_S (the last block):
    the student's output after block m is matched to the teacher's after block g(m)."""
    return [round(m * teacher_layers / student_layers) for m in range(student_layers + 1)]


def cosine_embedding(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DistilBERT's L_cos = mean_n (1 - cos(s_n, t_n)) over the rows of student, teacher (N, D); the same as
    ``F.cosine_embedding_loss(s, t, ones(N))``. Used on token states and on pooled sentence embeddings."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)).mean()


def attention_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's attention loss 1/h sum_i MSE(A_i^S, A_i^T) on unnormalised scores (B, H, T, T): the mean
    squared difference over every entry, which is the mean over heads of each head's MSE. Padding keys
    (``key_mask`` (B, T), 0 = padding) count as 0 in both, as in the authors' code (which zeroes the scores that
    the additive -10000 mask pushed below -100) and are kept in the mean's count."""
    if student_scores.shape != teacher_scores.shape:
        raise LlmlabError(f"attention scores of shape {tuple(student_scores.shape)} (student) and "
                          f"{tuple(teacher_scores.shape)} (teacher): TinyBERT's attention loss needs the same "
                          "number of heads")
    s, t = student_scores.float(), teacher_scores.float()
    if key_mask is not None:
        keep = key_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        s, t = s.masked_fill(~keep, 0.0), t.masked_fill(~keep, 0.0)
    return F.mse_loss(s, t)
