"""BERT masked-language-model pretraining (Devlin et al. 2018, arXiv:1810.04805, section 3.1).

Of the tokens of a sequence, 15% are chosen for prediction (never the document separator); of those
80% become the mask token, 10% a random token and 10% stay unchanged; the loss is the cross-entropy
at the chosen positions only. The masking draws from a generator seeded by (seed, step, row), so a
batch is reproducible and resume-exact like the causal LM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.models.bert import BertMLMHead, BertModel
from llmlab.models.config import ModelConfig

IGNORE = -100


def mask_tokens(ids: torch.Tensor, *, mask_id: int, vocab_size: int, generator: torch.Generator,
                rate: float = 0.15, protect: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (inputs, labels); labels are IGNORE where no prediction is made."""
    chosen = torch.rand(ids.shape, generator=generator) < rate
    for tok in protect:
        chosen &= ids != tok
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=generator)  # < 0.8 mask, < 0.9 random, else keep
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (action < 0.8)] = mask_id
    use_random = chosen & (action >= 0.8) & (action < 0.9)
    inputs[use_random] = random_ids[use_random]
    return inputs, labels


class MaskedLM(nn.Module):
    """A BERT encoder and its MLM head: (B, T) ids -> (B, T, vocab) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = BertModel(cfg)
        self.mlm_head = BertMLMHead(cfg, self.bert.embed_tokens)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(self.bert(input_ids))


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
