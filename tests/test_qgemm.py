"""The integer-dot kernels (nn/csrc/qgemm.c): every CPU variant this machine runs, and the portable C build,
against the exact product they stand for, dequantized weights times Q8-quantized activations."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from llmlab.nn import cpu_kernels, packed_linear
from llmlab.nn.cpu_kernels import CSRC, build_kernel, find_compiler, runnable_variants
from llmlab.nn.ggml_quants import dequantize, q8_activations
from llmlab.nn.packed_linear import LINEAR_ARGTYPES, PackedLinear
from tests.conftest import need

TYPES = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7}
VARIANTS = runnable_variants()  # e.g. ["avx2", "portable"] here; ["avx512vnni", "avx2", "portable"] on AVX-512


@pytest.fixture(scope="module", params=VARIANTS)
def qlinear(request, tmp_path_factory):
    """The qlinear entry point of one variant's build (compile failures fail: a compiler is required here)."""
    if find_compiler() is None:
        pytest.skip("no C compiler")
    build = build_kernel(CSRC / "qgemm.c", "qlinear", LINEAR_ARGTYPES, request.param,
                         tmp_path_factory.mktemp("kernels"))
    assert build.fn is not None, build.status
    return request.param, build.fn


def _packed(name: str, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    gguf = need("gguf")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)) * rng.uniform(0.01, 3, (out_features, 1))
    raw = gguf.quants.quantize(w.astype(np.float32), getattr(gguf.GGMLQuantizationType, name))
    return torch.from_numpy(np.ascontiguousarray(raw)).reshape(out_features, -1)


def _run(fn, tid: int, x: torch.Tensor, raw: torch.Tensor, threads: int) -> torch.Tensor:
    M, K = x.shape
    y = torch.empty(M, raw.shape[0])
    assert fn(tid, x.data_ptr(), raw.data_ptr(), y.data_ptr(), M, raw.shape[0], K, threads) == 0
    return y


def _error(fn, name: str, rows: int, threads: int = 2, N: int = 97, K: int = 160) -> float:
    """max |kernel - W_deq @ q8(x)^T| relative to the product's size. K = 160: five blocks, not a multiple of 256;
    N odd; the outlier column makes some blocks' scales large, as real activations do."""
    raw = _packed(name, N, K)
    w = dequantize(raw.reshape(-1), TYPES[name], N * K).reshape(N, K)
    x = torch.randn(rows, K)
    x[:, 7] *= 50
    expected = q8_activations(x) @ w.T
    got = _run(fn, TYPES[name], x, raw, threads)
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 64, 131, 512])
def test_every_variant_equals_the_q8_product(qlinear, name, rows):
    variant, fn = qlinear
    assert _error(fn, name, rows) < 2e-6, variant


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(qlinear, threads):
    _variant, fn = qlinear
    raw = _packed("Q4_1", 33, 96)
    x = torch.randn(7, 96)
    torch.testing.assert_close(_run(fn, 3, x, raw, threads), _run(fn, 3, x, raw, 1), rtol=0, atol=0)


def test_real_weights_of_smollm2(qlinear, smollm_path):
    """The embedded GGUF's own Q4_1 and Q8_0 blocks (a layer's gate and a slice of the head), real activations
    taken from the model's embedding of a prompt."""
    from llmlab.formats.gguf import GGUFFile

    _variant, fn = qlinear
    g = GGUFFile(smollm_path)
    emb = g.tensors["token_embd.weight"]
    x = dequantize(g.raw(emb).reshape(emb.shape[0], -1)[:12].reshape(-1), emb.ggml_type, 12 * emb.shape[1])
    x = x.reshape(12, -1) * 40  # (12, 576): rows of the embedding, scaled to activations
    for name in ("blk.0.ffn_gate.weight", "token_embd.weight"):
        info = g.tensors[name]
        rows = min(info.shape[0], 2048)
        raw = g.raw(info).reshape(info.shape[0], -1)[:rows].contiguous()
        w = dequantize(raw.reshape(-1), info.ggml_type, rows * info.shape[1]).reshape(rows, -1)
        expected = q8_activations(x) @ w.T
        got = _run(fn, info.ggml_type, x, raw, 2)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-6, name


def test_int8_close_to_the_float_product_and_the_layer_dispatches_to_it():
    """The int8 impl of PackedLinear is the dequantized float product up to the activations' rounding."""
    raw = _packed("Q4_1", 64, 192)
    layer = PackedLinear(raw.reshape(-1), 3, 192, 64, bias=torch.randn(64))
    ref = PackedLinear(raw.reshape(-1), 3, 192, 64, bias=layer.bias.detach().clone(), impl="reference")
    x = torch.randn(2, 5, 192)
    got, expected = layer(x), ref(x)
    assert got.shape == (2, 5, 64)
    if packed_linear.kernel("int8") is not None:
        assert not torch.equal(got, expected)  # the kernel ran: activations were rounded
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 0.02


def test_negative_control_a_wrong_offset_or_interleave_fails(tmp_path):
    """Builds whose Q4_0 zero point is 7 instead of 8 (one line for every build), that drop the Q5 fifth bit, that
    shift Q8_0 by 127 instead of 128 (VNNI), or whose repack interleaves the 8 output rows with a wrong stride must
    fail the parity bound: in the portable C and in the x86 intrinsics (where this CPU runs them)."""
    if find_compiler() is None:
        pytest.skip("no C compiler")
    src = (CSRC / "qgemm.c").read_text()
    x86 = [v for v in VARIANTS if v != "portable"]
    stride = ("memcpy(o + qo + 32 * j + 4 * n, qs + 4 * j, 4)",
              "memcpy(o + qo + 32 * j + 4 * ((n + 1) % NR), qs + 4 * j, 4)")  # rows interleaved one place off
    cases = [("kind == Q4_0 ? 8 :", "kind == Q4_0 ? 7 :", "Q4_0", "portable"),
             ("if (q5) c |= (int32_t)((qh >> (4 * n + i)) & 1) << 4;", "if (q5) c |= 0;", "Q5_0",
              "portable"),
             (*stride, "Q4_1", "portable")]
    if x86:
        cases += [("_mm256_set1_epi8(0x10)", "_mm256_set1_epi8(0x00)", "Q5_1", x86[0]),
                  (*stride, "Q8_0", x86[0])]
    if "avx512vnni" in x86:
        cases.append(("return kind == Q8_0 ? -128 :", "return kind == Q8_0 ? -127 :", "Q8_0", "avx512vnni"))
    for i, (old, new, name, variant) in enumerate(cases):
        assert src.count(old) == 1, old
        broken = tmp_path / f"qgemm_{i}.c"
        broken.write_text(src.replace(old, new))
        build = build_kernel(broken, "qlinear", LINEAR_ARGTYPES, variant, tmp_path / "cache")
        assert build.fn is not None, build.status
        assert _error(build.fn, name, 3) > 1e-3, (old, variant)


def test_variant_cap_and_missing_compiler_give_the_reference_path(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLAB_CPU_VARIANT", "portable")
    assert runnable_variants() == ["portable"] and not cpu_kernels.cpu_has_avx2()
    status = build_kernel(CSRC / "ggml_gemv.c", "ggml_gemv", LINEAR_ARGTYPES, "avx2", tmp_path).status
    assert status.startswith("reference path: this CPU lacks AVX2") and "LLMLAB_CPU_VARIANT" in status
    monkeypatch.setenv("CC", "/nonexistent")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    assert build_kernel(CSRC / "qgemm.c", "qlinear", LINEAR_ARGTYPES, "portable", tmp_path).status.startswith(
        "reference path: no C compiler")


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"CC": "/nonexistent", "PATH": "/nonexistent"}, {"LLMLAB_CPU_VARIANT": "portable"}],
                         ids=["no-compiler", "no-avx2"])
def test_forced_fallbacks_generate_the_same_text(env, tmp_path, smollm_path):
    """``llmlab generate --packed`` in a fresh process without a compiler (the reference path: dequantized blocks,
    so exactly the fp32 model's text) or on a simulated CPU without AVX2 (the portable int8 build: the avx2
    build's text)."""
    import os

    def run(extra: dict, flags: list[str]) -> str:
        environ = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **extra}
        environ["PATH"] = extra.get("PATH", os.environ["PATH"])
        cmd = [sys.executable, "-m", "llmlab", "generate", "def fibonacci(n):", "--max-new-tokens", "24",
               "--temperature", "0", *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    got = run(env, ["--packed"])
    if "CC" in env:
        assert got == run({}, ["--no-packed"])
    else:
        assert got == run({}, ["--packed"])



def test_an_unknown_variant_cap_is_named_and_ignored(monkeypatch, caplog):
    monkeypatch.setenv("LLMLAB_CPU_VARIANT", "avx9")
    cpu_kernels._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="llmlab"):
        assert runnable_variants() == VARIANTS
    assert [r.getMessage() for r in caplog.records] == [
        "llmlab: LLMLAB_CPU_VARIANT='avx9' is not a variant (avx512vnni, avxvnni, avx2, portable); ignored"]
