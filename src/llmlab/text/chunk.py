"""Chunking: a document -> overlapping pieces of at most ``max_tokens`` tokens, each an exact slice of the text.

A retriever embeds and scores pieces, not whole files: an encoder reads a bounded number of tokens (all-MiniLM-L6-v2
was trained on 128), and a short passage ranks better than a long file that mentions the query once. Two steps:

1. **Sections** (cheap structure): a Markdown file splits before each ATX heading (``# Title`` ... ``###### x``,
   outside ``` fences), a Python file before each top-level ``def`` / ``class`` / decorator, so a chunk does not
   straddle two topics where the file says where topics start. Other text is one section.
2. **Token windows**: each section is cut at word boundaries into windows of at most ``max_tokens`` tokens (as
   ``count_tokens`` counts them, e.g. the encoder's WordPiece), the next window starting ``overlap`` tokens before
   the previous one ended, so a sentence cut at a boundary appears whole in one of the two (the overlap of
   LangChain's ``TokenTextSplitter``). A single word longer than ``max_tokens`` is a window of its own (the encoder
   truncates it).

``collect_files`` reads the documents themselves: files named directly, or a folder's files with a text suffix;
binary or non-UTF-8 content is an error, an empty file named directly too (in a folder it is skipped and counted).

A chunk is ``(start, end)`` character offsets into the original text plus that slice, so a hit can be shown in
place. Shapes: text (characters) -> chunks (n,), each ``text[start:end]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmlab.common import LlmlabError

_WORD = re.compile(r"\S+")
_MD_HEADING = re.compile(r"^#{1,6}[ \t]")
_MD_FENCE = re.compile(r"^(```|~~~)")
_PY_TOP = re.compile(r"^(?:(?:async[ \t]+)?def|class)[ \t]|^@\w")


@dataclass(frozen=True)
class Chunk:
    start: int  # character offsets into the document: text == document[start:end]
    end: int
    text: str
    n_tokens: int


def word_count(text: str) -> int:
    """The default token count: white-space separated words."""
    return len(text.split())


def section_starts(text: str, kind: str) -> list[int]:
    """Character offsets where sections begin (always including 0): before Markdown headings (``kind="markdown"``)
    or top-level Python definitions (``kind="python"``); ``kind="text"`` is one section."""
    if kind not in ("markdown", "python", "text"):
        raise ValueError(f"kind {kind!r}: use markdown, python or text")
    starts, pos, fenced, after_decorator = [0], 0, False, False
    for line in text.splitlines(keepends=True):
        if kind == "markdown":
            if _MD_FENCE.match(line):
                fenced = not fenced
            elif not fenced and _MD_HEADING.match(line) and pos > 0:
                starts.append(pos)
        elif kind == "python":
            if _PY_TOP.match(line) and pos > 0 and not after_decorator:
                starts.append(pos)  # a decorator starts the section; the def under it does not start another
            after_decorator = line.startswith("@")
        pos += len(line)
    return starts


def kind_of(path: str) -> str:
    """The section rule for a file name: markdown for .md / .markdown, python for .py / .pyi, else text."""
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return {"md": "markdown", "markdown": "markdown", "py": "python", "pyi": "python"}.get(suffix, "text")


def chunk_text(text: str, max_tokens: int = 128, overlap: int = 32, *, kind: str = "text",
               count_tokens: Callable[[str], int] = word_count) -> list[Chunk]:
    """``text`` -> its chunks, in order; sections first (``kind``), then windows of at most ``max_tokens`` tokens
    overlapping by about ``overlap`` tokens. Blank text gives no chunks."""
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError(f"max_tokens {max_tokens}, overlap {overlap}: need max_tokens >= 1 and "
                         "0 <= overlap < max_tokens")
    cache: dict[str, int] = {}

    def count(word: str) -> int:
        n = cache.get(word)
        if n is None:
            n = cache[word] = max(1, count_tokens(word))
        return n

    bounds = [*section_starts(text, kind), len(text)]
    chunks = []
    for lo, hi in zip(bounds, bounds[1:]):
        words = [(m.start(), m.end(), count(m.group())) for m in _WORD.finditer(text, lo, hi)]
        i = 0
        while i < len(words):
            j, total = i, 0
            while j < len(words) and (j == i or total + words[j][2] <= max_tokens):
                total += words[j][2]
                j += 1
            start, end = words[i][0], words[j - 1][1]
            chunks.append(Chunk(start, end, text[start:end], total))
            if j == len(words):
                break
            back, k = 0, j  # step back over whole words until about ``overlap`` tokens repeat, never to i
            while k - 1 > i and back + words[k - 1][2] <= overlap:
                k -= 1
                back += words[k][2]
            i = k
    return chunks


TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".py", ".pyi", ".json", ".jsonl", ".toml", ".yaml",
                           ".yml", ".cfg", ".ini", ".html", ".css", ".js", ".ts", ".c", ".h", ".cpp", ".rs", ".go",
                           ".java", ".sh", ".tex", ".csv"})


def read_document(path: Path) -> str:
    """A file's UTF-8 text; binary content (a NUL byte, or bytes that are not UTF-8) is a one-line error."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LlmlabError(f"{path}: cannot read it: {e.strerror}") from None
    if b"\0" in raw[:8192]:
        raise LlmlabError(f"{path}: a binary file, not text: leave it out")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmlabError(f"{path}: not UTF-8 text (byte {e.start}; a binary file?): leave it out") from None


def collect_files(sources: list[str], meta: dict[str, str]) -> tuple[list[tuple[str, str, dict]], int]:
    """Files and folders -> ((absolute path, text, metadata) per document, empty files skipped). A folder gives its
    files with a known text suffix (hidden ones left out); a file named directly must be non-empty text."""
    docs, skipped = [], 0
    for source in sources:
        root = Path(source).expanduser()
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(root).parts))
        elif root.is_file():
            files = [root]
        else:
            raise LlmlabError(f"{source}: no such file or folder")
        for file in files:
            text = read_document(file)
            if not text.strip():
                if file == root:
                    raise LlmlabError(f"{file}: empty document (no text to index): leave it out")
                skipped += 1
                continue
            path = str(file.resolve())
            docs.append((path, text, {"path": path, "suffix": file.suffix.lower(), **meta}))
    return docs, skipped
