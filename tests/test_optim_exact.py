"""AdamW groups and the learning-rate schedule, exactly: hand-computed values at warmup, the schedule's
ends and interior points, and an optimizer step compared with torch's AdamW configured by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmlab.train.optim import build_adamw, lr_at, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.first_frozen = nn.Parameter(torch.ones(2), requires_grad=False)  # frozen before trainable ones
        self.embed = nn.Embedding(5, 3)
        self.proj = nn.Linear(3, 5)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: (5, 3) both


def test_param_groups_decay_matrices_only_and_count_tied_weights_once():
    m = Tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(m.embed.weight), id(m.proj.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)]


def test_build_adamw_matches_a_hand_configured_torch_adamw():
    torch.manual_seed(0)
    ours_model, ref_model = Tiny(), Tiny()
    ref_model.load_state_dict(ours_model.state_dict())
    loop_model = Tiny()
    loop_model.load_state_dict(ours_model.state_dict())
    ours = build_adamw(ours_model, lr=0.1, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-3)
    assert ours.defaults["fused"] is True and ours.defaults["betas"] == (0.8, 0.9) and ours.defaults["eps"] == 1e-3
    d, n = param_groups(ref_model, 0.5)
    ref = torch.optim.AdamW([d, n], lr=0.1, betas=(0.8, 0.9), eps=1e-3, fused=True)
    d, n = param_groups(loop_model, 0.5)  # PyTorch's per-parameter loop: the same update, other float rounding
    loop = torch.optim.AdamW([d, n], lr=0.1, betas=(0.8, 0.9), eps=1e-3, foreach=False)
    x = torch.tensor([[0, 1, 4]])
    for _ in range(3):
        for model, opt in ((ours_model, ours), (ref_model, ref), (loop_model, loop)):
            opt.zero_grad()
            h = model.norm(model.embed(x))
            (model.head(h).square().mean() + model.proj(h).mean()).backward()
            opt.step()
    for a, b, c in zip(ours_model.parameters(), ref_model.parameters(), loop_model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    default = build_adamw(Tiny(), lr=1.0, weight_decay=0.0)
    assert default.defaults["betas"] == (0.9, 0.95) and default.defaults["eps"] == 1e-8


def test_fused_kernel_exactly_when_every_parameter_is_on_one_cuda_or_cpu_device(monkeypatch):
    class FakeParam:
        requires_grad, ndim = True, 2

        def __init__(self, device):
            self.device = torch.device(device)

    class FakeModel:
        def __init__(self, *flags):
            self.params = [FakeParam(f) for f in flags]

        def parameters(self):
            return iter(self.params)

    calls = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **kw: calls.append(kw["fused"]))
    for flags in (("cuda", "cuda"), ("cuda", "cpu"), ("cpu",), ("meta",)):
        build_adamw(FakeModel(*flags), lr=1.0, weight_decay=0.0)
    assert calls == [True, None, True, None]


def test_warmup_is_linear_from_lr_over_warmup_to_lr():
    assert [lr_at(s, lr=1.0, warmup=4, total=10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(0, lr=2.0, warmup=1, total=10) == 2.0
    # the first step after warmup is the top of the decay, not above it
    assert lr_at(4, lr=1.0, warmup=4, total=10) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_reaches_the_floor_and_stays_there(schedule):
    kw = {"lr": 1.0, "warmup": 2, "total": 6, "schedule": schedule, "min_lr_ratio": 0.2}
    assert lr_at(6, **kw) == pytest.approx(0.2, abs=1e-12)
    assert lr_at(11, **kw) == pytest.approx(0.2, abs=1e-12)  # past the end: clamped, not rising again
    assert lr_at(4, **kw) == pytest.approx(0.6, abs=1e-12)  # half way, both schedules are at the middle


def test_interior_points_of_cosine_and_linear():
    kw = {"lr": 2.0, "warmup": 0, "total": 8, "min_lr_ratio": 0.25}  # floor 0.5
    assert lr_at(2, **kw) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert lr_at(2, schedule="linear", **kw) == pytest.approx(0.5 + 1.5 * 0.75, abs=1e-12)
    assert lr_at(0, **kw) == 2.0
    # defaults: cosine down to 10 % of lr
    assert lr_at(8, lr=1.0, warmup=0, total=8) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(1, lr=1.0, warmup=0, total=1) == pytest.approx(0.1, abs=1e-12)


def test_constant_and_degenerate_schedules():
    assert [lr_at(s, lr=0.5, warmup=2, total=9, schedule="constant") for s in (0, 1, 2, 8, 20)] == \
        [0.25, 0.5, 0.5, 0.5, 0.5]
    # nothing to decay over (total <= warmup): lr after the warmup
    assert [lr_at(s, lr=1.0, warmup=3, total=3) for s in (3, 4, 10)] == [1.0, 1.0, 1.0]
    assert [lr_at(s, lr=1.0, warmup=0, total=0) for s in (0, 5)] == [1.0, 1.0]


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosin': choose from cosine, linear"):
        lr_at(5, lr=1.0, warmup=0, total=10, schedule="cosin")


def test_eight_bit_build_keeps_the_groups_and_hyper_parameters():
    from llmlab.train.adamw8bit import AdamW8bit

    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.LayerNorm(64))
    opt = build_adamw(model, 2e-3, 0.05, (0.8, 0.9), eps=1e-6, eight_bit=True)
    assert isinstance(opt, AdamW8bit)
    got = [(len(g["params"]), g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups]
    assert got == [(1, 2e-3, (0.8, 0.9), 1e-6, 0.05), (3, 2e-3, (0.8, 0.9), 1e-6, 0.0)]
    assert not isinstance(build_adamw(model, 2e-3, 0.05), AdamW8bit)
