"""Task heads on a BERT encoder (Devlin et al. 2018, arXiv:1810.04805, section 4): sequence classification from
the pooled [CLS] state, token classification (NER) from every token's state, and extractive question answering
as a start and an end score per token (section 4.2, SQuAD).

The layers and names are Hugging Face's ``BertForSequenceClassification`` (``classifier`` on
``tanh(pooler(h_0))``), ``BertForTokenClassification`` (``classifier`` on each h_t) and
``BertForQuestionAnswering`` (``qa_outputs``: 2 scores per token, split into start / end), so a folder that
transformers saved loads with equal logits (``formats/bert_heads.py``; tests/test_bert_tasks.py). Dropout is left
out: the models here run deterministically, in training too.

With prompt or prefix tuning (``models/bert_prompt.py``) ``virtual`` holds the trained virtual tokens; the
encoder's output then has P leading virtual rows (prompt tuning), which classification pools from (position 0, as
peft) and the token-level heads drop.

Shapes: input_ids, attention_mask (B, T) -> classify (B, C); ner (B, T, C); qa start, end (B, T) each, stacked as
(B, T, 2).
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.models.bert import BertModel
from llmlab.models.bert_prompt import BertVirtualTokens

TASKS = ("classify", "ner", "qa")
HF_ARCHITECTURES = {"classify": "BertForSequenceClassification", "ner": "BertForTokenClassification",
                    "qa": "BertForQuestionAnswering"}
HEAD_NAMES = {"classify": "classifier", "ner": "classifier", "qa": "qa_outputs"}


class BertWithHead(nn.Module):
    """``bert`` (the encoder) + one linear head; ``task`` is classify, ner or qa (qa has 2 outputs)."""

    def __init__(self, bert: BertModel, task: str, n_labels: int = 2):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.bert = bert
        out = 2 if task == "qa" else n_labels
        head = nn.Linear(bert.config.dim, out)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        setattr(self, HEAD_NAMES[task], head)
        self.virtual: BertVirtualTokens | None = None  # prompt / prefix tuning's trained tokens

    @property
    def head(self) -> nn.Linear:
        return getattr(self, HEAD_NAMES[self.task])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = self.virtual.encoder_inputs() if self.virtual is not None else {}
        hidden = self.bert(input_ids, attention_mask, token_type_ids, **extra)  # (B, [P+]T, dim)
        if self.task == "classify":
            return self.head(self.bert.pooled(hidden))  # (B, C)
        hidden = hidden[:, hidden.shape[1] - input_ids.shape[1]:]  # (B, T, dim): the real tokens' rows
        return self.head(hidden)  # ner: (B, T, C); qa: (B, T, 2) = start, end scores
