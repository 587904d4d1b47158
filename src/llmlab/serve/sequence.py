"""A request and its sequences, as the scheduler and the engine see them (token ids only).

A request holds ``n`` sequences (1 until its prompt is computed; then it forks, sharing the prompt's KV
blocks) or, for beam search, its live beams. A sequence's KV covers ``tokens[:num_computed]``; the rest
(the prompt while prefill is under way, or the newest sampled token) is computed in a later step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from llmlab.serve.outputs import RequestParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n outputs
    tokens: list[int]  # prompt + generated
    num_computed: int = 0  # positions whose keys/values are in the blocks of ``table``
    table: list[int] = field(default_factory=list)  # block table
    hashes: list[int] = field(default_factory=list)  # hashes of its full blocks (prefix cache)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # per-sequence RNG: the same samples in any batch
    draft: list[int] = field(default_factory=list)  # speculative tokens checked in the current step
    new_ids: list[int] = field(default_factory=list)  # generated since the last output
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    last_logprobs: torch.Tensor | None = None  # beam search: (V,) log-probs waiting for the other beams
    reported: bool = False  # its finish reason has been sent

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.request.prompt_len

    @property
    def to_compute(self) -> int:
        """Positions still without KV in this step's view (the draft included)."""
        return len(self.tokens) + len(self.draft) - self.num_computed


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    params: RequestParams
    arrival: int  # admission order: earlier requests are scheduled first and preempted last
    max_tokens: int = 0  # resolved budget of new tokens (params.max_tokens or up to the context)
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # the n > 1 sequences exist (after the prompt's first logits)
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    beam: object | None = None  # infer.beam.BeamState for beam-search requests
    finished_outputs: list = field(default_factory=list)  # beam search: final hypotheses

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)
