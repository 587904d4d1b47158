"""One typed config for every architecture, in Llama vocabulary (docs/architecture.md, "Names").

``arch`` picks the family; the family fixes which fields matter:
- llama: RMSNorm, RoPE, SwiGLU, no biases, GQA (n_kv_heads), optional tied head;
- gpt2: LayerNorm, learned positions, GELU(tanh) MLP, biases, tied head;
- bert: post-LN encoder, learned positions + token types, GELU(erf) MLP, biases, pooler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmlab.common import LlmlabError

ARCHS = ("llama", "gpt2", "bert")


@dataclass
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    head_dim: int | None = None  # None = dim // n_heads
    ffn_dim: int = 1376
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = True
    attn_bias: bool = False
    mlp_bias: bool = False
    type_vocab_size: int = 2  # bert only
    n_experts: int = 0  # llama only: >0 replaces each SwiGLU by a mixture of experts (nn/moe.py)
    experts_per_token: int = 2  # MoE top-k
    moe_capacity_factor: float = 0.0  # MoE expert capacity (0 = unlimited, no token drops)
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss in training
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # provenance (e.g. source file); never changes the maths

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads

    def validate(self) -> ModelConfig:
        if self.arch not in ARCHS:
            raise LlmlabError(f"unknown architecture {self.arch!r}: supported are {', '.join(ARCHS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LlmlabError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.head_dim * self.n_heads != self.dim and self.dim % self.n_heads:
            raise LlmlabError(f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise LlmlabError(f"model config: n_heads={self.n_heads} is not a multiple of "
                              f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None or self.head_dim <= 0 or (self.arch == "llama" and self.head_dim % 2):
            raise LlmlabError(f"model config: head_dim={self.head_dim} must be positive (and even for RoPE)")
        if self.n_experts and (self.arch != "llama" or not 1 <= self.experts_per_token <= self.n_experts):
            raise LlmlabError(f"model config: a mixture of experts needs arch=llama and 1 <= experts_per_token "
                              f"<= n_experts, got {self.arch}, {self.experts_per_token}, {self.n_experts}")
        if self.arch != "llama" and self.dim != self.n_heads * self.head_dim:
            raise LlmlabError(f"model config: dim={self.dim} must equal n_heads*head_dim for {self.arch}")
        return self

    @property
    def is_causal(self) -> bool:
        return self.arch != "bert"

    def num_params(self) -> int:
        """Parameter count computed from the config alone (tied head counted once)."""
        d, f, L, V = self.dim, self.ffn_dim, self.n_layers, self.vocab_size
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if self.arch == "llama":
            ffn = (self.n_experts * 3 * d * f + d * self.n_experts) if self.n_experts else 3 * d * f
            per_layer = attn + ffn + 2 * d + (q + 2 * kv + d if self.attn_bias else 0)
            return V * d + L * per_layer + d + (0 if self.tie_embeddings else V * d)
        biases = q + 2 * kv + d + f + d
        per_layer = attn + 2 * d * f + biases + 4 * d
        if self.arch == "gpt2":
            return V * d + self.max_seq_len * d + L * per_layer + 2 * d + (0 if self.tie_embeddings else V * d)
        # bert: embeddings + token types + embedding LayerNorm + layers + pooler
        return (V + self.max_seq_len + self.type_vocab_size) * d + 2 * d + L * per_layer + d * d + d
