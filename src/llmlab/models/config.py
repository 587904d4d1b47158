"""One typed config for every architecture, in Llama vocabulary (docs/architecture.md, "Names").

``arch`` picks the family; the family fixes which fields matter:
- llama: RMSNorm, RoPE, SwiGLU, no biases, GQA (n_kv_heads), optional tied head;
- gpt2: LayerNorm, learned positions, GELU(tanh) MLP, biases, tied head;
- bert: post-LN encoder, learned positions + token types, GELU(erf) MLP, biases, pooler;
- t5: encoder-decoder, RMS-style norm, relative position buckets, no biases, shared embeddings; ``head_dim`` is
  T5's ``d_kv`` (free of ``dim / n_heads``), ``ffn_act`` picks v1.0's ReLU or v1.1's gated-GELU feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmlab.common import LlmlabError

ARCHS = ("llama", "gpt2", "bert", "t5")
T5_FFN_ACTS = ("relu", "gated-gelu")


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
    n_decoder_layers: int | None = None  # t5 only: decoder depth (None = n_layers)
    rel_buckets: int = 32  # t5 only: relative position buckets
    rel_max_distance: int = 128  # t5 only: distance from which all positions share the last bucket
    ffn_act: str = "relu"  # t5 only: "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # provenance (e.g. source file); never changes the maths

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        if self.arch == "t5" and self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers

    def validate(self) -> ModelConfig:
        if self.arch not in ARCHS:
            raise LlmlabError(f"unknown architecture {self.arch!r}: supported are {', '.join(ARCHS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LlmlabError(f"model config: {name} must be a positive integer, got {value!r}")
        # llama / t5 take any head_dim (a structurally pruned Llama keeps head_dim with fewer heads)
        if self.arch not in ("llama", "t5") and self.head_dim * self.n_heads != self.dim and self.dim % self.n_heads:
            raise LlmlabError(f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise LlmlabError(f"model config: n_heads={self.n_heads} is not a multiple of "
                              f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None or self.head_dim <= 0 or (self.arch == "llama" and self.head_dim % 2):
            raise LlmlabError(f"model config: head_dim={self.head_dim} must be positive (and even for RoPE)")
        if self.n_experts and (self.arch != "llama" or not 1 <= self.experts_per_token <= self.n_experts):
            raise LlmlabError(f"model config: a mixture of experts needs arch=llama and 1 <= experts_per_token "
                              f"<= n_experts, got {self.arch}, {self.experts_per_token}, {self.n_experts}")
        if self.arch == "t5" and (self.ffn_act not in T5_FFN_ACTS or not isinstance(self.n_decoder_layers, int)
                                  or self.n_decoder_layers <= 0 or self.rel_buckets < 4
                                  or self.rel_max_distance <= self.rel_buckets // 4):
            raise LlmlabError(f"model config: t5 needs ffn_act in {T5_FFN_ACTS}, n_decoder_layers > 0, "
                              f"rel_buckets >= 4 and rel_max_distance > rel_buckets / 4, got {self.ffn_act!r}, "
                              f"{self.n_decoder_layers}, {self.rel_buckets}, {self.rel_max_distance}")
        if self.arch not in ("llama", "t5") and self.dim != self.n_heads * self.head_dim:
            raise LlmlabError(f"model config: dim={self.dim} must equal n_heads*head_dim for {self.arch}")
        return self

    @property
    def is_causal(self) -> bool:
        return self.arch not in ("bert", "t5")

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
        if self.arch == "t5":  # no biases; one relative-position table per stack; cross-attention in the decoder
            ffn = (3 if self.ffn_act == "gated-gelu" else 2) * d * f
            enc = self.n_layers * (attn + ffn + 2 * d) + d
            dec = self.n_decoder_layers * (2 * attn + ffn + 3 * d) + d
            return V * d + enc + dec + 2 * self.rel_buckets * self.n_heads + (0 if self.tie_embeddings else V * d)
        biases = q + 2 * kv + d + f + d
        per_layer = attn + 2 * d * f + biases + 4 * d
        if self.arch == "gpt2":
            return V * d + self.max_seq_len * d + L * per_layer + 2 * d + (0 if self.tie_embeddings else V * d)
        # bert: embeddings + token types + embedding LayerNorm + layers + pooler
        return (V + self.max_seq_len + self.type_vocab_size) * d + 2 * d + L * per_layer + d * d + d
