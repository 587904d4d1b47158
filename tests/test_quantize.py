"""Round-to-nearest quantization, the QuantLinear layer, quantized folders and ``llmlab quantize``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.compress.quantize import (
    absmax_quantize,
    make_spec,
    quantize_absmax_layer,
    quantize_model_,
    quantize_rtn_layer,
    quantize_zeropoint_layer,
    zeropoint_quantize,
)
from llmlab.formats.convert import write_loaded
from llmlab.formats.load import load_model
from llmlab.models.registry import build_model, get_preset
from llmlab.nn.ggml_quants import TYPE_IDS, dequantize
from llmlab.nn.packed_linear import PackedLinear
from llmlab.nn.quant_linear import QuantLinear


def tiny(seed: int = 0):
    """llama-tiny with an FFN width that is whole GGML blocks (the preset's 172 is not)."""
    from dataclasses import replace

    torch.manual_seed(seed)
    return build_model(replace(get_preset("llama-tiny"), ffn_dim=128)).eval()


def loaded_tiny(seed: int = 0):
    ld = load_model("llama-tiny")
    ld.model = tiny(seed)
    ld.config = ld.model.config
    return ld


# ---- the notebook's worked example, computed by hand ------------------------------------------------------
def test_absmax_worked_example():
    x = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    q, deq = absmax_quantize(x)
    # scale = 127 / 2 = 63.5: -63.5 rounds half to even -> -64, 31.75 -> 32, 127, 0
    assert q.tolist() == [-64, 32, 127, 0]
    assert torch.allclose(deq, torch.tensor([-64, 32, 127, 0]) / 63.5)


def test_zeropoint_worked_example():
    x = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    q, deq = zeropoint_quantize(x)
    # scale = 255 / 3 = 85, zero-point = round(85 - 128) = -43; 0.5 * 85 - 43 = -0.5 rounds to -0
    assert q.tolist() == [-128, 0, 127, -43]
    assert torch.allclose(deq, (torch.tensor([-128.0, 0, 127, -43]) + 43) / 85)


def test_finer_granularity_lowers_error():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[3] *= 20  # an outlier row: per-tensor scales waste the grid on it
    w[:, 7] *= 10  # an outlier column: per-channel scales waste it, groups contain it
    err = {g: (quantize_absmax_layer(w, 4, g).dequantized() - w).pow(2).mean().item() for g in (-1, 0, 32)}
    assert err[32] < err[0] < err[-1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_in_range_and_error_bound(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    for sym in (True, False):
        layer = quantize_rtn_layer(w, bits, 32, sym)
        q = layer.qweight.long()
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
        assert lo <= q.min() and q.max() <= hi
        # round-to-nearest: most weights within half a step; the range's ends within one (a symmetric grid's top
        # code is clamped, an asymmetric grid's zero-point is rounded)
        step = layer.scales.float().repeat_interleave(32, dim=1)
        err = (layer.dequantized() - w).abs()
        assert (err <= step + 1e-6).all() and (err <= 0.5 * step + 1e-6).float().mean() > 0.9


# ---- packing: the codes become GGML blocks with the same values --------------------------------------------
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 32), (4, 0), (5, 32), (6, 32), (8, 0), (8, -1)])
def test_symmetric_layers_pack_exactly(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(24, 128)
    for layer in (quantize_rtn_layer(w, bits, group, True), quantize_absmax_layer(w, bits, group)):
        raw, name = layer.packed_blocks()
        assert name == ("Q4_0" if bits <= 4 else "Q5_0" if bits == 5 else "Q8_0")
        back = dequantize(raw.reshape(-1), TYPE_IDS[name], w.numel()).reshape(w.shape)
        assert torch.equal(back, layer.dequantized())


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_asymmetric_layers_pack_within_the_min_rounding(bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 128) + 0.3
    layer = quantize_rtn_layer(w, bits, 32, False)
    raw, name = layer.packed_blocks()
    assert name == ("Q4_1" if bits <= 4 else "Q5_1")
    back = dequantize(raw.reshape(-1), TYPE_IDS[name], w.numel()).reshape(w.shape)
    m = (layer.scales.float() * layer.zeros.float()).repeat_interleave(32, dim=1)  # |min| per weight
    assert ((back - layer.dequantized()).abs() <= m * 2 ** -11 + 1e-7).all()


def test_not_packable_cases():
    w = torch.randn(8, 96)
    assert quantize_zeropoint_layer(w, 8, 0).packed_blocks() is None  # 8-bit asymmetric: no GGML type
    assert quantize_rtn_layer(w, 4, 48, True).packed_blocks() is None  # groups straddle 32-blocks
    assert quantize_absmax_layer(w, 8, 0, act="token").packed_blocks() is None  # activations quantized


def test_quant_linear_keeps_scales_dtype_under_to():
    layer = quantize_rtn_layer(torch.randn(8, 64), 4, 32, True)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int8


def test_per_token_activations():
    layer = quantize_absmax_layer(torch.randn(8, 64), 8, 0, act="token")
    x = torch.randn(3, 64)
    qmax = 127
    s = x.abs().amax(dim=1, keepdim=True) / qmax
    expected = (torch.round(x / s) * s) @ layer.dequantized().t()
    assert torch.allclose(layer(x), expected, atol=1e-5)


# ---- quantized folders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("absmax", {}), ("zeropoint", {}), ("rtn", {"bits": 4}),
                                       ("rtn", {"bits": 3, "symmetric": True}), ("nf4", {}),
                                       ("absmax", {"act": "token"}), ("absmax", {"group_size": -1})])
def test_folder_round_trip(tmp_path, method, kw):
    ld = loaded_tiny()
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = ld.model(x)
        spec = make_spec(method, **kw)
        quantize_model_(ld.model, spec)
        y = ld.model(x)
    assert 0 < (y - ref).abs().max() < 0.2 * ref.abs().max()
    write_loaded(ld, tmp_path / "q", quant_spec=spec.to_json(), dtype="float32")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["method"] == method
    back = load_model(str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(back.model(x), y)


def test_folder_runs_on_packed_kernels(tmp_path):
    ld = loaded_tiny()
    spec = make_spec("rtn", bits=4, group_size=32, symmetric=True)
    quantize_model_(ld.model, spec)
    write_loaded(ld, tmp_path / "q", quant_spec=spec.to_json(), dtype="float32")
    x = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        hidden = ld.model(x, return_hidden=True)
        for kernel, tol in (("reference", 1e-5), ("int8", 0.05)):
            from llmlab.api import load

            fast = load(str(tmp_path / "q"), packed=True, packed_kernel=kernel)
            packed = [m for m in fast.model.layers.modules() if isinstance(m, PackedLinear)]
            assert len(packed) == len(spec.modules) and {m.ggml_type for m in packed} == {TYPE_IDS["Q4_0"]}
            assert (fast.model(x, return_hidden=True) - hidden).abs().max() < tol


@pytest.mark.parametrize("method,kw", [("zeropoint", {}), ("absmax", {"act": "token"}), ("llm-int8", {})])
def test_unpackable_layers_keep_a_dense_weight_on_the_fast_path(tmp_path, method, kw):
    """8-bit asymmetric codes, W8A8 and LLM.int8() have no GGML type: load(packed=True) dequantizes them once
    (QuantLinear.keep_dense_) instead of in every call, with the same outputs."""
    ld = loaded_tiny()
    spec = make_spec(method, **kw)
    quantize_model_(ld.model, spec)
    write_loaded(ld, tmp_path / "q", quant_spec=spec.to_json(), dtype="float32")
    x = torch.randint(0, 512, (2, 10))
    slow, fast = load_model(str(tmp_path / "q")), load_model(str(tmp_path / "q"), packed=True)
    layers = [m for m in fast.model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(spec.modules) and all(m.dense is not None for m in layers)
    with torch.no_grad():
        assert torch.equal(fast.model(x, return_hidden=True), slow.model(x, return_hidden=True))


def test_truncated_folder_is_named(tmp_path):
    from llmlab.formats import safetensors

    ld = loaded_tiny()
    spec = make_spec("rtn", bits=4, group_size=32)
    quantize_model_(ld.model, spec)
    write_loaded(ld, tmp_path / "q", quant_spec=spec.to_json())
    path = tmp_path / "q" / "model.safetensors"
    tensors = safetensors.load(path)
    del tensors["model.layers.1.mlp.down_proj.scales"]
    safetensors.save(tensors, path)
    with pytest.raises(LlmlabError, match=r"down_proj\.scales is missing"):
        load_model(str(tmp_path / "q"))


# ---- quantized folder -> GGUF: the layers' own blocks -------------------------------------------------------
@pytest.mark.parametrize("method,kw,gtype", [("rtn", {"bits": 4, "symmetric": True}, "Q4_0"),
                                             ("absmax", {"bits": 8}, "Q8_0"),
                                             ("rtn", {"bits": 4}, "Q4_1"),
                                             ("nf4", {}, None)])
def test_quantized_folder_converts_to_gguf_with_its_own_blocks(tmp_path, tiny_chat, method, kw, gtype):
    """``llmlab convert`` of a quantized folder writes each packable layer's own blocks (no second
    quantization: the GGUF model computes what the folder does, exactly for symmetric codes and within the
    asymmetric min's float16 rounding); a layer with no GGML type (NF4) is dequantized and written as --qtype."""
    from llmlab.formats.gguf import GGUFFile

    ld = load_model(str(tiny_chat))
    spec = make_spec(method, **kw)
    quantize_model_(ld.model, spec)
    write_loaded(ld, tmp_path / "q", quant_spec=spec.to_json(), dtype="float32")
    r = run_cli("convert", str(tmp_path / "q"), str(tmp_path / "q.gguf"), "--qtype", "F32")
    assert r.returncode == 0, r.stderr
    g = GGUFFile(tmp_path / "q.gguf")
    kinds = {name: info.type_name for name, info in g.tensors.items() if name.startswith("blk.0.")}
    linears = {n: t for n, t in kinds.items() if "norm" not in n}
    assert len(linears) == 7 and set(linears.values()) == {gtype or "F32"}
    assert g.metadata["general.file_type"] == {"Q4_0": 2, "Q8_0": 7, "Q4_1": 3, None: 0}[gtype]
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        want = load_model(str(tmp_path / "q")).model(x)
        got = load_model(str(tmp_path / "q.gguf")).model(x)
    if gtype == "Q4_1":  # the block min -s * z rounded to float16
        assert 0 < (got - want).abs().max() < 1e-3 * want.abs().max()
    else:  # symmetric codes as they are; NF4 dequantized to F32
        assert torch.equal(got, want)


@pytest.mark.slow
def test_quantized_smollm2_gguf_generates_like_llmlab_and_llama_cpp(tmp_path, smollm_path):
    """The real SmolLM2 quantized to 4-bit groups of 32 (Q4_1 blocks), converted to GGUF: the GGUF computes what
    the folder does (logits within the blocks' float16 mins), and llmlab's packed path and llama.cpp on the GGUF
    give the same greedy text."""
    from llmlab.api import load

    r = run_cli("quantize", "--method", "rtn", "--out", str(tmp_path / "q"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("convert", str(tmp_path / "q"), str(tmp_path / "q.gguf"))
    assert r.returncode == 0, r.stderr
    ids = torch.tensor([load_model(str(tmp_path / "q")).tokenizer.encode("def add(a, b):\n    return")])
    with torch.no_grad():
        want = load_model(str(tmp_path / "q")).model(ids)
        got = load_model(str(tmp_path / "q.gguf")).model(ids)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert load(str(tmp_path / "q.gguf"), packed=True).generate("The capital of France is",
                                                                max_new_tokens=4).startswith(" Paris")
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: the llama.cpp half of this test did not run")
    # llama.cpp reads the same blocks: its logits (Q8_1 activations, float16 head) match llmlab's within a few
    # percent, and the top token agrees almost everywhere (4-bit greedy text can split at near-ties, margins of
    # 0.01-0.1, as on "The capital of France is Paris" -> ',' / '.")')
    text = ids[0].tolist() + load_model(str(tmp_path / "q")).tokenizer.encode(
        " a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\nclass Point:\n    def __init__(self, x, y):")
    ref = llama_cpp.Llama(model_path=str(tmp_path / "q.gguf"), n_ctx=64, n_threads=1, verbose=False,
                          logits_all=True)
    ref.eval(text)
    theirs = torch.tensor(ref.scores[: len(text)])  # (T, vocab)
    with torch.no_grad():
        ours = load_model(str(tmp_path / "q.gguf")).model(torch.tensor([text]))[0]
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


# ---- bad input -----------------------------------------------------------------------------------------------
def test_spec_errors():
    with pytest.raises(LlmlabError, match="does not support --bits 4"):
        make_spec("llm-int8", bits=4)
    with pytest.raises(LlmlabError, match="unknown method"):
        make_spec("awq")
    with pytest.raises(LlmlabError, match="--act token"):
        make_spec("gptq", act="token")
    ld = loaded_tiny()
    with pytest.raises(LlmlabError, match="does not divide"):
        quantize_model_(ld.model, make_spec("rtn", bits=4, group_size=48))
    quantize_model_(ld.model, make_spec("rtn", bits=4))
    with pytest.raises(LlmlabError, match="no linear layers"):  # quantized already
        quantize_model_(ld.model, make_spec("rtn", bits=4))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, timeout=300)


def test_cli_quantize_and_errors(tmp_path, tiny_chat):
    out = tmp_path / "q"
    r = run_cli("quantize", "llama-tiny", "--method", "rtn", "--bits", "4", "--group-size", "4", "--out", str(out),
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (out / "summary.md").exists() and (out / "quantize_report.json").exists()
    assert "14 layers" in r.stderr
    r = run_cli("quantize", "llama-tiny", "--method", "rtn", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    for args, message in ((["--method", "llm-int8", "--bits", "4"], "does not support --bits 4"),
                          (["--method", "rtn", "--group-size", "48"], "does not divide"),
                          (["--method", "gptq", "--calib", str(tmp_path / "missing.txt")], "no such file"),
                          (["--method", "gptq", "--calib", str(tmp_path / "empty.txt")], "fewer than one window")):
        (tmp_path / "empty.txt").write_text("")
        r = run_cli("quantize", str(tiny_chat), *args, "--out", str(tmp_path / "x"))
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_readme_quantize_commands(tmp_path, smollm_path):
    """The README's quantize lines as written (GPTQ with a small calibration budget appended), then generate."""
    r = run_cli("quantize", "--method", "rtn", "--out", str(tmp_path / "q4-rtn"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("quantize", "--method", "gptq", "--out", str(tmp_path / "q4-gptq"), "--calib-samples", "2",
                "--calib-len", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "q4-gptq"), "The capital of France is", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = run_cli("convert", str(tmp_path / "q4-gptq"), str(tmp_path / "q4-gptq.gguf"))
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "q4-gptq.gguf"), "The capital of France is",
                "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    spec = json.loads((tmp_path / "q4-gptq" / "config.json").read_text())["quantization_config"]
    assert (spec["method"], spec["bits"], spec["group_size"], len(spec["modules"])) == ("gptq", 4, 32, 210)
