"""Prompt tuning and prefix tuning: learned virtual tokens in front of every sequence, the base model frozen.

- Prompt tuning (Lester, Al-Rfou, Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021,
  arXiv:2104.08691): P learned embeddings (P, dim) are prepended to the input embeddings and run through
  every layer like tokens.
- Prefix tuning (Li, Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021,
  arXiv:2101.00190): P learned key and value vectors per layer, (P, H_kv, D) each, are prepended to every
  attention's keys and values. Optionally (the paper's reparameterisation, peft's ``prefix_projection``) they
  are the output of a two-layer tanh MLP over P smaller embeddings during training; saving keeps the output.

Both are wrappers (``PromptTunedLM`` / ``PrefixTunedLM``) with the decoder's interface: ``forward(input_ids,
cache=, start=, attention_mask=, position_ids=, return_hidden=)``, ``new_cache``, ``config``, ``lm_head``, so
training, ``llmlab.infer.generate`` and ``LLM.generate`` use them unchanged. Outputs cover the T real tokens
only. The frozen model is ``.base_model`` (the same object, not copied).

Positions follow Hugging Face ``peft`` (checked against ``peft/peft_model.py``, PeftModelForCausalLM.forward):
prompt tuning gives the virtual tokens positions 0..P-1 and the real tokens P.. (peft drops given
``position_ids``); prefix tuning hands the prefix over as ``past_key_values`` and offsets ``position_ids`` by P,
so real tokens also start at P, and the prefix keys are used as given (never rotated).

A KV cache from the wrapper's ``new_cache`` holds P more positions than asked: [0, P) are the virtual tokens
(written by ``new_cache`` for prefix tuning; by the first call, ``start`` 0, for prompt tuning). ``start``,
``position_ids``, the (B, S) key mask and ``cache.length`` stay in real-token coordinates, which is what
``generate``, beam search and speculative decoding read and set. ``config`` is the base config with
``max_seq_len`` reduced by P (the context left for real tokens); the base's own is ``base_model.config``.

Masks: a (B, S) key mask gets P visible keys in front; a (B, T, S) per-query mask gets P visible columns (and,
for prompt tuning's first chunk, P query rows that see only the virtual tokens). So a packed row (block-diagonal
mask, positions restarting per example) gives each example the virtual tokens at 0..P-1 and itself from P on:
the same as separate forwards (tested), although SFT with these methods uses one example per row.

Training without a cache (prefix tuning) passes the prefix as a per-call ``PrefixKV`` whose ``update``
concatenates instead of writing in place, so the gradient reaches the prefix and nothing is stored.

Shapes: input_ids (B, T) -> logits (B, T, V) or hidden (B, T, dim); prompt (P, dim); prefix per layer
k, v (H_kv, P, D); peft's flat prefix (P, n_layers * 2 * H_kv * D), per token [layer0 k, layer0 v, layer1 k, ...].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.nn.kv_cache import StaticKVCache

INITS = ("random", "text", "vocab")


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "random"  # "random": N(0, 1) as peft's RANDOM; "text": embeddings of init_text; "vocab": random ids
    init_text: str | None = None  # with init "text": the tokenizer's ids, cut or repeated to P tokens (peft's TEXT)

    def validate(self) -> PromptTuningConfig:
        _check_p(self.num_virtual_tokens)
        if self.init not in INITS:
            raise LlmlabError(f"prompt tuning init {self.init!r} is unknown: use one of {', '.join(INITS)}")
        if self.init == "text" and not self.init_text:
            raise LlmlabError("prompt tuning init 'text' needs init_text (the words whose embeddings start the prompt)")
        return self


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # train through a 2-layer tanh MLP (Li & Liang's reparameterisation)
    encoder_hidden_size: int | None = None  # that MLP's width (None: H_kv * D, as peft)
    # "random": N(0, 1) as peft; "text": the keys/values the frozen model computes for init_text (cut or
    # repeated to P tokens) -- Li & Liang (section 7.2) found initialising with real words' activations
    # trains better than random; at step 0 the model then behaves as if init_text preceded every input.
    init: str = "random"
    init_text: str | None = None

    def validate(self) -> PrefixTuningConfig:
        _check_p(self.num_virtual_tokens)
        if self.init not in ("random", "text"):
            raise LlmlabError(f"prefix tuning init {self.init!r} is unknown: use random or text")
        if self.init == "text" and (not self.init_text or self.prefix_projection):
            raise LlmlabError("prefix tuning init 'text' needs init_text and no prefix_projection")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise LlmlabError(f"prefix encoder_hidden_size must be positive, got {self.encoder_hidden_size!r}")
        return self


def _check_p(p: int) -> None:
    if not isinstance(p, int) or p <= 0:
        raise LlmlabError(f"num_virtual_tokens must be a positive integer, got {p!r}")


def _extend_mask(mask: torch.Tensor | None, P: int, virtual_queries: bool) -> torch.Tensor | None:
    """Add the P virtual keys (visible to every query) in front of a (B, S) or (B, T, S) mask; with
    ``virtual_queries`` also P query rows in front that see only virtual keys (the causal mask does the rest)."""
    if mask is None:
        return None
    mask = mask.bool()
    B = mask.shape[0]
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(B, P), mask], dim=1)  # (B, P+S)
    T, S = mask.shape[1:]
    out = torch.cat([mask.new_ones(B, T, P), mask], dim=2)  # (B, T, P+S)
    if virtual_queries:
        top = torch.cat([mask.new_ones(B, P, P), mask.new_zeros(B, P, S)], dim=2)  # (B, P, P+S)
        out = torch.cat([top, out], dim=1)  # (B, P+T, P+S)
    return out


class _VirtualTokenLM(nn.Module):
    """What both wrappers share: the base, the coordinate shift by P, the interface the stack reads."""

    def __init__(self, base_model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        if isinstance(base_model, _VirtualTokenLM):
            raise LlmlabError("the model already has prompt or prefix tuning: apply one method to the base model")
        cfg = base_model.config
        if num_virtual_tokens >= cfg.max_seq_len:
            raise LlmlabError(f"num_virtual_tokens {num_virtual_tokens} leaves no room in the "
                              f"{cfg.max_seq_len}-token context: use fewer")
        self.base_model = base_model
        self.num_virtual_tokens = num_virtual_tokens
        self.config = dataclasses.replace(cfg, max_seq_len=cfg.max_seq_len - num_virtual_tokens)

    @property
    def lm_head(self) -> nn.Module:
        return self.base_model.lm_head

    def set_attn_impl(self, impl: str) -> None:
        self.base_model.set_attn_impl(impl)

    def _weight(self) -> torch.Tensor:
        return self.base_model.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int | None = None) -> StaticKVCache:
        """A cache for ``max_len`` real tokens (default: ``config.max_seq_len``) plus the P virtual ones."""
        cfg, p = self.base_model.config, self._weight()
        return StaticKVCache(cfg.n_layers, batch, cfg.n_kv_heads, (max_len or self.config.max_seq_len)
                             + self.num_virtual_tokens, cfg.head_dim, dtype=p.dtype, device=p.device)

    def _coords(self, input_ids, cache, start, position_ids):
        """Real-token start and position_ids (B, T) (defaults as the decoder's)."""
        B, T = input_ids.shape
        if start is None:
            start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)  # (B, T)
        return start, position_ids


class PromptTunedLM(_VirtualTokenLM):
    """Prompt tuning (Lester et al. 2021): ``prompt`` (P, dim) is prepended to the token embeddings."""

    def __init__(self, base_model: nn.Module, num_virtual_tokens: int):
        super().__init__(base_model, num_virtual_tokens)
        w = self._weight()
        self.prompt = nn.Parameter(torch.randn(num_virtual_tokens, w.shape[1], device=w.device, dtype=w.dtype))

    def forward(self, input_ids: torch.Tensor, *, cache: StaticKVCache | None = None, start: int | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        P = self.num_virtual_tokens
        start, position_ids = self._coords(input_ids, cache, start, position_ids)
        base = self.base_model
        x = base.embed_tokens(input_ids)  # (B, T, dim)
        first = start == 0  # the virtual tokens go in with the first chunk; later chunks find them in the cache
        if first:
            x = torch.cat([self.prompt.to(x.dtype).expand(B, P, -1), x], dim=1)  # (B, P+T, dim)
            virtual_pos = torch.arange(P, device=x.device).expand(B, P)  # (B, P)
            position_ids = torch.cat([virtual_pos, position_ids + P], dim=1)  # (B, P+T)
        else:
            position_ids = position_ids + P
        mask = _extend_mask(attention_mask, P, virtual_queries=first)
        hidden = base(None, inputs_embeds=x, cache=cache, start=0 if first else start + P, attention_mask=mask,
                      position_ids=position_ids, return_hidden=True)  # (B, P+T | T, dim)
        if cache is not None:
            cache.length = start + T  # real-token coordinates (the base wrote P + start + T)
        if first:
            hidden = hidden[:, P:]  # (B, T, dim)
        return hidden if return_hidden else base.lm_head(hidden)


class PrefixKV:
    """A stand-in KV cache for one forward without a cache: ``update`` returns the layer's prefix followed by
    the new keys/values, (B, H_kv, P+T, D), by concatenation (autograd reaches the prefix; nothing is kept)."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
        self.prefix, self.batch, self.length = prefix, batch, 0

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        pk, pv = self.prefix[layer]  # (H_kv, P, D)
        B = k.shape[0]
        return (torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2),
                torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2))


def split_prefix(flat: torch.Tensor, n_layers: int, n_kv_heads: int, head_dim: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """peft's flat prefix (P, n_layers * 2 * H_kv * D) -> per layer (k, v), each (H_kv, P, D)."""
    P = flat.shape[0]
    kv = flat.view(P, n_layers * 2, n_kv_heads, head_dim)  # (P, 2L, H_kv, D)
    kv = kv.permute(1, 2, 0, 3)  # (2L, H_kv, P, D): index 2l is layer l's keys, 2l+1 its values
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(n_layers)]


class PrefixTunedLM(_VirtualTokenLM):
    """Prefix tuning (Li & Liang 2021): per layer P learned keys and values in front of the attention's own.

    Without projection the parameter is ``prefix`` (P, n_layers * 2 * H_kv * D), peft's layout; with
    ``prefix_projection`` it is ``prefix_tokens`` (P, H_kv * D) through ``prefix_mlp`` (Linear, tanh, Linear)."""

    def __init__(self, base_model: nn.Module, num_virtual_tokens: int, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None):
        super().__init__(base_model, num_virtual_tokens)
        cfg, w = base_model.config, self._weight()
        self.token_dim = cfg.n_kv_heads * cfg.head_dim
        flat = cfg.n_layers * 2 * self.token_dim
        kw = {"device": w.device, "dtype": w.dtype}
        self.prefix_projection = prefix_projection
        if prefix_projection:
            hidden = encoder_hidden_size or self.token_dim
            self.prefix_tokens = nn.Parameter(torch.randn(num_virtual_tokens, self.token_dim, **kw))
            self.prefix_mlp = nn.Sequential(nn.Linear(self.token_dim, hidden, **kw), nn.Tanh(),
                                            nn.Linear(hidden, flat, **kw))
        else:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, flat, **kw))

    def flat_prefix(self) -> torch.Tensor:
        """(P, n_layers * 2 * H_kv * D): what peft saves as ``prompt_embeddings``."""
        return self.prefix_mlp(self.prefix_tokens) if self.prefix_projection else self.prefix

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each (H_kv, P, D)."""
        cfg = self.base_model.config
        return split_prefix(self.flat_prefix(), cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)

    @torch.no_grad()
    def new_cache(self, batch: int, max_len: int | None = None) -> StaticKVCache:
        """A cache with the prefix already in positions [0, P) of every layer (cache.length 0 real tokens)."""
        cache = super().new_cache(batch, max_len)
        P = self.num_virtual_tokens
        for i, (k, v) in enumerate(self.prefix_kv()):
            cache.k[i, :, :, :P] = k.to(cache.k.dtype)  # (B, H_kv, P, D), broadcast over the batch
            cache.v[i, :, :, :P] = v.to(cache.v.dtype)
        return cache

    def forward(self, input_ids: torch.Tensor, *, cache: StaticKVCache | None = None, start: int | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        P = self.num_virtual_tokens
        start, position_ids = self._coords(input_ids, cache, start, position_ids)
        kv = cache if cache is not None else PrefixKV(self.prefix_kv(), B)
        mask = _extend_mask(attention_mask, P, virtual_queries=False)
        out = self.base_model(input_ids, cache=kv, start=start + P, attention_mask=mask,
                              position_ids=position_ids + P, return_hidden=return_hidden)  # (B, T, V | dim)
        if cache is not None:
            cache.length = start + T  # real-token coordinates
        return out


# ---- model transforms --------------------------------------------------------------------------------


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig, tokenizer=None,
                        generator: torch.Generator | None = None) -> PromptTunedLM:
    """Wrap ``model`` with a learned prompt; the caller uses the returned module. ``init`` "text" needs a
    ``tokenizer`` (anything with ``encode(str) -> list[int]``); its ids are cut or repeated to P as in peft."""
    cfg.validate()
    wrapped = PromptTunedLM(model, cfg.num_virtual_tokens)
    table = model.embed_tokens.weight  # (V, dim)
    P = cfg.num_virtual_tokens
    with torch.no_grad():
        if cfg.init == "random":
            wrapped.prompt.copy_(torch.randn(wrapped.prompt.shape, generator=generator))
        else:
            if cfg.init == "text":
                ids_t = torch.tensor(_text_ids(tokenizer, cfg.init_text, P, "prompt tuning"), device=table.device)
            else:  # "vocab": embeddings of random token ids (peft's SAMPLE_VOCAB)
                ids_t = torch.randint(0, table.shape[0], (P,), generator=generator).to(table.device)
            wrapped.prompt.copy_(table[ids_t])  # (P, dim)
    return wrapped


def _text_ids(tokenizer, text: str, P: int, what: str) -> list[int]:
    """``text``'s ids cut or repeated to P tokens (peft's TEXT init)."""
    if tokenizer is None:
        raise LlmlabError(f"{what} init 'text' needs the model's tokenizer")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise LlmlabError(f"{what} init_text {text!r} encodes to no tokens")
    return (ids * -(-P // len(ids)))[:P]  # repeat, then cut to P


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig, tokenizer=None,
                        generator: torch.Generator | None = None) -> PrefixTunedLM:
    """Wrap ``model`` with a learned per-layer prefix; the caller uses the returned module. Initialised as
    peft's: N(0, 1) prefix (or prefix tokens, with projection; the MLP as ``nn.Linear``), or with ``init``
    "text" from the keys/values the model computes for ``init_text`` at positions [0, P)."""
    cfg.validate()
    wrapped = PrefixTunedLM(model, cfg.num_virtual_tokens, cfg.prefix_projection, cfg.encoder_hidden_size)
    with torch.no_grad():
        p = wrapped.prefix_tokens if cfg.prefix_projection else wrapped.prefix
        if cfg.init == "random":
            p.copy_(torch.randn(p.shape, generator=generator))
        else:
            P, mc = cfg.num_virtual_tokens, model.config
            ids = torch.tensor([_text_ids(tokenizer, cfg.init_text, P, "prefix tuning")], device=p.device)
            cache = model.new_cache(1, P)
            model(ids, cache=cache, start=0)
            kv = torch.stack([cache.k[:, 0], cache.v[:, 0]], dim=1)  # (L, 2, H_kv, P, D)
            kv = kv.reshape(mc.n_layers * 2, mc.n_kv_heads, P, mc.head_dim).permute(2, 0, 1, 3)  # (P, 2L, H_kv, D)
            p.copy_(kv.reshape(P, -1).to(p.dtype))  # peft's layout, see PrefixTunedLM.prefix_kv
    return wrapped


def prompt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a prompt- or prefix-tuned wrapper (``prompt``; ``prefix`` or ``prefix_tokens``
    + ``prefix_mlp.*``), detached."""
    if not isinstance(model, _VirtualTokenLM):
        raise LlmlabError("the model has no prompt or prefix tuning (apply_prompt_tuning / apply_prefix_tuning)")
    return {k: v.detach() for k, v in model.named_parameters() if not k.startswith("base_model.")}


def load_prompt_state_dict_(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy tensors from ``prompt_state_dict`` of a like model: the same keys, every shape equal."""
    ours = prompt_state_dict(model)
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LlmlabError(f"{where}: tensors do not match the model's virtual tokens ({detail})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise LlmlabError(f"{where}: {k} has shape {tuple(v.shape)}, the model needs {tuple(ours[k].shape)} "
                              "(an adapter for another base model or num_virtual_tokens)")
    with torch.no_grad():
        for k, v in sd.items():
            ours[k].copy_(v)


def mark_only_prompt_trainable_(model: nn.Module) -> int:
    """requires_grad = True for the virtual-token parameters only; returns the trainable count."""
    prompt_state_dict(model)  # raises for a model without them
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if not name.startswith("base_model."):
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
