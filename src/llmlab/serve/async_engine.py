"""The engine behind an asyncio server: one background thread runs ``Engine.step()`` while requests come
and go from the event loop.

The engine is single-threaded by design; the event loop never touches it. Requests, aborts and the
shutdown signal travel to the engine thread through a queue; each step's outputs travel back through
``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per request. A consumer that stops iterating
(a client that disconnected, a cancelled task) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from llmlab.serve.engine import Engine
from llmlab.serve.outputs import EngineError, EngineFull, EngineStats, RequestOutput, RequestParams

log = logging.getLogger(__name__)


class EngineDraining(EngineFull):
    """The server is shutting down: no new requests (HTTP 503)."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.draining = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._outputs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _outputs and _stats
        self._stats = engine.stats()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.step_seconds = 0.0  # time spent in steps (for tokens/s)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmlab-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; wait up to ``timeout`` s for running ones, then abort the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._outputs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._outputs):
            self.abort(rid)
        while self._outputs and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)

    # -- requests -------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats

    def pending(self) -> int:
        """Requests accepted and not yet finished."""
        with self._lock:
            return len(self._outputs)

    async def generate(self, request_id: str | None, prompt_ids: list[int],
                       params: RequestParams) -> AsyncIterator[RequestOutput]:
        """Outputs as they come; raises EngineError / EngineFull before the first one."""
        if self.draining:
            raise EngineDraining("the server is shutting down; retry on another instance")
        self.engine.check(prompt_ids, params)  # pure: safe outside the engine thread
        params.sampling.validate()
        if self.pending() - self.stats().running >= self.engine.config.max_waiting:
            raise EngineFull(f"{self.engine.config.max_waiting} requests are waiting (the limit); retry later")
        rid = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        out_q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._outputs:
                raise EngineError(f"request id {rid!r} is already running", param="request_id")
            self._outputs[rid] = (loop, out_q)
        self._commands.put(("add", rid, prompt_ids, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await out_q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)
            with self._lock:
                self._outputs.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        with self._lock:
            target = self._outputs.get(rid)
        if target is not None:
            loop, q = target
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                try:
                    self.engine.add_request(rid, prompt, params)
                except EngineError as e:
                    self._deliver(rid, e)
            else:
                self.engine.abort(cmd[1])

    def _run(self) -> None:
        while not self._stop:
            self._apply_commands()
            if not self.engine.has_unfinished():
                with self._lock:
                    self._stats = self.engine.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                outs = self.engine.step()
            except Exception as e:  # a bug: fail the running requests rather than hang them
                log.exception("llmlab engine step failed")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine failure: {e}"))
                self.engine.requests.clear()
                continue
            self.step_seconds += time.perf_counter() - t0
            for out in outs:
                self._deliver(out.request_id, out)
            with self._lock:
                self._stats = self.engine.stats()
