"""Small shared helpers: the user-facing error type, device/dtype choice, seeding, atomic writes.

Everything here depends on the standard library and torch only (the bottom layer in docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("llmlab")


class LlmlabError(Exception):
    """An expected error caused by the user's input (bad file, bad flag, ...).

    The CLI prints ``str(err)`` as one line and exits with code 2; no traceback.
    The message names the problem and, where there is one, the fix.
    """


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, then mps, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LlmlabError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def pick_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """'auto' -> bf16 on GPUs that support it, else float32; or one of float32/float16/bfloat16."""
    if name == "auto":
        if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise LlmlabError(f"unknown dtype {name!r}: use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def _create_new(make, path: Path) -> Path:
    """``make(candidate)`` on fresh hidden names beside ``path`` until one does not exist yet."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def temp_file_beside(path: Path) -> Path:
    """A new empty file beside ``path``, created like any other output: mode 0o666 minus the umask.
    (``tempfile.mkstemp`` makes 0o600 files, and renaming one into place would keep that mode.)"""
    return _create_new(lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)), path)


def temp_dir_beside(path: Path) -> Path:
    """A new empty folder beside ``path``, mode 0o777 minus the umask (``tempfile.mkdtemp`` makes 0o700)."""
    return _create_new(lambda p: p.mkdir(0o777), path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    On error the temporary file is removed and ``path`` is untouched: nothing half-written.
    The file gets the mode any new file gets (0o666 minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_file_beside(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (``atomic_path``) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_path``: the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_text_file(path: str | os.PathLike, name: str, expected: str) -> str:
    """The UTF-8 text of a file the user named; a missing file, a folder, an unreadable file or bytes that are not
    UTF-8 is a one-line LlmlabError starting with ``name`` (how the user gave it, e.g. ``--calib x.txt``) and
    saying what was ``expected`` (e.g. ``a UTF-8 text or JSONL file``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LlmlabError(f"{name}: no such file (give {expected})")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmlabError(f"{name}: not UTF-8 text (byte {e.start}; give {expected})") from None
    except OSError as e:
        raise LlmlabError(f"{name}: cannot read it: {e.strerror}") from None


def read_jsonl_objects(path: str, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of the JSONL file ``path``; a line that is not JSON, not an
    object or lacks one of ``fields``, an unreadable file or one with no lines is a one-line LlmlabError naming
    ``path:line``."""
    import json

    raw = read_text_file(path, path, f"a JSONL file of objects with {', '.join(fields)}")
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmlabError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LlmlabError(f"{path}:{n}: expected a JSON object with {', '.join(fields)}")
        for f in fields:
            if f not in row:
                raise LlmlabError(f"{path}:{n}: missing field {f!r} (each line needs {', '.join(fields)})")
        rows.append((n, row))
    if not rows:
        raise LlmlabError(f"{path}: no lines (give one JSON object per line)")
    return rows


def read_json(path: Path, missing: str | None = None):
    """Parse a JSON file; a missing file (when ``missing`` says why it is needed) or bad JSON is a one-line
    LlmlabError naming the file. With ``missing=None`` an absent file gives None."""
    import json

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing is None:
            return None
        raise LlmlabError(f"{Path(path).parent}: no {Path(path).name} ({missing})") from None
    except OSError as e:
        raise LlmlabError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise LlmlabError(f"{path}: not UTF-8 text (byte {e.start}): not a JSON file, or a corrupt one") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LlmlabError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LlmlabError(f"{path}: JSON nested too deeply to read (corrupt or hostile file)") from None


def jsonl_texts(raw: str, where: str) -> list[str]:
    """The string ``text`` field of each non-blank line of JSONL ``raw``; a one-line error naming ``where`` and
    the line number for a line that is not a JSON object with one."""
    import json

    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise LlmlabError(f"{where}:{i}: not a JSON object (each line needs a 'text' field)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise LlmlabError(f"{where}:{i}: no string 'text' field")
        texts.append(rec["text"])
    return texts


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
