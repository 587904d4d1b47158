"""Hugging Face folders of BERT task models: ``BertForSequenceClassification``, ``BertForTokenClassification`` and
``BertForQuestionAnswering`` <-> ``models.bert_heads.BertWithHead``.

Such a folder is a BERT folder whose tensors carry the ``bert.`` prefix, plus the head (``classifier.weight`` /
``.bias``, or ``qa_outputs.*`` for QA), and whose ``config.json`` names the architecture and the labels
(``id2label`` / ``label2id``; QA has none). A plain encoder folder (all-minilm-l6-v2) loads with a new head, its
weights drawn from the seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llmlab.common import LlmlabError, temp_dir_beside
from llmlab.formats import hf, safetensors
from llmlab.formats.load import Loaded, embedded_path, load_model
from llmlab.models.bert_heads import HEAD_NAMES, HF_ARCHITECTURES, TASKS, BertWithHead

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


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
    return loaded, model, saved_labels


def save_head(folder: Path, model: BertWithHead, loaded: Loaded, labels: list[str], extra: dict | None = None) -> Path:
    """Write ``model`` as a transformers task folder (atomically: a temporary folder renamed into place), with the
    encoder's tokenizer files."""
    cfg = loaded.config
    sd = {f"bert.{k}": v.detach().float().contiguous()
          for k, v in hf.state_to_hf(cfg, model.bert.state_dict()).items()
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
