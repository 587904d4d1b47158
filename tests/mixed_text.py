"""A deterministic >= 200 KB mixed-text corpus for tokenizer parity: English prose, Python code,
whitespace runs, long digit strings, emoji, CJK, accents and special tokens inside text."""

from __future__ import annotations

import inspect
import json
import random
import textwrap

PROSE = (
    "The quick brown fox jumps over the lazy dog. It's a well-known pangram; we've used it since 1885, "
    "haven't we? Dr. Smith's lab (est. 2019) reported a 3.14159% gain -- not bad! "
    "\"Quoted text,\" she said, 'and single quotes'. Tabs\tand\r\nCRLF line endings, NBSP\u00a0here. "
)
ACCENTS = "Café naïve façade résumé jalapeño Ångström Straße œuvre Zoë São Paulo Kraków Ελληνικά Русский текст "
CJK = "日本語のテキストと中文文本，还有한국어 문장입니다。東京タワー 北京大学 "
EMOJI = "👍🏽 🎉🚀 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖💬 ✨ 😀😃😄 "
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "[CLS]", "[SEP]", "[MASK]"]


def python_sources(limit: int = 60_000) -> str:
    import argparse
    import collections
    import json as json_mod
    import textwrap as tw

    out = []
    for mod in (json_mod, tw, argparse, collections):
        out.append(inspect.getsource(mod))
    return "".join(out)[:limit]


def build(size: int = 210_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = [python_sources()]
    total = len(parts[0])
    while total < size:
        kind = rng.randrange(8)
        if kind == 0:
            piece = PROSE * rng.randint(1, 3)
        elif kind == 1:
            piece = ACCENTS
        elif kind == 2:
            piece = CJK
        elif kind == 3:
            piece = EMOJI
        elif kind == 4:
            piece = " " * rng.randint(1, 40) + "\n" * rng.randint(0, 4) + "\t" * rng.randint(0, 3) + "x"
        elif kind == 5:
            piece = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 60))) + " "
        elif kind == 6:
            piece = f"before{rng.choice(SPECIALS)}after {rng.choice(SPECIALS)} "
        else:
            piece = textwrap.indent(json.dumps({"k": rng.random(), "v": [1, 2, 3]}, indent=2), "    ") + "\n"
        parts.append(piece)
        total += len(piece)
    return "".join(parts)


def lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)
