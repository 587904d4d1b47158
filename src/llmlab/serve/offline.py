"""Offline text completion on the serving engine: submit text prompts, collect the texts as each one ends.

``Engine.generate`` runs a fixed list of id prompts to the end. A data pipeline (Self-Instruct,
``data/self_instruct.py``; preference sampling, ``data/preferences.py``) wants more: it keeps the engine full,
reads each completion the moment it ends, and builds the next prompts from what it has read, so the batch never
drains while the slowest request finishes (continuous batching, Orca, OSDI '22). ``TextCompleter`` is that
loop's edge: ``submit(text, n, seed)`` -> a handle; ``step()`` runs one engine iteration and returns the
requests that ended in it as ``Completion`` (n texts, n finish reasons); ``complete(texts, n)`` runs a list to
the end. Texts are decoded without the stop ids (end of turn / end of text), special tokens skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from llmlab.infer.sample import SamplingParams
from llmlab.serve.engine import Engine
from llmlab.serve.outputs import RequestParams


@dataclass
class Completion:
    handle: int
    texts: list[str]  # one per sample (n)
    finish_reasons: list[str]  # "stop" (a stop id) | "length" (max_tokens) | "abort"
    tokens: int  # new tokens over the n samples


class TextCompleter:
    def __init__(self, engine: Engine, tokenizer, sampling: SamplingParams, max_tokens: int,
                 stop_ids: set[int] | frozenset[int] = frozenset()):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling.validate()
        self.max_tokens, self.stop_ids = max_tokens, frozenset(stop_ids)
        self._handles = itertools.count()
        self._open: dict[str, tuple[int, list[list[int]], list[str]]] = {}  # request id -> (handle, ids, reasons)
        self.generated_tokens = 0

    @property
    def pending(self) -> int:
        """Requests submitted and not yet returned by ``step``."""
        return len(self._open)

    @property
    def generating(self) -> int:
        """Samples still generating: with n > 1 a request stays pending until its last sample ends, and its
        finished samples no longer use the batch, so a caller keeping the engine full counts these."""
        return sum(r == "" for _, _, reasons in self._open.values() for r in reasons)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def submit(self, text: str, n: int = 1, seed: int | None = None) -> int:
        """Queue ``text`` (already rendered: raw text or a chat template's output) for ``n`` samples."""
        handle = next(self._handles)
        rid = f"offline-text-{handle}"
        sampling = dataclasses.replace(self.sampling, seed=seed) if seed is not None else self.sampling
        params = RequestParams(max_tokens=self.max_tokens, sampling=sampling, n=n, stop_ids=self.stop_ids)
        self.engine.add_request(rid, self.encode(text), params)
        self._open[rid] = (handle, [[] for _ in range(n)], [""] * n)
        return handle

    def step(self) -> list[Completion]:
        done = []
        for out in self.engine.step():
            handle, ids, reasons = self._open[out.request_id]
            for so in out.outputs:
                ids[so.index].extend(so.new_ids)
                self.generated_tokens += len(so.new_ids)
                if so.finish_reason:
                    reasons[so.index] = so.finish_reason
            if out.finished:
                del self._open[out.request_id]
                texts = [self.tokenizer.decode([t for t in row if t not in self.stop_ids], skip_special=True)
                         for row in ids]
                done.append(Completion(handle, texts, reasons, sum(map(len, ids))))
        return done

    def complete(self, texts: list[str], n: int = 1, seeds: list[int] | None = None) -> list[Completion]:
        """Every text to the end (``n`` samples each), in the order given."""
        got: dict[int, Completion] = {}
        order: list[int] = []
        queue = list(enumerate(texts))
        while queue or self.pending:
            while queue and self.pending < self.engine.config.max_waiting:
                i, text = queue.pop(0)
                order.append(self.submit(text, n, None if seeds is None else seeds[i]))
            for c in self.step():
                got[c.handle] = c
        return [got[h] for h in order]
