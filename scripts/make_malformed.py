"""Write a corpus of malformed model files (GGUF, safetensors, HF folders, tokenizer.json) to a folder.

Each entry is a file or folder that llmlab must reject with a one-line error, exit code 2, quickly and
without a huge allocation. Usage: python scripts/make_malformed.py OUT_DIR
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path


def s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def minimal_llama_kvs() -> list[bytes]:
    u32 = lambda k, v: kv(k, 4, struct.pack("<I", v))  # noqa: E731
    return [kv("general.architecture", 8, s("llama")), u32("llama.block_count", 1),
            u32("llama.embedding_length", 8), u32("llama.feed_forward_length", 16),
            u32("llama.attention.head_count", 2), u32("llama.context_length", 32), u32("llama.vocab_size", 4)]


def tensor_info(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def pad(b: bytes, align: int = 32) -> bytes:
    return b + b"\0" * (-len(b) % align)


def gguf_cases() -> dict[str, bytes]:
    kvs = minimal_llama_kvs()
    good_head = header(1, len(kvs)) + b"".join(kvs)
    emb = tensor_info("token_embd.weight", [8, 4], 0, 0)
    cases = {
        "empty.gguf": b"",
        "short_magic.gguf": b"GGU",
        "bad_magic.gguf": b"GGML" + b"\0" * 40,
        "version_99.gguf": header(0, 0, version=99),
        "absurd_tensor_count.gguf": header(2**62, 0),
        "absurd_kv_count.gguf": header(0, 2**63 - 1),
        # The 43-byte file that once hung the gguf package: one array declaring 2^63 items.
        "array_2e63_items.gguf": header(0, 1) + s("a") + struct.pack("<IIQ", 9, 0, 2**63 - 1),
        "absurd_string_length.gguf": header(0, 1) + struct.pack("<Q", 2**60) + b"key",
        "absurd_value_string.gguf": header(0, 1) + s("k") + struct.pack("<IQ", 8, 2**40),
        "unknown_value_type.gguf": header(0, 1) + s("k") + struct.pack("<I", 77) + b"\0" * 8,
        "truncated_metadata.gguf": (header(0, len(kvs)) + b"".join(kvs))[:-5],
        "nested_array_bomb.gguf": header(0, 1) + s("k") + struct.pack("<IIQ", 9, 9, 2**40),
        "too_many_dims.gguf": good_head + s("t") + struct.pack("<I", 99),
        "tensor_past_eof.gguf": pad(good_head + emb) + b"\0" * 16,
        "tensor_offset_huge.gguf": pad(good_head + tensor_info("token_embd.weight", [8, 4], 0, 2**62)),
        "absurd_shape.gguf": pad(good_head + tensor_info("token_embd.weight", [2**40, 2**40], 0, 0)),
        "unknown_ggml_type.gguf": pad(good_head + tensor_info("token_embd.weight", [8, 4], 250, 0)) + b"\0" * 128,
        "unsupported_q6_k.gguf": pad(good_head + tensor_info("token_embd.weight", [256, 4], 14, 0)) + b"\0" * 1024,
        "block_size_mismatch.gguf": pad(good_head + tensor_info("token_embd.weight", [7, 4], 8, 0)) + b"\0" * 256,
        "bad_alignment.gguf": header(0, 1) + kv("general.alignment", 4, struct.pack("<I", 3)),
        "unknown_architecture.gguf": header(0, 1) + kv("general.architecture", 8, s("mamba9")),
        "missing_hparams.gguf": header(0, 1) + kv("general.architecture", 8, s("llama")),
        "duplicate_tensor.gguf": pad(header(2, len(kvs)) + b"".join(kvs) + emb + emb) + b"\0" * 256,
        "no_tensors.gguf": good_head,
        "negative_heads.gguf": header(0, len(kvs)) + b"".join(kvs[:4])
        + kv("llama.attention.head_count", 5, b"\xff" * 4) + b"".join(kvs[5:]),
    }
    return cases


def safetensors_cases() -> dict[str, bytes]:
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    good = struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16
    return {
        "st_header_len_too_big.safetensors": struct.pack("<Q", 10**12) + hdr + b"\0" * 16,
        "st_header_len_wrong.safetensors": struct.pack("<Q", len(hdr) + 3) + hdr + b"\0" * 16,
        "st_truncated_data.safetensors": good[:-4],
        "st_not_json.safetensors": struct.pack("<Q", 6) + b"{nope!",
        "st_bad_dtype.safetensors": _st({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, 4),
        "st_shape_mismatch.safetensors": _st({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, 4),
        "st_overlap.safetensors": _st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12),
        "st_tiny.safetensors": b"\x01\x02",
    }


def _st(header_obj: dict, data_len: int) -> bytes:
    h = json.dumps(header_obj).encode()
    return struct.pack("<Q", len(h)) + h + b"\0" * data_len


def folder_cases(out: Path) -> None:
    llama_cfg = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "intermediate_size": 16}
    cases = {
        "hf_unknown_arch": ({"model_type": "mamba9"}, None),
        "hf_config_not_json": ("{not json", None),
        "hf_missing_weights": (llama_cfg, None),
        "hf_bad_header": (llama_cfg, safetensors_cases()["st_header_len_wrong.safetensors"]),
        "hf_missing_key": ({"model_type": "llama", "vocab_size": 16}, None),
        "hf_wrong_tensors": (llama_cfg, _st({"foo": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4)),
        "hf_bad_heads": ({**llama_cfg, "num_attention_heads": 3}, None),
    }
    for name, (cfg, weights) in cases.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
    # Broken tokenizer.json files next to a valid tiny llama (zero weights).
    for name, text in (("tok_unigram", json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})),
                       ("tok_not_json", "[1, 2"),
                       ("tok_no_model", json.dumps({"version": "1.0"})),
                       ("tok_config_not_json", None)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({**llama_cfg, "tie_word_embeddings": True}))
        (d / "model.safetensors").write_bytes(zero_llama_weights())
        if text is None:  # a valid tokenizer.json beside a broken tokenizer_config.json
            text = json.dumps({"model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}}})
            (d / "tokenizer_config.json").write_text("{'single': 'quotes'}")
        (d / "tokenizer.json").write_text(text)


def zero_llama_weights() -> bytes:
    """A valid safetensors file for the 1-layer llama in ``folder_cases`` (vocab 16, dim 8, ffn 16)."""
    shapes = {"model.embed_tokens.weight": [16, 8], "model.norm.weight": [8],
              "model.layers.0.input_layernorm.weight": [8], "model.layers.0.post_attention_layernorm.weight": [8],
              "model.layers.0.mlp.gate_proj.weight": [16, 8], "model.layers.0.mlp.up_proj.weight": [16, 8],
              "model.layers.0.mlp.down_proj.weight": [8, 16]}
    shapes.update({f"model.layers.0.self_attn.{p}_proj.weight": [8, 8] for p in "qkvo"})
    header_obj, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header_obj[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return _st(header_obj, offset)


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in {**gguf_cases(), **safetensors_cases()}.items():
        (out / name).write_bytes(data)
    folder_cases(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "malformed"))
