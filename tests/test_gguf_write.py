"""GGUF writing in every type the reader runs, bit-exact with llama.cpp: the block quantizers against gguf-py
(Q4_0 .. Q8_0) and against llama.cpp's own bytes (all types, K-quants included: the golden file
tests/data/ggml_golden.gguf made by tests/data/make_ggml_golden.py, and the live library where llama-cpp-python
is installed), K-quant dequantization against gguf-py, pack_blocks as dequantize's exact inverse, the writer's
per-tensor types and bytes against llama.cpp's llama-quantize, and the written files read by gguf-py, llmlab and
llama.cpp."""

from __future__ import annotations

import argparse
import ctypes
import functools
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.formats.gguf import GGUFFile
from llmlab.formats.gguf_model import WRITE_TYPES, _rope_rows, gguf_name, tensor_type, write_model_gguf
from llmlab.formats.load import load_model
from llmlab.models import build_model
from llmlab.models.config import ModelConfig
from llmlab.nn.ggml_quants import CODES, GGML_TYPES, QUANT_TYPES, TYPE_IDS, dequantize, pack_blocks, quantize
from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
from llmlab.tokenizer.pretokenize import GGUF_PRE
from tests.conftest import need
from tests.data.make_ggml_golden import (
    GOLDEN,
    ggml_quantize_chunk,
    golden_input,
    llama_cpp_quantize,
    real_rows,
    sha256,
)

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]
LLAMA_CPP = ggml_quantize_chunk()  # None without llama-cpp-python


def _hard_rows(seed: int, rows: int = 16, cols: int = 512) -> np.ndarray:
    """float32 (rows, cols) with what quantizers branch on: zero, constant and all-positive blocks, outliers,
    exact rounding ties, scales too small for f16, heavy tails and a wide range of magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-6, 2, (rows, 1)))
    x[0, :256] = 0.0
    x[1] = 0.75
    x[2, :32] = -3.0
    x[3, rng.integers(0, cols, 4)] *= 200.0
    x[4] = np.abs(x[4])
    x[5] = rng.integers(-20, 21, cols) / 8
    x[6] *= 1e-8
    x[7] = rng.standard_t(2, cols)
    x[8, ::2] = 0.0
    x[9] = rng.integers(-127, 127, cols) + 0.5  # Q8_0 ties: absmax 127 makes the scale 1
    x[9, ::32] = 127.0
    x = x.astype(np.float32)
    x[9, 1::32] = np.nextafter(np.float32(0.5), np.float32(0))  # roundf gives 0; trunc(x + 0.5) would give 1
    return x


def _raw(g: GGUFFile, name: str) -> torch.Tensor:
    """A tensor's bytes, copied out of the read-only file map (no warning about it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return g.raw(g.tensors[name]).clone()


def _gguf_type(gguf, name: str):
    return getattr(gguf.GGMLQuantizationType, name)


# ---- quantizers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LEGACY)
def test_block_quantizers_bit_exact_with_gguf_py(name):
    gguf = need("gguf")
    for seed, x in enumerate([_hard_rows(seed) for seed in range(3)] + [golden_input(64, 512)]):
        ref = gguf.quants.quantize(x, _gguf_type(gguf, name)).reshape(-1)
        assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), ref), (name, seed)


@pytest.mark.parametrize("name", LEGACY + K_TYPES)
def test_quantizers_bit_exact_with_llama_cpp_golden_file(name):
    """What llama.cpp's ggml_quantize_chunk wrote (tests/data/make_ggml_golden.py): the bytes of a small input, and
    the SHA-256 of its bytes for a large one (128 x 2048: rare rounding cases need many values)."""
    g = GGUFFile(GOLDEN)
    x = g.load("input")
    assert torch.equal(x, torch.from_numpy(golden_input(4, 512)))  # the input is made the same way everywhere
    if name in g.tensors:
        info = g.tensors[name]
        assert info.shape == x.shape and info.ggml_type == TYPE_IDS[name]
        block_bytes = GGML_TYPES[info.ggml_type][2]
        got, expected = quantize(x, name).numpy(), _raw(g, name).numpy()
        differ = np.flatnonzero((got != expected).reshape(-1, block_bytes).any(1))
        assert differ.size == 0, f"{name}: blocks {differ.tolist()} differ from llama.cpp's"
    big = quantize(torch.from_numpy(golden_input(128, 2048)), name).numpy()
    assert sha256(big) == g.metadata[f"golden.sha256.big.{name}"], name


@pytest.mark.parametrize("name", LEGACY + K_TYPES)
def test_quantizers_bit_exact_with_llama_cpp_on_real_weights(name, smollm_path):
    """The SHA-256 of llama.cpp's bytes for 64 x 512 slices of four SmolLM2 weights (in the golden file)."""
    g = GGUFFile(GOLDEN)
    x = _real_rows(smollm_path)
    if sha256(x) != g.metadata["golden.sha256.real.input"]:
        pytest.skip(f"{smollm_path} is not the SmolLM2 file the golden digests were made from")
    assert sha256(quantize(torch.from_numpy(x), name).numpy()) == g.metadata[f"golden.sha256.real.{name}"], name


@pytest.mark.skipif(LLAMA_CPP is None, reason="llama-cpp-python is not installed (the golden file covers CI)")
@pytest.mark.parametrize("name", LEGACY + K_TYPES)
def test_quantizers_bit_exact_with_live_llama_cpp(name, smollm_path):
    """llama.cpp's quantizer itself, on hard rows of other seeds and shapes and on real weights."""
    _, block, block_bytes = GGML_TYPES[TYPE_IDS[name]]
    for i, x in enumerate([_hard_rows(seed, 16, 1024) for seed in range(3)] + [_real_rows(smollm_path)]):
        expected = llama_cpp_quantize(LLAMA_CPP, x, TYPE_IDS[name], block, block_bytes)
        assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), expected), (name, i)


@functools.cache
def _real_rows(path: Path) -> np.ndarray:
    return real_rows(path)


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_dequantize_bit_exact_with_gguf_py(name):
    """Every bit pattern: random blocks (finite f16 scales) and llama.cpp's golden bytes."""
    gguf = need("gguf")
    _, _, block_bytes = GGML_TYPES[TYPE_IDS[name]]
    raw = np.random.default_rng(3).integers(0, 256, (64, block_bytes), dtype=np.uint8)
    scales = np.random.default_rng(4).uniform(-2, 2, (64, 2)).astype(np.float16).view(np.uint8)
    if name == "Q6_K":
        raw[:, 208:210] = scales[:, :2]
    else:
        raw[:, 0:4] = scales
    golden = GGUFFile(GOLDEN)
    for blocks in (raw, _raw(golden, name).numpy().reshape(-1, block_bytes)):
        expected = gguf.quants.dequantize(blocks, _gguf_type(gguf, name)).reshape(-1)
        got = dequantize(torch.from_numpy(blocks.copy()).reshape(-1), TYPE_IDS[name], blocks.shape[0] * 256)
        assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", LEGACY)
def test_pack_blocks_is_the_inverse_of_dequantize(name):
    lo, hi, has_min = CODES[name]
    offset = {"Q4_0": 8, "Q5_0": 16}.get(name, 0)
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(lo, hi + 1, (300, 32), generator=gen)
    d = (torch.randn(300, generator=gen) * 0.1).half()
    m = (torch.randn(300, generator=gen) * 0.1).half() if has_min else None
    raw = pack_blocks(name, q, d, m)
    assert raw.dtype == torch.uint8 and raw.numel() == 300 * GGML_TYPES[TYPE_IDS[name]][2]
    expected = d.float()[:, None] * (q - offset).float()
    if has_min:
        expected = expected + m.float()[:, None]
    got = dequantize(raw, TYPE_IDS[name], q.numel()).reshape(300, 32)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # float scales are rounded to f16 as the file stores them
    assert torch.equal(pack_blocks(name, q, d.float(), None if m is None else m.float()), raw)


def test_pack_blocks_and_quantize_refuse_bad_input():
    q = torch.zeros(2, 32, dtype=torch.long)
    d = torch.ones(2)
    for call, needle in [
        (lambda: pack_blocks("Q4_0", q + 16, d), "Q4_0 codes lie in 16..16, outside 0..15"),
        (lambda: pack_blocks("Q8_0", q - 129, d), "outside -128..127"),
        (lambda: pack_blocks("Q4_0", q.reshape(4, 16), d), "not (n_blocks, 32)"),
        (lambda: pack_blocks("Q4_0", q.float(), d), "not integers"),
        (lambda: pack_blocks("Q4_1", q, d), "Q4_1 stores per-block mins: pass m"),
        (lambda: pack_blocks("Q4_0", q, d, d), "Q4_0 has no per-block mins: drop m"),
        (lambda: pack_blocks("Q4_0", q, torch.ones(3)), "scales d have shape (3,), not (2,)"),
        (lambda: pack_blocks("Q4_K", q, d), "no block type 'Q4_K'"),
        (lambda: quantize(torch.zeros(4, 576), "Q4_K"), "rows of 576 to Q4_K: the row length must be a multiple "
                                                        "of 256"),
        (lambda: quantize(torch.zeros(4, 64), "Q3_K"), "cannot quantize to 'Q3_K'"),
    ]:
        with pytest.raises(LlmlabError) as err:
            call()
        assert needle in str(err.value)


# ---- the writer ------------------------------------------------------------------------------------
def test_tensor_types_follow_llama_quantize_rules():
    """SmolLM2-135M's shapes (576-wide rows, 1536-wide ffn_down, 30 layers, tied head): llama-quantize's choices."""
    def kinds(qtype):
        return {name: tensor_type(name, shape, qtype, 30, tied=True) for name, shape in [
            ("token_embd.weight", (49152, 576)), ("blk.0.attn_q.weight", (576, 576)),
            ("blk.0.attn_v.weight", (192, 576)), ("blk.0.ffn_down.weight", (576, 1536)),
            ("blk.4.ffn_down.weight", (576, 1536)), ("blk.5.ffn_down.weight", (576, 1536)),
            ("blk.0.attn_norm.weight", (576,))]}

    assert kinds("Q4_K") == {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0",
                             "blk.0.attn_v.weight": "Q8_0", "blk.0.ffn_down.weight": "Q6_K",
                             "blk.4.ffn_down.weight": "Q4_K", "blk.5.ffn_down.weight": "Q6_K",
                             "blk.0.attn_norm.weight": "F32"}
    assert set(kinds("Q5_K").values()) == {"Q8_0", "Q5_1", "Q6_K", "Q5_K", "F32"}
    assert set(kinds("Q6_K").values()) == {"Q8_0", "Q6_K", "F32"}
    assert kinds("Q4_0")["token_embd.weight"] == "Q8_0" and kinds("Q4_0")["blk.0.ffn_down.weight"] == "Q4_0"
    assert tensor_type("output.weight", (100, 512), "Q4_0", 30, tied=False) == "Q6_K"
    assert tensor_type("token_embd.weight", (100, 512), "Q4_0", 30, tied=False) == "Q4_0"
    assert tensor_type("output.weight", (100, 512), "Q8_0", 30, tied=False) == "Q8_0"
    assert tensor_type("blk.0.ffn_down.weight", (64, 172), "Q4_K", 2, tied=True) == "F16"  # not even 32-wide
    assert set(kinds("BF16").values()) == {"BF16", "F32"}


def _tokenizer() -> ByteBPE:
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return ByteBPE(vocab, merges, GGUF_PRE["gpt2"], {"<|endoftext|>": vocab["<|endoftext|>"]},
                   eos_id=vocab["<|endoftext|>"])


_WRITTEN: dict = {}


def _tiny(tmp_path_factory, qtype: str, tied: bool):
    """A small random llama whose rows take every rule: 256-wide rows (K-quants fit), 128-wide attn_output and
    32-wide ffn_down (they fall back), 2 layers (the _M mixtures give layer 1 more bits), tied or untied head;
    written once per type."""
    key = (qtype, tied)
    if key not in _WRITTEN:
        tok = _tokenizer()
        cfg = ModelConfig(arch="llama", vocab_size=len(tok.vocab), dim=256, n_layers=2, n_heads=2, n_kv_heads=1,
                          head_dim=64, ffn_dim=32, max_seq_len=64, tie_embeddings=tied).validate()
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)  # norms start at 1: random values make the check meaningful
        path = tmp_path_factory.mktemp("gguf") / f"tiny-{qtype}-{'tied' if tied else 'untied'}.gguf"
        write_model_gguf(path, cfg, model.state_dict(), tok, qtype=qtype)
        _WRITTEN[key] = (path, cfg, model, tok)
    return _WRITTEN[key]


@pytest.mark.parametrize("qtype", WRITE_TYPES)
def test_written_file_reads_back_in_gguf_py_and_llmlab(qtype, tmp_path_factory):
    """Each tensor in the type tensor_type names, holding exactly our quantizer's bytes (as gguf-py reads them);
    llmlab loads the weights as stored (Q/K rows back in our RoPE order), logits within quantization error of
    the original; the packed fast path runs a mix of packed blocks and dense K-quant layers."""
    gguf = need("gguf")
    path, cfg, model, tok = _tiny(tmp_path_factory, qtype, tied=qtype in ("Q4_0", "Q5_1", "Q4_K", "Q6_K"))
    reader = gguf.GGUFReader(str(path))
    back = load_model(path)
    loaded, original = back.model.state_dict(), model.state_dict()
    ours_of = {gguf_name(k): k for k in original if not (cfg.tie_embeddings and k == "lm_head.weight")}
    seen = Counter()
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # PyTorch order: (rows, row length)
        want = tensor_type(t.name, shape, qtype, cfg.n_layers, cfg.tie_embeddings)
        assert t.tensor_type.name == want, t.name
        seen[want] += 1
        ours = ours_of[t.name]
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        w = _rope_rows(original[ours], ours, cfg, to_hf=False)  # the float weight in the file's row order
        if want in QUANT_TYPES:  # exactly our (llama.cpp's) quantizer's bytes
            assert np.array_equal(quantize(w, want).numpy(), raw), t.name
        stored = dequantize(torch.from_numpy(raw.copy()), TYPE_IDS[want], w.numel()).reshape(shape)
        assert torch.equal(loaded[ours], _rope_rows(stored, ours, cfg, to_hf=True)), t.name
    if qtype in ("Q4_K", "Q5_K"):
        assert {"Q6_K", qtype, "Q5_0" if qtype == "Q4_K" else "Q5_1", "Q8_0"} <= set(seen), seen
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = model(ids), back.model(ids)
    bound = {"F32": 1e-5, "F16": 1e-2, "BF16": 5e-2, "Q8_0": 5e-2}.get(qtype, 0.5)
    assert (got - want).abs().max() <= bound * want.abs().max(), (qtype, (got - want).abs().max())
    assert back.tokenizer.encode("the cat") == tok.encode("the cat")
    assert GGUFFile(path).metadata["general.file_type"] == {  # llama.cpp's llama_ftype; Q4_K is its Q4_K_M
        "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15, "Q5_K": 17,
        "Q6_K": 18, "BF16": 32}[qtype]
    if qtype in ("Q4_K", "Q8_0"):
        packed = load_model(path, packed=True).model
        kinds = Counter(type(m).__name__ for m in packed.modules() if type(m).__name__.endswith("Linear"))
        # Q4_K: attn_output and ffn_down (Q5_0, Q8_0: fallbacks) are in blocks the kernels run; K-quants stay dense
        assert kinds == ({"PackedLinear": 15} if qtype == "Q8_0" else {"PackedLinear": 4, "Linear": 11}), kinds
        with torch.inference_mode():
            assert (packed(ids) - got).abs().max() <= 0.05 * got.abs().max()


@pytest.mark.skipif(LLAMA_CPP is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("qtype", LEGACY + K_TYPES)
def test_writer_equals_llama_quantize(qtype, tmp_path_factory):
    """llama.cpp's llama-quantize (llama_model_quantize, no imatrix) on our F32 file gives the file we write for
    qtype: every tensor's type and bytes, and general.file_type."""
    gguf = need("gguf")
    llama_cpp = need("llama_cpp")
    tied = qtype in ("Q4_0", "Q5_1", "Q4_K", "Q6_K")
    ours, *_ = _tiny(tmp_path_factory, qtype, tied)
    f32, *_ = _tiny(tmp_path_factory, "F32", tied)
    theirs = ours.with_name(f"llama-quantize-{qtype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}[qtype]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    want = {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).tobytes()) for t in b.tensors}
    got = {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).tobytes()) for t in a.tensors}
    assert [(n, got[n][0]) for n in want] == [(n, want[n][0]) for n in want]
    assert [n for n in want if got[n][1] != want[n][1]] == []
    assert a.fields["general.file_type"].contents() == b.fields["general.file_type"].contents()


@pytest.mark.slow
@pytest.mark.skipif(LLAMA_CPP is None, reason="llama-cpp-python is not installed")
def test_k_quant_smollm2_generates_the_same_text_in_llmlab_and_llama_cpp(smollm, tmp_path):
    """The real SmolLM2 written as Q4_K (Q4_K_M: Q4_K and Q6_K ffn_down, Q5_0 for the 576-wide rows, a Q8_0 head)
    loads on llmlab's packed fast path (the K-quant layers stay dense) and in llama.cpp: the same greedy text."""
    from llmlab.api import load
    from llmlab.formats.convert import write_loaded

    llama_cpp = need("llama_cpp")
    path = tmp_path / "smollm2-q4_k.gguf"
    write_loaded(smollm.loaded, path, qtype="Q4_K")
    kinds = Counter(info.type_name for info in GGUFFile(path).tensors.values())
    assert kinds == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    llm = load(path, packed=True, packed_kernel="int8")  # llama.cpp's arithmetic (the default int8r adds residuals)
    prompt = "The capital of France is"
    ours = llm.generate(prompt, max_new_tokens=16)
    assert ours.startswith(" Paris")
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    theirs = ref.create_completion(prompt, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert theirs == ours


def test_cli_convert_offers_every_write_type():
    from llmlab.cli import build_parser

    sub = next(a for a in build_parser({"convert"})._actions if isinstance(a, argparse._SubParsersAction))
    convert = next(a for a in sub.choices["convert"]._actions if a.dest == "qtype")
    assert tuple(convert.choices) == WRITE_TYPES
    with pytest.raises(LlmlabError, match="unknown qtype 'Q3_K'"):
        write_model_gguf(Path("never.gguf"), ModelConfig(arch="llama"), {}, _tokenizer(), qtype="Q3_K")
