"""sentence-transformers' module folders for an encoder with a projection after pooling.

A sentence-transformers model folder (Reimers & Gurevych 2019, "Sentence-BERT", arXiv:1908.10084) lists its
pipeline in ``modules.json``: here ``Transformer`` (the BERT folder itself, path ""), ``Pooling`` (``1_Pooling``),
``Dense`` (``2_Dense``: ``config.json`` with in/out features, bias and activation, ``model.safetensors`` with
``linear.weight`` (out, in) and ``linear.bias`` (out,)) and ``Normalize``. The Dense module is
``models.bert.BertModel.projection``: y = W pool(h) + b, identity activation, so llmlab's ``embed`` and
sentence-transformers' ``encode`` give the same vectors (tests/test_pca_rotation.py).

``write_projection`` adds those files to a folder ``formats/convert.write_loaded`` is writing; ``read_projection``
reads the Dense module back when ``modules.json`` lists one (``formats/load``). Only an identity activation and a
square projection (dim -> dim) are read: anything else fails with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, read_json
from llmlab.formats import safetensors

DENSE_DIR = "2_Dense"
IDENTITY = "torch.nn.modules.linear.Identity"
_ST = "sentence_transformers.models."


def projection_state(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model state dict -> (the encoder's tensors, the projection's ``weight`` / ``bias``)."""
    proj = {k.removeprefix("projection."): v for k, v in sd.items() if k.startswith("projection.")}
    return {k: v for k, v in sd.items() if not k.startswith("projection.")}, proj


def write_projection(folder: Path, proj: dict[str, torch.Tensor], pooling: str = "mean") -> None:
    """modules.json, 1_Pooling, 2_Dense (identity activation) and 3_Normalize into ``folder`` (being written)."""
    out_f, in_f = proj["weight"].shape
    modules = [("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", DENSE_DIR), ("Normalize", "3_Normalize")]
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": _ST + kind} for i, (kind, path) in enumerate(modules)],
        indent=2) + "\n")
    for sub in ("1_Pooling", DENSE_DIR, "3_Normalize"):
        (folder / sub).mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": in_f, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2) + "\n")
    (folder / DENSE_DIR / "config.json").write_text(json.dumps({
        "in_features": in_f, "out_features": out_f, "bias": "bias" in proj, "activation_function": IDENTITY},
        indent=2) + "\n")
    safetensors.save({f"linear.{k}": v.detach().float().contiguous() for k, v in proj.items()},
                     folder / DENSE_DIR / "model.safetensors", metadata={"format": "pt"})


def read_projection(folder: Path, dim: int) -> nn.Linear | None:
    """The folder's Dense module as an ``nn.Linear(dim, dim)``, or None when ``modules.json`` lists none."""
    modules = read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return None
    dense = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Dense")]
    if not dense:
        return None
    sub = folder / dense[0].get("path", DENSE_DIR)
    cfg = read_json(sub / "config.json", missing=f"{sub}: no config.json for the Dense module")
    where = f"{sub}/config.json"
    if not isinstance(cfg, dict):
        raise LlmlabError(f"{where}: not a JSON object: write the Dense module's config as sentence-transformers does")
    if cfg.get("activation_function", IDENTITY) != IDENTITY:
        raise LlmlabError(f"{where}: activation {cfg.get('activation_function')!r}: llmlab reads a Dense module "
                          f"with {IDENTITY} only (a linear projection)")
    if (cfg.get("in_features"), cfg.get("out_features")) != (dim, dim):
        raise LlmlabError(f"{where}: a {cfg.get('in_features')} -> {cfg.get('out_features')} projection; llmlab "
                          f"reads a square one of the encoder's size ({dim} -> {dim})")
    if not (sub / "model.safetensors").exists():
        raise LlmlabError(f"{sub}: no model.safetensors (save the model with safe_serialization=True)")
    sd = safetensors.load(sub / "model.safetensors")
    bias = bool(cfg.get("bias", True))
    linear = nn.Linear(dim, dim, bias=bias)
    want = {"linear.weight"} | ({"linear.bias"} if bias else set())
    if set(sd) != want:
        raise LlmlabError(f"{sub}/model.safetensors: tensors {sorted(sd)}, expected {sorted(want)}")
    linear.load_state_dict({k.removeprefix("linear."): v.float() for k, v in sd.items()})
    return linear
