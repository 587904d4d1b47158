"""T5, the text-to-text encoder-decoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", arXiv:1910.10683).

What sets it apart from ``decoder.py``:

- positions are a learned scalar per (head, bucket) added to the attention scores, with no position
  embedding anywhere. The buckets are exact for small offsets and logarithmic up to ``rel_max_distance``;
  bidirectional (signed offsets) in the encoder, causal (past only) in the decoder. Only the first layer of
  each stack owns a table; every layer of that stack adds the same bias. Cross-attention has none;
- no biases, and an RMS-style norm without a mean (``nn/norm.RMSNorm``: the same formula as HF ``T5LayerNorm``);
- no 1/sqrt(d) in the attention: T5 folds it into the initialisation of the query projection;
- one embedding table shared by encoder, decoder and (v1.0, ``tie_embeddings``) the output head; a tied head
  sees the decoder states scaled by dim**-0.5;
- feed-forward: v1.0 ReLU ``down(relu(up(x)))``, v1.1 gated-GELU ``down(gelu_tanh(gate(x)) * up(x))``.

Decoding keeps two caches: the decoder's own keys/values (``StaticKVCache``, one position per step) and the
*encoder-side* keys/values of every cross-attention, computed once per input (``EncoderKV``). ``Seq2SeqDecoder``
binds one input's encoder-side cache to the model and has a decoder-only LM's interface, so
``infer/generate.py`` (sampling) and ``infer/beam.py`` (beam search) decode T5 unchanged.

Parameter names (HF Llama words; ``formats/hf.py`` maps them to HF T5's ``shared``, ``block.N.layer.M``):
``embed_tokens``, ``{encoder,decoder}.relative_attention_bias``, ``{encoder,decoder}.layers.N.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}``, the decoder's
``layers.N.{cross_attn_layernorm, cross_attn.{q,k,v,o}_proj}``, ``{encoder,decoder}.norm``, ``lm_head`` (untied).

Shapes: input_ids (B, S) -> encoder states (B, S, dim); decoder_input_ids (B, T) -> logits (B, T, vocab).
Attention: q (B, H, T, D), k/v (B, H, S, D), position bias (1, H, T, S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.models.config import ModelConfig
from llmlab.nn.kv_cache import StaticKVCache
from llmlab.nn.norm import RMSNorm


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Offsets key - query (any shape, int) -> bucket ids in [0, num_buckets).

    Bidirectional: half the buckets for keys after the query. Causal: keys after the query (masked anyway)
    share bucket 0. Of the rest, half are exact offsets 0..max_exact-1, the other half cover max_exact ..
    max_distance on a log scale; farther offsets share the last bucket."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    # The float division and truncation follow the reference (mesh-tensorflow, HF) bit for bit.
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


IMPLS = ("sdpa", "reference")


class T5Attention(nn.Module):
    """Multi-head attention without scaling; ``bias`` (1|B, H, T, S) float holds the position bias plus the
    mask (a large negative number where a key may not be seen), added to q k^T. Self- or cross-attention:
    ``kv`` gives the key/value source states (B, S, dim) or, with ``kv_given``, ready keys/values."""

    def __init__(self, cfg: ModelConfig, impl: str = "sdpa"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
        self.n_heads, self.head_dim, self.impl = cfg.n_heads, cfg.head_dim, impl
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.k_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.v_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.dim, bias=False)
        self.prefix_k: nn.Parameter | None = None  # prefix tuning (``add_prefix_``): (H, P, D) keys
        self.prefix_v: nn.Parameter | None = None  # and values

    def heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, *, kv: torch.Tensor | None = None,
                kv_given: tuple[torch.Tensor, torch.Tensor] | None = None, cache: StaticKVCache | None = None,
                layer: int = 0, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.heads(x, self.q_proj)  # (B, H, T, D)
        if kv_given is not None:  # cross-attention on the encoder-side cache
            k, v = kv_given
        else:
            src = x if kv is None else kv
            k, v = self.heads(src, self.k_proj), self.heads(src, self.v_proj)  # (B, H, S, D)
            if cache is not None:
                k, v = cache.update(layer, start, k, v)  # (B, H, start+T, D)
        if k.shape[0] != B:  # one input's encoder cache shared by several decoder rows (beams)
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        if self.prefix_k is not None:  # Li & Liang 2021: P trained keys/values in front, seen by every query
            pk, pv = self.prefix_k, self.prefix_v  # (H, P, D)
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, H, P+S, D)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
            if bias is not None:
                bias = F.pad(bias, (pk.shape[1], 0))  # the prefix: no position bias, never masked
        if self.impl == "reference":
            scores = q @ k.transpose(-2, -1)  # (B, H, T, S), no 1/sqrt(D): folded into q_proj's init
            if bias is not None:
                scores = scores + bias
            out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                                 scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, dim)


class T5FeedForward(nn.Module):
    """v1.0: down(relu(up(x))); v1.1: down(gelu_tanh(gate(x)) * up(x)) (HF ``wi``/``wi_0``, ``wi_1``, ``wo``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.ffn_act == "gated-gelu"
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False) if self.gated else None
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)))


class T5Block(nn.Module):
    """Pre-norm: x + attn(norm(x)); [decoder: x + cross_attn(norm(x), encoder)]; x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, is_decoder: bool, impl: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = T5Attention(cfg, impl)
        if is_decoder:
            self.cross_attn_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.cross_attn = T5Attention(cfg, impl)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = T5FeedForward(cfg)

    def forward(self, x, bias, *, cross_kv=None, cross_bias=None, cache=None, layer=0, start=0):
        x = x + self.self_attn(self.input_layernorm(x), bias, cache=cache, layer=layer, start=start)
        if cross_kv is not None:
            x = x + self.cross_attn(self.cross_attn_layernorm(x), cross_bias, kv_given=cross_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (True = may attend) -> 0 / the dtype's most negative number, added to the scores (as HF does;
    unlike -inf, a row with every key masked stays finite)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class T5Stack(nn.Module):
    def __init__(self, cfg: ModelConfig, n_layers: int, is_decoder: bool, impl: str):
        super().__init__()
        self.cfg, self.is_decoder = cfg, is_decoder
        self.relative_attention_bias = nn.Embedding(cfg.rel_buckets, cfg.n_heads)  # HF: block 0's table
        self.layers = nn.ModuleList(T5Block(cfg, is_decoder, impl) for _ in range(n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def position_bias(self, T: int, S: int, start: int, device) -> torch.Tensor:
        """(1, H, T, S): queries at start..start+T-1, keys at 0..S-1."""
        q_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        buckets = relative_position_bucket(k_pos - q_pos, not self.is_decoder, self.cfg.rel_buckets,
                                           self.cfg.rel_max_distance)  # (T, S)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


@dataclass
class EncoderKV:
    """The encoder-side cache: each decoder layer's cross-attention keys and values, computed once per input.
    k, v: one (B, H, S, D) pair per decoder layer; ``bias`` (B, 1, 1, S): the input's padding as an additive mask."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    bias: torch.Tensor | None


class T5Model(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        cfg.validate()
        if cfg.arch != "t5":
            raise ValueError(f"T5Model builds t5, not {cfg.arch}")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)  # HF "shared"
        self.encoder = T5Stack(cfg, cfg.n_layers, False, attn_impl)
        self.decoder = T5Stack(cfg, cfg.n_decoder_layers, True, attn_impl)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T5's initialisation (Mesh TensorFlow, as HF ``T5PreTrainedModel._init_weights``): every weight
        N(0, 1/fan_in), except q_proj N(0, 1/(dim * head_dim)): the attention's missing 1/sqrt(head_dim)."""
        cfg = self.config
        nn.init.normal_(self.embed_tokens.weight, std=1.0)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith("relative_attention_bias.weight"):
                nn.init.normal_(p, std=cfg.dim ** -0.5)
            elif name.endswith("q_proj.weight"):
                nn.init.normal_(p, std=(cfg.dim * cfg.head_dim) ** -0.5)
            elif name.endswith("_proj.weight"):
                nn.init.normal_(p, std=p.shape[1] ** -0.5)  # fan-in: dim, n_heads*head_dim or ffn_dim

    def set_attn_impl(self, impl: str) -> None:
        for m in self.modules():
            if isinstance(m, T5Attention):
                m.impl = impl

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S), attention_mask (B, S) True/1 = real token -> encoder states (B, S, dim)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, dim)
        S = x.shape[1]
        bias = self.encoder.position_bias(S, S, 0, x.device)  # (1, H, S, S)
        if attention_mask is not None:
            bias = bias + additive_mask(attention_mask.bool()[:, None, None, :], bias.dtype)  # (B, H, S, S)
        for block in self.encoder.layers:
            x = block(x, bias)
        return self.encoder.norm(x)

    def encoder_kv(self, encoded: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderKV:
        """Encoder states (B, S, dim) -> the cross-attention keys/values of every decoder layer."""
        kv = [(block.cross_attn.heads(encoded, block.cross_attn.k_proj),
               block.cross_attn.heads(encoded, block.cross_attn.v_proj)) for block in self.decoder.layers]
        bias = None if attention_mask is None else additive_mask(attention_mask.bool()[:, None, None, :],
                                                                 encoded.dtype)  # (B, 1, 1, S)
        return EncoderKV(kv, bias)

    def decode(self, decoder_input_ids: torch.Tensor, enc: EncoderKV, *, cache: StaticKVCache | None = None,
               start: int | None = None, return_hidden: bool = False) -> torch.Tensor:
        """decoder_input_ids (B, T) at positions [start, start+T) -> logits (B, T, V). With ``cache`` the
        decoder's own keys/values are kept and it advances (``start`` defaults to its length)."""
        x = self.embed_tokens(decoder_input_ids)  # (B, T, dim)
        T = x.shape[1]
        if start is None:
            start = cache.length if cache is not None else 0
        S = start + T
        causal = torch.arange(S, device=x.device)[None, :] <= torch.arange(start, S, device=x.device)[:, None]
        bias = self.decoder.position_bias(T, S, start, x.device) + additive_mask(causal, x.dtype)  # (1, H, T, S)
        for i, block in enumerate(self.decoder.layers):
            x = block(x, bias, cross_kv=enc.kv[i], cross_bias=enc.bias, cache=cache, layer=i, start=start)
        if cache is not None:
            cache.length = S
        x = self.decoder.norm(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, T, dim) -> (B, T, V); a head tied to the embeddings sees them scaled by dim**-0.5."""
        if self.config.tie_embeddings:
            hidden = hidden * self.config.dim ** -0.5
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: input_ids (B, S), decoder_input_ids (B, T) (the targets shifted right behind
        ``decoder_start_id``) -> logits (B, T, V)."""
        encoded = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.encoder_kv(encoded, attention_mask))

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        p, cfg = self.embed_tokens.weight, self.config
        return StaticKVCache(cfg.n_decoder_layers, batch, cfg.n_heads, max_len, cfg.head_dim, dtype=p.dtype,
                             device=p.device)


def add_prefix_(model: T5Model, n_tokens: int, generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
    arXiv:2101.00190) on T5: every attention (encoder self, decoder self and cross) gets ``n_tokens`` trained
    keys and values (H, P, D) in front of its own; they carry no position bias and no query is masked from
    them. The base is frozen; the new parameters are returned (they are the only ones that train). The paper's
    MLP reparameterisation is left out: the prefix is trained directly, with T5's own key/value scale."""
    if n_tokens < 1:
        raise ValueError(f"prefix tuning needs n_tokens >= 1, got {n_tokens}")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg, new = model.config, []
    w = model.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, T5Attention):
            shape = (cfg.n_heads, n_tokens, cfg.head_dim)  # (H, P, D)
            # N(0, 1): the scale of T5's own keys and values (unit-RMS states through N(0, 1/dim) weights)
            m.prefix_k = nn.Parameter(torch.randn(shape, generator=generator).to(w))
            m.prefix_v = nn.Parameter(torch.randn(shape, generator=generator).to(w))
            new += [m.prefix_k, m.prefix_v]
    return new


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Targets (B, T) (-100 = ignored) -> decoder inputs (B, T): ``start_id``, then the targets but the last."""
    out = torch.full_like(labels, start_id)
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return out


class Seq2SeqDecoder(nn.Module):
    """One batch of inputs encoded once, seen as a decoder-only LM over the target side: ``forward(ids,
    cache=)`` -> logits (B, T, V), ``new_cache``, ``config``. ``infer/generate.py`` and ``infer/beam.py`` decode
    T5 through it; the prompt is ``[decoder_start_id]`` per row. ``config.max_seq_len`` is the target budget + 1.
    Beam search runs its beams as rows of a batch-1 input: the encoder-side cache is broadcast, not copied."""

    def __init__(self, model: T5Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_target_len: int = 512):
        super().__init__()
        self.model = model
        self.config = replace(model.config, max_seq_len=max_target_len + 1)
        self.enc = model.encoder_kv(model.encode(input_ids, attention_mask), attention_mask)

    def new_cache(self, batch: int, max_len: int | None = None) -> StaticKVCache:
        return self.model.new_cache(batch, max_len or self.config.max_seq_len)

    def forward(self, input_ids: torch.Tensor, *, cache: StaticKVCache | None = None, start: int | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Every target row starts with the one start token, so there is no padding and no position to pass:
        # positions are relative and counted from the cache.
        return self.model.decode(input_ids, self.enc, cache=cache, start=start)
