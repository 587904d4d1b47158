"""The fast CPU decode path: GEMV on packed GGML blocks agrees with the dequantized float32 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmlab.nn.ggml_quants import quantize_q8_0
from llmlab.nn.packed_linear import GEMV_MAX_ROWS, PackedLinear, kernel, pack_linears_q8_0_
from tests.conftest import need

needs_kernel = pytest.mark.skipif(kernel() is None, reason="no C compiler or no AVX2/FMA/F16C on this CPU")


def _packed(name: str, out_features: int, in_features: int, seed: int = 0):
    gguf = need("gguf")
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_features, in_features)) * rng.uniform(0.01, 3, (out_features, 1)))
    w = w.astype(np.float32)
    raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, name))
    return torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1), {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}[name]


@needs_kernel
@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 3, 9, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1])
def test_kernel_matches_reference(name, rows):
    raw, tid = _packed(name, 96, 160)
    fast = PackedLinear(raw, tid, 160, 96, bias=torch.randn(96))
    ref = PackedLinear(raw, tid, 160, 96, bias=fast.bias.detach().clone(), impl="reference")
    x = torch.randn(rows, 160) if rows != 9 else torch.randn(3, 3, 160)  # (M, K), or (B, T, K) flattened
    expected = torch.nn.functional.linear(x, ref.dequantized(), ref.bias)
    assert torch.allclose(ref(x), expected, atol=1e-5)
    got = fast(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_dequantized_is_bit_exact_with_gguf():
    gguf = need("gguf")
    raw, tid = _packed("Q4_1", 8, 64)
    ref = gguf.quants.dequantize(raw.numpy().reshape(8, -1), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(PackedLinear(raw, tid, 64, 8).dequantized().numpy(), ref)


@needs_kernel
def test_q8_0_packing_of_any_model():
    from llmlab.models import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("llama-tiny")).eval()
    ids = torch.randint(0, 512, (1, 9))
    with torch.inference_mode():
        ref = model(ids)
        pack_linears_q8_0_(model)
        assert isinstance(model.lm_head, PackedLinear) and isinstance(model.layers[0].mlp.up_proj, PackedLinear)
        cache = model.new_cache(1, 16)
        model(ids[:, :8], cache=cache)
        step = model(ids[:, 8:], cache=cache)[:, -1]
    # Q8_0 weight-only quantization: small, bounded error
    assert (step - ref[:, -1]).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(quantize_q8_0(torch.zeros(2, 32)), quantize_q8_0(torch.zeros(2, 32)))


@needs_kernel
@pytest.mark.slow
def test_smollm2_packed_decode_agrees_with_reference(smollm, smollm_path):
    from llmlab.api import load
    from llmlab.infer.generate import generate

    fast = load(smollm_path, fast=True)
    assert fast.fast and type(fast.model.lm_head).__name__ == "PackedLinear"
    tok = smollm.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
               "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"]
    for prompt in prompts:
        ids = tok.encode(prompt)
        assert generate(fast.model, [ids], 24)[0].ids == generate(smollm.model, [ids], 24)[0].ids, prompt
    # per-step logits on the decode path (the kernel) vs the reference model
    ids = torch.tensor([tok.encode(prompts[1] + " return n\n    return fibonacci(n - 1) + fibonacci(n - 2)")])
    c_ref, c_fast = smollm.model.new_cache(1, 64), fast.model.new_cache(1, 64)
    with torch.inference_mode():
        smollm.model(ids[:, :5], cache=c_ref)
        fast.model(ids[:, :5], cache=c_fast)
        for t in range(5, ids.shape[1]):
            a = smollm.model(ids[:, t:t + 1], cache=c_ref)
            b = fast.model(ids[:, t:t + 1], cache=c_fast)
            assert (a - b).abs().max() < 1e-3
