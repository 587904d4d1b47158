"""Mixture-of-experts feed-forward (nn/moe.py): routing, renormalised mixing, load-balancing loss,
capacity drops, and a Llama+MoE model that trains and saves in Mixtral layout."""

import torch
import torch.nn.functional as F

from llmlab.formats.hf import config_from_hf, config_to_hf
from llmlab.models.config import ModelConfig
from llmlab.models.registry import build_model
from llmlab.nn.moe import MoEFeedForward, moe_aux_loss


def manual_moe(moe: MoEFeedForward, x):
    """Per-token loop: the textbook definition."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = torch.softmax(moe.gate(x[n]), -1)
        w, idx = probs.topk(moe.top_k)
        w = w / w.sum()
        for weight, e in zip(w, idx):
            out[n] += weight * moe.experts[int(e)](x[n][None])[0]
    return out


def test_output_matches_per_token_definition():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 32, n_experts=4, top_k=2)
    x = torch.randn(2, 5, 16)
    y = moe(x)
    assert y.shape == x.shape
    assert torch.allclose(y.reshape(-1, 16), manual_moe(moe, x.reshape(-1, 16)), atol=1e-6)
    assert moe.last_dropped == 0 and int(moe.last_load.sum()) == 10 * 2


def test_aux_loss_is_one_for_a_balanced_router_and_larger_when_skewed():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, n_experts=4, top_k=1)
    x = torch.randn(400, 8)
    torch.nn.init.zeros_(moe.gate.weight)  # uniform probabilities; top-1 ties go to expert 0
    moe(x)
    # f = (1, 0, 0, 0), P = 1/4 each -> E * sum f P = 4 * 1/4 = 1
    assert abs(float(moe.last_aux_loss.detach()) - 1.0) < 1e-6
    with torch.no_grad():
        moe.gate.weight[0] = 5.0 * x.mean(0) / x.mean(0).norm()  # expert 0 wins with high probability
    moe(x)
    assert float(moe.last_aux_loss.detach()) > 1.0


def test_capacity_drops_are_counted_and_contribute_nothing():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, n_experts=2, top_k=1, capacity_factor=0.5)
    torch.nn.init.zeros_(moe.gate.weight)  # every token picks expert 0 (a tie)
    x = torch.randn(20, 8)
    y = moe(x)
    capacity = 5  # ceil(0.5 * 20 * 1 / 2)
    assert moe.last_dropped == 20 - capacity
    assert torch.all(y[capacity:] == 0) and torch.all(y[:capacity].abs().sum(-1) > 0)


def test_router_receives_gradient_from_the_aux_loss_and_the_output():
    moe = MoEFeedForward(8, 16, n_experts=4, top_k=2)
    y = moe(torch.randn(10, 8))
    (y.pow(2).mean() + 0.01 * moe.last_aux_loss).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_llama_moe_trains_and_round_trips_mixtral_config():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=32,
                      n_experts=4, experts_per_token=2)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (8, 17))
    losses = []
    for _ in range(30):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), data[:, 1:].reshape(-1)) + 0.01 * moe_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    hf = config_to_hf(cfg)
    assert hf["model_type"] == "mixtral" and hf["num_local_experts"] == 4
    back = config_from_hf(hf)
    assert (back.n_experts, back.experts_per_token, back.ffn_dim) == (4, 2, 48)
    names = set(model.state_dict())
    assert "layers.0.block_sparse_moe.gate.weight" in names and "layers.1.block_sparse_moe.experts.3.w2.weight" in names
