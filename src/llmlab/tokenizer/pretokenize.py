"""Pre-tokenization: split text into pieces that BPE never merges across.

GPT-2 (Radford et al. 2019) splits with one regex (contractions, letters, digits, punctuation,
whitespace). Later models change the pattern: Llama 3 groups digits by at most three; SmolLM2
first isolates every digit (``tokenizers``' ``Digits(individual_digits=True)``, llama.cpp's
``smollm`` pre-tokenizer) and then applies the GPT-2 regex to each piece.

A pre-tokenizer here is a list of steps; each step maps one piece to a list of pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
DIGITS = "digits"  # the step that isolates each digit

# llama.cpp's ``tokenizer.ggml.pre`` names -> steps.
GGUF_PRE: dict[str, list[str]] = {
    "default": [GPT2_PATTERN],
    "gpt2": [GPT2_PATTERN],
    "smollm": [DIGITS, GPT2_PATTERN],
    "llama-bpe": [LLAMA3_PATTERN],
    "llama3": [LLAMA3_PATTERN],
    "qwen2": [QWEN2_PATTERN],
}

_DIGIT_RE = regex.compile(r"\p{N}|[^\p{N}]+")


def _regex_step(pattern: str) -> Callable[[str], list[str]]:
    compiled = regex.compile(pattern)
    return compiled.findall


def make_pretokenizer(steps: list[str]) -> Callable[[str], list[str]]:
    """Compose steps (regex patterns or ``DIGITS``) into one text -> pieces function."""
    fns = [_DIGIT_RE.findall if s == DIGITS else _regex_step(s) for s in steps]

    def pretokenize(text: str) -> list[str]:
        pieces = [text]
        for fn in fns:
            pieces = [p for piece in pieces for p in fn(piece)]
        return pieces

    return pretokenize
