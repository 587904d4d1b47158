"""Emulated bf16 autocast (nn/autocast.py) against torch.autocast: same numbers to bf16 precision."""

import torch
import torch.nn.functional as F

from llmlab.models.config import ModelConfig
from llmlab.models.decoder import DecoderLM
from llmlab.nn.autocast import EmulatedAutocast, autocast


def test_linear_matches_torch_autocast_to_bf16_rounding():
    torch.manual_seed(0)
    x, w = torch.randn(64, 96), torch.randn(80, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, w)
    with EmulatedAutocast(torch.bfloat16):
        ours = F.linear(x, w)
    assert ref.dtype == torch.bfloat16 and ours.dtype == torch.float32
    assert torch.equal(ours, ours.bfloat16().float())  # results are bf16 values
    rel = ((ours - ref.float()).abs() / ref.float().abs().clamp(min=1e-3)).max()
    assert rel <= 2**-7  # at most one bf16 rounding step apart (summation order)
    assert not torch.equal(ours, F.linear(x, w))  # and really rounded


def test_model_loss_and_gradients_match_torch_autocast():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt2", vocab_size=128, dim=64, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=32,
                      attn_bias=True, mlp_bias=True)
    model = DecoderLM(cfg)
    x = torch.randint(0, 128, (4, 32))

    def run(ctx):
        model.zero_grad()
        with ctx:
            loss = F.cross_entropy(model(x[:, :-1]).float().reshape(-1, 128), x[:, 1:].reshape(-1))
        loss.backward()
        return float(loss.detach()), model.lm_head.weight.grad.clone()

    ref_loss, ref_grad = run(torch.autocast("cpu", dtype=torch.bfloat16))
    our_loss, our_grad = run(autocast(torch.device("cpu"), "bfloat16", emulate=True))
    fp32_loss, _ = run(autocast(torch.device("cpu"), "float32"))
    assert abs(our_loss - ref_loss) < 0.01 and our_loss != fp32_loss
    cos = F.cosine_similarity(our_grad.flatten(), ref_grad.flatten(), dim=0)
    assert cos > 0.999


def test_upcast_matmuls_gives_the_bf16_model_its_numbers():
    """Inference with bf16 weights on fp32 units: the products of bf16 values are exact in fp32, the result is
    rounded back to bf16, so the logits equal the native bf16 model's to bf16 precision."""
    from llmlab.models import build_model, get_preset
    from llmlab.nn.autocast import UpcastMatmuls, upcast_matmuls

    torch.manual_seed(0)
    model = build_model(get_preset("llama-tiny")).eval().to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 40))
    with torch.inference_mode():
        native = model(ids).float()
        with UpcastMatmuls(torch.bfloat16):
            up = model(ids)
    assert up.dtype == torch.bfloat16
    assert (up.float() - native).abs().max() <= 0.02 * native.abs().max()
    mode = upcast_matmuls(torch.device("cpu"), torch.float32)
    assert not isinstance(mode, UpcastMatmuls)  # float32 needs nothing


def test_packed_with_bfloat16_stays_float32_and_says_so(caplog):
    from llmlab.api import load

    with caplog.at_level("WARNING", logger="llmlab"):
        llm = load("llama-tiny", packed=True, dtype="bfloat16")
    assert llm.model.embed_tokens.weight.dtype == torch.float32
    assert any("computes in int8/float32" in r.getMessage() for r in caplog.records)
