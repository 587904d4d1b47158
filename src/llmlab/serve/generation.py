"""One OpenAI request in flight: its engine requests ("jobs": one per prompt), its choices (one per output
sequence: the text so far through ``serve/text.py``, finish reason, log-probs) and the engine streams merged
into one.

A completions request with several prompts, or ``n`` > 1, is several sequences; they all start at once and
their outputs are read concurrently, each reader a task, so that closing the merged stream (the client
went away, or every choice hit a stop string) cancels the readers and aborts the engine requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmlab.serve import protocol as p
from llmlab.serve.metrics import RequestTimer
from llmlab.serve.outputs import EngineFull, RequestOutput, RequestParams, TokenLogprob
from llmlab.serve.text import TextTracker


@dataclass
class Choice:
    """One output sequence (OpenAI "choice"): its text so far, finish reason and log-probs."""

    index: int
    tracker: TextTracker
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list[tuple[int, TokenLogprob, int]] = field(default_factory=list)  # (id, log-prob, text offset)
    sent_first: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, ids: list[int], lps: list[TokenLogprob] | None, finish: str | None) -> tuple[str, int]:
        """New ids of this sequence -> (text safe to send, how many of the log-prob entries are new)."""
        if self.done:
            return "", 0
        text, before = "", len(self.logprobs)
        for j, tid in enumerate(ids):
            offset = len(self.tracker.text) + len(self.tracker.pending)
            text += self.tracker.push([tid])
            self.tokens += 1
            if lps is not None and j < len(lps):
                self.logprobs.append((tid, lps[j], offset))
            if self.tracker.stopped:
                self.finish_reason = "stop"
                return text, len(self.logprobs) - before
        if finish is not None:
            text += self.tracker.finish()
            self.finish_reason = finish
        return text, len(self.logprobs) - before


@dataclass
class Job:
    """One engine request: a prompt and its ``n`` choices (``first`` = the index of choice 0)."""

    request_id: str
    prompt_ids: list[int]
    params: RequestParams
    first: int
    prompt_text: str = ""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0
    finished: bool = False


async def start_jobs(engine, jobs: list[Job]) -> list[tuple[AsyncIterator[RequestOutput], RequestOutput]]:
    """Submit every job at once and wait for each one's first output, so that a refusal (EngineError,
    EngineFull) is an HTTP error rather than a broken stream. On any refusal the others are aborted."""
    its = [engine.generate(j.request_id, j.prompt_ids, j.params) for j in jobs]
    firsts = await asyncio.gather(*(anext(it) for it in its), return_exceptions=True)
    failures = [f for f in firsts if isinstance(f, BaseException)]
    if failures:
        for it, f in zip(its, firsts, strict=True):
            if not isinstance(f, BaseException):
                await it.aclose()
        raise next((f for f in failures if isinstance(f, EngineFull)), failures[0])
    return list(zip(its, firsts, strict=True))


async def pump(k: int, it, first, queue: asyncio.Queue) -> None:
    try:
        queue.put_nowait((k, first))
        async for out in it:
            queue.put_nowait((k, out))
    except Exception as e:  # surfaces in the consumer
        queue.put_nowait((k, e))
    finally:
        await it.aclose()  # aborts the engine request unless it finished
        queue.put_nowait((k, None))


async def merged_outputs(started) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(job index, output) from all engine requests as they come. Closing this generator cancels the
    readers, which aborts the unfinished requests; its cleanup never awaits (it may run in a cancelled scope)."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(pump(k, it, first, queue)) for k, (it, first) in enumerate(started)]
    live = len(tasks)
    try:
        while live:
            k, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class Generation:
    """One completions / chat request in flight: its jobs, choices and counters."""

    jobs: list[Job]
    choices: list[Choice]
    timer: RequestTimer
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def apply(self, k: int, out: RequestOutput) -> list[tuple[Choice, str, int]]:
        """Feed one engine output into its choices -> (choice, new text, new log-prob count) per touched choice."""
        job = self.jobs[k]
        if out.prompt_logprobs is not None:
            job.prompt_logprobs = out.prompt_logprobs
        job.cached_tokens = max(job.cached_tokens, out.cached_tokens)
        job.finished = job.finished or out.finished
        self.timer.token(sum(len(s.new_ids) for s in out.outputs))
        touched = []
        for so in out.outputs:
            choice = self.choices[job.first + so.index]
            if not choice.done:
                text, n_lp = choice.feed(so.new_ids, so.logprobs, so.finish_reason)
                touched.append((choice, text, n_lp))
        return touched

    def all_done(self) -> bool:
        return all(c.done for c in self.choices)

    def usage(self) -> p.Usage:
        prompt = sum(len(j.prompt_ids) for j in self.jobs)
        completion = sum(c.tokens for c in self.choices)
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=sum(j.cached_tokens
                                                                                      for j in self.jobs)))
