"""Adapter folders for prompt tuning, prefix tuning (Hugging Face ``peft``'s own format) and Houlsby
bottleneck adapters (an llmlab-only format): ``adapter_config.json`` + ``adapter_model.safetensors``.

The methods are ``llmlab.nn.prompt_tuning`` (Lester et al. 2021, arXiv:2104.08691; Li & Liang 2021,
arXiv:2101.00190) and ``llmlab.nn.bottleneck`` (Houlsby et al. 2019, arXiv:1902.00751); this module only
moves their tensors.

- ``PROMPT_TUNING`` (peft): one tensor ``prompt_embeddings`` (P, dim); config ``num_virtual_tokens``,
  ``token_dim`` (dim), ``num_transformer_submodules`` 1, ``num_attention_heads``, ``num_layers``,
  ``prompt_tuning_init``, ``task_type`` CAUSAL_LM, ...
- ``PREFIX_TUNING`` (peft): one tensor ``prompt_embeddings`` (P, n_layers * 2 * token_dim), the final prefix.
  For a GQA model peft sets ``token_dim`` = H_kv * D and ``num_attention_heads`` = H_kv (the key/value
  heads), and so do we. peft saves the projected prefix also when it trained with ``prefix_projection``
  (``get_prompt_embedding_to_save``); we write ``prefix_projection: false`` beside it, because the file
  holds no MLP: peft then loads it in inference and in training mode alike.
- ``BOTTLENECK`` (llmlab only: peft has no Houlsby adapter, ``PeftModel.from_pretrained`` refuses it):
  ``<llmlab module path>.adapter_down.{weight,bias}`` / ``.adapter_up.{weight,bias}`` and, since Houlsby
  et al. also train them, every norm's parameters (``<path>.weight`` / ``.bias``); config ``dim``,
  ``activation``, ``sublayers``.

Reading checks everything against the model before changing it: a wrong ``peft_type`` or task, an adapter
for another base (a shape that does not fit: the message names the file, the tensor, expected vs got), a
missing or corrupt safetensors file are one-line ``LlmlabError``s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, read_json, write_text_atomic
from llmlab.formats import safetensors as st
from llmlab.models.config import ModelConfig
from llmlab.nn.bottleneck import (
    NORM_TYPES,
    SUBLAYERS,
    BottleneckConfig,
    apply_bottleneck_,
    bottleneck_modules,
    bottleneck_state_dict,
    load_bottleneck_state_dict_,
)
from llmlab.nn.prompt_tuning import (
    PrefixTunedLM,
    PrefixTuningConfig,
    PromptTunedLM,
    PromptTuningConfig,
    apply_prefix_tuning,
    apply_prompt_tuning,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EMBEDDINGS = "prompt_embeddings"  # peft's key for both prompt-learning methods
TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK")


def _base_config(model: nn.Module, model_config: ModelConfig | None) -> ModelConfig:
    base = getattr(model, "base_model", model)
    return model_config or base.config


def _norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every norm parameter by name (``layers.0.input_layernorm.weight``, ``norm.weight``, ...)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, NORM_TYPES):
            for leaf, p in m.named_parameters(recurse=False):
                out[f"{name}.{leaf}"] = p
    return out


def save_prompt_adapter(folder: str | Path, model: nn.Module, model_config: ModelConfig | None = None,
                        base_model: str | None = None, base_fingerprint: str | None = None) -> Path:
    """Write the prompt tuning, prefix tuning or bottleneck adapters of ``model`` as an adapter folder
    (each file atomically); returns the folder. ``model_config`` is the base model's (default: its own);
    ``base_fingerprint`` (``formats.peft.base_fingerprint``) goes into the safetensors metadata."""
    cfg = _base_config(model, model_config)
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
              "revision": None, "modules_to_save": None, "num_layers": cfg.n_layers}
    P = getattr(model, "num_virtual_tokens", None)
    if isinstance(model, PromptTunedLM):
        tensors = {EMBEDDINGS: model.prompt.detach()}  # (P, dim)
        conf = {"peft_type": "PROMPT_TUNING", **common, "num_virtual_tokens": P, "token_dim": cfg.dim,
                "num_transformer_submodules": 1, "num_attention_heads": cfg.n_heads,
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None}
    elif isinstance(model, PrefixTunedLM):
        with torch.no_grad():
            tensors = {EMBEDDINGS: model.flat_prefix().detach()}  # (P, n_layers * 2 * token_dim)
        conf = {"peft_type": "PREFIX_TUNING", **common, "num_virtual_tokens": P, "token_dim": model.token_dim,
                "num_transformer_submodules": 1, "num_attention_heads": cfg.n_kv_heads,
                "encoder_hidden_size": model.token_dim, "prefix_projection": False, "init_weights": None}
    elif mods := bottleneck_modules(model):
        first = next(iter(mods.values()))
        sublayers = sorted({"attn" if p.endswith("o_proj") else "mlp" for p in mods})
        tensors = {**bottleneck_state_dict(model), **{k: v.detach() for k, v in _norm_state(model).items()}}
        conf = {"peft_type": "BOTTLENECK", "library": "llmlab", **common, "dim": first.dim,
                "activation": first.activation, "sublayers": sublayers, "target_modules": sorted(mods)}
    else:
        raise LlmlabError("the model has no prompt tuning, prefix tuning or bottleneck adapters to save "
                          "(apply_prompt_tuning / apply_prefix_tuning / apply_bottleneck_ first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if base_fingerprint:
        from llmlab.formats.peft import FINGERPRINT_KEY

        meta[FINGERPRINT_KEY] = base_fingerprint
    st.save({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS_NAME, metadata=meta)
    write_text_atomic(folder / CONFIG_NAME, json.dumps(conf, indent=2) + "\n")
    return folder


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    conf_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    conf = read_json(conf_path, "expected a PEFT adapter folder")
    if not isinstance(conf, dict):
        raise LlmlabError(f"{conf_path}: not a JSON object")
    kind = conf.get("peft_type")
    if kind not in TYPES:
        other = " (a LoRA adapter: load it with llmlab.formats.peft.load_adapter_)" if kind == "LORA" else ""
        raise LlmlabError(f"{conf_path}: peft_type {kind!r} is not one of {', '.join(TYPES)}{other}")
    if conf.get("task_type", "CAUSAL_LM") not in ("CAUSAL_LM", None):
        raise LlmlabError(f"{conf_path}: task_type {conf['task_type']!r} is not supported (only CAUSAL_LM)")
    if conf.get("num_transformer_submodules", 1) != 1:
        raise LlmlabError(f"{conf_path}: num_transformer_submodules {conf['num_transformer_submodules']} is for "
                          "encoder-decoder models; a decoder adapter has 1")
    if not weights_path.exists():
        other = " (adapter_model.bin pickles are not read: re-save with safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LlmlabError(f"{folder}: no {WEIGHTS_NAME}{other}")
    return conf, st.load(weights_path), weights_path


def _need_shape(weights_path: Path, key: str, got: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(got.shape) != want:
        raise LlmlabError(f"{weights_path}: {key} has shape {tuple(got.shape)}, this model needs {want} "
                          "(an adapter for another base model, or adapter_config.json does not match the file)")


def _embeddings(tensors: dict[str, torch.Tensor], weights_path: Path) -> torch.Tensor:
    if set(tensors) != {EMBEDDINGS}:
        raise LlmlabError(f"{weights_path}: expected one tensor {EMBEDDINGS!r}, found {sorted(tensors)[:3]}")
    return tensors[EMBEDDINGS]


def _positive(conf: dict, key: str, conf_path: Path) -> int:
    v = conf.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LlmlabError(f"{conf_path}: {key} must be a positive integer, got {v!r}")
    return v


def load_prompt_adapter(model: nn.Module, folder: str | Path, model_config: ModelConfig | None = None) -> nn.Module:
    """Apply the adapter in ``folder`` to the plain base ``model`` and load its tensors; returns the model to
    use (a new wrapper for prompt / prefix tuning, ``model`` itself, changed in place, for bottleneck)."""
    cfg = model_config or model.config
    folder = Path(folder)
    conf, tensors, weights_path = _read(folder)
    conf_path = folder / CONFIG_NAME
    kind = conf["peft_type"]
    if kind != "BOTTLENECK" and conf.get("num_layers", cfg.n_layers) != cfg.n_layers:
        raise LlmlabError(f"{conf_path}: num_layers {conf['num_layers']} but this model has {cfg.n_layers} "
                          "(an adapter for another base model)")
    if kind == "PROMPT_TUNING":
        P = _positive(conf, "num_virtual_tokens", conf_path)
        emb = _embeddings(tensors, weights_path)
        _need_shape(weights_path, EMBEDDINGS, emb, (P, cfg.dim))
        out = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=P))
        with torch.no_grad():
            out.prompt.copy_(emb)
        return out
    if kind == "PREFIX_TUNING":
        P = _positive(conf, "num_virtual_tokens", conf_path)
        emb = _embeddings(tensors, weights_path)
        token_dim = cfg.n_kv_heads * cfg.head_dim
        if conf.get("token_dim", token_dim) != token_dim:
            raise LlmlabError(f"{conf_path}: token_dim {conf['token_dim']} but this model's keys are "
                              f"{cfg.n_kv_heads} heads x {cfg.head_dim} = {token_dim} (an adapter for another base)")
        _need_shape(weights_path, EMBEDDINGS, emb, (P, cfg.n_layers * 2 * token_dim))
        out = apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=P))  # the file holds the final prefix
        with torch.no_grad():
            out.prefix.copy_(emb)
        return out
    bcfg = BottleneckConfig(dim=_positive(conf, "dim", conf_path), activation=conf.get("activation", "gelu"),
                            sublayers=list(conf.get("sublayers", ["attn", "mlp"]))).validate()
    norms = _norm_state(model)
    adapter_sd = {k: v for k, v in tensors.items() if ".adapter_" in k}
    norm_sd = {k: v for k, v in tensors.items() if ".adapter_" not in k}
    for k, v in norm_sd.items():
        if k not in norms:
            raise LlmlabError(f"{weights_path}: {k!r} is neither an adapter tensor nor a norm of this "
                              f"{cfg.arch} model (an adapter for another base model?)")
        _need_shape(weights_path, k, v, tuple(norms[k].shape))
    for k, v in adapter_sd.items():  # checked before wrapping: a failed load leaves the model as it was
        path, _, leaf = k.rpartition(".adapter_")
        try:
            base = model.get_submodule(path)
        except AttributeError:
            raise LlmlabError(f"{weights_path}: {k!r} names module {path!r}, which this {cfg.arch} model does "
                              "not have (an adapter for another base model?)") from None
        n = getattr(base, "out_features", None)
        want = {"down.weight": (bcfg.dim, n), "down.bias": (bcfg.dim,), "up.weight": (n, bcfg.dim),
                "up.bias": (n,)}.get(leaf)
        if want is None or n is None:
            raise LlmlabError(f"{weights_path}: unexpected tensor {k!r} (not a bottleneck adapter weight)")
        _need_shape(weights_path, k, v, want)
    expected = {n for n, _ in model.named_modules() if n.endswith(tuple("." + SUBLAYERS[s] for s in bcfg.sublayers))}
    got = {k.rpartition(".adapter_")[0] for k in adapter_sd}
    if got != expected or len(adapter_sd) != 4 * len(expected):
        miss = sorted(expected - got) or sorted(got - expected) or ["(a module lacks one of its four tensors)"]
        raise LlmlabError(f"{weights_path}: the adapter tensors do not cover this model's {', '.join(bcfg.sublayers)} "
                          f"outputs (e.g. {miss[0]}): an adapter for another base model, or a corrupt file")
    apply_bottleneck_(model, bcfg)
    load_bottleneck_state_dict_(model, adapter_sd, where=str(weights_path))
    with torch.no_grad():
        for k, v in norm_sd.items():
            norms[k].copy_(v)
    return model
