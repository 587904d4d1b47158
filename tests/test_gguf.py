"""GGUF: dequantization bit-exact with ``gguf.quants``, reader/writer against the ``gguf`` package,
and GGUF <-> Hugging Face folder conversions that keep the logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmlab.formats.gguf import GGUFFile, write_gguf
from llmlab.formats.load import load_model
from llmlab.nn.ggml_quants import GGML_TYPES, TYPE_IDS, dequantize, quantize, quantize_q8_0
from tests.conftest import need


@pytest.mark.parametrize("name", sorted(n for n, _, _ in GGML_TYPES.values()))
def test_dequantize_bit_exact_with_gguf_quants(name):
    gguf = need("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, name)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 10, (8, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = 65000.0  # a block near f16's range
    if name == "F32":
        raw = x.view(np.uint8)
    elif name == "F16":
        raw = x.astype(np.float16).view(np.uint8)
    elif name.endswith("_K"):  # gguf-py has no K-quant quantizer: ours (bit-exact with llama.cpp's) makes the input
        raw = quantize(torch.from_numpy(x), name).numpy()
    else:
        raw = gguf.quants.quantize(x, qtype)
    expected = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = dequantize(torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1), TYPE_IDS[name], x.size)
    assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_q8_0_quantizer_bit_exact():
    gguf = need("gguf")
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    ours = quantize_q8_0(torch.from_numpy(x)).numpy()
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert np.array_equal(ours, ref)


def test_reader_matches_gguf_package(smollm_path):
    gguf = need("gguf")
    ref = gguf.GGUFReader(str(smollm_path))
    ours = GGUFFile(smollm_path)
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors[:40]:
        info = ours.tensors[t.name]
        assert info.ggml_type == int(t.tensor_type)
        assert list(reversed(info.shape)) == [int(d) for d in t.shape]
        assert info.offset == t.data_offset  # the gguf package reports absolute offsets
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["llama.block_count"] == 30
    field = ref.fields["tokenizer.ggml.tokens"]
    assert ours.metadata["tokenizer.ggml.tokens"][:5] == [bytes(field.parts[i]).decode() for i in field.data[:5]]


def test_real_tensors_dequantize_like_gguf(smollm_path):
    gguf = need("gguf")
    ref = gguf.GGUFReader(str(smollm_path))
    ours = GGUFFile(smollm_path)
    seen = set()
    for t in ref.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = ours.load(t.name).numpy()
        assert np.array_equal(got.reshape(expected.shape), expected), t.name
    assert seen == {"Q4_1", "Q8_0", "F32"}


def test_writer_output_reads_in_gguf_package(tmp_path):
    gguf = need("gguf")
    data = np.arange(64, dtype=np.float32)
    path = tmp_path / "w.gguf"
    write_gguf(path, {"general.architecture": "llama", "x.count": 7, "x.ratio": 0.5, "x.flag": True,
                      "x.names": ["a", "bé", "日本"], "x.ids": [1, 2, 3]},
               {"t": (data.tobytes(), (8, 8), 0), "q": (quantize_q8_0(torch.from_numpy(data)).numpy().tobytes(),
                                                         (2, 32), 8)})
    r = gguf.GGUFReader(str(path))
    assert r.fields["x.count"].contents() == 7
    assert r.fields["x.names"].contents() == ["a", "bé", "日本"]
    assert r.fields["x.flag"].contents() is True
    assert np.array_equal(r.tensors[0].data.reshape(-1), data)
    ours = GGUFFile(path)
    assert ours.metadata["x.ids"] == [1, 2, 3]
    assert torch.allclose(ours.load("q").reshape(-1), torch.from_numpy(data), atol=0.3)


@pytest.mark.slow
def test_gguf_to_hf_folder_to_reload_same_logits(smollm, tmp_path):
    from llmlab.formats.convert import convert

    convert(smollm.loaded.source, tmp_path / "hf")
    again = load_model(tmp_path / "hf")
    ids = torch.tensor([smollm.tokenizer.encode("Hello, how are you today?")])
    with torch.inference_mode():
        assert torch.equal(again.model(ids), smollm.model(ids))
    assert again.tokenizer.encode("x = 12345 👍") == smollm.tokenizer.encode("x = 12345 👍")
    assert again.chat_template == smollm.loaded.chat_template
    # and the folder is a real Hugging Face folder
    transformers = need("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("x = 12345 👍")["input_ids"] == smollm.tokenizer.encode("x = 12345 👍")
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, smollm.model(ids))


def _as_stored(sd: dict[str, torch.Tensor], qtype: str) -> dict[str, torch.Tensor]:
    """The weights as a GGUF of ``qtype`` holds them: 2-D ones in Q8_0 (rows of 32-multiples) or F16."""
    out = {}
    for name, t in sd.items():
        if t.ndim == 2 and qtype == "Q8_0" and t.shape[1] % 32 == 0:
            t = dequantize(quantize_q8_0(t), TYPE_IDS["Q8_0"], t.numel()).reshape(t.shape)
        elif t.ndim == 2 and qtype in ("F16", "Q8_0"):
            t = t.half().float()
        out[name] = t
    return out


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_hf_to_gguf_round_trip(tmp_path, qtype):
    """A tiny llama (and GPT-2) written to GGUF read back by us and by the gguf package: the logits are those
    of the same model with its weights rounded as the file stores them."""
    gguf = need("gguf")
    from llmlab.formats.gguf_model import write_model_gguf
    from llmlab.models import build_model, get_preset
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = ByteBPE(vocab, merges, GGUF_PRE["gpt2"], {"<|endoftext|>": vocab["<|endoftext|>"]},
                  eos_id=vocab["<|endoftext|>"])
    for preset in ("llama-tiny", "gpt2-tiny"):
        torch.manual_seed(0)
        cfg = get_preset(preset)
        cfg.vocab_size = len(vocab)
        model = build_model(cfg).eval()
        path = tmp_path / f"{preset}-{qtype}.gguf"
        write_model_gguf(path, cfg, model.state_dict(), tok, chat_template="{{ messages }}", qtype=qtype)
        assert len(gguf.GGUFReader(str(path)).tensors) > 0
        back = load_model(path)
        ids = torch.randint(0, len(vocab), (1, 12))
        stored = build_model(cfg).eval()
        stored.load_state_dict(_as_stored(model.state_dict(), qtype))
        with torch.inference_mode():
            got, expected = back.model(ids), stored(ids)
            rounding = (got - model(ids)).abs().max().item()
        assert torch.equal(got, expected), (preset, qtype, (got - expected).abs().max().item())
        # F16 / Q8_0 storage really rounds (measured: ~2e-4 / ~7e-3), so the check above has teeth
        assert rounding == 0.0 if qtype == "F32" else rounding > 1e-5, (preset, qtype, rounding)
        assert back.tokenizer.encode("the cat") == tok.encode("the cat")
        assert back.chat_template == "{{ messages }}"
