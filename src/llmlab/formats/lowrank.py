"""Low-rank model folders: a Hugging Face folder whose ``config.json`` records the factored layers
(``lowrank_config``, ``"format": "llmlab-lowrank"``) and whose ``model.safetensors`` holds, per factored layer
``<name>`` (Hugging Face names, ``model.layers.0.mlp.up_proj`` for Llama), two thin matrices instead of
``<name>.weight``:

    <name>.down.weight   (r, in)   float, or <name>.down.qweight / .scales / .zeros with quantized factors
    <name>.up.weight     (out, r)  float, or <name>.up.qweight / .scales / .zeros (the quantized folder's
                                   tensors, ``formats/quantized.py``)
    <name>.up.bias       (out,)    float32, when the model's layers have a bias

``lowrank_config`` holds ``modules`` ({our layer name: rank}), ``factor_bits`` (0: float factors; else the
bits of the round-to-nearest codes, per output channel) and how the factors were made (``compress/lowrank.py``).
Every other tensor is written as in any folder. ``load_lowrank`` builds the model with ``LowRankLinear``
layers (``nn/lowrank.py``), so ``llmlab.load`` and every command run it without multiplying the factors out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, read_json
from llmlab.formats import hf
from llmlab.formats.quantized import quant_layer, quantized_tensors
from llmlab.models.config import ModelConfig
from llmlab.models.registry import build_model, skip_init
from llmlab.nn.lowrank import LowRankLinear
from llmlab.nn.quant_linear import QuantLinear

FORMAT = "llmlab-lowrank"


def lowrank_config(folder: Path) -> dict | None:
    """The folder's ``lowrank_config`` when it is an llmlab low-rank folder, else None."""
    raw = read_json(folder / "config.json", "expected a Hugging Face model folder")
    lc = raw.get("lowrank_config") if isinstance(raw, dict) else None
    return lc if isinstance(lc, dict) and lc.get("format") == FORMAT else None


def _prefix(cfg: ModelConfig) -> str:
    return "model." if cfg.arch == "llama" else ""


def factor_tensors(name: str, layer: LowRankLinear, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors written for one factored layer (module docstring), keyed by ``name`` + suffix."""
    out: dict[str, torch.Tensor] = {}
    for part in ("down", "up"):
        sub = getattr(layer, part)
        if isinstance(sub, QuantLinear):
            out.update(quantized_tensors(f"{name}.{part}", sub))
        else:
            out[f"{name}.{part}.weight"] = sub.weight.detach().to(float_dtype)
        if sub.bias is not None:
            out[f"{name}.{part}.bias"] = sub.bias.detach().float()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def write_lowrank(folder: Path, model: nn.Module, cfg: ModelConfig, config_json: dict, *,
                  float_dtype: torch.dtype = torch.float32, tokenizer_json: str | None = None,
                  tokenizer_config: dict | None = None) -> None:
    """Write ``model`` (its ``LowRankLinear`` layers named in ``config_json['modules']``) into ``folder`` (which
    the caller creates as a temporary folder and renames into place)."""
    modules = dict(config_json["modules"])
    factored = {n: model.get_submodule(n) for n in modules}
    sd = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(n + ".") for n in factored):
            continue
        sd[k] = v.to(float_dtype) if v.is_floating_point() and v.ndim >= 2 else v
    extra = {}
    for n, layer in factored.items():
        extra.update(factor_tensors(_prefix(cfg) + n, layer, float_dtype))
    hf.write_folder(folder, cfg, sd, tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config,
                    extra_tensors=extra, extra_config={"lowrank_config": {"format": FORMAT, **config_json}})


def _factor(name: str, t: dict[str, torch.Tensor], bits: int, k: int, n: int, where: str) -> nn.Module:
    """One factor (n, k) from its tensors: an ``nn.Linear`` or, with ``bits``, a ``QuantLinear``."""
    if bits:
        if "qweight" not in t or "scales" not in t:
            raise LlmlabError(f"{where}: {name}.qweight or .scales is missing (a truncated or partial folder?)")
        layer = quant_layer(name, t, {"method": "rtn", "bits": bits, "group_size": 0},
                            nn.Linear(k, n, bias=False, device="meta"), where)
        if "bias" in t:
            layer.bias = nn.Parameter(t["bias"].float(), requires_grad=False)
        return layer
    w = t.get("weight")
    if w is None:
        raise LlmlabError(f"{where}: {name}.weight is missing (a truncated or partial folder?)")
    if tuple(w.shape) != (n, k):
        raise LlmlabError(f"{where}: {name}.weight is {tuple(w.shape)}, the config needs {(n, k)}")
    layer = nn.Linear(k, n, bias="bias" in t, device="meta")
    layer.weight = nn.Parameter(w.float())
    if "bias" in t:
        layer.bias = nn.Parameter(t["bias"].float())
    return layer


def load_lowrank(folder: Path, cfg: ModelConfig, lc: dict, attn_impl: str = "sdpa") -> nn.Module:
    """The model of a low-rank folder, its factored layers as ``LowRankLinear``."""
    where = str(folder)
    modules, bits = lc.get("modules"), lc.get("factor_bits", 0)
    if not isinstance(modules, dict) or not modules or not all(isinstance(r, int) and r >= 1
                                                                for r in modules.values()):
        raise LlmlabError(f"{where}/config.json: lowrank_config needs modules {{layer name: rank >= 1}}")
    if bits not in (0, 4, 8):
        raise LlmlabError(f"{where}/config.json: lowrank_config factor_bits {bits!r} is not 0, 4 or 8")
    raw = hf.read_weights(folder)
    prefix = _prefix(cfg)
    per_layer: dict[str, dict[str, dict[str, torch.Tensor]]] = {m: {"down": {}, "up": {}} for m in modules}
    floats = {}
    for key, v in raw.items():
        owner = next((m for m in modules if key.startswith(f"{prefix}{m}.down.") or key.startswith(f"{prefix}{m}.up.")),
                     None)
        if owner is None:
            floats[key] = v
            continue
        part, _, leaf = key[len(prefix) + len(owner) + 1:].partition(".")
        per_layer[owner][part][leaf] = v
    sd = {k: v.float() if v.is_floating_point() else v for k, v in hf.state_from_hf(cfg, floats).items()}
    with skip_init():
        model = build_model(cfg, attn_impl)
    try:
        olds = {m: model.get_submodule(m) for m in modules}
    except AttributeError:
        raise LlmlabError(f"{where}: lowrank_config names modules this {cfg.arch} model does not have") from None
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")
                and k.rpartition(".")[0] not in olds}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise LlmlabError(f"{where}: weights do not match the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.load_state_dict(sd, strict=False, assign=True)
    for m, old in olds.items():
        r = modules[m]
        if not isinstance(old, nn.Linear) or r > min(old.in_features, old.out_features):
            raise LlmlabError(f"{where}: lowrank_config gives {m} rank {r}, which its shape does not allow")
        down = _factor(f"{prefix}{m}.down", per_layer[m]["down"], bits, old.in_features, r, where)
        up = _factor(f"{prefix}{m}.up", per_layer[m]["up"], bits, r, old.out_features, where)
        if (old.bias is None) != (up.bias is None):
            raise LlmlabError(f"{where}: {prefix}{m}.up.bias is {'missing' if up.bias is None else 'unexpected'}")
        parent, _, leaf = m.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LowRankLinear(down, up))
    if cfg.tie_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()
