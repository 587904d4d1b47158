"""ZeroQuant (``llmlab.compress.zeroquant``): the quantized model is the formula (group-wise symmetric absmax
weights, per-token int8 activations), and layer-by-layer distillation lowers the block output error,
deterministically."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.spec import QuantSpec
from llmlab.compress.zeroquant import quantize_zeroquant_
from llmlab.models import build_model
from llmlab.models.registry import get_preset
from llmlab.nn.quant_linear import QuantLinear

WINDOWS = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(1))


def tiny(preset: str = "llama-tiny", **cfg):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(get_preset(preset), **cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def zeroquant(model, bits, group_size, windows=None, **options):
    spec = QuantSpec(method="zeroquant", bits=bits, group_size=group_size, options=options)
    return spec, quantize_zeroquant_(model, spec, windows, progress=False)


class Formula(nn.Module):
    """ZeroQuant's layer written from the definitions: per group of ``group`` input columns, the absmax scale
    s = max|w| / (2^(b-1) - 1) (stored as float16), codes q = round(w / s), w = s * q; and each token's input
    rounded onto its own int8 absmax grid."""

    def __init__(self, lin: nn.Linear, bits: int, group: int):
        super().__init__()
        w = lin.weight.detach()
        n, k = w.shape
        g = w.reshape(n, k // group, group)  # (N, groups, group)
        s = (g.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)).half().float()  # (N, groups, 1)
        self.codes = torch.round(g / s)
        self.weight, self.bias = (self.codes * s).reshape(n, k), lin.bias

    def forward(self, x):
        t = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127  # (..., 1)
        return F.linear(torch.round(x / t) * t, self.weight, self.bias)


@pytest.mark.parametrize("preset,bits,group", [("gpt2-tiny", 8, 32), ("gpt2-tiny", 4, 64), ("llama-tiny", 4, 4)])
def test_model_output_is_the_formula(preset, bits, group):
    model = tiny(preset)
    ref = copy.deepcopy(model)
    spec, report = zeroquant(model, bits, group)
    assert spec.act == "token" and spec.options == {"lkd_steps": 0, "lkd_lr": {4: 1e-4, 8: 1e-5}[bits]}
    for name in spec.modules:
        parent, _, leaf = name.rpartition(".")
        formula = Formula(ref.get_submodule(name), bits, group)
        setattr(ref.get_submodule(parent), leaf, formula)
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear) and q.act == "token" and q.bits == bits and q.group_size == group
        assert torch.equal(q.qweight.float(), formula.codes.reshape(q.qweight.shape))
        assert int(q.qweight.abs().max()) == 2 ** (bits - 1) - 1
        assert report[name]["weight_rmse"] < report[name]["weight_rms"] / (4 if bits == 4 else 50)
    with torch.no_grad():
        ours, theirs = model(WINDOWS), ref(WINDOWS)
    assert float((ours - theirs).norm() / theirs.norm()) <= 1e-5


def block0_mse(model, float_model) -> float:
    """Block 0's output against the float block 0 on the same inputs (the embeddings, unquantized)."""
    with torch.no_grad():
        x = model.embed_tokens(WINDOWS)  # (n, T, dim)
        rope = model.rotary(torch.arange(WINDOWS.shape[1]).expand(1, -1), torch.float32)
        run = lambda b: b(x, rope=rope, key_mask=None, cache=None, layer=0, start=0)  # noqa: E731
        return F.mse_loss(run(model.layers[0]), run(float_model.layers[0])).item()


@pytest.mark.parametrize("bits,group", [(4, 4), (8, 0)])
def test_lkd_lowers_block_output_error(bits, group):
    float_model = tiny()
    rtn, lkd, again = copy.deepcopy(float_model), copy.deepcopy(float_model), copy.deepcopy(float_model)
    zeroquant(rtn, bits, group)
    _, report = zeroquant(lkd, bits, group, WINDOWS, lkd_steps=12)
    stats = report["layers.0.mlp.down_proj"]
    assert stats["block_mse_after"] < 0.85 * stats["block_mse_before"]
    assert block0_mse(rtn, float_model) == pytest.approx(stats["block_mse_before"], rel=1e-5)
    assert block0_mse(lkd, float_model) < 0.85 * block0_mse(rtn, float_model)  # measured ~0.6 (both widths)
    zeroquant(again, bits, group, WINDOWS, lkd_steps=12)
    for name, q in lkd.named_modules():  # deterministic: the same codes and scales on a second run
        if isinstance(q, QuantLinear):
            assert torch.equal(q.qweight, again.get_submodule(name).qweight)
            assert torch.equal(q.scales, again.get_submodule(name).scales)


def test_lkd_runs_on_gpt2_and_under_no_grad():
    model = tiny("gpt2-tiny")
    with torch.no_grad():  # as ``quantize_model_`` may call it; LKD turns gradients on for its own steps
        _, report = zeroquant(model, 4, 32, WINDOWS, lkd_steps=3)
    assert set(report["layers.1.mlp.up_proj"]) == {"weight_rmse", "weight_rms", "block_mse_before",
                                                   "block_mse_after"}
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("_proj"))


def test_bad_input():
    with pytest.raises(LlmlabError, match="no linear layers"):
        zeroquant(nn.Sequential(nn.Linear(4, 4)), 8, 0)
    model = tiny()
    with pytest.raises(LlmlabError, match="does not support --bits 6"):
        zeroquant(model, 6, 0)
    with pytest.raises(LlmlabError, match="--group-size 32 does not divide layers.0.mlp.down_proj's 172"):
        zeroquant(model, 4, 32)
    with pytest.raises(LlmlabError, match="needs calibration windows"):
        zeroquant(model, 4, 4, None, lkd_steps=5)
    with pytest.raises(LlmlabError, match="lkd_lr > 0"):
        zeroquant(model, 4, 4, WINDOWS, lkd_steps=5, lkd_lr=0.0)
    with pytest.raises(LlmlabError, match="symmetric"):
        quantize_zeroquant_(model, QuantSpec(method="zeroquant", symmetric=False), None, progress=False)
    with pytest.raises(LlmlabError, match="decoder blocks"):
        zeroquant(build_model(get_preset("bert-tiny")), 8, 0, WINDOWS, lkd_steps=2)
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))  # untouched
