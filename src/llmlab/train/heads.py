"""Fine-tuning a BERT encoder with a task head: sequence classification, token classification (NER) and extractive
question answering (Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", arXiv:1810.04805, section 4), fully, with LoRA (Hu et al. 2021, arXiv:2106.09685) on the
encoder's linear layers, or with QLoRA (Dettmers et al. 2023, arXiv:2305.14314: the same LoRA over a frozen NF4
base, ``nn/qlora.py``), with Houlsby bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751: after each
layer's attention output and feed-forward output projection, before the residual add and LayerNorm -- BERT's
``attention.output.dense`` and ``output.dense``, llmlab's ``self_attn.o_proj`` and ``mlp.down_proj`` --
``nn/bottleneck.py``; the layer norms train too), or with prompt or prefix tuning (Lester et al. 2021,
arXiv:2104.08691; Li & Liang 2021, arXiv:2101.00190; placed as peft does for BERT, ``models/bert_prompt.py``),
while the new head trains in full (peft's ``modules_to_save``).

- classify: cross-entropy of the pooled [CLS] logits (B, C) against each text's label.
- ner: cross-entropy of each word's *first* word piece (B, T, C); the other pieces, [CLS], [SEP] and padding are
  ignored. A word is predicted from its first piece; entity F1 is scored on words (``text/span_metrics.py``).
- qa: each example is cut into windows ``[CLS] question [SEP] context piece [SEP]`` of ``max_tokens``, the context
  pieces overlapping by ``stride`` tokens (transformers' ``stride``). A window's target is the answer's first and
  last token, or [CLS] (position 0) when the answer is not wholly inside it; loss = mean of the start and end
  cross-entropies over the window's positions. At evaluation the best span over all windows (start <= end, at most
  ``max_answer_tokens``, inside the context; score = start + end logit) is cut from the context through the
  tokens' character offsets (``WordPiece.encode_offsets``) and scored by SQuAD EM / F1.

``HeadTask`` hands the loss to the one training loop (``train/loop.py``): each step takes rows of the training
units (texts, sentences or windows) in an order fixed by (seed, epoch); the validation loss is the test split's.
The result is a transformers task folder (``formats/bert_heads.py``; LoRA merged into the weights; QLoRA's merged
into the dequantized NF4 base, W = dequant(NF4(W0)) + (alpha / r) B A, as peft's merge of a 4-bit model). Adapters,
prompts and prefixes do not merge: the folder then also holds their tensors (``llmlab_peft.*``), which
``load_head`` applies and transformers does not read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError, human_count, seed_everything, write_text_atomic
from llmlab.dataclass_io import to_dict
from llmlab.formats.bert_heads import load_head, save_head
from llmlab.formats.load import DEFAULT_EMBED
from llmlab.infer.embed import tokenize_batch
from llmlab.models.bert_heads import TASKS, BertWithHead
from llmlab.models.bert_prompt import VIRTUAL_METHODS, BertVirtualTokens
from llmlab.nn.bottleneck import (
    BottleneckConfig,
    apply_bottleneck_,
    bottleneck_modules,
    mark_only_bottleneck_trainable_,
)
from llmlab.text.span_metrics import entity_scores, squad_scores
from llmlab.text.span_tasks import QASet, TaggedSentences, ner_task, qa_task, read_qa, read_tagged
from llmlab.text.tasks import TextTask, docstring_task
from llmlab.train.loop import TrainConfig, TrainResult, train

METHODS = ("full", "lora", "qlora", "adapter", "prompt", "prefix")
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3, "adapter": 1e-3, "prompt": 1e-2, "prefix": 1e-2}
IGNORE = -100
HEAD_WEIGHTS = "head.safetensors"  # the head (full) or every trainable tensor (lora) inside a checkpoint


@dataclass
class HeadConfig:
    task: str = field(default="classify", metadata={
        "help": "classify: which stdlib module a docstring is from; ner: BIO entity tags of generated sentences; "
                "qa: answer spans in the Python help topics", "choices": TASKS})
    model: str = field(default=DEFAULT_EMBED, metadata={
        "help": "the encoder: an embedded name, a Hugging Face BERT folder, or a Bert*For* task folder (its head "
                "and labels are kept)"})
    method: str = field(default="lora", metadata={"help": "full: every weight; lora: low-rank updates on the "
                                                          "encoder, the head in full; qlora: the same LoRA on the "
                                                          "encoder's linear layers stored frozen in 4-bit NF4; "
                                                          "adapter: Houlsby bottleneck adapters after each "
                                                          "attention and feed-forward output, + layer norms; "
                                                          "prompt: learned input embeddings in front; prefix: "
                                                          "learned keys / values in front in every attention "
                                                          "(the last three with the head)",
                                                  "choices": METHODS})
    out: str = field(default="runs/head", metadata={"help": "run folder; the fine-tuned model goes to OUT/model"})
    data: str = field(default="", metadata={
        "help": "a JSONL file instead of the built-in task: classify {text, label}; ner {tokens, tags}; qa "
                "{question, context, answer[, answer_start]}"})
    labels: str = field(default="", metadata={
        "help": "comma-separated label set the --data labels must come from (ner: entity types, e.g. PER,LOC); "
                "empty = the labels the data uses"})
    max_tokens: int = field(default=128, metadata={"help": "tokens per row (qa: per window, question included)"})
    stride: int = field(default=32, metadata={"help": "qa: context tokens shared by neighbouring windows"})
    max_answer_tokens: int = field(default=30, metadata={"help": "qa: longest answer span predicted, in tokens"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_targets: str = field(default="all-linear", metadata={
        "help": "encoder modules LoRA wraps: all-linear, comma-separated names (q_proj,v_proj) or a regex"})
    adapter_dim: int = field(default=64, metadata={"help": "adapter: the bottleneck width"})
    num_virtual_tokens: int = field(default=20, metadata={
        "help": "prompt / prefix: learned virtual tokens in front (they take positions: --max-tokens + this must "
                "fit the encoder's position table)"})
    eval_batch: int = field(default=32, metadata={"help": "rows per forward pass when scoring"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> HeadConfig:
        if self.task not in TASKS:
            raise LlmlabError(f"--task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise LlmlabError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.max_tokens < 8:
            raise LlmlabError(f"--max-tokens must be >= 8, got {self.max_tokens}")
        if self.task == "qa" and not 0 <= self.stride < self.max_tokens // 2:
            raise LlmlabError(f"--stride {self.stride}: give 0..{self.max_tokens // 2 - 1} (under half a window)")
        if self.max_answer_tokens < 1 or self.lora_r < 1 or self.eval_batch < 1 or self.adapter_dim < 1:
            raise LlmlabError("--max-answer-tokens, --lora-r, --adapter-dim and --eval-batch must be >= 1")
        if self.num_virtual_tokens < 1:
            raise LlmlabError(f"--num-virtual-tokens {self.num_virtual_tokens}: give 1 or more (the prompt / prefix "
                              "length; default 20)")
        return self


@dataclass
class HeadTrainConfig(TrainConfig):
    """The training loop's flags with task fine-tuning defaults (a few minutes on 2 CPU cores)."""

    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "rows per step (texts, sentences or QA windows)"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate; 0 = the method's default "
                                                     f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})"})
    warmup: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    eval_every: int = field(default=0, metadata={"help": "validation loss every N steps; 0 = only at the end"})
    eval_batches: int = field(default=2, metadata={"help": "validation batches per evaluation"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only"})
    keep_checkpoints: int = field(default=1, metadata={"help": "checkpoints kept"})
    log_every: int = field(default=5, metadata={"help": "progress-bar refresh / metrics line every N steps"})

    def validate(self) -> HeadTrainConfig:
        if self.lr == 0.0:
            self.lr = 1e-3  # replaced by the method's default in run_head; here only to pass the check
        return super().validate()


# ---- rows: what one training unit is, per task ------------------------------------------------------------------


@dataclass
class Row:
    ids: list[int]
    types: list[int]
    target: object  # classify: label index; ner: per-token labels; qa: (start, end) token positions
    example: int = 0  # qa: the example a window belongs to
    offsets: list[tuple[int, int]] | None = None  # qa: context offsets of each token, (-1, -1) outside the context


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def ner_rows(tokenizer, sentences: list[tuple[list[str], list[str]]], labels: list[str], max_tokens: int) -> list[Row]:
    """Each word's pieces; the label on the first piece, IGNORE on the rest; cut to ``max_tokens``."""
    unk = tokenizer.vocab[tokenizer.unk_token]
    rows = []
    for words, tags in sentences:
        ids, target = [tokenizer.cls_id], [IGNORE]
        for word, tag in zip(words, tags):
            pieces = tokenizer.encode(word) or [unk]
            ids += pieces
            target += [labels.index(tag)] + [IGNORE] * (len(pieces) - 1)
        ids, target = ids[:max_tokens - 1] + [tokenizer.sep_id], target[:max_tokens - 1] + [IGNORE]
        rows.append(Row(ids, [0] * len(ids), target))
    return rows


def qa_windows(tokenizer, examples, max_tokens: int, stride: int) -> list[Row]:
    """Sliding windows over each example's context (module docstring), with their targets and offsets."""
    rows, contexts = [], {}
    for n, ex in enumerate(examples):
        q = tokenizer.encode(ex.question)[:max_tokens // 2]
        if ex.context not in contexts:  # the questions of one paragraph share its context
            contexts[ex.context] = tokenizer.encode_offsets(ex.context)
        c, offs = contexts[ex.context]
        a0, a1 = ex.answer_start, ex.answer_start + len(ex.answer)
        first = next((i for i, (s, e) in enumerate(offs) if e > a0), len(offs))  # the answer's first token
        last = max((i for i, (s, e) in enumerate(offs) if s < a1), default=-1)  # and its last
        span = max_tokens - len(q) - 3  # context tokens per window
        start = 0
        while True:
            piece = range(start, min(start + span, len(c)))
            head = [tokenizer.cls_id, *q, tokenizer.sep_id]
            ids = head + [c[i] for i in piece] + [tokenizer.sep_id]
            types = [0] * len(head) + [1] * (len(piece) + 1)
            inside = piece.start <= first <= last < piece.stop
            target = (first - start + len(head), last - start + len(head)) if inside else (0, 0)
            woffs = [(-1, -1)] * len(head) + [offs[i] for i in piece] + [(-1, -1)]
            rows.append(Row(ids, types, target, n, woffs))
            if piece.stop >= len(c):
                break
            start += span - stride
    return rows


def classify_rows(tokenizer, texts: list[str], labels: list[int], max_tokens: int) -> list[Row]:
    rows = []
    for text, label in zip(texts, labels):
        ids, _ = tokenize_batch(tokenizer, [text], max_tokens)  # (1, T): [CLS] ... [SEP], cut as embeddings are
        rows.append(Row(ids[0].tolist(), [0] * ids.shape[1], label))
    return rows


def batch_tensors(rows: list[Row], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = _pad([r.ids for r in rows], pad_id).to(device)  # (B, T)
    mask = _pad([[1] * len(r.ids) for r in rows], 0).to(device)  # (B, T)
    types = _pad([r.types for r in rows], 0).to(device)  # (B, T)
    return ids, mask, types


def head_loss(model: nn.Module, task: str, rows: list[Row], pad_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, mask, types = batch_tensors(rows, pad_id, device)
    logits = model(ids, mask, types).float()
    if task == "classify":  # (B, C)
        return F.cross_entropy(logits, torch.tensor([r.target for r in rows], device=device))
    if task == "ner":  # (B, T, C)
        target = _pad([r.target for r in rows], IGNORE).to(device)  # (B, T)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    logits = logits.masked_fill(~mask.bool()[..., None], -1e4)  # (B, T, 2): no answer in the padding
    target = torch.tensor([r.target for r in rows], device=device)  # (B, 2)
    return (F.cross_entropy(logits[..., 0], target[:, 0]) + F.cross_entropy(logits[..., 1], target[:, 1])) / 2


# ---- the data of one run ------------------------------------------------------------------------------------------


@dataclass
class HeadData:
    task: str
    labels: list[str]
    train_rows: list[Row]
    test_rows: list[Row]
    test: object  # what the scorer needs: classify (labels), ner (sentences), qa (examples)
    counts: dict


def _label_list(text: str) -> list[str] | None:
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names or None


def build_data(cfg: HeadConfig, tokenizer) -> HeadData:
    """Read the task's data (built-in or ``cfg.data``), check its labels, and cut it into rows."""
    given = _label_list(cfg.labels)
    if cfg.task == "classify":
        if cfg.data:
            from llmlab.text.classify import labelled_task

            task = labelled_task(cfg.data)
            if given is not None:
                outside = sorted(set(task.labels) - set(given))
                if outside:
                    raise LlmlabError(f"--data {cfg.data}: {len(outside)} label(s) outside the label set --labels "
                                      f"{','.join(given)}: {', '.join(outside[:5])}; fix the data or --labels")
                remap = [given.index(label) for label in task.labels]
                task = TextTask(given, task.train_texts, [remap[y] for y in task.train_labels], task.test_texts,
                                [remap[y] for y in task.test_labels])
        else:
            task = docstring_task()
        return HeadData("classify", task.labels,
                        classify_rows(tokenizer, task.train_texts, task.train_labels, cfg.max_tokens),
                        classify_rows(tokenizer, task.test_texts, task.test_labels, cfg.max_tokens),
                        task.test_labels, {"train": len(task.train_texts), "test": len(task.test_texts)})
    if cfg.task == "ner":
        from llmlab.text.span_tasks import bio_labels

        tagged: TaggedSentences = (read_tagged(cfg.data, bio_labels(given) if given else None) if cfg.data
                                   else ner_task())
        return HeadData("ner", tagged.labels, ner_rows(tokenizer, tagged.train, tagged.labels, cfg.max_tokens),
                        ner_rows(tokenizer, tagged.test, tagged.labels, cfg.max_tokens), tagged.test,
                        {"train": len(tagged.train), "test": len(tagged.test)})
    qa: QASet = read_qa(cfg.data) if cfg.data else qa_task()
    train_rows = qa_windows(tokenizer, qa.train, cfg.max_tokens, cfg.stride)
    test_rows = qa_windows(tokenizer, qa.test, cfg.max_tokens, cfg.stride)
    return HeadData("qa", [], train_rows, test_rows, qa.test,
                    {"train": len(qa.train), "test": len(qa.test), "train_windows": len(train_rows),
                     "test_windows": len(test_rows)})


# ---- scoring -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(model: nn.Module, rows: list[Row], pad_id: int, batch: int) -> list[torch.Tensor]:
    """Each row's logits (float32, CPU): classify (C,); ner (T, C); qa (T, 2)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        logits = model(*batch_tensors(part, pad_id, device)).float().cpu()
        out += [logits[j] if logits.ndim == 2 else logits[j, :len(r.ids)] for j, r in enumerate(part)]
    return out


def best_span(logits: torch.Tensor, row: Row, max_answer_tokens: int, top: int = 20) -> tuple[float, int, int]:
    """(score, start char, end char) of the best answer in one window; score -inf when none is allowed."""
    start, end = logits[:, 0], logits[:, 1]  # (T,), (T,)
    best = (float("-inf"), 0, 0)
    for s in start.topk(min(top, len(start))).indices.tolist():
        for e in end.topk(min(top, len(end))).indices.tolist():
            if row.offsets[s][0] < 0 or row.offsets[e][0] < 0 or not 0 <= e - s < max_answer_tokens:
                continue
            score = float(start[s] + end[e])
            if score > best[0]:
                best = (score, row.offsets[s][0], row.offsets[e][1])
    return best


def evaluate(model: nn.Module, data: HeadData, pad_id: int, cfg: HeadConfig) -> dict:
    """Held-out scores: classify accuracy; ner entity precision / recall / F1; qa exact match / F1 (percent)."""
    logits = predict_logits(model, data.test_rows, pad_id, cfg.eval_batch)
    if data.task == "classify":
        pred = [int(x.argmax()) for x in logits]
        return {"accuracy": 100.0 * sum(p == y for p, y in zip(pred, data.test)) / max(1, len(pred))}
    if data.task == "ner":
        true, pred = [], []
        for (_, tags), row, lg in zip(data.test, data.test_rows, logits):
            first = [i for i, t in enumerate(row.target) if t != IGNORE]  # each kept word's first piece
            guess = [data.labels[int(lg[i].argmax())] for i in first]
            true.append(list(tags))
            pred.append(guess + ["O"] * (len(tags) - len(guess)))  # words cut off by max_tokens: O
        return {k: 100.0 * v for k, v in entity_scores(true, pred).items()}
    best: dict[int, tuple[float, int, int]] = {}
    for row, lg in zip(data.test_rows, logits):
        cand = best_span(lg, row, cfg.max_answer_tokens)
        if cand[0] > best.get(row.example, (float("-inf"),))[0]:
            best[row.example] = cand
    answers = [ex.context[best[n][1]:best[n][2]] if n in best else "" for n, ex in enumerate(data.test)]
    return squad_scores(answers, [[ex.answer] for ex in data.test])


# ---- the Task ------------------------------------------------------------------------------------------------------


class HeadTask:
    """Rows of the task -> ``head_loss``. A full fine-tune checkpoints the encoder as the model folder and the head
    beside it; LoRA checkpoints only the trainable tensors."""

    name = "head"

    def __init__(self, model: BertWithHead, model_config, data: HeadData, pad_id: int, method: str, seed: int):
        self.model, self.model_config, self.data = model, model_config, data
        self.pad_id, self.method, self.seed = pad_id, method, seed
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for split, rows in (("training", data.train_rows), ("test", data.test_rows)):
            if not rows:
                raise LlmlabError(f"the {data.task} data has no {split} examples: give more examples (a fifth "
                                  "is held out by a hash of each text)")

    def rows(self, split: str, step: int, first_row: int, rows: int, total_rows: int) -> list[Row]:
        pool = self.data.train_rows if split == "train" else self.data.test_rows
        out = []
        for r in range(step * total_rows + first_row, step * total_rows + first_row + rows):
            epoch, i = divmod(r, len(pool))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + (split != "train") * 10**9)
            out.append(pool[int(torch.randperm(len(pool), generator=g)[i])])
        return out

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        batch = self.rows(split, step, first_row, rows, total_rows)
        return head_loss(model, self.data.task, batch, self.pad_id), sum(len(r.ids) for r in batch)

    def split_state(self, sd):
        if self.method == "full":
            core = {k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")}
            return core, {HEAD_WEIGHTS: {k: v for k, v in sd.items() if not k.startswith("bert.")}}
        return {}, {HEAD_WEIGHTS: {k: v for k, v in sd.items() if k in self.trainable}}

    def join_state(self, core, extras):
        if self.method == "full":
            return {**{f"bert.{k}": v for k, v in core.items()}, **extras[HEAD_WEIGHTS]}
        return {**self.model.state_dict(), **extras[HEAD_WEIGHTS]}

    def extra_files(self):
        return [HEAD_WEIGHTS]

    def aux_stats(self) -> dict:
        return {}

    def tokenizer_files(self):
        return None  # WordPiece: the final folder copies the original tokenizer files


def apply_method_(model: BertWithHead, cfg: HeadConfig) -> int:
    """full: everything trains; lora: LoRA on the encoder's linear layers, the head in full; qlora: those linear
    layers first quantized to NF4 (double quantization, block 64), then the same LoRA; adapter: bottleneck
    adapters + every LayerNorm + the head; prompt / prefix: the virtual tokens + the head. Returns the count of
    trainable parameters."""
    if model.virtual is not None or bottleneck_modules(model):  # a folder with llmlab_peft.*: nothing stacks on it
        raise LlmlabError(f"--model {cfg.model} already carries trained adapter / prompt / prefix tensors: start "
                          "from the plain encoder (or its BertFor* folder without llmlab_peft.*)")
    if cfg.method in ("lora", "qlora"):
        from llmlab.nn.lora import LoRAConfig, apply_lora_, mark_only_lora_trainable_

        if cfg.method == "qlora":
            from llmlab.nn.qlora import prepare_qlora_

            prepare_qlora_(model.bert)  # the encoder only: the task head stays float and trains

        names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        targets: list[str] | str = names if names and all(n.replace(".", "_").isidentifier() for n in names) \
            else cfg.lora_targets
        apply_lora_(model.bert, LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=targets))
        mark_only_lora_trainable_(model)
        model.head.requires_grad_(True)
    elif cfg.method == "adapter":
        apply_bottleneck_(model.bert, BottleneckConfig(dim=cfg.adapter_dim))
        mark_only_bottleneck_trainable_(model)  # the adapters and every LayerNorm, as Houlsby et al.
        model.head.requires_grad_(True)
    elif cfg.method in VIRTUAL_METHODS:
        device = next(model.parameters()).device
        model.virtual = BertVirtualTokens(model.bert.config, cfg.method, cfg.num_virtual_tokens).to(device)
        model.requires_grad_(False)
        model.virtual.requires_grad_(True)
        model.head.requires_grad_(True)
    else:
        model.requires_grad_(True)
    if model.task != "classify":  # only classification reads the pooler: a parameter with no gradient would get no
        model.bert.pooler.requires_grad_(False)  # optimizer state, and a checkpoint without it could not resume
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_head(cfg: HeadConfig, tcfg: HeadTrainConfig) -> dict:
    """Load the encoder and head, score the held-out split, fine-tune, score again, save OUT/model. Returns the
    summary (also OUT/summary.json)."""
    from llmlab.nn.lora import remove_lora_

    cfg.validate()
    lr_given = tcfg.lr
    tcfg.validate()
    tcfg.lr = lr_given or DEFAULT_LR[cfg.method]
    seed_everything(tcfg.seed)
    from llmlab.formats.load import load_model

    loaded = load_model(cfg.model)
    tokenizer = loaded.tokenizer
    if tokenizer is None or not hasattr(tokenizer, "encode_offsets"):
        raise LlmlabError(f"{cfg.model}: not a BERT encoder with a WordPiece tokenizer (e.g. {DEFAULT_EMBED})")
    data = build_data(cfg, tokenizer)  # bad data fails before the head is built
    loaded, model, labels = load_head(loaded, cfg.task, data.labels if cfg.task != "qa" else None)
    if cfg.max_tokens > loaded.config.max_seq_len:
        raise LlmlabError(f"--max-tokens {cfg.max_tokens} is more than the model's {loaded.config.max_seq_len}")
    if cfg.method in VIRTUAL_METHODS and cfg.max_tokens + cfg.num_virtual_tokens > loaded.config.max_seq_len:
        raise LlmlabError(f"--max-tokens {cfg.max_tokens} + --num-virtual-tokens {cfg.num_virtual_tokens} positions "
                          f"is more than the model's {loaded.config.max_seq_len}: lower one of them")
    pad_id = tokenizer.pad_id
    t0 = time.perf_counter()
    before = evaluate(model, data, pad_id, cfg)
    eval_seconds = time.perf_counter() - t0
    trainable = apply_method_(model, cfg)
    task = HeadTask(model, loaded.config, data, pad_id, cfg.method, tcfg.seed)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "head_config.json", json.dumps({**to_dict(cfg), "train": to_dict(tcfg)},
                                                               indent=2) + "\n")
    from llmlab.nn.nf4 import NF4Linear

    n_params = sum(p.numel() for p in model.parameters()) + sum(  # QLoRA's NF4 weights are buffers: count them too
        m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    print(f"llmlab: {cfg.task} ({cfg.method}, {human_count(trainable)} of {human_count(n_params)} parameters train) "
          f"on {data.counts['train']} examples ({len(data.train_rows)} rows), {data.counts['test']} held out -> "
          f"{run_dir}", flush=True)
    result: TrainResult = train(task, tcfg, run_dir, resume=cfg.resume)
    saved, after = None, None
    if result.stopped != "interrupted":
        if cfg.method == "qlora":
            from llmlab.nn.qlora import dequantize_linears_

            dequantize_linears_(model.bert)  # float bases to merge into (the NF4-rounded weights)
        if cfg.method in ("lora", "qlora"):
            remove_lora_(model, merge=True)
        after = evaluate(model, data, pad_id, cfg)
        saved = save_head(run_dir / "model", model, loaded, labels)
    summary = {"task": cfg.task, "model": cfg.model, "method": cfg.method, "labels": labels, **data.counts,
               "trainable_parameters": trainable, "steps": result.step, "stopped": result.stopped,
               "before": before, "after": after, "train_loss": result.train_loss, "val_loss": result.val_loss,
               "train_seconds": round(result.seconds, 1), "eval_seconds": round(eval_seconds, 1),
               "saved": str(saved) if saved else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
