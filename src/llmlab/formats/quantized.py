"""Quantized model folders: a Hugging Face folder whose ``config.json`` records the scheme
(``quantization_config``, ``quant_method: "llmlab"``) and whose ``model.safetensors`` holds, per quantized layer
``<name>``, the integer codes and their scales instead of ``<name>.weight``:

    <name>.qweight   int8 (symmetric) / uint8 (asymmetric) (N, K); for 2-4 bits two codes per byte (N, K/2),
                     even columns in the low nibble, symmetric codes stored + 2^(bits-1)
    <name>.scales    (N, groups) float16 or float32 (per tensor: (1, 1))
    <name>.zeros     (N, groups) uint8, asymmetric only
    <name>.nf4_codes / .nf4_absmax | .nf4_absmax_codes, .nf4_absmax_scales, .nf4_absmax_mean   (method nf4)

Layer names are the Hugging Face ones (``model.layers.0.self_attn.q_proj`` for Llama). Other tensors are
written as in any folder: norms in float32, the embedding (and an untied head) in ``float_dtype``.

``load_quantized`` builds the model with ``QuantLinear`` / ``NF4Linear`` layers; ``pack_quantized_`` swaps
every layer whose codes fit a GGML block type (``QuantLinear.packed_blocks``) for a ``PackedLinear`` over
those blocks, so the integer kernels and the C decode step run it (``load(..., packed=True)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, read_json
from llmlab.formats import hf
from llmlab.models.config import ModelConfig
from llmlab.models.registry import build_model, skip_init
from llmlab.nn.ggml_quants import TYPE_IDS
from llmlab.nn.nf4 import NF4Linear, NF4Weight
from llmlab.nn.packed_linear import PackedLinear
from llmlab.nn.quant_linear import QuantLinear

QUANT_SUFFIXES = (".qweight", ".scales", ".zeros", ".nf4_codes", ".nf4_absmax", ".nf4_absmax_codes",
                  ".nf4_absmax_scales", ".nf4_absmax_mean")


def quant_config(folder: Path) -> dict | None:
    """The folder's ``quantization_config`` when it is an llmlab-quantized folder, else None."""
    raw = read_json(folder / "config.json", "expected a Hugging Face model folder")
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "llmlab" else None


def _prefix(cfg: ModelConfig) -> str:
    return "model." if cfg.arch == "llama" else ""


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, column 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) codes 0..15."""
    return torch.stack((p & 0x0F, p >> 4), dim=2).reshape(p.shape[0], -1)  # (N, K/2, 2) -> (N, K)


def quantized_tensors(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors written for one quantized layer (module docstring), keyed by ``name`` + suffix."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(layer, QuantLinear):
        q = layer.qweight
        if layer.bits <= 4:
            q = _pack_nibbles(q.to(torch.int16) + (2 ** (layer.bits - 1) if layer.symmetric else 0))
        out[f"{name}.qweight"] = q
        out[f"{name}.scales"] = layer.scales.detach()
        if layer.zeros is not None:
            out[f"{name}.zeros"] = layer.zeros
    elif isinstance(layer, NF4Linear):
        w = layer.nf4_weight()
        for field in ("codes", "absmax", "absmax_codes", "absmax_scales", "absmax_mean"):
            t = getattr(w, field)
            if t is not None:
                out[f"{name}.nf4_{field}"] = t.reshape(-1) if field == "absmax_mean" else t
    else:
        raise TypeError(f"{name}: {type(layer).__name__} is not a quantized layer")
    return {k: v.contiguous().cpu() for k, v in out.items()}


def write_quantized(folder: Path, model: nn.Module, cfg: ModelConfig, spec_json: dict, *,
                    float_dtype: torch.dtype = torch.float16, tokenizer_json: str | None = None,
                    tokenizer_config: dict | None = None) -> None:
    """Write ``model`` (its quantized layers named in ``spec_json['modules']``) into ``folder`` (which the caller
    creates as a temporary folder and renames into place)."""
    modules = list(spec_json["modules"])
    quantized = {n: model.get_submodule(n) for n in modules}
    float_sd = {}
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in quantized and leaf != "bias":
            continue
        float_sd[k] = v.to(float_dtype) if v.is_floating_point() and v.ndim >= 2 else v
    extra = {}
    for n, layer in quantized.items():
        extra.update(quantized_tensors(_prefix(cfg) + n, layer))
    hf.write_folder(folder, cfg, float_sd, tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config,
                    extra_tensors=extra, extra_config={"quantization_config": spec_json})


def quant_layer(name: str, t: dict[str, torch.Tensor], spec: dict, old: nn.Linear, where: str) -> nn.Module:
    bias = None if old.bias is None else old.bias
    n, k = old.out_features, old.in_features
    if spec["method"] == "nf4":
        opts = spec.get("options", {})
        mean = t.get("nf4_absmax_mean")
        w = NF4Weight(t["nf4_codes"], (n, k), int(opts.get("block_size", 64)), t.get("nf4_absmax"),
                      t.get("nf4_absmax_codes"), t.get("nf4_absmax_scales"),
                      None if mean is None else mean.reshape(()), int(opts.get("absmax_block_size", 256)))
        return NF4Linear(w, bias)
    bits, symmetric = int(spec["bits"]), "zeros" not in t
    q = t["qweight"]
    if bits <= 4:
        q = _unpack_nibbles(q).to(torch.int16) - (2 ** (bits - 1) if symmetric else 0)
    if tuple(q.shape) != (n, k):
        raise LlmlabError(f"{where}: {name}.qweight holds {tuple(q.shape)} codes, the config needs {(n, k)}")
    return QuantLinear(q, t["scales"], t.get("zeros"), bits, int(spec["group_size"]), bias,
                       act=spec.get("act", "none"), act_bits=int(spec.get("act_bits", 8)),
                       threshold=float(spec.get("threshold", 6.0)))


def load_quantized(folder: Path, cfg: ModelConfig, spec: dict, attn_impl: str = "sdpa") -> nn.Module:
    """The model of a quantized folder, its quantized layers as ``QuantLinear`` / ``NF4Linear``."""
    where = str(folder)
    raw = hf.read_weights(folder)
    prefix = _prefix(cfg)
    modules = spec.get("modules")
    if not isinstance(modules, list) or not modules:
        raise LlmlabError(f"{where}/config.json: quantization_config lists no quantized modules")
    per_layer: dict[str, dict[str, torch.Tensor]] = {m: {} for m in modules}
    floats = {}
    for key, v in raw.items():
        suffix = next((s for s in QUANT_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            floats[key] = v
            continue
        owner = key[: -len(suffix)].removeprefix(prefix)
        if owner not in per_layer:
            raise LlmlabError(f"{where}: {key} belongs to no module listed in quantization_config")
        per_layer[owner][suffix[1:]] = v
    sd = {k: v.float() if v.is_floating_point() else v for k, v in hf.state_from_hf(cfg, floats).items()}
    with skip_init():
        model = build_model(cfg, attn_impl)
    try:
        layers = {m: model.get_submodule(m) for m in modules}
    except AttributeError:
        raise LlmlabError(f"{where}: quantization_config names modules this {cfg.arch} model does not have") from None
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")
                and not (k.rpartition(".")[0] in layers and k.endswith(".weight"))}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise LlmlabError(f"{where}: weights do not match the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    needed = ("nf4_codes",) if spec.get("method") == "nf4" else ("qweight", "scales")
    for m, t in per_layer.items():
        absent = [s for s in needed if s not in t]
        if absent:
            raise LlmlabError(f"{where}: {prefix}{m}.{absent[0]} is missing (a truncated or partial folder?)")
    model.load_state_dict(sd, strict=False, assign=True)
    for m, old in layers.items():
        parent, _, leaf = m.rpartition(".")
        setattr(model.get_submodule(parent), leaf, quant_layer(prefix + m, per_layer[m], spec, old, where))
    if cfg.tie_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def pack_quantized_(model: nn.Module, impl: str = "int8") -> int:
    """Swap each ``QuantLinear`` whose codes are a GGML block type for a ``PackedLinear`` with the same values
    (the others keep a dense float32 weight, ``QuantLinear.keep_dense_``); returns how many were swapped."""
    swapped = 0
    for name, layer in list(model.named_modules()):
        if isinstance(layer, QuantLinear):
            blocks = layer.packed_blocks()
            if blocks is None:
                layer.keep_dense_()  # no GGML type: dequantized once, not in every call
                continue
            raw, type_name = blocks
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, PackedLinear(raw, TYPE_IDS[type_name], layer.in_features,
                                                                    layer.out_features, layer.bias, impl))
            swapped += 1
    return swapped


def gguf_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, str]]]:
    """A model with quantized layers as a GGUF writer wants it: (state dict with every quantized layer's weight
    dequantized to float32 under ``<layer>.weight``, own blocks). Own blocks map ``<layer>.weight`` to
    (raw GGML blocks (N, K / 32 * block bytes) uint8, type name) for each layer whose values *are* a GGML type
    (a ``QuantLinear`` whose ``packed_blocks`` exist, a ``PackedLinear``): writing those keeps the quantized
    values instead of quantizing their dequantized weights a second time."""
    sd = dict(model.state_dict())
    own: dict[str, tuple[torch.Tensor, str]] = {}
    type_names = {tid: name for name, tid in TYPE_IDS.items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, (QuantLinear, NF4Linear, PackedLinear)):
            continue
        for key in [k for k in sd if k.startswith(f"{name}.")]:
            del sd[key]
        if isinstance(layer, NF4Linear):
            w = layer.dequantize(torch.float32)
        else:
            w = layer.dequantized().float()
        sd[f"{name}.weight"] = w  # (out, in)
        if layer.bias is not None:
            sd[f"{name}.bias"] = layer.bias.detach().float()
        if isinstance(layer, QuantLinear):
            blocks = layer.packed_blocks()
            if blocks is not None:
                own[f"{name}.weight"] = blocks
        elif isinstance(layer, PackedLinear) and layer.ggml_type in type_names:
            own[f"{name}.weight"] = (layer.packed, type_names[layer.ggml_type])
    return sd, own
