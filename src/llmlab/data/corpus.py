"""Where pretraining text comes from: files, folders, globs, JSONL and Parquet, read as documents.

Every source yields documents (strings). A text file is one document; a JSONL line's ``text`` field
(or the field named by ``text_field``) is one; so is a Parquet row's. Binary and non-UTF-8 files are
skipped and counted, never a crash; malformed JSONL lines are skipped and counted with their line
number. With no inputs the corpus is the Python standard library of the running interpreter
(sources with their docstrings: about 30 MB of text that every machine with Python has).
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.common import LlmlabError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cpp", ".js", ".ts", ".html", ".css", ".json",
                 ".toml", ".yaml", ".yml", ".cfg", ".ini", ".sh", ".tex", ".csv", ".xml", ".java", ".go", ".rs"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0  # binary, non-UTF-8 or unreadable
    bad_lines: int = 0  # malformed JSONL lines
    skipped_examples: list[str] = field(default_factory=list)  # a few, for the report

    def skip(self, what: str) -> None:
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(what)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_sources() -> list[Path]:
    """The standard library's .py files (not site-packages), sorted for a reproducible corpus."""
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders recursively (text and record files only); globs expanded. Sorted, unique."""
    out: list[Path] = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise LlmlabError(f"{item}: the pattern matches no files")
            out.extend(files)
            continue
        path = Path(item).expanduser()
        if not path.exists():
            raise LlmlabError(f"{item}: no such file or folder")
        if path.is_dir():
            wanted = TEXT_SUFFIXES | RECORD_SUFFIXES
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
            if not found:
                raise LlmlabError(f"{item}: the folder holds no text, .jsonl or .parquet files")
            out.extend(found)
        else:
            out.append(path)
    return list(dict.fromkeys(out))


def _read_text(path: Path, stats: CorpusStats) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as e:
        stats.skipped_files += 1
        stats.skip(f"{path} (unreadable: {e.strerror})")
        return None
    if b"\x00" in raw[:8192]:
        stats.skipped_files += 1
        stats.skip(f"{path} (binary)")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_files += 1
        stats.skip(f"{path} (not UTF-8)")
        return None


def _jsonl_documents(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    text = _read_text(path, stats)
    if text is None:
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            value = record[text_field]
            if not isinstance(value, str):
                raise TypeError(f"{text_field!r} is not a string")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            stats.bad_lines += 1
            stats.skip(f"{path}:{lineno} ({type(e).__name__}: {e})")
            continue
        yield value


def _parquet_documents(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlmlabError(f"{path}: reading Parquet needs pyarrow: pip install 'llmlab[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        stats.skipped_files += 1
        stats.skip(f"{path} (not a readable Parquet file: {type(e).__name__})")
        return
    if text_field not in pf.schema_arrow.names:
        raise LlmlabError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                          "pass --text-field")
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield value
            else:
                stats.bad_lines += 1


def iter_documents(paths: list[Path], stats: CorpusStats, text_field: str = "text") -> Iterator[str]:
    for path in paths:
        stats.files += 1
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs = _jsonl_documents(path, text_field, stats)
        elif suffix == ".parquet":
            docs = _parquet_documents(path, text_field, stats)
        else:
            text = _read_text(path, stats)
            docs = iter([text] if text else [])
        for doc in docs:
            stats.documents += 1
            stats.bytes += len(doc.encode("utf-8"))
            yield doc
