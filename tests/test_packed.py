"""The packed CPU decode path's float-activation GEMV (impl "float", csrc/ggml_gemv.c) agrees with the dequantized
float32 reference; the integer kernels (impl "int8", the default) are tested in test_qgemm.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmlab.nn import packed_linear
from llmlab.nn.cpu_kernels import CSRC, build_kernel, cpu_has_avx2, find_compiler
from llmlab.nn.ggml_quants import dequantize, quantize_q8_0
from llmlab.nn.packed_linear import (
    GEMV_MAX_ROWS,
    LINEAR_ARGTYPES,
    PackedLinear,
    kernel_build,
    pack_linears_q8_0_,
    set_impl_,
)
from tests.conftest import need

BUILD = kernel_build("float")
# The kernel variant that runs is part of every kernel test's id, e.g. test_kernel_matches_reference[avx2-fma-f16c-...]
VARIANT = pytest.mark.parametrize("variant", [BUILD.variant or "none"])


@pytest.fixture(autouse=True)
def _kernel_or_reason(request, record_property):
    """Kernel tests run where a compiler and AVX2/FMA/F16C exist; there a failed build is a failure, not a skip."""
    if "variant" not in request.fixturenames:
        return
    record_property("packed_kernel", BUILD.status)
    if BUILD.fn is None:
        if find_compiler() is not None and cpu_has_avx2():
            pytest.fail(f"a C compiler and AVX2/FMA/F16C are here, yet {BUILD.status}")
        pytest.skip(BUILD.status)


def _packed(name: str, out_features: int, in_features: int, seed: int = 0):
    gguf = need("gguf")
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_features, in_features)) * rng.uniform(0.01, 3, (out_features, 1)))
    w = w.astype(np.float32)
    raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, name))
    return torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1), {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}[name]


def _kernel_error(name: str, rows: int) -> tuple[float, float]:
    """(max |kernel - dequantized float32 product|, the allowed bound) for one layer and batch of rows."""
    raw, tid = _packed(name, 96, 160)
    kern = PackedLinear(raw, tid, 160, 96, bias=torch.randn(96), impl="float")
    ref = PackedLinear(raw, tid, 160, 96, bias=kern.bias.detach().clone(), impl="reference")
    x = torch.randn(rows, 160) if rows != 9 else torch.randn(3, 3, 160)  # (M, K), or (B, T, K) flattened
    expected = torch.nn.functional.linear(x, ref.dequantized(), ref.bias)
    assert torch.allclose(ref(x), expected, atol=1e-5)
    got = kern(x)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item(), 1e-4 * expected.abs().max().item()


@VARIANT
@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 3, 9, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1])
def test_kernel_matches_reference(variant, name, rows):
    err, bound = _kernel_error(name, rows)
    assert err <= bound, (variant, err)


def _compile_variant(tmp_path, old: str, new: str):
    src = (CSRC / "ggml_gemv.c").read_text()
    assert src.count(old) == 1
    path = tmp_path / "ggml_gemv_broken.c"
    path.write_text(src.replace(old, new))
    return build_kernel(path, "ggml_gemv", LINEAR_ARGTYPES, "avx2", tmp_path / "cache")


@VARIANT
def test_negative_control_a_wrong_kernel_fails_the_parity_check(variant, tmp_path, monkeypatch):
    """A kernel whose horizontal sum drops half the lanes must fail the bound of the test above."""
    broken = _compile_variant(tmp_path, "    s = _mm_hadd_ps(s, s);\n    s = _mm_hadd_ps(s, s);\n",
                              "    s = _mm_hadd_ps(s, s);\n")
    assert broken.fn is not None, broken.status
    monkeypatch.setattr(packed_linear, "kernel", lambda impl: broken.fn)
    for name in ("Q8_0", "Q4_0", "Q4_1"):
        for rows in (1, 3):
            err, bound = _kernel_error(name, rows)
            assert err > bound, (name, rows, err, bound)
    err, bound = _kernel_error("Q8_0", GEMV_MAX_ROWS + 1)  # prefill never reaches the kernel
    assert err <= bound


def test_negative_control_a_failed_compile_keeps_the_compilers_message(tmp_path, caplog):
    if find_compiler() is None or not cpu_has_avx2():
        pytest.skip(BUILD.status)
    broken = _compile_variant(tmp_path, "static inline float hsum(", "static inline flaot hsum(")
    assert broken.fn is None and broken.failed
    assert "failed to compile ggml_gemv_broken.c" in broken.status
    assert "error" in broken.status and "flaot" in broken.status  # the compiler's own words
    assert "\n" not in broken.status and "flaot" in broken.compiler_output
    # users see it once, in one line: kernel_build() warns through the llmlab logger
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(packed_linear, "build_kernel", lambda *a: broken)
        packed_linear.kernel_build.cache_clear()
        with caplog.at_level("WARNING", logger="llmlab"):
            assert packed_linear.kernel("float") is None
        assert [r.getMessage().count("\n") for r in caplog.records] == [0]
        assert "flaot" in caplog.records[0].getMessage()
    finally:
        monkeypatch.undo()
        packed_linear.kernel_build.cache_clear()


def test_dequantized_is_bit_exact_with_gguf():
    gguf = need("gguf")
    raw, tid = _packed("Q4_1", 8, 64)
    ref = gguf.quants.dequantize(raw.numpy().reshape(8, -1), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(PackedLinear(raw, tid, 64, 8).dequantized().numpy(), ref)


@VARIANT
def test_q8_0_packing_of_any_model(variant, monkeypatch):
    from llmlab.models import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("llama-tiny")).eval()
    ids = torch.randint(0, 512, (1, 9))
    calls = []
    monkeypatch.setattr(packed_linear, "kernel", lambda impl: calls.append(impl) or BUILD.fn)
    with torch.inference_mode():
        ref = model(ids)
        pack_linears_q8_0_(model, impl="float")
        assert isinstance(model.lm_head, PackedLinear) and isinstance(model.layers[0].mlp.up_proj, PackedLinear)
        cache = model.new_cache(1, 16)
        model(ids[:, :8], cache=cache)
        step = model(ids[:, 8:], cache=cache)[:, -1]
    # Q8_0 weight-only quantization: small, bounded error
    assert (step - ref[:, -1]).abs().max() < 0.05 * ref.abs().max()
    assert calls, "the decode step never asked for the C kernel"


def test_q8_0_of_zeros_is_zero_blocks():
    """An all-zero block has scale 0: 34 zero bytes, and it must dequantize to zeros (no 0/0 NaN)."""
    packed = quantize_q8_0(torch.zeros(2, 32))
    assert packed.dtype == torch.uint8 and packed.numel() == 2 * 34 and not packed.any()
    assert torch.equal(dequantize(packed.reshape(-1), 8, 64), torch.zeros(64))


@VARIANT
@pytest.mark.slow
def test_smollm2_packed_decode_agrees_with_reference(variant, smollm, smollm_path):
    from llmlab.api import load
    from llmlab.infer.generate import generate

    packed = load(smollm_path, packed=True)
    assert packed.packed and type(packed.model.lm_head).__name__ == "PackedLinear"
    set_impl_(packed.model, "float")  # the float-activation GEMV: the reference's numbers up to summation order
    tok = smollm.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
               "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"]
    for prompt in prompts:
        ids = tok.encode(prompt)
        assert generate(packed.model, [ids], 24)[0].ids == generate(smollm.model, [ids], 24)[0].ids, prompt
    # per-step logits on the decode path (the kernel) vs the reference model
    ids = torch.tensor([tok.encode(prompts[1] + " return n\n    return fibonacci(n - 1) + fibonacci(n - 2)")])
    c_ref, c_packed = smollm.model.new_cache(1, 64), packed.model.new_cache(1, 64)
    with torch.inference_mode():
        smollm.model(ids[:, :5], cache=c_ref)
        packed.model(ids[:, :5], cache=c_packed)
        for t in range(5, ids.shape[1]):
            a = smollm.model(ids[:, t:t + 1], cache=c_ref)
            b = packed.model(ids[:, t:t + 1], cache=c_packed)
            assert (a - b).abs().max() < 1e-3


def test_keep_dense_uses_the_float_weight_for_many_rows(monkeypatch):
    """keep_dense_: products of >= min_rows rows go through the float32 copy, fewer through the blocks; both
    give the dequantized product."""
    from llmlab.nn.packed_linear import keep_dense_

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    layer = PackedLinear(quantize_q8_0(lin.weight.detach()), 8, 64, 48, impl="float")
    model = keep_dense_(torch.nn.Sequential(layer), min_rows=4)
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(packed_linear.F, "linear", lambda x, w, *a: calls.append(w is layer.dense) or real(x, w, *a))
    w = layer.dequantized()
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 64)
        calls.clear()
        torch.testing.assert_close(model(x), x @ w.T, atol=1e-4, rtol=1e-4)
        assert (calls == [True]) == (rows >= 4) or packed_linear.kernel("float") is None
