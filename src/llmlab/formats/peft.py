"""PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``, written and read.

The layout Hugging Face ``peft`` saves and loads (``PeftModel.from_pretrained``): a JSON config
(``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ...)
and one safetensors file whose keys are ``base_model.model.<Hugging Face module path>.lora_A.weight``
(r, in) and ``...lora_B.weight`` (out, r). Module paths are translated between llmlab's names and the
Hugging Face model's through ``llmlab.formats.hf`` (for Llama: a ``model.`` prefix). The LoRA layers
themselves are ``llmlab.nn.lora``; this module only moves their tensors.

``target_modules`` in a written config is the llmlab value when it selects exactly the same layers of the
Hugging Face model (peft's rules: suffix names, ``all-linear``, a full-match regex), else the explicit list
of Hugging Face module paths, which peft matches one by one. Reading trusts the tensor file: every module
with LoRA tensors in it is wrapped. Options llmlab does not implement (DoRA, bias training,
``modules_to_save``, per-layer ranks or alphas) are refused with a message rather than silently dropped.

**Base fingerprint.** An adapter only means something on the base it was trained on, and a different model
of the same shapes loads it without complaint. ``base_fingerprint`` is a short string naming the base:

    v1:<arch>-v<vocab>-d<dim>-l<layers>-h<heads>-kv<kv heads>-f<ffn>:tok-<8 hex>:emb-<max>,<min>.<max>,<min>...

the config's shape fields, a hash of the tokenizer vocabulary (``tok-none`` without a tokenizer), and the
argmax and argmin columns of 8 embedding rows spread over the vocabulary. The embedding is stored float or Q8_0 in
every form llmlab loads (a GGUF's Q4_1 blocks are linear layers; NF4 and packed bases leave the embedding
alone), so it is the one weight that looks the same in every storage precision. The check is
tolerant rather than exact: quantization may swap two near-equal entries, so a stored column matches when
the live row's value there is within ``EMB_TOLERANCE`` x the row's absmax of the row's maximum (minimum) (Q4_0, the
coarsest 4-bit GGML type, moves each weight by at most 1/16 of its block's absmax). A different model
passes one column with probability about 1e-2 (a random entry of a 576-wide Gaussian row within 20% of
its maximum), all 16 with about 1e-32. What it cannot tell apart is a model from its own fine-tune
(SmolLM2-135M and -Instruct share the embedding to within quantization noise, and the tokenizer): there
the base's name in adapter_config.json remains the guard. The fingerprint goes in the safetensors ``__metadata__``
(``llmlab.base_fingerprint``), which peft ignores; unknown adapter_config.json keys would make peft warn.
Adapters without one (made by peft) load with the shape checks only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, read_json, write_text_atomic
from llmlab.formats import hf
from llmlab.formats import safetensors as st
from llmlab.models.config import ModelConfig
from llmlab.nn.lora import (
    LINEAR_TYPES,
    LoRAConfig,
    apply_lora_,
    load_lora_state_dict_,
    lora_modules,
    lora_state_dict,
    matches_target,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "llmlab.base_fingerprint"  # in the adapter safetensors' __metadata__
EMB_ROWS = 8
EMB_TOLERANCE = 0.2


# ---- base fingerprint (module docstring) -----------------------------------------------------------------


def _embedding(model: nn.Module) -> torch.Tensor | None:
    """The token embedding matrix (vocab, dim), wherever a wrapper put the base model."""
    for name, m in model.named_modules():
        if name.rpartition(".")[2] == "embed_tokens" and isinstance(getattr(m, "weight", None), torch.Tensor):
            return m.weight
    return None


def _emb_rows(vocab: int) -> list[int]:
    return sorted({(i + 1) * vocab // (EMB_ROWS + 1) for i in range(EMB_ROWS)})


def _shape_part(cfg: ModelConfig) -> str:
    return (f"{cfg.arch}-v{cfg.vocab_size}-d{cfg.dim}-l{cfg.n_layers}-h{cfg.n_heads}-kv{cfg.n_kv_heads}"
            f"-f{cfg.ffn_dim}")


def _tok_part(tokenizer, vocab: int) -> str:
    itos = getattr(tokenizer, "id_to_token", None)
    if not isinstance(itos, dict) or not itos:
        return "tok-none"
    h = hashlib.sha256()
    for i in sorted(k for k in itos if k < vocab):
        h.update(f"{i}\t{itos[i]}\n".encode("utf-8", "surrogatepass"))
    return "tok-" + h.hexdigest()[:8]


def base_fingerprint(model: nn.Module, model_config: ModelConfig | None = None, tokenizer=None) -> str:
    """The fingerprint of a base model (the same for its GGUF, HF-folder, NF4 and packed forms)."""
    cfg = model_config or model.config
    parts = ["v1", _shape_part(cfg), _tok_part(tokenizer, cfg.vocab_size)]
    emb = _embedding(model)
    if emb is not None:
        with torch.no_grad():
            rows = emb.detach()[_emb_rows(emb.shape[0])].float()  # (8, dim)
            hi, lo = rows.argmax(dim=1).tolist(), rows.argmin(dim=1).tolist()
            parts.append("emb-" + ".".join(f"{a},{b}" for a, b in zip(hi, lo)))
    return ":".join(parts)


def fingerprint_mismatch(stored: str, model: nn.Module, model_config: ModelConfig | None = None,
                         tokenizer=None) -> str | None:
    """None when ``model`` (with ``tokenizer``) may be the base that ``stored`` names, else what differs.
    Parts either side lacks (no tokenizer, an unknown fingerprint version) are not compared."""
    cfg = model_config or model.config
    parts = stored.split(":")
    if not parts or parts[0] != "v1":
        return None
    fields = {p.partition("-")[0]: p for p in parts[1:]}
    if parts[1:2] and parts[1] != _shape_part(cfg):
        return "model shapes differ"
    tok = fields.get("tok")
    live_tok = _tok_part(tokenizer, cfg.vocab_size)
    if tok and "tok-none" not in (tok, live_tok) and tok != live_tok:
        return "tokenizer vocabularies differ"
    emb, live = fields.get("emb"), _embedding(model)
    if emb and live is not None:
        try:
            cols = torch.tensor([[int(c) for c in pair.split(",")] for pair in emb.removeprefix("emb-").split(".")])
        except (ValueError, RuntimeError):
            return None
        ids = _emb_rows(live.shape[0])
        if cols.shape != (len(ids), 2) or int(cols.max()) >= live.shape[1] or int(cols.min()) < 0:
            return "embedding weights differ"
        with torch.no_grad():
            rows = live.detach()[ids].float()  # (8, dim)
            at = rows.gather(1, cols)  # (8, 2): the live values at the stored argmax / argmin columns
            slack = EMB_TOLERANCE * rows.abs().amax(dim=1)  # (8,)
            ok = (at[:, 0] >= rows.amax(dim=1) - slack) & (at[:, 1] <= rows.amin(dim=1) + slack)
        if not bool(ok.all()):
            return "embedding weights differ"
    return None


def read_fingerprint(weights_path: str | Path) -> str | None:
    """The base fingerprint stored in an adapter's safetensors file, or None (e.g. made by peft)."""
    header, _, _ = st.read_header(weights_path)
    meta = header.get("__metadata__")
    value = meta.get(FINGERPRINT_KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def check_base_fingerprint(folder: str | Path, model: nn.Module, model_config: ModelConfig | None = None,
                           tokenizer=None, base_name: str = "the base model") -> None:
    """LlmlabError (one line, naming both fingerprints) when the adapter in ``folder`` was made for
    another base; nothing when it matches or carries no fingerprint."""
    weights = Path(folder) / WEIGHTS_NAME
    stored = read_fingerprint(weights) if weights.exists() else None  # a missing file: the loader says so
    if stored is None:
        return
    why = fingerprint_mismatch(stored, model, model_config, tokenizer)
    if why is not None:
        live = base_fingerprint(model, model_config, tokenizer)
        raise LlmlabError(f"{folder}: this adapter was made for another base model ({why}): adapter base "
                          f"{stored}, {base_name} is {live}; load it onto the base it was trained on")


def hf_module_path(cfg: ModelConfig, path: str) -> str | None:
    """Our module path -> the Hugging Face model's, or None where it has no single HF module
    (GPT-2 fuses q, k and v into one ``c_attn``; a tied ``lm_head`` is not stored)."""
    try:
        out = hf.state_to_hf(cfg, {f"{path}.weight": torch.empty(1, 1)})
    except KeyError:
        return None
    return next(iter(out)).removesuffix(".weight") if len(out) == 1 else None


def _linear_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by path, LoRA-wrapped ones under their own path (not ``.base_layer``)."""
    out: dict[str, nn.Module] = {}
    wrapped = lora_modules(model)
    for name, m in model.named_modules():
        if name in wrapped:
            out[name] = m.base_layer
        elif isinstance(m, LINEAR_TYPES) and name.removesuffix(".base_layer") not in wrapped:
            out[name] = m
    return out


def adapter_config(lora: LoRAConfig, target_modules: list[str] | str, base_model: str | None,
                   fan_in_fan_out: bool = False) -> dict:
    """The adapter_config.json content (``fan_in_fan_out``: True for GPT-2, whose HF layers are Conv1D)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora,
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def save_adapter(folder: str | Path, model: nn.Module, lora: LoRAConfig, model_config: ModelConfig | None = None,
                 base_model: str | None = None, base_fingerprint: str | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder (each file atomically); returns the folder.

    ``base_model``: adapter_config.json's ``base_model_name_or_path`` (what ``llmlab.load`` of the folder
    loads the adapter onto). ``base_fingerprint``: ``base_fingerprint(model, cfg, tokenizer)`` of the base,
    checked when the adapter is loaded (module docstring)."""
    cfg = model_config or model.config
    mods = lora_modules(model)
    if not mods:
        raise LlmlabError("the model has no LoRA layers to save (apply_lora_ first)")
    for m in mods.values():
        if (m.r, m.alpha, m.use_rslora) != (lora.r, lora.alpha, lora.use_rslora):
            raise LlmlabError("the LoRA layers were made with another r / alpha / use_rslora than the config given")
    names = {path: hf_module_path(cfg, path) for path in _linear_paths(model)}
    chosen = {}
    for path in mods:
        if names[path] is None:
            raise LlmlabError(f"LoRA on {path} has no PEFT equivalent for a {cfg.arch} model "
                              "(GPT-2 stores q, k and v as one c_attn): target other modules")
        chosen[path] = names[path]
    linears = _linear_paths(model)
    selected = {names[p] for p, m in linears.items()
                if names[p] is not None and matches_target(names[p], lora.target_modules, m)}
    targets = lora.target_modules if selected == set(chosen.values()) else sorted(chosen.values())
    tensors = {}
    for key, t in lora_state_dict(model).items():
        path, _, leaf = key.rpartition(".lora_")  # "<path>", "A.weight"
        tensors[f"{PREFIX}{chosen[path]}.lora_{leaf}"] = t.contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if base_fingerprint:
        meta[FINGERPRINT_KEY] = base_fingerprint
    st.save(tensors, folder / WEIGHTS_NAME, metadata=meta)
    conf = adapter_config(lora, targets, base_model, fan_in_fan_out=cfg.arch == "gpt2")
    write_text_atomic(folder / CONFIG_NAME, json.dumps(conf, indent=2) + "\n")
    return folder


def _check_supported(conf: dict, path: Path) -> None:
    if conf.get("peft_type") != "LORA":
        raise LlmlabError(f"{path}: peft_type {conf.get('peft_type')!r} is not supported (only LORA adapters)")
    unsupported = {
        "use_dora": bool(conf.get("use_dora")), "bias": conf.get("bias", "none") != "none",
        "modules_to_save": bool(conf.get("modules_to_save")), "rank_pattern": bool(conf.get("rank_pattern")),
        "alpha_pattern": bool(conf.get("alpha_pattern")), "layers_to_transform": conf.get("layers_to_transform")
        is not None,
    }  # fan_in_fan_out is fine: it says how peft merges into a GPT-2 Conv1D; A and B are stored alike
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise LlmlabError(f"{path}: LoRA option(s) {', '.join(bad)} are not supported by llmlab; "
                          "save the adapter without them")
    if not isinstance(conf.get("r"), int) or conf["r"] <= 0:
        raise LlmlabError(f"{path}: r must be a positive integer, got {conf.get('r')!r}")


def load_adapter_(model: nn.Module, folder: str | Path, model_config: ModelConfig | None = None) -> LoRAConfig:
    """Wrap the modules named in a PEFT adapter folder with LoRA and load its weights into them.

    The model must not have LoRA layers yet. Returns the adapter's LoRAConfig, with ``target_modules`` as
    the explicit list of our module paths (so that it re-applies to a fresh model exactly)."""
    cfg = model_config or model.config
    folder = Path(folder)
    conf_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    conf = read_json(conf_path, "expected a PEFT adapter folder")
    if not isinstance(conf, dict):
        raise LlmlabError(f"{conf_path}: not a JSON object")
    _check_supported(conf, conf_path)
    if not weights_path.exists():
        other = " (adapter_model.bin pickles are not read: re-save with safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LlmlabError(f"{folder}: no {WEIGHTS_NAME}{other}")
    tensors = st.load(weights_path)
    if lora_modules(model):
        raise LlmlabError("the model already has LoRA layers: load the adapter into a model without them")
    linears = _linear_paths(model)
    from_hf = {name: path for path in linears if (name := hf_module_path(cfg, path)) is not None}
    r = conf["r"]
    sd: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        body, _, leaf = key.removeprefix(PREFIX).rpartition(".lora_")  # "<hf path>", "A.weight"
        if not key.startswith(PREFIX) or leaf not in ("A.weight", "B.weight"):
            raise LlmlabError(f"{weights_path}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        if body not in from_hf:
            raise LlmlabError(f"{weights_path}: {key!r} names module {body!r}, which this {cfg.arch} model "
                              "does not have (an adapter for another base model?)")
        m = linears[from_hf[body]]
        want = (r, m.in_features) if leaf == "A.weight" else (m.out_features, r)
        if tuple(t.shape) != want:  # checked before any module is wrapped: a failed load changes nothing
            raise LlmlabError(f"{weights_path}: {key} has shape {tuple(t.shape)}, this model needs {want} "
                              "(an adapter for another base model, or r does not match adapter_config.json)")
        sd[f"{from_hf[body]}.lora_{leaf}"] = t
    if not sd:
        raise LlmlabError(f"{weights_path}: no LoRA tensors")
    targets = sorted({k.rpartition(".lora_")[0] for k in sd})
    for t in targets:
        if f"{t}.lora_A.weight" not in sd or f"{t}.lora_B.weight" not in sd:
            raise LlmlabError(f"{weights_path}: module {t} has only one of lora_A / lora_B (corrupt adapter)")
    lora = LoRAConfig(r=r, alpha=float(conf.get("lora_alpha", 8)), dropout=float(conf.get("lora_dropout", 0)),
                      target_modules=targets, use_rslora=bool(conf.get("use_rslora", False)))
    apply_lora_(model, lora)
    load_lora_state_dict_(model, sd, where=str(weights_path))
    return lora
