"""Training checkpoints that are complete or absent, never half-written.

A checkpoint is a folder ``step-00000100`` holding the model in Hugging Face layout (``config.json`` +
``model.safetensors`` + the tokenizer, loadable by ``llmlab.load``), any extra tensor files (e.g. an MLM head),
``training_state.pt`` (optimizer, scheduler, RNG and data position for exact resume; read back with
``weights_only=True``) and ``trainer_state.json``. It is written as

    1. every file into ``.tmp-step-...`` beside the final name, each fsync'ed;
    2. ``manifest.json`` last: size and SHA-256 of every file;
    3. one ``rename`` to ``step-...`` and an fsync of the parent folder.

A crash (or a full disk) at any point leaves either the previous checkpoints untouched plus a
``.tmp-*`` folder that is ignored and cleaned up, or the complete new one. ``latest`` walks the
checkpoints newest first and returns the first whose manifest verifies: a truncated or bit-flipped
file is detected by its size or hash and that checkpoint is skipped for the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from llmlab.common import LlmlabError, log
from llmlab.formats import hf, safetensors
from llmlab.models.config import ModelConfig

PREFIX = "step-"
MANIFEST = "manifest.json"
STATE = "training_state.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(root: Path, step: int, cfg: ModelConfig, model_state: dict[str, torch.Tensor], *,
         extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None, training_state: dict | None = None,
         trainer_state: dict | None = None, tokenizer: tuple[str, dict] | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep`` complete ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        hf.write_folder(tmp, cfg, model_state, tokenizer_json=tokenizer[0] if tokenizer else None,
                        tokenizer_config=tokenizer[1] if tokenizer else None)
        for name, tensors in (extra_tensors or {}).items():
            safetensors.save(tensors, tmp / name)
        if training_state is not None:
            with open(tmp / STATE, "wb") as f:
                torch.save(training_state, f)
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump({"step": step, **(trainer_state or {})}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"step": step, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LlmlabError(f"could not write checkpoint {final} ({e.strerror or e}); nothing was written and the "
                          "previous checkpoints are intact: free disk space and resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest first (by step number)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def verify(folder: Path) -> str | None:
    """None if ``folder`` is a complete checkpoint, else the reason it is not."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not all(isinstance(info, dict) for info in files.values()):
            raise TypeError("a manifest entry is not an object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "no readable manifest.json (incomplete write)"
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {info.get('bytes')} (truncated)"
        if _sha256(path) != info.get("sha256"):
            return f"{name} does not match its SHA-256 (corrupted)"
    return None


def latest(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a message for each newer one that was skipped."""
    skipped = []
    for folder in list_checkpoints(root):
        reason = verify(folder)
        if reason is None:
            return folder, skipped
        skipped.append(f"skipping checkpoint {folder}: {reason}")
        log.warning(skipped[-1])
    return None, skipped


def load_model_state(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = hf.read_config(folder)
    return cfg, hf.state_from_hf(cfg, hf.read_weights(folder))


def load_training_state(folder: Path) -> dict:
    path = folder / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file to the user
        raise LlmlabError(f"{path}: cannot load training state ({type(e).__name__})") from None
