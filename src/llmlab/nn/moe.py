"""Sparsely-gated mixture-of-experts feed-forward (Shazeer et al. 2017, arXiv:1701.06538), in the
Switch Transformer / Mixtral style (Fedus et al. 2021, arXiv:2101.03961; Jiang et al. 2024,
arXiv:2401.04088).

A linear router scores every token against ``n_experts`` SwiGLU experts; each token goes to its
``top_k`` experts and their outputs are mixed with the renormalised router probabilities
(Mixtral). Each expert takes at most ``capacity = ceil(capacity_factor * N * top_k / E)`` of the N
tokens (Switch); assignments beyond that are dropped (the token's residual stream carries it past
this layer) and counted in ``last_dropped``. ``capacity_factor=0`` means no limit.

Load-balancing auxiliary loss (Switch eq. 4): ``E * sum_e f_e * P_e`` where f_e is the fraction of
token->expert assignments that went to expert e and P_e is the mean router probability of e; it is 1
for a perfectly uniform router. The module keeps it in ``last_aux_loss`` for the training loop.

Parameter names follow Mixtral: ``gate`` (the router), ``experts.N.{w1,w2,w3}`` = gate/down/up.
Shapes: (B, T, dim) -> (B, T, dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """One SwiGLU expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, n_experts: int, top_k: int = 2, capacity_factor: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"MoE: top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim, ffn_dim) for _ in range(n_experts))
        self.last_aux_loss: torch.Tensor | None = None
        self.last_dropped = 0  # token->expert assignments dropped by the capacity limit, last forward
        self.last_load: torch.Tensor | None = None  # (E,) assignments per expert, last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        N, E, K = x.shape[0], self.n_experts, self.top_k
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        weights, chosen = probs.topk(K, dim=-1)  # (N, K)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

        one_hot = F.one_hot(chosen, E).to(probs.dtype)  # (N, K, E)
        load = one_hot.sum((0, 1))  # (E,) assignments per expert
        frac_assigned = load / (N * K)
        self.last_aux_loss = E * (frac_assigned * probs.mean(0)).sum()
        self.last_load = load.detach()

        keep = torch.ones_like(chosen, dtype=torch.bool)  # (N, K)
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * N * K / E)
            # Position of each assignment in its expert's queue, in token order (k=0 choices first).
            flat = one_hot.transpose(0, 1).reshape(K * N, E)  # (K*N, E), choice-major
            position = (flat.cumsum(0) * flat).sum(-1).reshape(K, N).t() - 1  # (N, K), 0-based
            keep = position < capacity
        self.last_dropped = int((~keep).sum())

        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where((chosen == e) & keep)  # tokens routed to expert e
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * weights[token_idx, slot, None]  # (n_e, dim)
            out.index_add_(0, token_idx, y)
        return out.reshape(shape)


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean load-balancing loss over the MoE layers of ``model`` (None when it has none)."""
    losses = [m.last_aux_loss for m in model.modules() if isinstance(m, MoEFeedForward) and m.last_aux_loss is not None]
    return torch.stack(losses).mean() if losses else None


def moe_dropped(model: nn.Module) -> int:
    return sum(m.last_dropped for m in model.modules() if isinstance(m, MoEFeedForward))
