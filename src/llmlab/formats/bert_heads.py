"""Hugging Face folders of BERT task models: ``BertForSequenceClassification``, ``BertForTokenClassification`` and
``BertForQuestionAnswering`` <-> ``models.bert_heads.BertWithHead``.

Such a folder is a BERT folder whose tensors carry the ``bert.`` prefix, plus the head (``classifier.weight`` /
``.bias``, or ``qa_outputs.*`` for QA), and whose ``config.json`` names the architecture and the labels
(``id2label`` / ``label2id``; QA has none). A plain encoder folder (all-minilm-l6-v2) loads with a new head, its
weights drawn from the seed.

Methods that cannot merge into the weights -- Houlsby adapters, prompt tuning, prefix tuning -- add two llmlab-only
files to the folder: ``llmlab_peft.json`` (``{"method": "adapter", "dim", "activation"}`` or ``{"method":
"prompt" | "prefix", "num_virtual_tokens"}``) and ``llmlab_peft.safetensors`` (the adapters under llmlab's module
paths, ``bert.layers.N.self_attn.o_proj.adapter_down.weight`` ..., or the virtual tokens, ``virtual.embedding``).
``load_head`` applies them; transformers reads the rest of the folder (the base encoder with the adapter run's
trained layer norms, and the head) and ignores them, so there it is the model *without* its adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llmlab.common import LlmlabError, read_json, temp_dir_beside
from llmlab.formats import hf, safetensors
from llmlab.formats.load import Loaded, embedded_path, load_model
from llmlab.models.bert_heads import HEAD_NAMES, HF_ARCHITECTURES, TASKS, BertWithHead
from llmlab.models.bert_prompt import VIRTUAL_METHODS, BertVirtualTokens
from llmlab.nn.bottleneck import (
    BottleneckConfig,
    apply_bottleneck_,
    base_state_dict,
    bottleneck_modules,
    bottleneck_state_dict,
    load_bottleneck_state_dict_,
)
from llmlab.nn.lora import copy_adapter_tensors_

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
PEFT_CONFIG, PEFT_WEIGHTS = "llmlab_peft.json", "llmlab_peft.safetensors"


def head_folder_task(folder: Path) -> tuple[str, list[str]] | None:
    """(task, labels) when ``folder`` holds a BERT task model, else None (a plain encoder, or no folder)."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    raw = json.loads(cfg.read_text())
    arch = (raw.get("architectures") or [None])[0]
    task = next((t for t, name in HF_ARCHITECTURES.items() if name == arch), None)
    if task is None:
        return None
    if task == "qa":
        return task, []
    id2label = raw.get("id2label") or {}
    n = int(raw.get("num_labels", len(id2label) or 2))
    return task, [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def load_head(loaded: Loaded | str, task: str,
              labels: list[str] | None = None) -> tuple[Loaded, BertWithHead, list[str]]:
    """A loaded encoder (or its source) with a ``task`` head: the folder's own head (its labels must be ``labels``
    when given), or a new one for ``labels``. Returns (the encoder's Loaded, the model, its labels)."""
    if task not in TASKS:
        raise LlmlabError(f"--task {task!r}: use one of {', '.join(TASKS)}")
    loaded = load_model(loaded) if isinstance(loaded, str) else loaded
    source = loaded.source
    if loaded.config.arch != "bert" or loaded.tokenizer is None:
        raise LlmlabError(f"{source}: not a BERT encoder with a tokenizer (e.g. all-minilm-l6-v2)")
    folder = Path(loaded.source)
    found = head_folder_task(folder) if folder.is_dir() else None
    if found is None:
        labels = list(labels or [])
        if task != "qa" and len(labels) < 2:
            raise LlmlabError(f"{source}: a new {task} head needs at least two labels, got {len(labels)}")
        return loaded, BertWithHead(loaded.model, task, len(labels)), labels
    saved_task, saved_labels = found
    if saved_task != task:
        raise LlmlabError(f"{source} is a {HF_ARCHITECTURES[saved_task]} folder, not {HF_ARCHITECTURES[task]}: use "
                          f"--task {saved_task}, or start from the plain encoder")
    if labels is not None and task != "qa" and list(labels) != saved_labels:
        extra = sorted(set(labels) - set(saved_labels))
        raise LlmlabError(f"{source}: the data has labels {extra or labels} outside the model's label set "
                          f"{saved_labels}: use data with the model's labels, or start from the plain encoder")
    model = BertWithHead(loaded.model, task, len(saved_labels))
    head = HEAD_NAMES[task]
    weights = hf.read_weights(folder)
    try:
        with torch.no_grad():
            model.head.weight.copy_(weights[f"{head}.weight"])
            model.head.bias.copy_(weights[f"{head}.bias"])
    except KeyError as e:
        raise LlmlabError(f"{folder}: the {HF_ARCHITECTURES[task]} weights have no {e.args[0]!r}") from None
    except RuntimeError:
        raise LlmlabError(f"{folder}: {head} has shape {tuple(weights[f'{head}.weight'].shape)}, the config "
                          f"says {len(saved_labels) if task != 'qa' else 2} outputs") from None
    _load_peft(folder, model)
    return loaded, model, saved_labels


def peft_state(model: BertWithHead) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(llmlab_peft.json's content, its tensors) for a model with adapters or virtual tokens, else None."""
    adapters = bottleneck_modules(model)
    if adapters:
        first = next(iter(adapters.values()))
        return ({"method": "adapter", "dim": first.dim, "activation": first.activation},
                {k: v.detach().float().contiguous() for k, v in bottleneck_state_dict(model).items()})
    if model.virtual is not None:
        return ({"method": model.virtual.method, "num_virtual_tokens": model.virtual.num_virtual_tokens},
                {"virtual.embedding": model.virtual.embedding.detach().float().contiguous()})
    return None


def _load_peft(folder: Path, model: BertWithHead) -> None:
    """Apply a folder's llmlab_peft.* (adapters or virtual tokens) to ``model``; nothing when there are none."""
    raw = read_json(folder / PEFT_CONFIG)
    if raw is None:
        return
    where = folder / PEFT_WEIGHTS
    if not where.is_file():
        raise LlmlabError(f"{folder}: {PEFT_CONFIG} without {PEFT_WEIGHTS}: copy the whole run folder")
    sd = safetensors.load(where)
    method = raw.get("method") if isinstance(raw, dict) else None
    try:
        if method == "adapter":
            apply_bottleneck_(model.bert, BottleneckConfig(dim=int(raw["dim"]), activation=raw["activation"]))
            load_bottleneck_state_dict_(model, sd, str(where))
        elif method in VIRTUAL_METHODS:
            model.virtual = BertVirtualTokens(model.bert.config, method, int(raw["num_virtual_tokens"]))
            copy_adapter_tensors_(dict(model.virtual.named_parameters(prefix="virtual")), sd, str(where),
                                  f"{method} tuning", "num_virtual_tokens")
        else:
            raise LlmlabError(f"{folder / PEFT_CONFIG}: method {method!r} is unknown: use adapter, "
                              f"{', '.join(VIRTUAL_METHODS)}")
    except (KeyError, TypeError, ValueError) as e:
        raise LlmlabError(f"{folder / PEFT_CONFIG}: malformed ({type(e).__name__}: {e})") from None


def save_head(folder: Path, model: BertWithHead, loaded: Loaded, labels: list[str], extra: dict | None = None) -> Path:
    """Write ``model`` as a transformers task folder (atomically: a temporary folder renamed into place), with the
    encoder's tokenizer files, and llmlab_peft.* when it has adapters or virtual tokens."""
    cfg = loaded.config
    sd = {f"bert.{k}": v.detach().float().contiguous()
          for k, v in hf.state_to_hf(cfg, base_state_dict(model.bert)).items()
          if model.task == "classify" or not k.startswith("pooler.")}  # transformers' ner / qa have no pooler
    head = HEAD_NAMES[model.task]
    sd[f"{head}.weight"] = model.head.weight.detach().float().contiguous()
    sd[f"{head}.bias"] = model.head.bias.detach().float().contiguous()
    config = {**hf.config_to_hf(cfg), "architectures": [HF_ARCHITECTURES[model.task]], "torch_dtype": "float32",
              **(extra or {})}
    if model.task != "qa":
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(folder)
    try:
        safetensors.save(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        peft = peft_state(model)
        if peft is not None:
            safetensors.save(peft[1], tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
            (tmp / PEFT_CONFIG).write_text(json.dumps(peft[0], indent=2) + "\n")
        src = Path(loaded.source) if Path(loaded.source).is_dir() else embedded_path(loaded.source)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
