"""Prompt tuning and prefix tuning for a BERT encoder with a task head, the encoder and its head's inputs placed as
Hugging Face ``peft`` places them for ``PeftModelForSequenceClassification``, ``...TokenClassification`` and
``...QuestionAnswering`` (``peft/peft_model.py``, peft 0.21).

- Prompt tuning (Lester, Al-Rfou, Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
  arXiv:2104.08691): P learned input embeddings E_v (P, dim) are prepended to the token embeddings,
  x = LayerNorm([E_v; E(ids)] + pos(0..P+T-1) + type([0]*P; types)), the attention mask gets P ones in front.
  As in peft, the encoder's output keeps the P virtual rows: classification pools position 0 -- the first
  *virtual* token, not [CLS] -- and the token-level heads (NER, QA) read only the last T rows (peft returns all
  P+T rows' logits; the extra P are dropped here, since they label nothing).
- Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
  arXiv:2101.00190): per layer P learned keys and values in front of every self-attention's,
  attn(Q, [K_p; K], [V_p; V]); the real tokens take positions P..P+T-1 (transformers' BERT with a P-long
  ``past_key_values``). The parameter is peft's flat ``(P, n_layers * 2 * dim)``, split per layer by
  ``nn/prompt_tuning.split_prefix``; peft's reparameterisation MLP is left out (trained directly, as
  ``t5.add_prefix_``).

Both start as peft's RANDOM init, N(0, 1) (``nn.Embedding``'s). Neither merges into the weights: a run saves them
beside the task folder (``formats/bert_heads.py``). Shapes: ``prompt`` (P, dim) for ``BertModel.forward``; prefix
per layer (k, v), each (H, P, D).
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.models.config import ModelConfig
from llmlab.nn.prompt_tuning import split_prefix

VIRTUAL_METHODS = ("prompt", "prefix")


class BertVirtualTokens(nn.Module):
    """P trained virtual tokens for one encoder: ``embedding`` (P, dim) for prompt tuning, (P, n_layers * 2 * dim)
    for prefix tuning. ``encoder_inputs()`` is what ``BertModel.forward`` takes (``prompt=`` or ``prefix=``)."""

    def __init__(self, cfg: ModelConfig, method: str, num_virtual_tokens: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        if method not in VIRTUAL_METHODS:
            raise ValueError(f"method must be one of {VIRTUAL_METHODS}, got {method!r}")
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        self.method, self.cfg = method, cfg
        width = cfg.dim if method == "prompt" else cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, width, generator=generator))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def encoder_inputs(self) -> dict:
        if self.method == "prompt":
            return {"prompt": self.embedding}  # (P, dim)
        cfg = self.cfg
        return {"prefix": split_prefix(self.embedding, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)}

    def extra_repr(self) -> str:
        return f"{self.method}, num_virtual_tokens={self.num_virtual_tokens}"
