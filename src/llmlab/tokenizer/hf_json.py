"""Build our tokenizers from a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``).

Supported: byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2 style pre-tokenizers) and BERT WordPiece.
Anything else is a clear error naming the unsupported part.
"""

from __future__ import annotations

from pathlib import Path

from llmlab.common import LlmlabError, read_json
from llmlab.tokenizer.bpe import ByteBPE
from llmlab.tokenizer.pretokenize import DIGITS, GPT2_PATTERN
from llmlab.tokenizer.wordpiece import WordPiece


def _pre_steps(spec: dict | None, where: str) -> list[str]:
    if spec is None:
        raise LlmlabError(f"{where}: a byte-level BPE tokenizer without pre_tokenizer is not supported")
    kind = spec.get("type")
    if kind == "Sequence":
        return [s for sub in spec.get("pretokenizers", []) for s in _pre_steps(sub, where)]
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            raise LlmlabError(f"{where}: ByteLevel add_prefix_space=true is not supported")
        return [GPT2_PATTERN] if spec.get("use_regex", True) else []
    if kind == "Digits":
        if not spec.get("individual_digits"):
            raise LlmlabError(f"{where}: Digits(individual_digits=false) is not supported")
        return [DIGITS]
    if kind == "Split":
        pattern = spec.get("pattern", {})
        if "Regex" not in pattern or spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise LlmlabError(f"{where}: only Split(Regex, behavior=Isolated) pre-tokenizers are supported")
        return [pattern["Regex"]]
    raise LlmlabError(f"{where}: unsupported pre_tokenizer type {kind!r}")


def _special_tokens(spec: dict) -> dict[str, int]:
    return {t["content"]: t["id"] for t in spec.get("added_tokens", [])}


def load_tokenizer_json(folder: str | Path, fast: bool = True):
    """Read ``folder/tokenizer.json`` (and ``tokenizer_config.json`` for bos/eos) -> ByteBPE | WordPiece."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    spec = read_json(path, "llmlab reads the fast-tokenizer file")
    tcfg = read_json(folder / "tokenizer_config.json") or {}
    if not isinstance(tcfg, dict):
        raise LlmlabError(f"{folder / 'tokenizer_config.json'}: not a JSON object")
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise LlmlabError(f"{path}: no 'model' section: not a Hugging Face tokenizer.json")
    model = spec["model"]
    mtype = model.get("type")
    specials = _special_tokens(spec)

    def token_id(key: str) -> int | None:
        tok = tcfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok is None:
            return None
        return specials.get(tok, model.get("vocab", {}).get(tok))

    if mtype == "BPE":
        if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise LlmlabError(f"{path}: BPE with byte_fallback / subword prefixes (SentencePiece-style) is not "
                              "supported; llmlab reads byte-level BPE")
        norm = spec.get("normalizer")
        if norm not in (None, {"type": "NFC"}) and not (isinstance(norm, dict) and norm.get("type") == "Sequence"
                                                         and not norm.get("normalizers")):
            raise LlmlabError(f"{path}: unsupported normalizer {norm.get('type')!r} for byte-level BPE")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        vocab = dict(model.get("vocab", {}))
        for s, i in specials.items():
            vocab.setdefault(s, i)
        return ByteBPE(vocab, merges, _pre_steps(spec.get("pre_tokenizer"), str(path)), specials,
                       ignore_merges=bool(model.get("ignore_merges")), bos_id=token_id("bos_token"),
                       eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
                       add_bos=bool(tcfg.get("add_bos_token", False)), fast=fast)
    if mtype == "WordPiece":
        norm = spec.get("normalizer") or {}
        if norm and norm.get("type") != "BertNormalizer":
            raise LlmlabError(f"{path}: unsupported normalizer {norm.get('type')!r} for WordPiece")
        return WordPiece(dict(model["vocab"]), unk_token=model.get("unk_token", "[UNK]"),
                         prefix=model.get("continuing_subword_prefix", "##"),
                         max_chars=model.get("max_input_chars_per_word", 100),
                         lowercase=norm.get("lowercase", True), strip_accents=norm.get("strip_accents"),
                         clean_text=norm.get("clean_text", True), cjk=norm.get("handle_chinese_chars", True),
                         special_tokens=specials)
    raise LlmlabError(f"{path}: unsupported tokenizer model type {mtype!r} (llmlab reads BPE and WordPiece)")


def chat_template_from_config(folder: str | Path) -> str | None:
    """The chat template from tokenizer_config.json or chat_template.jinja, if any."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    cfg = read_json(folder / "tokenizer_config.json")
    if isinstance(cfg, dict):
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: take "default"
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        return tpl
    return None
