"""``llmlab convert IN OUT``: GGUF <-> Hugging Face folder (and folder -> folder, GGUF -> GGUF).

Quantized GGUF weights are dequantized to the chosen dtype for a folder; a quantized folder (``llmlab
quantize``) written as GGUF keeps each layer's own blocks where GGML has the type. Output is written atomically (a
temporary folder renamed into place) so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llmlab.common import LlmlabError, temp_dir_beside
from llmlab.formats import hf
from llmlab.formats.gguf_model import write_model_gguf
from llmlab.formats.load import Loaded, load_model
from llmlab.formats.lowrank import write_lowrank
from llmlab.formats.quantized import gguf_tensors, write_quantized
from llmlab.formats.st_modules import projection_state, write_projection
from llmlab.tokenizer.bpe import ByteBPE

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(source: str, output: Path, *, dtype: str = "float32", qtype: str = "F16", force: bool = False) -> None:
    if output.exists() and not force:
        raise LlmlabError(f"{output} already exists: pass --force to overwrite it")
    write_loaded(load_model(source), output, dtype=dtype, qtype=qtype)


def write_loaded(loaded: Loaded, output: Path, *, dtype: str = "float32", qtype: str = "F16",
                 name: str | None = None, quant_spec: dict | None = None, lowrank_spec: dict | None = None,
                 extra_files: dict[str, str] | None = None, pooling: str = "mean") -> None:
    """Write a loaded model (plain linear layers) as a GGUF file (``output`` ends in .gguf) or an HF folder,
    atomically, replacing what is there. ``name``: the GGUF's general.name (default: the source's stem).
    ``quant_spec``: the model's quantized layers and scheme (``formats/quantized.py``; float tensors in
    ``dtype``); ``lowrank_spec``: the model's factored layers (``formats/lowrank.py``); ``extra_files``: more text
    files for the folder (a report). An encoder with a projection after pooling is a folder with
    sentence-transformers' modules (``formats/st_modules``; ``pooling`` is the Pooling module it records).
    Without ``quant_spec`` a model's quantized layers are written dequantized, except into a GGUF where their
    values are a GGML type: those layers keep their own blocks (``gguf_tensors``) and ``qtype`` types the rest."""
    cfg, tok = loaded.config, loaded.tokenizer
    sd, own = dict(loaded.model.state_dict()), {}
    if lowrank_spec is not None and output.suffix == ".gguf":
        raise LlmlabError(f"{output}: a low-rank model is written as a folder, not a GGUF file")
    if quant_spec is None and lowrank_spec is None:
        # quantized layers (a quantized folder, a packed model) as float weights + own blocks
        sd, own = gguf_tensors(loaded.model)
    sd, proj = projection_state(sd)
    if proj and (output.suffix == ".gguf" or quant_spec is not None or lowrank_spec is not None):
        raise LlmlabError(f"{output}: an encoder with a projection (a Dense module) is written as a plain float "
                          "folder: give a folder path and no quantization or low-rank spec")
    if output.suffix == ".gguf":
        write_model_gguf(output, cfg, sd, tok, loaded.chat_template, qtype=qtype,
                         name=name or Path(loaded.source).stem, own_blocks=own)
        return
    if quant_spec is None and lowrank_spec is None:
        sd = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    tok_json, tok_cfg = None, None
    if isinstance(tok, ByteBPE):
        tok_json = tok.to_hf_json()
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                   "add_bos_token": tok.add_bos, "clean_up_tokenization_spaces": False}
        for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
            if tid is not None:
                tok_cfg[key] = tok.id_to_token[tid]
        if loaded.chat_template:
            tok_cfg["chat_template"] = loaded.chat_template
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(output)
    try:
        if lowrank_spec is not None:
            write_lowrank(tmp, loaded.model, cfg, lowrank_spec, float_dtype=_DTYPES[dtype], tokenizer_json=tok_json,
                          tokenizer_config=tok_cfg)
        elif quant_spec is None:
            hf.write_folder(tmp, cfg, sd, tokenizer_json=tok_json, tokenizer_config=tok_cfg)
        else:
            write_quantized(tmp, loaded.model, cfg, quant_spec, float_dtype=_DTYPES[dtype], tokenizer_json=tok_json,
                            tokenizer_config=tok_cfg)
        if proj:
            write_projection(tmp, proj, pooling)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        src = Path(loaded.source)
        if tok_json is None and src.is_dir():  # e.g. WordPiece: copy the original tokenizer files
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
                if (src / name).exists():
                    shutil.copy2(src / name, tmp / name)
        (tmp / "llmlab.json").write_text(json.dumps({"converted_from": loaded.source}) + "\n")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
