"""Iteration-level scheduling with chunked prefill and preemption by recomputation.

Orca (Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-Based Generative Models",
OSDI '22) schedules per *iteration* rather than per batch: every step may admit new requests and retire
finished ones, so a short reply never waits for the longest one in its batch. Each step has a token
budget (``max_batched_tokens``): running sequences come first (a decode costs one token, a prompt
still being read costs a chunk of it: chunked prefill, as Sarathi / vLLM), then waiting ones in arrival
order while the budget, the sequence limit and the free KV blocks allow.

When a running sequence needs a block and none is free, the most recently arrived request is
*preempted*: its blocks are released and its sequences go back to the front of the queue, to be
recomputed later from their tokens (prompt and output so far; the prefix cache often still holds much
of it). Recomputation, not swapping: on a CPU the copy would cost about as much as the recompute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from llmlab.serve.block_manager import BlockManager
from llmlab.serve.sequence import Request, Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    n_tokens: int  # positions computed this step (from seq.num_computed on), the draft included


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batched_tokens: int,
                 copy_block: Callable[[int, int, int], None]):
        self.blocks = blocks
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.copy_block = copy_block
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.preemptions = 0
        self.on_cannot_grow: Callable[[Sequence], None] | None = None  # set by the engine

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and give its blocks back (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.table)

    def _preempt(self, request: Request) -> None:
        for seq in reversed([s for s in self.running if s.request is request]):
            self.running.remove(seq)
            self.blocks.release(seq.table)
            seq.num_computed, seq.hashes, seq.draft = 0, [], []
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)
        self.preemptions += 1

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Blocks for ``n`` more positions of a running sequence, preempting later requests as needed.
        False when ``seq`` itself had to go (preempted, or alone and unable to grow)."""
        while not self.blocks.can_grow(seq.table, seq.num_computed + n, seq.num_computed):
            later = [s.request for s in self.running if s.request.arrival > seq.request.arrival]
            if later:
                self._preempt(max(later, key=lambda r: r.arrival))
            elif any(s.request is not seq.request for s in self.running):
                self._preempt(seq.request)  # only earlier requests are left: they keep their blocks
                return False
            else:
                self.on_cannot_grow(seq)  # the pool is too small for this request on its own
                return False
        self.blocks.grow(seq.table, seq.num_computed + n, seq.num_computed, self.copy_block)
        return True

    def schedule(self) -> list[Scheduled]:
        budget = self.max_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq not in self.running:
                continue  # preempted or finished while making room
            if budget <= 0:
                break
            if seq.draft and seq.to_compute > budget:
                seq.draft = []  # no room left to check a speculative draft this step
            n = min(seq.to_compute, budget)
            running_before = len(self.running)
            if not self._grow(seq, n):
                preempted = True
                continue
            preempted |= len(self.running) < running_before
            out.append(Scheduled(seq, n))
            budget -= n
        if preempted:
            return [s for s in out if s.seq.status is Status.RUNNING and s.seq in self.running]
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = seq.num_computed == 0 and not seq.table
            if fresh:
                cached = self.blocks.match_prefix(seq.tokens, seq.table)
                if seq.request.params.prompt_logprobs:  # every prompt position must be computed
                    self.blocks.release(seq.table)
                    cached = 0
                seq.num_computed = cached
                if seq.num_generated == 0:
                    seq.request.cached_tokens = cached
            n = min(seq.to_compute, budget)
            if not self.blocks.can_grow(seq.table, seq.num_computed + n, seq.num_computed):
                if fresh:
                    self.blocks.release(seq.table)
                    seq.num_computed = 0
                break
            self.blocks.grow(seq.table, seq.num_computed + n, seq.num_computed, self.copy_block)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.running.sort(key=lambda s: s.request.arrival)
            out.append(Scheduled(seq, n))
            budget -= n
        return out
