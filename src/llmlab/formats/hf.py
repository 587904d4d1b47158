"""Hugging Face model folders: ``config.json`` + ``model.safetensors`` (or a sharded index), read and
written for the four families, with tensor names mapped between HF's and ours.

Ours use HF Llama names everywhere (``q_proj`` ... ``down_proj``); GPT-2's fused ``c_attn`` Conv1D
(stored transposed, (in, out)) is split into q/k/v, and BERT's ``attention.self.query`` and T5's
``block.N.layer.M.SelfAttention.q`` etc. are renamed.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from llmlab.common import LlmlabError, read_json, write_text_atomic
from llmlab.formats import safetensors
from llmlab.models.config import ModelConfig

# ---- config.json <-> ModelConfig --------------------------------------------------------------------


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    mtype = hf.get("model_type")
    try:
        if mtype in ("llama", "mistral", "mixtral"):
            return ModelConfig(
                arch="llama", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"), ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                rope_scaling=hf.get("rope_scaling"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attn_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
                pad_token_id=hf.get("pad_token_id"), n_experts=int(hf.get("num_local_experts", 0)),
                experts_per_token=int(hf.get("num_experts_per_tok", 2)),
                moe_aux_weight=float(hf.get("router_aux_loss_coef", 0.01)))
        if mtype == "gpt2":
            dim = hf["n_embd"]
            return ModelConfig(
                arch="gpt2", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                ffn_dim=hf.get("n_inner") or 4 * dim, max_seq_len=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), attn_bias=True, mlp_bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"))
        if mtype == "bert":
            return ModelConfig(
                arch="bert", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
                max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("layer_norm_eps", 1e-12),
                type_vocab_size=hf.get("type_vocab_size", 2), attn_bias=True, mlp_bias=True, tie_embeddings=False,
                pad_token_id=hf.get("pad_token_id", 0))
        if mtype == "t5":
            # transformers >= 5 writes tie_word_embeddings: true for every T5 and says whether the head is scaled
            # (= tied, T5 v1.0) in scale_decoder_outputs; older files say it in tie_word_embeddings.
            tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
            return ModelConfig(
                arch="t5", vocab_size=hf["vocab_size"], dim=hf["d_model"], n_layers=hf["num_layers"],
                n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], n_heads=hf["num_heads"],
                head_dim=hf["d_kv"], ffn_dim=hf["d_ff"], max_seq_len=hf.get("n_positions", 512),
                norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=bool(tied),
                ffn_act=hf.get("feed_forward_proj", "relu"), rel_buckets=hf.get("relative_attention_num_buckets", 32),
                rel_max_distance=hf.get("relative_attention_max_distance", 128),
                pad_token_id=hf.get("pad_token_id", 0), eos_token_id=_first(hf.get("eos_token_id", 1)),
                bos_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)))
    except KeyError as e:
        raise LlmlabError(f"{where}: missing key {e.args[0]!r} for model_type {mtype!r}") from None
    raise LlmlabError(f"{where}: unsupported model_type {mtype!r} (llmlab reads llama, mistral, gpt2, bert and t5)")


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.arch == "llama" and cfg.n_experts:  # Mixtral: Llama with a sparse mixture-of-experts feed-forward
        return {**config_to_hf(replace(cfg, n_experts=0)), "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral", "num_local_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.experts_per_token, "router_aux_loss_coef": cfg.moe_aux_weight}
    if cfg.arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
                "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attn_bias,
                "mlp_bias": cfg.mlp_bias, "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "torch_dtype": "float32"}
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings,
                "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if cfg.arch == "t5":
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
                "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.ffn_dim, "num_layers": cfg.n_layers,
                "num_decoder_layers": cfg.n_decoder_layers, "num_heads": cfg.n_heads,
                "relative_attention_num_buckets": cfg.rel_buckets,
                "relative_attention_max_distance": cfg.rel_max_distance, "layer_norm_epsilon": cfg.norm_eps,
                "feed_forward_proj": cfg.ffn_act, "tie_word_embeddings": cfg.tie_embeddings,
                "scale_decoder_outputs": cfg.tie_embeddings, "n_positions": cfg.max_seq_len,
                "is_encoder_decoder": True, "dropout_rate": 0.0, "pad_token_id": cfg.pad_token_id,
                "eos_token_id": cfg.eos_token_id, "decoder_start_token_id": cfg.bos_token_id
                if cfg.bos_token_id is not None else cfg.pad_token_id}
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.ffn_dim, "max_position_embeddings": cfg.max_seq_len,
            "layer_norm_eps": cfg.norm_eps, "type_vocab_size": cfg.type_vocab_size, "hidden_act": "gelu",
            "pad_token_id": cfg.pad_token_id, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


# ---- state dict names -------------------------------------------------------------------------------
# (Hugging Face prefix, our prefix); "{i}" is the layer index.
_BERT_NAMES = [
    ("embeddings.word_embeddings.", "embed_tokens."), ("embeddings.position_embeddings.", "embed_positions."),
    ("embeddings.token_type_embeddings.", "embed_token_types."), ("embeddings.LayerNorm.", "embed_norm."),
    ("encoder.layer.{i}.attention.self.query.", "layers.{i}.self_attn.q_proj."),
    ("encoder.layer.{i}.attention.self.key.", "layers.{i}.self_attn.k_proj."),
    ("encoder.layer.{i}.attention.self.value.", "layers.{i}.self_attn.v_proj."),
    ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.self_attn.o_proj."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "layers.{i}.attn_norm."),
    ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.mlp.up_proj."),
    ("encoder.layer.{i}.output.dense.", "layers.{i}.mlp.down_proj."),
    ("encoder.layer.{i}.output.LayerNorm.", "layers.{i}.mlp_norm."),
    ("pooler.dense.", "pooler."),
]
_GPT2_NAMES = [
    ("wte.", "embed_tokens."), ("wpe.", "embed_positions."), ("ln_f.", "norm."),
    ("h.{i}.ln_1.", "layers.{i}.input_layernorm."), ("h.{i}.ln_2.", "layers.{i}.post_attention_layernorm."),
    ("h.{i}.attn.c_proj.", "layers.{i}.self_attn.o_proj."),
    ("h.{i}.mlp.c_fc.", "layers.{i}.mlp.up_proj."), ("h.{i}.mlp.c_proj.", "layers.{i}.mlp.down_proj."),
]




def _t5_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """HF T5: block i's sub-layers are numbered (self-attention 0, [cross-attention 1], feed-forward last);
    the relative position table lives in block 0's self-attention."""
    pairs = [("shared.", "embed_tokens.")]
    for stack, ff in (("encoder", 1), ("decoder", 2)):
        hf_b, ours = f"{stack}.block.{{i}}.layer.", f"{stack}.layers.{{i}}."
        pairs += [(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.",
                   f"{stack}.relative_attention_bias."), (f"{stack}.final_layer_norm.", f"{stack}.norm.")]
        pairs += [(f"{hf_b}0.SelfAttention.{p}.", f"{ours}self_attn.{p}_proj.") for p in "qkvo"]
        pairs += [(f"{hf_b}0.layer_norm.", f"{ours}input_layernorm."),
                  (f"{hf_b}{ff}.layer_norm.", f"{ours}post_attention_layernorm."),
                  (f"{hf_b}{ff}.DenseReluDense.wo.", f"{ours}mlp.down_proj.")]
        if cfg.ffn_act == "gated-gelu":
            pairs += [(f"{hf_b}{ff}.DenseReluDense.wi_0.", f"{ours}mlp.gate_proj."),
                      (f"{hf_b}{ff}.DenseReluDense.wi_1.", f"{ours}mlp.up_proj.")]
        else:
            pairs += [(f"{hf_b}{ff}.DenseReluDense.wi.", f"{ours}mlp.up_proj.")]
    pairs += [(f"decoder.block.{{i}}.layer.1.EncDecAttention.{p}.", f"decoder.layers.{{i}}.cross_attn.{p}_proj.")
              for p in "qkvo"]
    pairs += [("decoder.block.{i}.layer.1.layer_norm.", "decoder.layers.{i}.cross_attn_layernorm.")]
    return pairs


def _rename(name: str, pairs, reverse: bool = False) -> str | None:
    for hf, ours in pairs:
        src, dst = (ours, hf) if reverse else (hf, ours)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)"), name)
        if m:
            return dst.replace("{i}", m.groupdict().get("i") or "") + name[m.end():]
    return None


def state_from_hf(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor],
                  where: str = "model weights") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if cfg.arch == "t5":
        for stack in ("encoder", "decoder"):
            table = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            if table not in hf_sd:
                raise LlmlabError(f"{where}: T5 weights lack {table} (the {stack}'s relative-attention table); "
                                  "the file is incomplete: save the model again with all its weights")
        pairs = _t5_names(cfg)
        for k, v in hf_sd.items():
            new = _rename(k, pairs)
            if new is not None:
                out[new] = v
            elif k == "lm_head.weight":
                out[k] = v  # the v1.1 untied head (transformers' embed_tokens copies of "shared" are dropped)
        if not cfg.tie_embeddings and "lm_head.weight" not in out and "embed_tokens.weight" in out:
            out["lm_head.weight"] = out["embed_tokens.weight"]  # transformers 5 saves an unscaled head tied
    elif cfg.arch == "llama":
        for k, v in hf_sd.items():
            if k.endswith("rotary_emb.inv_freq"):
                continue
            out[k.removeprefix("model.")] = v
    elif cfg.arch == "bert":
        for k, v in hf_sd.items():
            new = _rename(k.removeprefix("bert."), _BERT_NAMES)
            if new is not None:
                out[new] = v
        if "pooler.weight" not in out and "embed_tokens.weight" in out:
            # saved without its pooler (BertForTokenClassification, BertForQuestionAnswering): those heads never
            # read it, so a zero pooler (pooled output 0) stands in rather than a missing-weights error
            dim = out["embed_tokens.weight"].shape[1]
            out["pooler.weight"] = out["embed_tokens.weight"].new_zeros(dim, dim)
            out["pooler.bias"] = out["embed_tokens.weight"].new_zeros(dim)
    else:  # gpt2: Conv1D weights are (in, out): transpose to nn.Linear's (out, in)
        for k, v in hf_sd.items():
            k = k.removeprefix("transformer.")
            m = re.match(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)$", k)
            if m:
                i, kind = m.groups()
                out.update(split_qkv(v.t() if kind == "weight" else v, i, kind))
                continue
            new = _rename(k, _GPT2_NAMES)
            if new is None:
                if k == "lm_head.weight":
                    out[k] = v
                continue  # attn.bias / masked_bias buffers of old checkpoints
            conv = re.search(r"(c_proj|c_fc)\.weight$", k)
            out[new] = v.t().contiguous() if conv else v
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def split_qkv(fused: torch.Tensor, layer: str | int, kind: str) -> dict[str, torch.Tensor]:
    """GPT-2's fused attention projection, rows (3 * dim, ...) = q, k, v -> our three tensors of ``layer``
    (``kind``: weight or bias). Hugging Face and GGUF both store GPT-2's q/k/v fused this way."""
    return {f"layers.{layer}.self_attn.{p}_proj.{kind}": part.contiguous()
            for p, part in zip("qkv", fused.chunk(3, dim=0))}


def fuse_qkv(sd: dict[str, torch.Tensor], layer: str | int, kind: str) -> torch.Tensor:
    """The inverse of ``split_qkv``: the q, k, v tensors of ``layer`` stacked row-wise (3 * dim, ...)."""
    return torch.cat([sd[f"layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)


def state_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    if cfg.arch == "llama":
        return {(k if k == "lm_head.weight" else "model." + k): v for k, v in sd.items()}
    pairs = {"bert": _BERT_NAMES, "t5": _t5_names(cfg)}.get(cfg.arch, _GPT2_NAMES)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)$", k)
        if cfg.arch == "gpt2" and m:
            i, proj, kind = m.groups()
            if proj == "q":  # GPT-2 stores q, k, v fused as one Conv1D
                fused = fuse_qkv(sd, i, kind)
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
            continue
        if k == "lm_head.weight":
            out[k] = v
            continue
        name = _rename(k, pairs, reverse=True)
        if name is None:
            raise KeyError(f"no Hugging Face name for {k}")
        if cfg.arch == "gpt2":
            if re.search(r"(c_proj|c_fc)\.weight$", name):
                v = v.t().contiguous()
            name = "transformer." + name
        out[name] = v
    return out


# ---- folders ---------------------------------------------------------------------------------------


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    hf = read_json(path, "expected a Hugging Face model folder")
    if not isinstance(hf, dict):
        raise LlmlabError(f"{path}: not a JSON object")
    cfg = config_from_hf(hf, str(path))
    try:
        return cfg.validate()
    except LlmlabError as e:
        raise LlmlabError(f"{path}: {e}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (weights_only)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return safetensors.load(single)
    if index.exists():
        try:
            weight_map = read_json(index, "needed")["weight_map"]
        except (KeyError, TypeError):
            raise LlmlabError(f"{index}: malformed shard index (needs a 'weight_map' object)") from None
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (folder / shard).resolve()
            if shard_path.parent != folder.resolve():
                raise LlmlabError(f"{index}: shard {shard!r} points outside the model folder")
            if not shard_path.exists():
                raise LlmlabError(f"{index}: shard {shard!r} is missing")
            out.update(safetensors.load(shard_path))
        return out
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file to the user
            raise LlmlabError(f"{binary}: cannot load safely with weights_only=True ({type(e).__name__})") from None
    raise LlmlabError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def write_folder(folder: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], *, tokenizer_json: str | None = None,
                 tokenizer_config: dict | None = None, max_shard_bytes: int = 2 * 1024**3,
                 extra_tensors: dict[str, torch.Tensor] | None = None, extra_config: dict | None = None) -> None:
    """config.json + model.safetensors (sharded with an index past ``max_shard_bytes``) + tokenizer files.
    ``extra_tensors`` are written under their own names (a quantized layer's codes and scales,
    ``formats/quantized.py``), ``extra_config`` merged into config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_sd = state_to_hf(cfg, sd)
    dtype = next(iter(hf_sd.values())).dtype if hf_sd else torch.float32
    hf_sd.update(extra_tensors or {})
    config = config_to_hf(cfg)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.update(extra_config or {})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(hf_sd):
        nbytes = hf_sd[name].numel() * hf_sd[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = hf_sd[name]
        size += nbytes
    if len(shards) == 1:
        safetensors.save(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            safetensors.save(shard, folder / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        write_text_atomic(folder / "model.safetensors.index.json",
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_json is not None:
        write_text_atomic(folder / "tokenizer.json", tokenizer_json)
    if tokenizer_config is not None:
        write_text_atomic(folder / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    # config.json last: a folder with a config.json is a complete folder.
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2))

