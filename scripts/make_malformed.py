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
        "unsupported_q3_k.gguf": pad(good_head + tensor_info("token_embd.weight", [256, 4], 11, 0)) + b"\0" * 1024,
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


def byte_tokens() -> list[str]:
    """GPT-2's byte -> printable character table (the 256 base tokens of a byte-level BPE vocabulary)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    out, n = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + n))
        n += b not in keep
    return out


def arr(item_type: int, items: list) -> bytes:
    if item_type == 8:
        return struct.pack("<IQ", 8, len(items)) + b"".join(s(x) for x in items)
    return struct.pack(f"<IQ{len(items)}i", item_type, len(items), *items)


def llama_with_tokenizer(**change) -> bytes:
    """A complete, loadable 1-layer llama GGUF (zero F32 weights, byte-level BPE vocabulary, ChatML-like
    template); ``change`` replaces a metadata entry by its key (payload = type + value bytes, None drops it)."""
    tokens = [*byte_tokens(), "Ġt", "he", "<|im_start|>", "<|im_end|>"]
    u32 = lambda v: struct.pack("<II", 4, v)  # noqa: E731
    meta = {"general.architecture": struct.pack("<I", 8) + s("llama"), "llama.block_count": u32(1),
            "llama.embedding_length": u32(8), "llama.feed_forward_length": u32(16),
            "llama.attention.head_count": u32(2), "llama.context_length": u32(32),
            "llama.rope.freq_base": struct.pack("<If", 6, 10000.0),
            "tokenizer.ggml.model": struct.pack("<I", 8) + s("gpt2"),
            "tokenizer.ggml.pre": struct.pack("<I", 8) + s("gpt2"),
            "tokenizer.ggml.tokens": struct.pack("<I", 9) + arr(8, tokens),
            "tokenizer.ggml.token_type": struct.pack("<I", 9) + arr(5, [1] * (len(tokens) - 2) + [3, 3]),
            "tokenizer.ggml.merges": struct.pack("<I", 9) + arr(8, ["Ġ t", "h e"]),
            "tokenizer.ggml.eos_token_id": u32(len(tokens) - 1),
            "tokenizer.chat_template": struct.pack("<I", 8) + s("{% for m in messages %}{{ m['content'] }}"
                                                                "{% endfor %}")}
    for key, payload in change.items():
        key = key.replace("__", ".")
        if payload is None:
            meta.pop(key, None)
        else:
            meta[key] = payload
    shapes = {"token_embd.weight": [8, len(tokens)], "output_norm.weight": [8], "blk.0.attn_norm.weight": [8],
              "blk.0.ffn_norm.weight": [8], "blk.0.attn_q.weight": [8, 8], "blk.0.attn_k.weight": [8, 8],
              "blk.0.attn_v.weight": [8, 8], "blk.0.attn_output.weight": [8, 8], "blk.0.ffn_gate.weight": [8, 16],
              "blk.0.ffn_up.weight": [8, 16], "blk.0.ffn_down.weight": [16, 8]}
    infos, offset = [], 0
    for name, dims in shapes.items():
        infos.append(tensor_info(name, dims, 0, offset))
        n = 4 * dims[0] * (dims[1] if len(dims) > 1 else 1)
        offset += n + (-n % 32)
    head = header(len(shapes), len(meta)) + b"".join(s(k) + v for k, v in meta.items()) + b"".join(infos)
    return pad(head) + b"\0" * offset


def fuzz_found_gguf_cases() -> dict[str, bytes]:
    """Failure classes found by scripts/fuzz.py (each once escaped as a non-LlmlabError or a traceback)."""
    str_ = lambda v: struct.pack("<I", 8) + s(v)  # noqa: E731
    u32 = lambda v: struct.pack("<II", 4, v)  # noqa: E731
    merges = lambda *m: struct.pack("<I", 9) + arr(8, list(m))  # noqa: E731
    return {
        "fz_merge_token_missing.gguf": llama_with_tokenizer(tokenizer__ggml__merges=merges("Ġ t", "h qz")),
        "fz_merge_result_missing.gguf": llama_with_tokenizer(tokenizer__ggml__merges=merges("Ġ t", "t h")),
        "fz_merge_no_space.gguf": llama_with_tokenizer(tokenizer__ggml__merges=merges("Ġt")),
        "fz_bos_id_out_of_range.gguf": llama_with_tokenizer(tokenizer__ggml__bos_token_id=u32(10**6)),
        "fz_bos_id_is_array.gguf": llama_with_tokenizer(tokenizer__ggml__bos_token_id=struct.pack("<I", 9)
                                                        + arr(5, [1, 2])),
        "fz_pre_is_array.gguf": llama_with_tokenizer(tokenizer__ggml__pre=merges("gpt2")),
        "fz_tokens_not_strings.gguf": llama_with_tokenizer(tokenizer__ggml__tokens=struct.pack("<I", 9)
                                                           + arr(5, [1, 2, 3])),
        "fz_token_type_not_array.gguf": llama_with_tokenizer(tokenizer__ggml__token_type=u32(3)),
        "fz_pre_unknown.gguf": llama_with_tokenizer(tokenizer__ggml__pre=str_("mamba")),
        "fz_heads_zero.gguf": llama_with_tokenizer(llama__attention__head_count=u32(0)),
        "fz_heads_string.gguf": llama_with_tokenizer(llama__attention__head_count=str_("two")),
        "fz_kv_heads_string.gguf": llama_with_tokenizer(llama__attention__head_count_kv=str_("1")),
        "fz_rope_base_string.gguf": llama_with_tokenizer(llama__rope__freq_base=str_("llama")),
        "fz_norm_eps_nan.gguf": llama_with_tokenizer(llama__attention__layer_norm_rms_epsilon=struct.pack(
            "<If", 6, float("nan"))),
        "fz_embedding_length_huge.gguf": llama_with_tokenizer(llama__embedding_length=u32(2**20),
                                                              llama__attention__key_length=u32(4)),
        "fz_template_syntax.gguf": llama_with_tokenizer(tokenizer__chat_template=str_("{% for m in messages %}")),
    }


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
        "fz_st_dtype_is_list.safetensors": _st({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4),
        "fz_st_nested_json.safetensors": struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000,
        "fz_st_shape_not_list.safetensors": _st({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, 4),
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
    bpe = {"type": "BPE", "vocab": {t: i for i, t in enumerate(byte_tokens())}, "merges": ["Ġ t"]}
    bpe["vocab"]["Ġt"] = 256
    level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    wp = {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}}
    found = {  # failure classes found by scripts/fuzz.py
        "fz_tok_merge_token_missing": {"model": {**bpe, "merges": ["Ġ qz"]}, "pre_tokenizer": level},
        "fz_tok_merge_not_pair": {"model": {**bpe, "merges": [["Ġ", "t", "x"]]}, "pre_tokenizer": level},
        "fz_tok_merges_not_list": {"model": {**bpe, "merges": 5}, "pre_tokenizer": level},
        "fz_tok_vocab_not_object": {"model": {**wp, "vocab": 3}},
        "fz_tok_vocab_id_string": {"model": {**bpe, "vocab": {**bpe["vocab"], "Ġt": "x"}}, "pre_tokenizer": level},
        "fz_tok_wordpiece_no_unk": {"model": {**wp, "vocab": {"a": 0}}},
        "fz_tok_added_token_bad_id": {"model": wp, "added_tokens": [{"id": "x", "content": "[CLS]"}]},
        "fz_tok_added_tokens_not_list": {"model": wp, "added_tokens": 7},
        "fz_tok_normalizer_not_object": {"model": bpe, "normalizer": 7, "pre_tokenizer": level},
        "fz_tok_pre_tokenizer_not_object": {"model": bpe, "pre_tokenizer": [level]},
        "fz_tok_split_bad_regex": {"model": bpe, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?<"},
                                                                   "behavior": "Isolated"}},
    }
    cases = [("tok_unigram", json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})),
             ("tok_not_json", "[1, 2"),
             ("tok_no_model", json.dumps({"version": "1.0"})),
             ("tok_config_not_json", None),
             *((name, json.dumps(spec)) for name, spec in found.items()),
             ("fz_tok_not_utf8", b'{"model": "\xff"}'),
             ("fz_tok_config_bos_list", ("config", '{"bos_token": [1]}')),
             ("fz_tok_config_template_number", ("config", '{"chat_template": 5}'))]
    for name, text in cases:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({**llama_cfg, "tie_word_embeddings": True}))
        (d / "model.safetensors").write_bytes(zero_llama_weights())
        if text is None or isinstance(text, tuple):  # a valid tokenizer.json beside a broken tokenizer_config.json
            config = "{'single': 'quotes'}" if text is None else text[1]
            text = json.dumps({"model": {"type": "BPE", "vocab": bpe["vocab"], "merges": ["Ġ t"]},
                               "pre_tokenizer": level})
            (d / "tokenizer_config.json").write_text(config)
        (d / "tokenizer.json").write_bytes(text if isinstance(text, bytes) else text.encode())


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
    for name, data in {**gguf_cases(), **fuzz_found_gguf_cases(), **safetensors_cases()}.items():
        (out / name).write_bytes(data)
    folder_cases(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "malformed"))
