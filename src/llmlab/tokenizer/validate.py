"""Checks on an untrusted byte-level BPE vocabulary before a tokenizer is built from it.

Used by both loaders (``tokenizer.json`` and GGUF metadata). A merge naming a token that is not in the
vocabulary makes Hugging Face ``tokenizers`` raise a bare ``Exception`` (or panic); a non-integer id
breaks decoding. Both are refused here, as one-line ``LlmlabError``s naming the file, the entry and the
problem. Missing byte tokens are allowed: real vocabularies omit rare ones (SmolLM2 lacks 0x04, 0x06, ...).
"""

from __future__ import annotations

from llmlab.common import LlmlabError

MAX_ID = 2**31 - 1


def is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_ID


def check_bpe(vocab: dict, merges: list, specials: dict, where: str, *, vocab_key: str, merges_key: str) -> None:
    """``vocab`` token -> id, ``merges`` [(a, b)], ``specials`` token -> id; raise LlmlabError on any flaw."""
    fix = "the file is corrupt or was written by a broken converter: re-download or re-export it"
    for tok, i in vocab.items():
        if not isinstance(tok, str) or not is_id(i):
            raise LlmlabError(f"{where}: {vocab_key} entry {tok!r}: {i!r} is not a token and a non-negative id; {fix}")
    for tok, i in specials.items():
        if not isinstance(tok, str) or not tok or not is_id(i):
            raise LlmlabError(f"{where}: special token {tok!r} has id {i!r}, not a non-negative integer; {fix}")
    for n, pair in enumerate(merges):
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise LlmlabError(f"{where}: {merges_key}[{n}] = {pair!r} is not a pair of tokens; {fix}")
        a, b = pair
        for part in (a, b, a + b):
            if part not in vocab:
                raise LlmlabError(f"{where}: {merges_key}[{n}] = {a + ' ' + b!r} names {part!r}, which is not in "
                                  f"{vocab_key}; {fix}")


def check_id(value, n_tokens: int, key: str, where: str) -> int | None:
    """An optional token id from metadata/config: None, or an int inside the vocabulary."""
    if value is None:
        return None
    if not is_id(value) or value >= n_tokens:
        raise LlmlabError(f"{where}: {key} = {value!r} is not a token id of this vocabulary (0..{n_tokens - 1}); "
                          "fix or remove it")
    return value
