"""BERT encoder (Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers",
arXiv:1810.04805), post-LayerNorm: x = norm(x + attn(x)); x = norm(x + mlp(x)).

Sentence embeddings as in Sentence-BERT (Reimers & Gurevych 2019, arXiv:1908.10084): mean of the
token states over the attention mask (all-MiniLM-L6-v2's pooling) or the [CLS] state, then L2-normalised.

Prompt and prefix tuning (``models/bert_prompt.py``) come in through ``forward``'s ``prompt`` (P, dim): embeddings
in front of the tokens', at positions 0..P-1 with token type 0, their P output rows kept; and ``prefix``: per layer
keys and values (H, P, D) in front of the attention's own, the real tokens at positions P.. -- both as Hugging Face
peft feeds a transformers BERT (inputs_embeds; past_key_values).

Parameter names: ``embed_tokens``, ``embed_positions``, ``embed_token_types``, ``embed_norm``,
``layers.N.self_attn.{q,k,v,o}_proj``, ``layers.N.attn_norm``, ``layers.N.mlp.{up,down}_proj``,
``layers.N.mlp_norm``, ``pooler``. forward: input_ids (B, T) -> hidden states (B, T, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.models.config import ModelConfig
from llmlab.nn.attention import Attention
from llmlab.nn.mlp import GeluMLP
from llmlab.nn.prompt_tuning import PrefixKV


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str):
        super().__init__()
        self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=True,
                                   causal=False, impl=attn_impl)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = GeluMLP(cfg.dim, cfg.ffn_dim, bias=True, approximate="none")
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, key_mask, prefix=None, layer: int = 0, start: int = 0):
        x = self.attn_norm(x + self.self_attn(x, key_mask=key_mask, cache=prefix, layer=layer, start=start))
        return self.mlp_norm(x + self.mlp(x))


class BertModel(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.embed_token_types = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderBlock(cfg, attn_impl) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(cfg.dim, cfg.dim)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # optional Linear(dim, dim) after pooling, sentence-transformers' Dense (train/pca_rotation.py,
        # formats/st_modules.py); None = the pooled vector as it is
        self.projection: nn.Linear | None = None

    def set_attn_impl(self, impl: str) -> None:
        for block in self.layers:
            block.self_attn.impl = impl

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, *, prompt: torch.Tensor | None = None,
                prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Hidden states (B, T, dim); with ``prompt`` (P, dim) (B, P+T, dim), the virtual rows first. ``prefix``:
        per layer (k, v), each (H, P, D)."""
        B, T = input_ids.shape
        P = prompt.shape[0] if prompt is not None else prefix[0][0].shape[1] if prefix else 0
        if self.config.max_seq_len < P + T:
            raise ValueError(f"sequence of {T} tokens{f' + {P} virtual' if P else ''} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.embed_tokens(input_ids)  # (B, T, dim)
        if prompt is not None:  # Lester et al.: the virtual tokens are the first P inputs (type 0, positions 0..P-1)
            x = torch.cat([prompt.to(x.dtype).expand(B, P, -1), x], dim=1)  # (B, P+T, dim)
            types = torch.cat([types.new_zeros(B, P), types], dim=1)
        first = P if prefix else 0  # prefix tuning: the real tokens come after the P cached positions
        pos = torch.arange(first, first + x.shape[1], device=input_ids.device)[None]  # (1, P+T | T)
        if attention_mask is not None and P:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, P+T)
        x = self.embed_norm(x + self.embed_positions(pos) + self.embed_token_types(types))
        kv = PrefixKV(prefix, B) if prefix else None
        for i, block in enumerate(self.layers):
            x = block(x, attention_mask, kv, i, first)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's [CLS] pooler: tanh(W h_0 + b). (B, T, dim) -> (B, dim)."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True,
              pooling: str = "mean"):
        """Pooled sentence embeddings (B, dim), through ``projection`` if set, L2-normalised by default. A batch
        without padding runs attention without a mask (SDPA's unmasked kernel)."""
        key_mask = None if bool(attention_mask.all()) else attention_mask
        emb = pool(self(input_ids, key_mask), attention_mask, pooling)  # (B, dim)
        if self.projection is not None:
            emb = self.projection(emb)  # (B, dim)
        return F.normalize(emb, p=2, dim=-1) if normalize else emb


POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Token states (B, T, dim) -> one vector per sequence (B, dim): ``mean`` over the attention mask
    (Sentence-BERT, all-MiniLM-L6-v2) or ``cls``, the first token's state as it is (sentence-transformers'
    CLS pooling; not BERT's tanh pooler)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class BertMLMHead(nn.Module):
    """BERT's masked-LM head: decoder(LayerNorm(gelu(dense(h)))) + bias, the decoder tied to the token
    embeddings (HF ``cls.predictions``). (B, T, dim) -> (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.embed_tokens = [embed_tokens]  # a list: tied, so not registered (and not saved) twice
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(h, self.embed_tokens[0].weight, self.bias)
