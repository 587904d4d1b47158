"""The Python API: ``llmlab.load(...)`` -> an ``LLM`` with ``.generate()``, ``.chat()``, ``.embed()``.

    >>> from llmlab import load
    >>> llm = load()                       # the embedded SmolLM2-135M-Instruct
    >>> llm.chat("What is the capital of France?", max_new_tokens=20)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from llmlab.common import LlmlabError, human_bytes, human_count, log, pick_device, pick_dtype
from llmlab.formats import load as loader
from llmlab.infer.beam import beam_search
from llmlab.infer.embed import embed_texts, truncate
from llmlab.infer.generate import chat_stop_ids, cut_at_stop, generate
from llmlab.infer.repetition import RepetitionGuard
from llmlab.infer.sample import SamplingParams, chat_sampling
from llmlab.infer.speculative import ModelDrafter, NgramDrafter, layer_skip_draft, speculative_generate
from llmlab.models.native_step import enable_native_step_
from llmlab.nn.nf4 import NF4Linear
from llmlab.nn.packed_linear import IMPLS, PackedLinear, set_impl_
from llmlab.nn.quant_linear import QuantLinear
from llmlab.tokenizer.stream import StreamDecoder


@dataclass
class DecodeOptions:
    """How ``LLM.generate`` / ``generate_batch`` / ``chat`` decode, beyond the prompt and the token budget.
    Each field is also a keyword argument of those methods (``llm.generate(p, beams=4)``)."""

    sampling: SamplingParams | None = None  # None = greedy
    stop: list[str] | None = None  # end at the first of these strings (the string itself is not returned)
    beams: int = 1  # > 1: beam search of this width
    length_penalty: float = 1.0  # beam score = log-probability / length ** length_penalty
    no_repeat_ngram_size: int = 0  # beam search never repeats an n-gram of this size; 0 = off
    speculative: str | None = None  # "ngram" (prompt lookup), "layer-skip", or a draft model source
    draft_tokens: int = 16  # most draft tokens per speculative step (fewer while drafts are rejected)
    ignore_eos: bool = False  # do not stop at end-of-sequence / end-of-turn tokens
    truncate: bool = False  # keep the end of a prompt longer than the context instead of failing
    repetition_guard: RepetitionGuard | None = None  # end a row whose tail repeats one block (plain decoding)

    @classmethod
    def merge(cls, options: DecodeOptions | None, overrides: dict[str, Any]) -> DecodeOptions:
        """``options`` (or the defaults) with the keyword arguments ``overrides`` applied over it."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected decode option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(f.name for f in fields(cls))}")
        return replace(options or cls(), **overrides)

    def validate(self) -> DecodeOptions:
        for name, low in (("beams", 1), ("no_repeat_ngram_size", 0), ("draft_tokens", 1)):
            if getattr(self, name) < low:
                raise LlmlabError(f"{name} must be >= {low}, got {getattr(self, name)}")
        return self


class LLM:
    def __init__(self, loaded: loader.Loaded):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.chat_template = loader.chat_template_of(loaded)
        self.last_spec_stats = None
        self.last_finish_reasons: list[str] = []  # per prompt of the last call: stop | length | repetition
        self.packed = any(type(m).__name__ == "PackedLinear" for m in self.model.modules())

    # ---- text generation -------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LlmlabError(f"{self.loaded.source} has no tokenizer: load a GGUF file or a folder with "
                              "tokenizer.json")
        return self.tokenizer

    def stop_ids(self) -> set[int]:
        return chat_stop_ids(self.config, self._need_tokenizer())

    def render_chat(self, messages: list[dict] | str, system: str | None = None) -> str:
        if self.chat_template is None:
            raise LlmlabError(f"{self.config.arch} models do not chat: use embed()")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return self.chat_template.render(messages, add_generation_prompt=True)

    def encode_prompt(self, text: str, max_new_tokens: int, truncate: bool = False) -> list[int]:
        ids = self._need_tokenizer().encode(text)
        room = self.config.max_seq_len - 1
        if len(ids) > room:
            if not truncate:
                raise LlmlabError(f"the prompt has {len(ids)} tokens but the context holds {self.config.max_seq_len}: "
                                  "shorten it (or pass truncate=True / --truncate to keep its end)")
            ids = ids[-room:]
        return ids

    def generate(self, prompt: str, max_new_tokens: int = 128, *, raw: bool = True,
                 on_text: Callable[[str], None] | None = None, options: DecodeOptions | None = None,
                 **decode: Any) -> str:
        """Continue ``prompt`` (as is when ``raw``, else as a user chat turn). ``decode`` takes the fields of
        ``DecodeOptions`` as keywords (``sampling=``, ``stop=``, ``beams=``, ``speculative=``, ...), applied over
        ``options``: greedy unless ``sampling`` says otherwise; ``beams`` > 1 runs beam search."""
        return self.generate_batch([prompt], max_new_tokens, raw=raw, on_text=on_text, options=options, **decode)[0]

    def generate_batch(self, prompts: list[str], max_new_tokens: int = 128, *, raw: bool = True,
                       on_text: Callable[[str], None] | None = None, options: DecodeOptions | None = None,
                       **decode: Any) -> list[str]:
        """``generate`` for several prompts at once (a ragged batch; beam search and speculative decoding
        take one prompt)."""
        if self.config.arch == "t5":
            raise LlmlabError("a T5 model answers an input text: use 'llmlab t5 generate' (llmlab.train.t5.answer)")
        if not self.config.is_causal:
            raise LlmlabError("an encoder model does not generate text: use embed()")
        opts = DecodeOptions.merge(options, decode).validate()
        self.last_finish_reasons = []
        sampling = (opts.sampling or SamplingParams()).validate()
        if max_new_tokens < 1:
            raise LlmlabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if opts.beams > 1 and not sampling.greedy:
            raise LlmlabError("beam search is deterministic: drop the sampling flags or use beams=1")
        if not prompts or any(not isinstance(p, str) or not p for p in prompts):
            raise LlmlabError("the prompt is empty: give some text")
        if (opts.beams > 1 or opts.speculative) and len(prompts) > 1:
            raise LlmlabError("beam search and speculative decoding take one prompt at a time")
        tok = self._need_tokenizer()
        texts = prompts if raw else [self.render_chat(p) for p in prompts]
        ids = [self.encode_prompt(t, max_new_tokens, opts.truncate) for t in texts]
        stops = set() if opts.ignore_eos else self.stop_ids()
        stream = StreamDecoder(tok)

        def emit(tid: int) -> None:
            if on_text is not None and tid not in stops:
                piece = stream.push(tid)
                if piece:
                    on_text(piece)

        def flush() -> None:  # the bytes of a character still incomplete when decoding ended
            rest = stream.flush() if on_text is not None else ""
            if rest:
                on_text(rest)

        try:
            if opts.beams > 1:
                best = beam_search(self.model, ids[0], max_new_tokens, opts.beams, length_penalty=opts.length_penalty,
                                   eos_ids=stops, no_repeat_ngram_size=opts.no_repeat_ngram_size)[0]
                outs = [best.ids]
                for t in best.ids:
                    emit(t)
            elif opts.speculative:
                drafter = self._drafter(opts.speculative, len(ids[0]) + max_new_tokens + opts.draft_tokens + 1)
                out, self.last_spec_stats = speculative_generate(
                    self.model, ids[0], max_new_tokens, drafter, gamma=opts.draft_tokens, params=sampling,
                    stop_ids=stops, on_token=emit)
                outs = [out]
            else:
                cb = (lambda row, t: emit(t)) if on_text is not None and len(ids) == 1 else None
                done = generate(self.model, ids, max_new_tokens, sampling, stop_ids=stops, stop_strings=opts.stop,
                                tokenizer=tok, on_token=cb, repetition_guard=opts.repetition_guard)
                flush()
                self.last_finish_reasons = [c.finish_reason for c in done]
                return [c.text for c in done]
        except ValueError as e:
            raise LlmlabError(str(e)) from None
        flush()
        return [cut_at_stop(tok.decode([t for t in out if t not in stops], skip_special=True), opts.stop)
                for out in outs]

    def _drafter(self, speculative: str, max_len: int):
        if speculative == "ngram":
            return NgramDrafter()
        if speculative == "layer-skip":
            return ModelDrafter(layer_skip_draft(self.model), max_len)
        draft = load(speculative, device=str(next(self.model.parameters()).device), packed=self.packed)
        if draft.config.vocab_size != self.config.vocab_size or not draft.config.is_causal:
            raise LlmlabError(f"draft model {speculative} has a vocabulary of {draft.config.vocab_size} tokens, the "
                              f"target {self.config.vocab_size}: a draft must share the target's tokenizer")
        if draft.tokenizer is not None and draft.tokenizer.vocab != self._need_tokenizer().vocab:
            raise LlmlabError(f"draft model {speculative} uses a different tokenizer than the target")
        return ModelDrafter(draft.model, max_len)

    def chat(self, messages: list[dict] | str, max_new_tokens: int = 256, *, system: str | None = None,
             on_text: Callable[[str], None] | None = None, **kwargs) -> str:
        """One chat turn. Greedy unless ``sampling=`` says otherwise (``chat_sampling()`` gives what the
        ``llmlab chat`` REPL uses); a reply that loops is ended by the default ``RepetitionGuard``
        (``repetition_guard=None`` turns it off; ``last_finish_reasons`` says "repetition" when it fired)."""
        kwargs.setdefault("repetition_guard", RepetitionGuard())
        return self.generate(self.render_chat(messages, system), max_new_tokens, raw=True, on_text=on_text, **kwargs)

    def chat_sampling(self, greedy: bool = False, **overrides) -> SamplingParams:
        """The sampling a chat uses: the model file's recommended settings (GGUF ``general.sampling.*`` or
        ``generation_config.json``) over ``CHAT_DEFAULTS``, then ``overrides``; see ``infer.sample``."""
        return chat_sampling(self.loaded.sampling_defaults, greedy=greedy, **overrides)

    # ---- embeddings --------------------------------------------------------------------------
    def embed(self, texts: list[str] | str, batch_size: int = 32, normalize: bool = True, pooling: str = "mean",
              dim: int | None = None, precision: str = "auto") -> torch.Tensor:
        """Sentence embeddings (N, dim) from a BERT model (mean or CLS pooling, L2-normalised by default);
        ``dim``: keep the first ``dim`` coordinates, re-normalised (a Matryoshka-trained model's nested size);
        ``precision``: auto (bf16 matrix products on a CPU with bf16 units, else fp32), float32 or bfloat16."""
        if self.config.arch != "bert":
            raise LlmlabError("embed() needs an encoder model, e.g. load('all-minilm-l6-v2')")
        tok = self._need_tokenizer()
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_len = min(self.config.max_seq_len, 256)  # sentence-transformers' max_seq_length for MiniLM
        emb = embed_texts(self.model, tok, texts, batch_size=batch_size, pooling=pooling, normalize=normalize,
                          max_tokens=max_len, precision=precision)
        return emb if dim is None else truncate(emb, dim)

    # ---- description -----------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by parameters and buffers, each storage counted once (tied weights share one)."""
        seen, total = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def info(self) -> dict:
        cfg, tok = self.config, self.tokenizer
        n_params = parameter_count(self.model)
        p = next(self.model.parameters())
        return {
            "source": self.loaded.source, "format": self.loaded.file_format, "architecture": cfg.arch,
            "parameters": n_params, "parameters_human": human_count(n_params), "layers": cfg.n_layers,
            "dim": cfg.dim, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len,
            "rope_theta": cfg.rope_theta if cfg.arch == "llama" else None, "tied_embeddings": cfg.tie_embeddings,
            "file_tensor_types": self.loaded.tensor_types, "dtype": str(p.dtype).removeprefix("torch."),
            "device": str(p.device), "memory": human_bytes(self.memory_bytes()),
            "tokenizer": type(tok).__name__ if tok is not None else None,
            "tokenizer_pre": getattr(tok, "pre_steps", None) and len(tok.pre_steps),
            "chat_template": (self.loaded.chat_template or "")[:60] + ("..." if self.loaded.chat_template else
                                                                        "(none: ChatML fallback)"),
            "load_seconds": round(self.loaded.load_seconds, 3),
        }


def parameter_count(model: torch.nn.Module) -> int:
    """The model's parameters as its float original has them: a quantized layer (codes and scales in buffers:
    ``QuantLinear``, ``NF4Linear``, ``PackedLinear``) counts its out x in weight and its bias; a tied weight
    counts once."""
    quantized = (QuantLinear, NF4Linear, PackedLinear)
    n, seen = 0, set()
    for m in model.modules():
        if isinstance(m, quantized):
            n += m.out_features * m.in_features
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen or (isinstance(m, quantized) and name != "bias"):  # PEQA's trainable scales
                continue
            seen.add(id(p))
            n += p.numel()
    return n


KV_DTYPES = {"float32": None, "float16": torch.float16}  # kv_dtype -> DecoderLM.kv_cache_dtype (None: the weights')


def load(source: str | Path | None = None, *, dtype: str = "float32", device: str = "cpu",
         attn_impl: str = "sdpa", use_tokenizers_lib: bool = True, packed: bool = False,
         packed_kernel: str = "int8r", kv_dtype: str = "float32") -> LLM:
    """A path (GGUF file or HF folder), a preset name, an embedded model name, or None for SmolLM2.

    ``packed=True`` runs the linear layers on packed GGML blocks (the GGUF's own, or Q8_0 for other
    models) through ``packed_kernel``: ``"int8r"`` (the default: integer dot products on Q8-quantized
    activations plus a residual Q8 block where a block has an outlier, and the whole decode step in C,
    ``llmlab.models.native_step``; perplexity within 0.2% of the reference, the top token the reference's at
    99.1-99.4% of positions), ``"int8"`` (llama.cpp's arithmetic, no residual: the fastest, 97.5%, +0.6% perplexity),
    ``"int8x2"`` (a residual for every block: 100%), ``"float"`` (float activations: logits within ~1e-4 of the
    reference path) or ``"reference"`` (dequantize + ``F.linear``). See ``llmlab.nn.packed_linear``.
    ``kv_dtype``: the KV caches ``model.new_cache`` makes, "float32" (default) or "float16" (half the bytes that
    every decode step reads and holds, as llama.cpp's default cache; the C step writes and reads it too; the speed
    gain at batch was not consistent in the README's runs, and the logits move by the keys' and values'
    half-precision rounding).
    ``use_tokenizers_lib`` lets ``encode_batch`` go through Hugging Face ``tokenizers`` when installed."""
    if packed_kernel not in IMPLS:
        raise LlmlabError(f"packed_kernel must be one of {', '.join(IMPLS)}, not {packed_kernel!r}")
    if kv_dtype not in KV_DTYPES:
        raise LlmlabError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {kv_dtype!r}")
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if packed and torch_dtype != torch.float32:
        # The packed layers multiply int8 (or float32) activations whatever the model's dtype; half-precision
        # norms and attention around them only add conversions (measured slower than float32 on CPUs without
        # bf16 units), so the packed path stays float32 and says so.
        log.warning("llmlab: --dtype %s with --packed: the packed path computes in int8/float32; "
                    "use --no-packed for %s weights", dtype, dtype)
        torch_dtype = torch.float32
    loaded = loader.load_model(source, dtype=torch_dtype, device=dev, attn_impl=attn_impl,
                               use_tokenizers_lib=use_tokenizers_lib, packed=packed)
    if packed and packed_kernel in ("int8x2", "int8r"):
        set_impl_(loaded.model, packed_kernel)
        loaded.native_step = enable_native_step_(loaded.model)  # the C step runs either integer impl
    elif packed and packed_kernel != "int8":
        set_impl_(loaded.model, packed_kernel)  # the native step steps aside: it runs the integer impls only
        loaded.native_step = f"eager step: packed kernel {packed_kernel}"
    if KV_DTYPES[kv_dtype] is not None:
        if not hasattr(loaded.model, "kv_cache_dtype"):
            raise LlmlabError(f"--kv-dtype {kv_dtype}: this model's caches keep its own dtype (decoder-only models "
                              "choose); use float32")
        loaded.model.kv_cache_dtype = KV_DTYPES[kv_dtype]
    return LLM(loaded)
