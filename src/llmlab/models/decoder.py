"""A pre-norm decoder-only Transformer language model, composed from ``llmlab.nn`` parts.

Llama (Touvron et al. 2023, arXiv:2302.13971): RMSNorm + RoPE + SwiGLU + GQA, no biases.
With ``n_experts > 0`` the Llama feed-forward is a sparse mixture of experts (``nn/moe.py``, Mixtral style).
GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): LayerNorm +
learned positions + GELU(tanh) MLP + biases. The family is chosen by ``ModelConfig.arch``; the
parts are injected, not subclassed (docs/architecture.md, "Compose, don't inherit").

Parameter names follow Hugging Face Llama without the ``model.`` prefix: ``embed_tokens``,
``layers.N.self_attn.{q,k,v,o}_proj``, ``layers.N.mlp.{gate,up,down}_proj``, ``norm``, ``lm_head``.

forward: input_ids (B, T) -> logits (B, T, vocab) (or hidden states (B, T, dim)). With tied embeddings the
lookup and the head share one gradient tensor (``nn/tied_embedding.py``): a caller that applies the head itself
asks for the head's weight with ``return_head_weight`` and uses it in place of ``lm_head.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.models.config import ModelConfig
from llmlab.nn.attention import Attention
from llmlab.nn.cpu_kernels import kernels_own_the_threads
from llmlab.nn.kv_cache import StaticKVCache
from llmlab.nn.mlp import make_mlp
from llmlab.nn.moe import MoEFeedForward
from llmlab.nn.norm import make_norm
from llmlab.nn.rope import RotaryEmbedding
from llmlab.nn.tied_embedding import tied_lookup


class DecoderBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, norm: str, mlp: str, attn_impl: str):
        super().__init__()
        self.config_moe = bool(cfg.n_experts)
        self.input_layernorm = make_norm(norm, cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=cfg.attn_bias,
                                   causal=True, impl=attn_impl)
        self.post_attention_layernorm = make_norm(norm, cfg.dim, cfg.norm_eps)
        if cfg.n_experts:  # Mixtral's name for the sparse feed-forward
            self.block_sparse_moe = MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.experts_per_token,
                                                   cfg.moe_capacity_factor)
        else:
            self.mlp = make_mlp(mlp, cfg.dim, cfg.ffn_dim, cfg.mlp_bias)

    def forward(self, x, *, rope, key_mask, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), rope=rope, key_mask=key_mask, cache=cache,
                               layer=layer, start=start)
        ffn = self.block_sparse_moe if self.config_moe else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        cfg.validate()
        if cfg.arch not in ("llama", "gpt2"):
            raise ValueError(f"DecoderLM builds llama or gpt2, not {cfg.arch}")
        self.config = cfg
        llama = cfg.arch == "llama"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Llama encodes position by rotating q/k; GPT-2 adds a learned vector per position.
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if llama else None
        self.embed_positions = None if llama else nn.Embedding(cfg.max_seq_len, cfg.dim)
        norm, mlp = ("rms", "swiglu") if llama else ("layer", "gelu_tanh")
        self.layers = nn.ModuleList(DecoderBlock(cfg, norm, mlp, attn_impl) for _ in range(cfg.n_layers))
        self.norm = make_norm(norm, cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        self.native_step = None  # models/native_step.py: the blocks in C on packed weights, where enabled
        self.kv_cache_dtype: torch.dtype | None = None  # new_cache's default (None: the weights' dtype)

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) -> the embeddings (B, T, dim) and the weight the head applies (None: ``lm_head`` as it
        is). A plain table tied to a plain head, with no hooks on either, goes through ``tied_lookup``."""
        e, head = self.embed_tokens, self.lm_head
        if (type(e) is nn.Embedding and type(head) is nn.Linear and head.weight is e.weight and head.bias is None
                and e.padding_idx is None and e.max_norm is None and not e.sparse and not e.scale_grad_by_freq
                and not (e._forward_hooks or e._forward_pre_hooks or head._forward_hooks or head._forward_pre_hooks)):
            x, weight = tied_lookup(e.weight, input_ids)
            return x, None if weight is e.weight else weight  # the table itself outside autograd
        return e(input_ids), None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_attn_impl(self, impl: str) -> None:
        for block in self.layers:
            block.self_attn.impl = impl

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> StaticKVCache:
        """A StaticKVCache for ``batch`` sequences of up to ``max_len`` positions, in ``dtype`` (default:
        ``kv_cache_dtype``, else the weights' dtype)."""
        p = self.embed_tokens.weight
        cfg = self.config
        return StaticKVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                             dtype=dtype or self.kv_cache_dtype or p.dtype, device=p.device)

    def forward(self, input_ids: torch.Tensor | None, *, cache: StaticKVCache | None = None, start: int | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False, inputs_embeds: torch.Tensor | None = None,
                return_head_weight: bool = False):
        """input_ids (B, T); with ``cache`` the tokens sit at positions [start, start+T) (default: the
        cache's current length) and the cache advances. ``attention_mask`` (B, S) marks real keys, or is a
        (B, T, S) per-query mask (packed rows, with ``position_ids`` restarting per example).
        ``inputs_embeds`` (B, T, dim) replaces the token embeddings (``input_ids`` None): prompt tuning.
        ``return_head_weight`` (with ``return_hidden``): (hidden, the head's weight (V, dim)) for a caller that
        applies the head itself: under autograd with a tied table, the view of ``nn/tied_embedding.py`` (use it,
        not ``lm_head.weight``, and the two gradients meet in place); else ``lm_head.weight`` (None for a head
        that is not a plain linear layer)."""
        # blocks in C (models/native_step.py: ready() here, fits() once x exists): the kernels get the threads,
        # PyTorch's small ops (embedding, RoPE tables, copies) one, so PyTorch's idle OpenMP workers do not spin on
        # the kernels' cores; any other forward keeps PyTorch's threads
        native = self.native_step
        paged = getattr(cache, "owns_attention", False)  # a PagedBatch: positions come per token
        native_ready = native is not None and not paged and native.ready(self, cache)
        with kernels_own_the_threads(native_ready):
            head_weight = None
            if inputs_embeds is None:
                x, head_weight = self._embed(input_ids)  # (B, T, dim), (V, dim) or None
            else:
                x = inputs_embeds  # (B, T, dim)
            B, T = x.shape[:2]
            if start is None:
                start = cache.length if cache is not None and not paged else 0
            if not paged and start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            if position_ids is None:
                position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)  # (B, T)
            rope = None
            if self.rotary is not None:
                rope = self.rotary(position_ids, x.dtype)
            else:
                x = x + self.embed_positions(position_ids)
            if native_ready and native.fits(x, cache, attention_mask):
                x = native.blocks(x, rope, cache, start, attention_mask)  # every block in C (models/native_step.py)
                cache.length = start + T
                logits = None if return_hidden else native.logits(self, x)  # final norm + head in C
                if logits is not None:
                    return logits
            else:
                for i, block in enumerate(self.layers):
                    x = block(x, rope=rope, key_mask=attention_mask, cache=cache, layer=i, start=start)
                if cache is not None and not paged:
                    cache.length = start + T
            x = self.norm(x)
            if return_hidden:
                if not return_head_weight:
                    return x
                plain = type(self.lm_head) is nn.Linear
                return x, head_weight if head_weight is not None else self.lm_head.weight if plain else None
            return self.lm_head(x) if head_weight is None else F.linear(x, head_weight)  # (B, T, V)
