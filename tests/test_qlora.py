"""QLoRA bases (Dettmers et al. 2023, arXiv:2305.14314): gradients through the frozen NF4 and GGML-packed
layers equal autograd through the dequantized weight, without a saved float copy of it; LoRA trains on both
bases; dequantize + merge reproduces the unmerged model; peft + bitsandbytes parity on a 4-bit base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.models.config import ModelConfig
from llmlab.models.registry import build_model
from llmlab.nn import packed_linear
from llmlab.nn.lora import LoRAConfig, LoRALinear, apply_lora_, lora_modules, mark_only_lora_trainable_, merge_lora_
from llmlab.nn.nf4 import NF4Linear, NF4Weight, quantize_nf4
from llmlab.nn.packed_linear import GEMV_MAX_ROWS, PackedLinear, kernel, pack_linears_q8_0_
from llmlab.nn.qlora import dequantize_linears_, prepare_qlora_
from tests.conftest import need

TYPE_IDS = {"Q8_0": 8, "Q4_1": 3}


def _tiny(tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      max_seq_len=64, tie_embeddings=tie)
    return build_model(cfg).eval()


def _randomize_lora_(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)  # B starts at zero: a random B makes the update non-trivial
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def _packed_layer(name: str, out_features: int, in_features: int, impl: str) -> PackedLinear:
    gguf = need("gguf")  # the reference quantizer: real GGML blocks
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((out_features, in_features)) * rng.uniform(0.01, 1, (out_features, 1))).astype(np.float32)
    raw = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, name))))
    return PackedLinear(raw.reshape(-1), TYPE_IDS[name], in_features, out_features, torch.randn(out_features), impl)


def _saved_numels(fn) -> list[int]:
    """Sizes of every tensor autograd saves for backward while ``fn()`` runs."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


# ---- gradients through the packed base -----------------------------------------------------------------


@pytest.mark.parametrize("impl", ["float", "reference"])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_1"])
def test_packed_backward_matches_autograd_through_dequantized(name, impl):
    layer = _packed_layer(name, 96, 160, impl)
    w = layer.dequantized()  # (96, 160)
    for rows in (1, 7, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 200):
        x = torch.randn(rows, 160, requires_grad=True)
        g = torch.randn(rows, 96)
        y = layer(x)
        (y * g).sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        y_ref = F.linear(x_ref, w, layer.bias)
        (y_ref * g).sum().backward()
        assert (y - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()  # kernel: summation order only
        assert (x.grad - x_ref.grad).abs().max() <= 1e-6 * x_ref.grad.abs().max()
        assert layer.packed.grad is None and not layer.packed.requires_grad
    # batched input (B, T, K) and a frozen weight: gradient to x only
    x = torch.randn(2, 3, 160, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape
    assert torch.allclose(x.grad, w.sum(0).expand(2, 3, 160), rtol=1e-5, atol=1e-5)


def test_packed_wide_layer_dequantizes_in_row_chunks(monkeypatch):
    layer = _packed_layer("Q4_1", 96, 160, "reference")
    w = layer.dequantized()  # (96, 160)
    monkeypatch.setattr(packed_linear, "DEQUANT_CHUNK", 160 * 10)  # 10 rows a chunk: 10 chunks, the last short
    assert len(layer.row_chunks()) == 10 and layer.row_chunks()[-1] == (90, 96)
    x = torch.randn(100, 160, requires_grad=True)
    g = torch.randn(100, 96)
    y = layer(x)
    (y * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w, layer.bias)
    (y_ref * g).sum().backward()
    assert (y - y_ref).abs().max() <= 1e-6 * y_ref.abs().max()
    assert (x.grad - x_ref.grad).abs().max() <= 1e-6 * x_ref.grad.abs().max()
    sizes = _saved_numels(lambda: layer(x).sum())
    assert max(sizes, default=0) <= 100 * 160  # nothing bigger than the input is saved


def test_packed_backward_keeps_no_float_weight():
    layer = _packed_layer("Q4_1", 96, 160, "reference")
    x = torch.randn(200, 160, requires_grad=True)  # > GEMV_MAX_ROWS: the dequantize + F.linear branch
    sizes = _saved_numels(lambda: layer(x).sum())
    assert 96 * 160 not in sizes  # F.linear(x, dequantized) would save the (96, 160) weight


@pytest.mark.skipif(kernel("float") is None, reason="the float GEMV does not build here")
def test_packed_kernel_path_is_taken_under_autograd(monkeypatch):
    calls = []
    layer = _packed_layer("Q8_0", 64, 96, "float")
    real = layer.matmul
    monkeypatch.setattr(layer, "dequantized", lambda *a: calls.append(1) or PackedLinear.dequantized(layer, *a))
    x = torch.randn(4, 96, requires_grad=True)
    y = real(x.detach())
    out = layer(x)
    assert not calls  # forward on <= 64 rows ran the GEMV, not a dequantize
    out.sum().backward()
    assert calls == [1]  # backward dequantized once
    assert torch.allclose(out, y + layer.bias)


# ---- NF4 backward ----------------------------------------------------------------------------------------


def _lora_pair(base: nn.Module, dense: nn.Linear) -> tuple[LoRALinear, LoRALinear]:
    a, b = LoRALinear(base, r=4, alpha=8.0), LoRALinear(dense, r=4, alpha=8.0)
    with torch.no_grad():
        a.lora_B.weight.normal_()
        b.lora_A.weight.copy_(a.lora_A.weight)
        b.lora_B.weight.copy_(a.lora_B.weight)
    return a, b


def _dense_twin(layer: nn.Module, w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    return lin


def _check_lora_grads(q: LoRALinear, ref: LoRALinear, x: torch.Tensor, tol: float = 1e-6) -> None:
    g = torch.randn(*x.shape[:-1], q.out_features)
    xq, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yq, yr = q(xq), ref(xr)
    (yq * g).sum().backward()
    (yr * g).sum().backward()
    assert (yq - yr).abs().max() <= tol * yr.abs().max()
    for got, want in ((xq.grad, xr.grad), (q.lora_A.weight.grad, ref.lora_A.weight.grad),
                      (q.lora_B.weight.grad, ref.lora_B.weight.grad)):
        assert (got - want).abs().max() <= tol * want.abs().max()


def test_lora_over_nf4_equals_lora_over_dequantized_linear():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 80))
    q, ref = _lora_pair(base, _dense_twin(base, base.dequantize()))
    _check_lora_grads(q, ref, torch.randn(3, 5, 128))
    sizes = _saved_numels(lambda: base(torch.randn(5, 128, requires_grad=True)).sum())
    assert 80 * 128 not in sizes  # no saved dequantized weight


def test_nf4_bf16_compute_backward():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    want = layer.dequantize().float().sum(0).expand(4, 64)  # d/dx sum(x W^T) = column sums of W
    assert x.grad.dtype == torch.float32 and torch.allclose(x.grad, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1"])
def test_lora_over_packed_equals_lora_over_dequantized_linear(name):
    base = _packed_layer(name, 64, 96, "float")
    q, ref = _lora_pair(base, _dense_twin(base, base.dequantized()))
    _check_lora_grads(q, ref, torch.randn(2, 3, 96), tol=1e-5)  # kernel forward: summation order


# ---- models --------------------------------------------------------------------------------------------


def test_lora_on_packed_tiny_model_trains_and_leaves_the_base():
    m = pack_linears_q8_0_(_tiny())
    before = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("packed")}
    apply_lora_(m, LoRAConfig(r=4, alpha=8.0, target_modules="all-linear"))
    assert isinstance(m.layers[0].mlp.down_proj.base_layer, PackedLinear)
    assert not isinstance(m.lm_head, LoRALinear)  # all-linear leaves the head out
    n_train = mark_only_lora_trainable_(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(0))
    m.train()
    losses = []
    for step in range(5):
        loss = F.cross_entropy(m(ids[:, :-1]).reshape(-1, 96), ids[:, 1:].reshape(-1))
        loss.backward()
        # once B != 0 (after step 0), the first layer's A learns only through dL/dx of every packed layer
        # above it and of the packed head
        assert step == 0 or m.layers[0].self_attn.q_proj.lora_A.weight.grad.abs().max() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert n_train == sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    after = m.state_dict()
    moved = {k: k if k in after else k.replace(".packed", ".base_layer.packed") for k in before}
    assert len(before) == 15 and all(torch.equal(before[k], after[moved[k]]) for k in before)


@pytest.mark.parametrize("base", ["nf4", "packed"])
def test_dequantize_and_merge_gives_the_unmerged_logits(base):
    m = _tiny(tie=True)
    info = prepare_qlora_(m, base)
    assert len(info["quantized"]) == 14 and info["left_float"] == ["lm_head"]
    assert info["bytes_after"] < info["bytes_before"]
    apply_lora_(m, LoRAConfig(r=4, alpha=8.0, target_modules="all-linear"))
    _randomize_lora_(m)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(ids)
    with pytest.raises(LlmlabError, match="dequantize_linears_"):
        merge_lora_(m)
    replaced = dequantize_linears_(m)
    assert len(replaced) == 14 and all(n.endswith(".base_layer") for n in replaced)
    with torch.no_grad():
        assert (m(ids) - want).abs().max() <= 1e-5 * want.abs().max()
        merge_lora_(m)
        got = m(ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_packed_gguf_style_head_is_retied_on_dequantize():
    m = _tiny(tie=True)
    with torch.no_grad():  # as a packed GGUF: the float embedding is the dequantized head blocks
        pack_linears_q8_0_(m)
        m.embed_tokens.weight.copy_(m.lm_head.dequantized())
    info = prepare_qlora_(m, "packed")
    assert len(info["kept"]) == 14 and not info["quantized"] and info["left_float"] == []
    assert "lm_head" in dequantize_linears_(m)
    assert m.lm_head.weight is m.embed_tokens.weight


def test_prepare_qlora_errors():
    with pytest.raises(LlmlabError, match="unknown QLoRA base"):
        prepare_qlora_(_tiny(), "int3")
    with pytest.raises(LlmlabError, match="base='packed'"):
        prepare_qlora_(pack_linears_q8_0_(_tiny()), "nf4")
    with pytest.raises(LlmlabError, match="float32"):
        prepare_qlora_(_tiny(), "packed", compute_dtype=torch.bfloat16)
    m = _tiny()
    apply_lora_(m, LoRAConfig(r=2))
    with pytest.raises(LlmlabError, match="before apply_lora_"):
        prepare_qlora_(m, "nf4")


@pytest.mark.parametrize("base", ["nf4", "packed"])
def test_state_dict_round_trip(base):
    def make(seed):
        m = _tiny(seed=seed)
        prepare_qlora_(m, base)
        apply_lora_(m, LoRAConfig(r=4, target_modules="all-linear"))
        _randomize_lora_(m, seed)
        return m

    a, b = make(0), make(1)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a(ids), b(ids))
    sd = a.state_dict()
    assert any(k.endswith("base_layer.codes" if base == "nf4" else "base_layer.packed") for k in sd)
    b.load_state_dict(sd)  # strict: the buffers' names and shapes round-trip
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sd.items())
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


# ---- peft + bitsandbytes -------------------------------------------------------------------------------


def test_lora_on_4bit_base_matches_peft_bitsandbytes():
    peft = need("peft")
    bnb = need("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    try:
        lin4 = bnb.nn.Linear4bit(128, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                 compress_statistics=True)
        lin4.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        lin4 = lin4.to("cpu")
        state = lin4.weight.quant_state
        lin4(torch.randn(1, 128))
    except Exception as e:  # no CPU backend in this build: the peer cannot run here
        pytest.skip(f"bitsandbytes' CPU 4-bit path does not run here: {type(e).__name__}: {e}")

    class Net(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    theirs = peft.get_peft_model(Net(lin4), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = theirs.base_model.model.proj
    assert layer.base_layer is lin4  # peft's LoRA over the bitsandbytes 4-bit layer (its CPU forward/backward)
    # our NF4Linear over bitsandbytes' own quantized state (codes, 8-bit absmax, scales, mean)
    nf4w = NF4Weight(lin4.weight.data.reshape(-1), (48, 128), 64, None, state.absmax, state.state2.absmax,
                     state.offset)
    ours = LoRALinear(NF4Linear(nf4w), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 128)
    g = torch.randn(3, 5, 48)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    (yo * g).sum().backward()
    (yt * g).sum().backward()
    assert (yo - yt).abs().max() <= 1e-5 * yt.abs().max()
    assert (xo.grad - xt.grad).abs().max() <= 1e-5 * xt.grad.abs().max()
    for ours_p, theirs_p in ((ours.lora_A.weight, layer.lora_A["default"].weight),
                             (ours.lora_B.weight, layer.lora_B["default"].weight)):
        assert (ours_p.grad - theirs_p.grad).abs().max() <= 1e-5 * theirs_p.grad.abs().max()
    assert quantize_nf4(w).codes.numel() == lin4.weight.data.numel()  # same packing size as ours


# ---- low-peak NF4 load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_load_quantize_nf4_equals_float_load_then_prepare(tmp_path, preset):
    from llmlab.formats.gguf_model import write_model_gguf
    from llmlab.formats.load import load_model
    from llmlab.models import get_preset
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = ByteBPE(vocab, [], GGUF_PRE["gpt2"], {})
    torch.manual_seed(0)
    cfg = get_preset(preset)
    cfg.vocab_size = len(vocab)
    path = tmp_path / "m.gguf"
    write_model_gguf(path, cfg, build_model(cfg).state_dict(), tok, qtype="Q8_0")
    low = load_model(path, quantize="nf4").model
    ref = load_model(path).model
    info = prepare_qlora_(ref, "nf4")
    assert len(info["quantized"]) == sum(isinstance(m, NF4Linear) for m in low.modules()) > 0
    a, b = low.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, len(vocab), (1, 9))
    with torch.no_grad():
        assert torch.equal(low(ids), ref(ids))
    with pytest.raises(LlmlabError, match="quantize"):
        load_model(path, quantize="nf4", packed=True)
    with pytest.raises(LlmlabError, match="GGUF"):
        load_model("llama-tiny", quantize="nf4")
