"""Calibration and held-out text, token windows, and per-layer input statistics.

Post-training quantization looks at the activations a layer sees (GPTQ's Hessian, SmoothQuant's per-channel
absmax, ZeroQuant's layer-wise distillation). The calibration text is the user's file, or ``builtin``: the
docstrings of a fixed list of Python standard-library modules, English prose and code that every machine with
Python has. The held-out text for perplexity uses a disjoint list of modules (both depend on the Python
version, which the results table states).

Shapes: windows (n_samples, seq_len) int64.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, jsonl_texts, read_text_file

CALIB_MODULES = ("argparse", "collections", "functools", "itertools", "pathlib", "subprocess", "threading",
                 "asyncio", "logging", "unittest", "typing", "dataclasses", "datetime", "decimal", "fractions",
                 "statistics", "random", "re", "string", "shutil", "tempfile", "zipfile", "tarfile", "csv",
                 "configparser", "email", "http.client", "urllib.request", "socket", "selectors", "sqlite3",
                 "pickle", "copy", "enum", "contextlib", "abc", "heapq", "bisect", "operator", "inspect")
HELDOUT_MODULES = ("json", "textwrap", "difflib", "calendar", "pprint", "base64", "hashlib", "gzip")


def module_text(names: tuple[str, ...]) -> str:
    """The docstrings of the modules ``names`` and of their public classes and functions, in a fixed order."""
    parts = []
    for name in names:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", "").split(".")[0] == name.split(".")[0]:
                parts.append(f"{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def calibration_text(source: str = "builtin") -> str:
    """``builtin`` or a path to a UTF-8 text file (a ``.jsonl`` file: each line's ``text`` field)."""
    if source == "builtin":
        return module_text(CALIB_MODULES)
    raw = read_text_file(source, f"--calib {source}", "a UTF-8 text or JSONL file, or 'builtin'")
    if Path(source).suffix == ".jsonl":
        raw = "\n\n".join(jsonl_texts(raw, f"--calib {source}"))
    return raw


def heldout_text() -> str:
    """The fixed held-out text the results table's perplexity is measured on."""
    return module_text(HELDOUT_MODULES)


def token_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0,
                  where: str = "--calib") -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at random offsets of the tokenized text (GPTQ's sampling of
    C4 / WikiText2), (n_samples, seq_len). Too little text is an error naming how much there is."""
    if n_samples < 1 or seq_len < 2:
        raise LlmlabError(f"calibration needs at least 1 sample of 2 tokens, got {n_samples} x {seq_len}")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise LlmlabError(f"{where}: the calibration text has {ids.numel()} tokens, fewer than one window of "
                          f"{seq_len}: give more text or a smaller --calib-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # (n_samples, seq_len)


@torch.no_grad()
def input_absmax(model: nn.Module, windows: torch.Tensor, names: list[str], batch: int = 8) -> dict[str, torch.Tensor]:
    """Per input channel max |x| over every calibration token, for the linear layers ``names``: (K,) each."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()  # (K,)
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return record

    run_with_hooks(model, windows, {n: hook(n) for n in names}, batch)
    return stats


@torch.no_grad()
def run_with_hooks(model: nn.Module, windows: torch.Tensor, hooks: dict, batch: int = 8) -> None:
    """Run the windows through ``model`` in micro-batches with forward hooks {module name: hook} attached."""
    handles = [model.get_submodule(n).register_forward_hook(h) for n, h in hooks.items()]
    try:
        for s in range(0, windows.shape[0], batch):
            model(windows[s:s + batch])
    finally:
        for h in handles:
            h.remove()
