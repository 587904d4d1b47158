"""Next-token selection on batched logits: greedy, temperature, top-k, top-p (nucleus), min-p,
repetition / frequency / presence penalties, logit bias, per-request seeds.

- top-k: Fan et al. 2018, "Hierarchical Neural Story Generation", arXiv:1805.04833.
- top-p: Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751.
- min-p: Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling", arXiv:2407.01082.
- repetition penalty: Keskar et al. 2019, "CTRL", arXiv:1909.05858 (divide positive logits, multiply
  negative ones, for every token already seen in prompt or output).
- frequency / presence penalties: OpenAI API semantics, over the generated tokens only.

Order (as transformers): penalties and bias -> temperature -> top-k -> top-p -> min-p -> sample.
Shapes: logits (B, V) -> token ids (B,).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmlab.common import LlmlabError


@dataclass
class SamplingParams:
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; higher = more random"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: keep the smallest set with this mass, in (0, 1]"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability, in [0, 1]"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL penalty on seen tokens, > 0; 1 = off"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "minus this x count of each generated token"})
    presence_penalty: float = field(default=0.0, metadata={"help": "minus this once per generated token"})
    logit_bias: dict[int, float] = field(default_factory=dict, metadata={"cli": False})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})

    def validate(self) -> SamplingParams:
        if not self.temperature >= 0:
            raise LlmlabError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise LlmlabError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlmlabError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise LlmlabError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise LlmlabError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise LlmlabError(f"{name} must be in [-2, 2] (OpenAI's range), got {getattr(self, name)}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
                    counts: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V); ``seen`` (B, V) bool: tokens in prompt or output; ``counts`` (B, V): output counts."""
    if p.repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if counts is not None and (p.frequency_penalty or p.presence_penalty):
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        bias = torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
        logits = logits.clone()
        logits[:, ids] += bias
    return logits


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p as -inf masks. (B, V) -> (B, V)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        logits = _top_p(logits, p.top_p)
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = p.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


TOP_P_CANDIDATES = (64, 1024)  # top-k sizes tried before a full sort of the vocabulary


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus mask: drop a token when the mass of the tokens ranked above it is >= top_p (the most likely one
    is always kept; transformers' rule, inclusive at the boundary). (B, V) -> (B, V).

    Fast path: the nucleus of a language model's distribution is nearly always among its few most likely
    tokens. ``topk(k)`` finds them (0.1 ms against 3.8 ms for a sort of SmolLM2's 49,152 logits, one core);
    once their mass reaches top_p in every row, every token outside them is dropped and the mask is decided
    within the k, the same set as the sort's up to float rounding of the running sums (``tests/
    test_sample_exact.py``). Otherwise a larger k, then the full sort."""
    V = logits.shape[-1]
    for k in TOP_P_CANDIDATES:
        if 4 * k > V:
            break
        vals, idx = torch.topk(logits, k, dim=-1)  # (B, k), descending
        probs = (vals - torch.logsumexp(logits, -1, keepdim=True)).exp()  # (B, k)
        cum = probs.cumsum(-1)  # (B, k)
        if bool((cum[:, -1] >= top_p).all()):  # the (k+1)-th token and all after it are dropped
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, (cum - probs) < top_p)
            return logits.masked_fill(~keep, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[:, -1] = False  # always keep the most likely token
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The sampling distribution (B, V) of (penalized) logits. Extreme but valid parameters (a temperature or
    a repetition penalty of 1e-300) overflow to inf and NaN; such a row becomes its limit, a one-hot at the
    largest logit, rather than an error from ``torch.multinomial``."""
    probs = warp(logits, p).softmax(-1)
    bad = ~torch.isfinite(probs).all(-1)  # (B,)
    if bool(bad.any()):
        top = torch.nan_to_num(logits[bad], nan=float("-inf")).argmax(-1)
        probs[bad] = torch.nn.functional.one_hot(top, probs.shape[-1]).to(probs.dtype)
    return probs


def select(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token for each row. logits (B, V) float -> (B,) int64."""
    logits = apply_penalties(logits.float(), p, seen, counts)
    if p.greedy:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, p), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# What a chat uses when neither the user nor the model file says otherwise: greedy decoding of a small
# model loops ("a leaf's fate is determined" x 80), so a chat samples, as chat UIs do by default
# (llama.cpp's server: temperature 0.8, top-p 0.95; Ollama: 0.8 / 0.9 and repeat penalty 1.1), with a
# mild CTRL repetition penalty.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


def chat_sampling(recommended: dict[str, float] | None = None, greedy: bool = False,
                  **overrides) -> SamplingParams:
    """Sampling for a chat turn: ``CHAT_DEFAULTS``, then the model file's ``recommended`` settings, then
    the caller's ``overrides`` (None values ignored). ``greedy=True`` starts from plain greedy decoding
    instead (overrides still apply, e.g. a repetition penalty)."""
    values = {} if greedy else {**CHAT_DEFAULTS, **(recommended or {})}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**values).validate()
