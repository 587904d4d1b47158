"""GGUF metadata and tensors <-> our ModelConfig, state dict and tokenizer (llama and gpt2 families).

llama.cpp's converter permutes the rows of Q and K so RoPE can rotate adjacent pairs (the original
Meta layout); we use the Hugging Face "rotate half" layout, so those rows are un-permuted on load
and permuted back on write.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.formats.gguf import T_ARRAY, T_FLOAT32, T_INT32, T_STRING, T_UINT32, GGUFFile, write_gguf
from llmlab.formats.hf import fuse_qkv, split_qkv
from llmlab.models.config import ModelConfig
from llmlab.nn.ggml_quants import GGML_TYPES, QUANT_TYPES, TYPE_IDS, quantize
from llmlab.tokenizer.bpe import ByteBPE
from llmlab.tokenizer.pretokenize import GGUF_PRE
from llmlab.tokenizer.validate import check_bpe, check_id

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

_LAYER = {  # GGUF per-layer name -> ours
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "embed_tokens", "position_embd": "embed_positions", "output_norm": "norm",
           "output": "lm_head"}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}


def _meta(g: GGUFFile, key: str, default=None, required: bool = True):
    if key in g.metadata:
        return g.metadata[key]
    if required and default is None:
        raise LlmlabError(f"{g.path}: GGUF metadata lacks {key!r}")
    return default


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.metadata.get("general.architecture")
    if arch not in ("llama", "gpt2"):
        raise LlmlabError(f"{g.path}: unsupported GGUF architecture {arch!r} (llmlab reads llama and gpt2)")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    vocab = _meta(g, f"{arch}.vocab_size", len(tokens) if isinstance(tokens, list) else None)
    if "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].shape[0]
    n_heads = _meta(g, f"{arch}.attention.head_count")
    dim = _meta(g, f"{arch}.embedding_length")
    for key in (f"{arch}.attention.head_count", f"{arch}.embedding_length", "llama.attention.key_length",
                "llama.attention.head_count_kv", f"{arch}.block_count", f"{arch}.feed_forward_length",
                f"{arch}.context_length"):
        value = g.metadata.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LlmlabError(f"{g.path}: GGUF metadata {key} = {value!r} is not a positive integer (corrupt file)")
    common = dict(vocab_size=vocab, dim=dim, n_layers=_meta(g, f"{arch}.block_count"), n_heads=n_heads,
                  ffn_dim=_meta(g, f"{arch}.feed_forward_length"), max_seq_len=_meta(g, f"{arch}.context_length"),
                  tie_embeddings="output.weight" not in g.tensors,
                  bos_token_id=g.metadata.get("tokenizer.ggml.bos_token_id"),
                  eos_token_id=g.metadata.get("tokenizer.ggml.eos_token_id"),
                  pad_token_id=g.metadata.get("tokenizer.ggml.padding_token_id"),
                  extra={"source": str(g.path), "gguf_file_type": g.metadata.get("general.file_type")})
    if arch == "llama":
        cfg = ModelConfig(arch="llama", n_kv_heads=_meta(g, "llama.attention.head_count_kv", n_heads),
                          head_dim=g.metadata.get("llama.attention.key_length", dim // n_heads),
                          norm_eps=_float(g, "llama.attention.layer_norm_rms_epsilon", 1e-5),
                          rope_theta=_float(g, "llama.rope.freq_base", 10000.0),
                          attn_bias="blk.0.attn_q.bias" in g.tensors, **common)
    else:
        cfg = ModelConfig(arch="gpt2", norm_eps=_float(g, "gpt2.attention.layer_norm_epsilon", 1e-5),
                          attn_bias=True, mlp_bias=True, **common)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
        if not isinstance(getattr(cfg, field), int):
            raise LlmlabError(f"{g.path}: GGUF metadata gives a non-integer {field}: {getattr(cfg, field)!r}")
    try:
        cfg.validate()
    except LlmlabError as e:
        raise LlmlabError(f"{g.path}: {e}") from None
    # Before the model is allocated: the sizes in the metadata must fit the weights the file holds.
    held = sum(info.numel for info in g.tensors.values())
    if cfg.num_params() > held:
        raise LlmlabError(f"{g.path}: GGUF metadata describes a model of {cfg.num_params()} parameters but the file "
                          f"holds {held} weights (corrupt metadata)")
    return cfg


def _float(g: GGUFFile, key: str, default: float) -> float:
    value = g.metadata.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise LlmlabError(f"{g.path}: GGUF metadata {key} = {value!r} is not a positive number (corrupt file)")
    return float(value)


def _rope_permute(w: torch.Tensor, n_heads: int, inverse: bool) -> torch.Tensor:
    """Rows (H*D, ...) between interleaved pairs (GGUF) and rotate-half halves (HF)."""
    shape = w.shape
    if inverse:  # GGUF -> HF
        return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _rope_rows(t: torch.Tensor, ours: str, cfg: ModelConfig, *, to_hf: bool) -> torch.Tensor:
    """``t`` (our tensor ``ours``) with llama's Q/K rows moved between the GGUF and HF RoPE layouts
    (``to_hf``: GGUF -> HF, on load); every other tensor as it is."""
    if cfg.arch == "llama" and ".q_proj." in ours:
        return _rope_permute(t, cfg.n_heads, inverse=to_hf)
    if cfg.arch == "llama" and ".k_proj." in ours:
        return _rope_permute(t, cfg.n_kv_heads, inverse=to_hf)
    return t


def our_name(gguf_name: str) -> str | None:
    m = re.match(r"blk\.(\d+)\.(\w+)\.(weight|bias)$", gguf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    m = re.match(r"(\w+)\.(weight|bias)$", gguf_name)
    if m and m.group(1) in _GLOBAL:
        return f"{_GLOBAL[m.group(1)]}.{m.group(2)}"
    return None


def gguf_name(our: str) -> str:
    m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", our)
    if m:
        return f"blk.{m.group(1)}.{_LAYER_INV[m.group(2)]}.{m.group(3)}"
    base, kind = our.rsplit(".", 1)
    return f"{_GLOBAL_INV[base]}.{kind}"


def state_from_gguf(g: GGUFFile, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name in g.tensors:
        if cfg.arch == "gpt2" and ".attn_qkv." in name:
            i, kind = re.match(r"blk\.(\d+)\.attn_qkv\.(weight|bias)$", name).groups()
            sd.update(split_qkv(g.load(name), i, kind))
            continue
        ours = our_name(name)
        if ours is None:
            continue  # e.g. rope_freqs: recomputed from the config
        sd[ours] = _rope_rows(g.load(name), ours, cfg, to_hf=True)
    return sd


def tokenizer_from_gguf(g: GGUFFile, use_tokenizers_lib: bool = True) -> ByteBPE:
    md = g.metadata
    model = md.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise LlmlabError(f"{g.path}: unsupported GGUF tokenizer model {model!r} (llmlab reads byte-level BPE, "
                          "'gpt2'); use the model's Hugging Face folder with its tokenizer.json instead")
    pre = md.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in GGUF_PRE:
        raise LlmlabError(f"{g.path}: unsupported pre-tokenizer {pre!r} (known: {', '.join(sorted(GGUF_PRE))})")
    tokens, merges = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise LlmlabError(f"{g.path}: GGUF tokenizer lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    if not all(isinstance(t, str) for t in tokens) or not all(isinstance(m, str) for m in merges):
        raise LlmlabError(f"{g.path}: tokenizer.ggml.tokens and tokenizer.ggml.merges must be arrays of strings")
    emb = g.tensors.get("token_embd.weight")
    if emb is not None and len(tokens) > emb.shape[0]:
        raise LlmlabError(f"{g.path}: tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight only "
                          f"{emb.shape[0]} rows (corrupt file)")
    types = md.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if not isinstance(types, list):
        raise LlmlabError(f"{g.path}: tokenizer.ggml.token_type is not an array")
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
                if t and ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise LlmlabError(f"{g.path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((a, b))
    check_bpe(vocab, pairs, specials, str(g.path), vocab_key="tokenizer.ggml.tokens",
              merges_key="tokenizer.ggml.merges")
    ids = {key: check_id(md.get(f"tokenizer.ggml.{key}_token_id"), len(tokens), f"tokenizer.ggml.{key}_token_id",
                         str(g.path)) for key in ("bos", "eos", "padding")}
    return ByteBPE(vocab, pairs, GGUF_PRE[pre], specials, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"],
                   add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
                   use_tokenizers_lib=use_tokenizers_lib)


# ---- writing ---------------------------------------------------------------------------------------
WRITE_TYPES = ("F32", "F16", "BF16", *QUANT_TYPES)  # the qtypes write_model_gguf takes
# general.file_type as llama.cpp's quantize records it (llama_ftype); Q4_K and Q5_K are its Q4_K_M / Q5_K_M
_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15, "Q5_K": 17,
          "Q6_K": 18, "BF16": 32}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama-quant.cpp tensor_type_fallback


def _block(gtype: str) -> int:
    return GGML_TYPES[TYPE_IDS[gtype]][1]


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixtures: the first and last eighth, and every
    third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple, qtype: str, n_layers: int, tied: bool) -> str:
    """The type GGUF tensor ``name`` (PyTorch shape: rows, row length) is written in for ``qtype``: see
    ``write_model_gguf``."""
    if len(shape) < 2:
        return "F32"
    if qtype not in QUANT_TYPES:
        return qtype
    ncols, gtype = shape[-1], qtype
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # the head is the most sensitive weight: Q6_K unless the file is Q8_0 (or the rows do not fit qtype)
        gtype = "Q8_0" if ncols % _block(qtype) else ("Q6_K" if qtype != "Q8_0" else qtype)
    elif qtype in ("Q4_K", "Q5_K"):  # the Q4_K_M / Q5_K_M mixtures
        m = re.match(r"blk\.(\d+)\.(attn_v|attn_qkv|ffn_down)\.weight$", name)
        if m and _use_more_bits(int(m.group(1)), n_layers):
            gtype = "Q6_K"
    if ncols % _block(gtype):
        gtype = _FALLBACK.get(gtype, "F16")
    return gtype if ncols % _block(gtype) == 0 else "F16"


def _tensor_bytes(t: torch.Tensor, gtype: str) -> tuple[bytes, int]:
    """A tensor's bytes stored as GGML type ``gtype`` (from ``tensor_type``) and the type's id."""
    t = t.detach().to("cpu")
    if gtype == "F32":
        return t.float().contiguous().numpy().tobytes(), TYPE_IDS["F32"]
    if gtype in ("F16", "BF16"):
        dtype = torch.float16 if gtype == "F16" else torch.bfloat16
        return t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes(), TYPE_IDS[gtype]
    return quantize(t, gtype).numpy().tobytes(), TYPE_IDS[gtype]


def _file_type(qtype: str, own_blocks: dict[str, tuple[torch.Tensor, str]]) -> str:
    """The qtype ``general.file_type`` names: the most common own-block type when there are own blocks."""
    if not own_blocks:
        return qtype
    counts = Counter(g for _, g in own_blocks.values())
    return max(counts, key=lambda g: (counts[g], g))


def _pre_name(tok: ByteBPE) -> str:
    for name, steps in GGUF_PRE.items():
        if steps == tok.pre_steps:
            return name
    raise LlmlabError("this tokenizer's pre-tokenizer has no GGUF name; GGUF export is not possible")


def write_model_gguf(path, cfg: ModelConfig, sd: dict[str, torch.Tensor], tokenizer: ByteBPE,
                     chat_template: str | None = None, qtype: str = "F16", name: str = "llmlab model",
                     own_blocks: dict[str, tuple[torch.Tensor, str]] | None = None) -> None:
    """Write a llama/gpt2 model as GGUF v3, 2-D weights in ``qtype`` (``WRITE_TYPES``): F32, F16, BF16, or
    quantized bit-exact as llama.cpp's ``llama-quantize`` would without an importance matrix (src/llama-quant.cpp,
    ``llama_tensor_get_type``) to Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K, with its per-tensor rules:

    - output.weight, and token_embd.weight when the head is tied to it (llama.cpp quantizes a tied embedding as
      the head): Q6_K, except Q8_0 for a Q8_0 file or when the row length is not a multiple of qtype's block;
    - Q4_K and Q5_K are llama.cpp's default mixtures for those names, Q4_K_M and Q5_K_M: attn_v (gpt2:
      attn_qkv) and ffn_down get Q6_K in the first and last eighth of the layers and every third between;
    - a row length that is not a multiple of the type's block (256 for K-quants, 32 else) falls back:
      Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (SmolLM2's 576-wide rows), then F16 for rows not a multiple of 32;
    - norms and biases (1-D) stay F32. position_embd (gpt2) is quantized like the other weights (llama.cpp
      would keep the converter's F16).

    ``own_blocks`` (``formats/quantized.gguf_tensors``): weights that already are GGML blocks (a quantized
    model's layers), written as they are whatever ``qtype`` says (Q/K rows moved to GGUF's RoPE order; gpt2's
    fused attn_qkv only when q, k and v share a type); ``qtype`` then types the other tensors.

    ``general.file_type`` records llama.cpp's file type (Q4_K: 15 = Q4_K_M, Q5_K: 17 = Q5_K_M; with own blocks,
    their most common type: "mostly Q4_1")."""
    if qtype not in WRITE_TYPES:
        raise LlmlabError(f"GGUF export: unknown qtype {qtype!r}; use one of {', '.join(WRITE_TYPES)}")
    if cfg.arch not in ("llama", "gpt2"):
        raise LlmlabError(f"GGUF export supports llama and gpt2 models, not {cfg.arch}")
    if not isinstance(tokenizer, ByteBPE):
        raise LlmlabError("GGUF export needs a byte-level BPE tokenizer")
    a = cfg.arch
    md: dict[str, object] = {
        "general.architecture": a, "general.name": name, "general.alignment": 32,
        f"{a}.context_length": cfg.max_seq_len, f"{a}.embedding_length": cfg.dim,
        f"{a}.feed_forward_length": cfg.ffn_dim, f"{a}.block_count": cfg.n_layers,
        f"{a}.attention.head_count": cfg.n_heads, f"{a}.vocab_size": cfg.vocab_size,
        "general.file_type": _FTYPE[_file_type(qtype, own_blocks or {})],
    }
    types: dict = {"general.file_type": T_UINT32}
    own_blocks = own_blocks or {}
    if qtype in QUANT_TYPES or own_blocks:
        md["general.quantization_version"] = 2  # GGML_QNT_VERSION: the block layouts of ggml-common.h
        types["general.quantization_version"] = T_UINT32
    if a == "llama":
        md.update({"llama.attention.head_count_kv": cfg.n_kv_heads, "llama.rope.freq_base": float(cfg.rope_theta),
                   "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
                   "llama.rope.dimension_count": cfg.head_dim, "llama.attention.key_length": cfg.head_dim,
                   "llama.attention.value_length": cfg.head_dim})
    else:
        md["gpt2.attention.layer_norm_epsilon"] = float(cfg.norm_eps)
    tokens = [tokenizer.id_to_token.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)]
    md.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(tokenizer),
               "tokenizer.ggml.tokens": tokens,
               "tokenizer.ggml.token_type": [TOKEN_CONTROL if i in tokenizer.special_ids else TOKEN_NORMAL
                                             for i in range(cfg.vocab_size)],
               "tokenizer.ggml.merges": [f"{x} {y}" for x, y in tokenizer.merges],
               "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos)})
    types.update({"tokenizer.ggml.tokens": (T_ARRAY, T_STRING), "tokenizer.ggml.token_type": (T_ARRAY, T_INT32),
                  "tokenizer.ggml.merges": (T_ARRAY, T_STRING), "llama.rope.freq_base": T_FLOAT32})
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
        if value is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = int(value)
            types[f"tokenizer.ggml.{key}_token_id"] = T_UINT32
    if chat_template:
        md["tokenizer.chat_template"] = chat_template
    tensors: dict[str, tuple[bytes, tuple, int]] = {}
    for ours, t in sd.items():
        if cfg.tie_embeddings and ours == "lm_head.weight":
            continue
        if a == "gpt2" and re.match(r"layers\.\d+\.self_attn\.[kv]_proj\.", ours):
            continue
        own = own_blocks.get(ours)
        if a == "gpt2" and re.match(r"layers\.\d+\.self_attn\.q_proj\.", ours):
            i, kind = re.match(r"layers\.(\d+)\.self_attn\.q_proj\.(\w+)", ours).groups()
            t, theirs = fuse_qkv(sd, i, kind), f"blk.{i}.attn_qkv.{kind}"
            parts = [own_blocks.get(f"layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            same = all(parts) and len({g for _, g in parts}) == 1
            own = (torch.cat([raw for raw, _ in parts]), parts[0][1]) if same else None
        else:
            t, theirs = _rope_rows(t, ours, cfg, to_hf=False), gguf_name(ours)
            if own is not None:
                own = (_rope_rows(own[0], ours, cfg, to_hf=False), own[1])
        if own is not None:  # the layer's own blocks, rows in GGUF order
            data, tid = own[0].contiguous().numpy().tobytes(), TYPE_IDS[own[1]]
        else:
            gtype = tensor_type(theirs, tuple(t.shape), qtype, cfg.n_layers, cfg.tie_embeddings)
            data, tid = _tensor_bytes(t, gtype)
        tensors[theirs] = (data, tuple(t.shape), tid)
    write_gguf(path, md, tensors, types)


def pack_from_gguf_(model, g: GGUFFile, cfg: ModelConfig, impl: str = "int8"):
    """Swap every linear layer whose GGUF tensor is Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1 for a PackedLinear over the
    file's own blocks (Q/K rows un-permuted, a tied lm_head packed from token_embd). Other layers are unchanged."""
    from llmlab.nn.packed_linear import BLOCK_BYTES, PackedLinear

    targets = {name: info for name, info in g.tensors.items() if info.ggml_type in BLOCK_BYTES}
    for gname, info in targets.items():
        if gname == "token_embd.weight":  # the embedding lookup stays float; a tied head reuses its blocks
            if not cfg.tie_embeddings:
                continue
            ours = "lm_head.weight"
        else:
            ours = our_name(gname)
            if ours is None or ours == "embed_tokens.weight" or not ours.endswith(".weight"):
                continue
        out_features, in_features = info.shape
        # (out, row bytes): rows are whole blocks, so the RoPE row permutation moves packed rows as they are
        raw = _rope_rows(g.raw(info).reshape(out_features, -1), ours, cfg, to_hf=True)
        parent_name, _, attr = ours.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):  # gpt2's quantized position_embd is an embedding table, not a layer
            continue
        setattr(parent, attr, PackedLinear(raw.clone(), info.ggml_type, in_features, out_features, old.bias, impl))
    return model


def nf4_model_from_gguf(g: GGUFFile, cfg: ModelConfig, attn_impl: str = "sdpa", double_quant: bool = True,
                        where: str = "model"):
    """The model with every linear layer except ``lm_head`` as a frozen ``NF4Linear`` (the QLoRA base,
    Dettmers et al. 2023, arXiv:2305.14314), each quantized as its tensor is read from the file.

    Only one float32 linear weight exists at a time (plus the float embedding and norms), so loading does
    not first build the whole float32 model (540 MB for SmolLM2-135M) and then quantize it. The weights
    equal ``quantize_linears_nf4_`` applied to the float32 load (tested)."""

    from llmlab.models.registry import build_model, skip_init
    from llmlab.nn.nf4 import NF4Linear, quantize_nf4

    with skip_init():  # the float weights are never written, so their pages are never made resident
        model = build_model(cfg, attn_impl)
    targets = {f"{n}.weight": n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] != "lm_head"}
    sd: dict[str, torch.Tensor] = {}
    quantized = {}

    def take(ours: str, t: torch.Tensor) -> None:
        if ours in targets:
            if tuple(t.shape) != tuple(model.get_submodule(targets[ours]).weight.shape):
                raise LlmlabError(f"{where}: {ours} has shape {tuple(t.shape)}, the config needs "
                                  f"{tuple(model.get_submodule(targets[ours]).weight.shape)}")
            quantized[targets[ours]] = quantize_nf4(t, double_quant=double_quant)  # t is dropped here
        else:
            sd[ours] = t

    for name in g.tensors:
        if cfg.arch == "gpt2" and ".attn_qkv." in name:
            i, kind = re.match(r"blk\.(\d+)\.attn_qkv\.(weight|bias)$", name).groups()
            for ours, t in split_qkv(g.load(name), i, kind).items():
                take(ours, t)
            continue
        ours = our_name(name)
        if ours is not None:
            take(ours, _rope_rows(g.load(name), ours, cfg, to_hf=True))
    missing = sorted(set(targets.values()) - set(quantized))
    for path, q in quantized.items():
        parent_name, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf,
                NF4Linear(q, sd.pop(f"{path}.bias", None)))
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in quantized
                and not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing += sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise LlmlabError(f"{where}: weights do not match the {cfg.arch} config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()
