"""Build our tokenizers from a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``).

Supported: byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2 style pre-tokenizers) and BERT WordPiece.
Anything else is a clear error naming the unsupported part.
"""

from __future__ import annotations

from pathlib import Path

import regex

from llmlab.common import LlmlabError, read_json
from llmlab.tokenizer.bpe import ByteBPE
from llmlab.tokenizer.pretokenize import DIGITS, GPT2_PATTERN
from llmlab.tokenizer.validate import check_bpe, is_id
from llmlab.tokenizer.wordpiece import WordPiece


def _pre_steps(spec: dict | None, where: str) -> list[str]:
    if spec is None:
        raise LlmlabError(f"{where}: a byte-level BPE tokenizer without pre_tokenizer is not supported")
    if not isinstance(spec, dict):
        raise LlmlabError(f"{where}: pre_tokenizer {spec!r} is not a JSON object")
    kind = spec.get("type")
    if kind == "Sequence":
        subs = spec.get("pretokenizers", [])
        if not isinstance(subs, list):
            raise LlmlabError(f"{where}: Sequence pre_tokenizer has no list of pretokenizers")
        return [s for sub in subs for s in _pre_steps(sub, where)]
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
        if (not isinstance(pattern, dict) or not isinstance(pattern.get("Regex"), str)
                or spec.get("behavior") != "Isolated" or spec.get("invert")):
            raise LlmlabError(f"{where}: only Split(Regex, behavior=Isolated) pre-tokenizers are supported")
        try:
            regex.compile(pattern["Regex"])
        except (regex.error, RecursionError, OverflowError) as e:
            raise LlmlabError(f"{where}: Split pre_tokenizer regex {pattern['Regex'][:60]!r} does not compile: "
                              f"{e}") from None
        return [pattern["Regex"]]
    raise LlmlabError(f"{where}: unsupported pre_tokenizer type {kind!r}")


def _special_tokens(spec: dict, where: str) -> dict[str, int]:
    added = spec.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise LlmlabError(f"{where}: added_tokens is not a list of objects")
    out = {}
    for t in added:
        if not isinstance(t.get("content"), str) or not t["content"] or not is_id(t.get("id")):
            raise LlmlabError(f"{where}: added token {t.get('content')!r} needs a non-empty content and a "
                              f"non-negative integer id, got id {t.get('id')!r}")
        out[t["content"]] = t["id"]
    return out


def _merges(raw, where: str) -> list[tuple[str, str]]:
    if not isinstance(raw, list):
        raise LlmlabError(f"{where}: model.merges is not a list")
    out = []
    for n, m in enumerate(raw):
        pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) if isinstance(m, list) else (m,)
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise LlmlabError(f"{where}: model.merges[{n}] = {m!r} is not a pair of tokens ('a b' or ['a', 'b'])")
        out.append(pair)
    return out


def load_tokenizer_json(folder: str | Path, use_tokenizers_lib: bool = True):
    """Read ``folder/tokenizer.json`` (and ``tokenizer_config.json`` for bos/eos) -> ByteBPE | WordPiece."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    spec = read_json(path, "llmlab reads the Hugging Face tokenizer file")
    tcfg = read_json(folder / "tokenizer_config.json") or {}
    if not isinstance(tcfg, dict):
        raise LlmlabError(f"{folder / 'tokenizer_config.json'}: not a JSON object")
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise LlmlabError(f"{path}: no 'model' section: not a Hugging Face tokenizer.json")
    model = spec["model"]
    mtype = model.get("type")
    specials = _special_tokens(spec, str(path))

    def token_id(key: str) -> int | None:
        tok = tcfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok is None:
            return None
        if not isinstance(tok, str):
            raise LlmlabError(f"{folder / 'tokenizer_config.json'}: {key} = {tok!r} is not a token string")
        vocab = model.get("vocab")
        found = specials.get(tok, vocab.get(tok) if isinstance(vocab, dict) else None)
        return found if is_id(found) else None

    if mtype == "BPE":
        if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise LlmlabError(f"{path}: BPE with byte_fallback / subword prefixes (SentencePiece-style) is not "
                              "supported; llmlab reads byte-level BPE")
        norm = spec.get("normalizer")
        if norm not in (None, {"type": "NFC"}) and not (isinstance(norm, dict) and norm.get("type") == "Sequence"
                                                         and not norm.get("normalizers")):
            kind = norm.get("type") if isinstance(norm, dict) else norm
            raise LlmlabError(f"{path}: unsupported normalizer {kind!r} for byte-level BPE")
        merges = _merges(model.get("merges", []), str(path))
        if not isinstance(model.get("vocab", {}), dict):
            raise LlmlabError(f"{path}: model.vocab is not a JSON object of token -> id")
        vocab = dict(model.get("vocab", {}))
        for s, i in specials.items():
            vocab.setdefault(s, i)
        check_bpe(vocab, merges, specials, str(path), vocab_key="model.vocab", merges_key="model.merges")
        return ByteBPE(vocab, merges, _pre_steps(spec.get("pre_tokenizer"), str(path)), specials,
                       ignore_merges=bool(model.get("ignore_merges")), bos_id=token_id("bos_token"),
                       eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
                       add_bos=bool(tcfg.get("add_bos_token", False)),
                       use_tokenizers_lib=use_tokenizers_lib)
    if mtype == "WordPiece":
        norm = spec.get("normalizer") or {}
        if norm and (not isinstance(norm, dict) or norm.get("type") != "BertNormalizer"):
            kind = norm.get("type") if isinstance(norm, dict) else norm
            raise LlmlabError(f"{path}: unsupported normalizer {kind!r} for WordPiece")
        vocab, unk = model.get("vocab"), model.get("unk_token", "[UNK]")
        prefix, max_chars = model.get("continuing_subword_prefix", "##"), model.get("max_input_chars_per_word", 100)
        if not isinstance(vocab, dict) or not all(isinstance(t, str) and is_id(i) for t, i in vocab.items()):
            raise LlmlabError(f"{path}: model.vocab is not a JSON object of token -> non-negative id")
        if not isinstance(unk, str) or unk not in vocab:
            raise LlmlabError(f"{path}: WordPiece unk_token {unk!r} is not in model.vocab")
        if not isinstance(prefix, str) or not prefix or not is_id(max_chars):
            raise LlmlabError(f"{path}: WordPiece continuing_subword_prefix={prefix!r} / "
                              f"max_input_chars_per_word={max_chars!r} are not a non-empty string / an integer")
        return WordPiece(dict(vocab), unk_token=unk, prefix=prefix, max_chars=max_chars,
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
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
        if tpl is not None and not isinstance(tpl, str):
            raise LlmlabError(f"{folder / 'tokenizer_config.json'}: chat_template is not a string (or a list of "
                              "{name, template} objects)")
        return tpl
    return None
