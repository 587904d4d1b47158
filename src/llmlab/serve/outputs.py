"""What goes into the serving engine and what comes out: per-request parameters, token log-probabilities,
incremental outputs and the engine's counters. Token ids only; text lives at the edge (``serve/text.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmlab.infer.sample import SamplingParams


class EngineError(ValueError):
    """A request the engine refuses. ``param`` names the offending field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class EngineFull(EngineError):
    """The waiting queue is at its limit: retry later (HTTP 429/503 with Retry-After)."""


@dataclass
class RequestParams:
    """Everything per request except the prompt. ``max_tokens`` None = up to the context limit."""

    max_tokens: int | None = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1  # independent samples sharing the prompt's KV blocks (copy-on-write)
    stop_ids: frozenset[int] = frozenset()  # ids that end a sequence (EOS, end of turn), included in its ids
    ignore_eos: bool = False  # keep going past stop ids (benchmarks)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k most likely
    prompt_logprobs: bool = False  # log-probs of the prompt tokens (OpenAI completions' echo + logprobs)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most likely first


@dataclass
class SeqOutput:
    """New tokens of one of the request's ``n`` sequences since the last output."""

    index: int
    new_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per new id when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[SeqOutput]
    prompt_len: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, first entry None (no context)
    finished: bool = False  # all n sequences finished
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    preemptions: int = 0
    prefix_queries: int = 0  # prompt blocks looked up in the prefix cache
    prefix_hits: int = 0  # ... found there
    prompt_tokens: int = 0  # computed (not served from cache)
    generated_tokens: int = 0
    steps: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
