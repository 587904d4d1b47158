"""LLM.int8() (``llmlab.compress.llm_int8``) against bitsandbytes' CPU path: the same int8 weight codes and
scales, the same outlier columns, and outputs equal within float16 rounding (``Linear8bitLt``) or within
bitsandbytes' dequantization constant (its float32 ops); negative controls show the checks bite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.llm_int8 import int8_vectorwise, llm_int8_linear, quantize_llm_int8_
from llmlab.compress.spec import QuantSpec
from llmlab.models import build_model
from llmlab.models.registry import get_preset
from llmlab.nn.quant_linear import QuantLinear

K, N = 96, 48
FP16_TOL = 2.0 ** -10  # |ours - bitsandbytes| / (|x| @ |W|^T + |b|); measured at most 2^-11 (one fp16 rounding)
BNB_DEQUANT_RATIO = 6.200124e-05 * 127 * 127  # bitsandbytes' CPU constant over the exact 1 / 127^2: 1.000018
OPS_TOL = 3e-5  # float32 ops: the 1.8e-5 of BNB_DEQUANT_RATIO, plus float32 summation


def fp16_linear(seed: int) -> nn.Linear:
    """A float32 linear layer whose weights and bias are float16-representable (bitsandbytes casts to fp16)."""
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight[:, 7] *= 8  # an outlier weight column, so rows have different absmax
        lin.weight.copy_(lin.weight.half().float())
        lin.bias.copy_(lin.bias.half().float())
    return lin


def outlier_input(seed: int) -> torch.Tensor:
    """(3, 7, K) float16-representable activations with injected outlier columns (|x| >= 6 in some tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, K, generator=g)
    x[:, :, [5, 40]] *= 8  # two systematic outlier features
    x[0, 2, 70] = -25.0  # one outlier in a single token: the whole column goes to float
    return x.half().float()


def bnb_linear(bnb, lin: nn.Linear, threshold: float):
    ref = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False, threshold=threshold)
    ref.load_state_dict({"weight": lin.weight.half(), "bias": lin.bias.half()})
    return ref.to("cpu").eval()  # .to() quantizes (Int8Params._quantize); eval: the inference path


def magnitude(x: torch.Tensor, q: QuantLinear) -> torch.Tensor:
    return x.abs() @ q.dequantized().abs().t() + q.bias.abs()  # (..., N): scale of the terms summed


def fp16_error(q: QuantLinear, ref, x: torch.Tensor) -> float:
    with torch.no_grad():
        ours, theirs = q(x.half()).float(), ref(x.half()).float()
    return float(((ours - theirs).abs() / magnitude(x, q)).max())


def test_weight_codes_and_scales_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    for seed in range(3):
        lin = fp16_linear(seed)
        ref = bnb_linear(bnb, lin, 6.0)
        q = llm_int8_linear(lin, 6.0)
        assert q.qweight.dtype == torch.int8 and torch.equal(q.qweight, ref.weight.CB)
        assert q.scales.dtype == torch.float32 and q.scales.shape == (N, 1)
        assert torch.equal(q.scales.flatten(), ref.weight.SCB / 127.0)
        with torch.no_grad():
            lin.weight[2] = 0.0  # an all-zero row: 0 * (127 / 0) is NaN; both give codes 0 and SCB 0
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(lin.weight.half())
        assert torch.equal(int8_vectorwise(lin.weight)[0], cb) and torch.equal(int8_vectorwise(lin.weight)[1], scb)
        assert not cb[2].any() and scb[2] == 0


def test_codes_negative_control_dividing_by_the_scale_differs():
    """round(W / (SCB / 127)) is the textbook formula but not bitsandbytes' rounding: on 1M float16 weights it
    gives different codes somewhere, so the equality above really checks the arithmetic."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = (torch.randn(1024, 1024) * 0.02).half()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w)
    assert torch.equal(int8_vectorwise(w.float())[0], cb)
    textbook = torch.round(w.float() / (scb.unsqueeze(1) / 127.0)).to(torch.int8)
    assert (textbook != cb).sum() > 0


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_outputs_match_linear8bitlt_fp16(threshold):
    bnb = pytest.importorskip("bitsandbytes")
    for seed in range(3):
        lin, x = fp16_linear(seed), outlier_input(seed)
        ref, q = bnb_linear(bnb, lin, threshold), llm_int8_linear(lin, threshold)
        assert fp16_error(q, ref, x) <= FP16_TOL
        if threshold:
            assert q.last_outliers == ref.state.idx.numel() == 3  # columns 5, 40, 70
        else:
            assert q.last_outliers == 0


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_outputs_match_bitsandbytes_ops_fp32(threshold):
    """The ops in float32 (no fp16 casts): equal up to bitsandbytes' dequantization constant."""
    pytest.importorskip("bitsandbytes")
    ops = torch.ops.bitsandbytes
    lin, x = fp16_linear(0), outlier_input(0).reshape(-1, K)  # (21, K)
    q = llm_int8_linear(lin, threshold)
    ca, sca, cols = ops.int8_vectorwise_quant(x.clone(), threshold)
    cb, scb = q.qweight, q.scales.flatten() * 127.0
    if threshold:
        theirs, _ = ops.int8_mixed_scaled_mm(x, ca, cb, sca, scb, cols, lin.bias.detach())
        assert cols.tolist() == [5, 40, 70]
    else:
        theirs = ops.int8_scaled_mm(ca, cb, sca, scb, bias=lin.bias.detach(), dtype=torch.float32)
    with torch.no_grad():
        ours = q(x)
    assert theirs.dtype == torch.float32
    err = float(((ours - theirs).abs() / magnitude(x, q)).max())
    assert err <= OPS_TOL
    assert err > 1e-6  # the constant shows: these are not bit-identical, and the test says why


def test_bitsandbytes_cpu_dequant_constant():
    """The finding behind OPS_TOL: bitsandbytes' default-backend int8_mm_dequant scales by 6.200124e-05, not
    1 / 127^2 = 6.2000124e-05 (its CUDA kernel: 6.200012e-05)."""
    pytest.importorskip("bitsandbytes")
    one = torch.ops.bitsandbytes.int8_mm_dequant(torch.ones(1, 1, dtype=torch.int32), torch.full((1,), 127.0),
                                                 torch.full((1,), 127.0), dtype=torch.float32)
    assert abs(float(one) - BNB_DEQUANT_RATIO) < 1e-7 and abs(BNB_DEQUANT_RATIO - 1 - 1.8e-5) < 1e-6


def _decomposition(zero_outlier_columns: bool):
    """LLM.int8()'s forward written out from the paper (eq. 3-4), as a stand-in for ``QuantLinear._llm_int8``;
    ``zero_outlier_columns=False`` is the bug of counting an outlier column's small values twice."""
    def forward(self, x2, w):
        outliers = x2.abs() >= self.threshold  # (M, K)
        cols = outliers.any(dim=0)  # (K,)
        inl = x2.masked_fill(outliers, 0.0)
        row = inl.abs().amax(dim=1, keepdim=True)  # (M, 1)
        q = torch.round(inl * (127.0 / row))
        if zero_outlier_columns:
            q[:, cols] = 0.0
        self.last_outliers = int(cols.sum())
        return (q @ self.qweight.float().t()) * (row * self.scales.float().t() / 127.0) + x2[:, cols] @ w[:, cols].t()
    return forward


def test_negative_control_not_zeroing_outlier_columns_fails(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    lin, x = fp16_linear(0), outlier_input(0)
    ref, q = bnb_linear(bnb, lin, 6.0), llm_int8_linear(lin, 6.0)
    monkeypatch.setattr(QuantLinear, "_llm_int8", _decomposition(True))
    assert fp16_error(q, ref, x) <= FP16_TOL  # the stand-in is faithful ...
    monkeypatch.setattr(QuantLinear, "_llm_int8", _decomposition(False))
    assert fp16_error(q, ref, x) > 10 * FP16_TOL  # ... and the broken one is caught


def test_negative_control_threshold_zero_means_no_decomposition(monkeypatch):
    """Before the fix in QuantLinear._llm_int8, threshold 0 made every column an outlier (|x| >= 0): a float
    product, far from bitsandbytes' pure int8 one."""
    bnb = pytest.importorskip("bitsandbytes")
    lin, x = fp16_linear(0), outlier_input(0)
    ref, q = bnb_linear(bnb, lin, 0.0), llm_int8_linear(lin, 0.0)
    monkeypatch.setattr(QuantLinear, "_llm_int8", _decomposition(True))  # no `threshold > 0` guard
    assert fp16_error(q, ref, x) > 10 * FP16_TOL


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(get_preset("llama-tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # fp16-representable, as bitsandbytes sees them
        model.layers[1].input_layernorm.weight[[3, 11]] = 400.0  # two outlier features into block 1's q/k/v
    return model


def test_model_codes_and_outlier_report():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    windows = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = model(windows)
    spec = QuantSpec(method="llm-int8")
    report = quantize_llm_int8_(model, spec, windows, progress=False)
    assert spec.act == "llm-int8" and len(spec.modules) == 14 and set(report) == set(spec.modules)
    for name in spec.modules:
        q = model.get_submodule(name)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weights[name].half())
        assert isinstance(q, QuantLinear) and torch.equal(q.qweight, cb)
        assert torch.equal(q.scales.flatten(), scb / 127.0)
    qkv = report["layers.1.self_attn.q_proj"]
    assert qkv["outlier_cols_max"] == 2 and qkv["outlier_col_frac"] == pytest.approx(2 / 64)
    assert qkv["outlier_token_frac"] > 0.5
    assert report["layers.0.self_attn.q_proj"]["outlier_cols_max"] == 0
    with torch.no_grad():
        rel = (model(windows) - ref_logits).norm() / ref_logits.norm()
    assert rel < 0.05  # int8 with the outliers in float stays close to the float model


def test_bad_input():
    with pytest.raises(LlmlabError, match="no linear layers"):
        quantize_llm_int8_(nn.Sequential(nn.Linear(4, 4)), QuantSpec(method="llm-int8"), progress=False)
    model = tiny_model()
    with pytest.raises(LlmlabError, match="does not support --bits 4"):
        quantize_llm_int8_(model, QuantSpec(method="llm-int8", bits=4), progress=False)
    with pytest.raises(LlmlabError, match="per output row"):
        quantize_llm_int8_(model, QuantSpec(method="llm-int8", group_size=32), progress=False)
    with pytest.raises(LlmlabError, match="threshold"):
        quantize_llm_int8_(model, QuantSpec(method="llm-int8", threshold=-1.0), progress=False)
