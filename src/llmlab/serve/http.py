"""The HTTP server: an OpenAI-compatible API over the serving engine, a metrics endpoint and the web chat page.

Specs: the OpenAI API reference (completions, chat completions, embeddings, models; the error object
``{"error": {"message", "type", "param", "code"}}``; streamed chunks ``chat.completion.chunk`` /
``text_completion``), Server-Sent Events (WHATWG HTML, "Server-sent events": ``data: ...`` lines, a blank line
after each event, ``data: [DONE]`` last, as OpenAI sends), and the Prometheus text exposition format.

Routes: ``GET /health`` (200, or 503 while draining), ``GET /metrics``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /`` (web chat page).
With an API key every ``/v1`` route needs ``Authorization: Bearer KEY``; ``/``, ``/health`` and ``/metrics``
stay open.

Context policy, with P prompt tokens, a context of L tokens and M = ``max_tokens``:
- M given: P + M must be <= L, else 400 naming P, M and L (param ``max_tokens``);
- M not given: M = L - P (completions default to OpenAI's 16 instead), and P must be < L, else 400 naming P
  and L (param ``messages`` or ``prompt``).
``max_tokens: 0`` (completions) returns no new text; with ``echo`` and ``logprobs`` it scores the prompt, as
lm-evaluation-harness's ``local-completions`` backend does.

Errors always come in OpenAI's shape: 400 for anything wrong with the request (the message names the field
and the limit, ``param`` its path), 401 bad key, 404 unknown model or route, 413 body over the limit (refused
from its Content-Length, or once the bytes read pass it), 415 not JSON, 429 + Retry-After when the engine's
queue is full, 503 + Retry-After while draining, 500 only for bugs (logged).

Streams and disconnects: each engine request is read by its own task; a client that goes away (or a
response whose every choice hit a stop string) cancels those tasks, and closing the engine's iterator aborts
the request and frees its KV blocks (``AsyncEngine.generate``).

The caller starts and shuts down the engine (``llmlab serve`` in ``cli.py``, or a test).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.resources
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.common import LlmlabError
from llmlab.serve import protocol as p
from llmlab.serve.errors import ApiError, Gate, api_error_response, error_response, validation_error
from llmlab.serve.generation import Choice, Generation, Job, merged_outputs, start_jobs
from llmlab.serve.metrics import CONTENT_TYPE, RequestTimer, ServerMetrics
from llmlab.serve.outputs import EngineError, EngineFull, RequestParams, TokenLogprob
from llmlab.serve.text import TextTracker, token_piece

log = logging.getLogger("llmlab.serve")

MAX_BODY_BYTES = 2 * 1024 * 1024
RETRY_AFTER_S = 1  # engine queue full: a step or two frees room
DRAIN_RETRY_AFTER_S = 30  # draining: the process is going away; a load balancer retries elsewhere


# ---- server-sent events ------------------------------------------------------------------------------------------
class _EventStream(StreamingResponse):
    """A text/event-stream response that always closes its generator, so the engine requests behind it are
    cancelled the moment the client goes away (Starlette stops iterating but leaves the closing to the GC)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _event(payload) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


# ---- the application --------------------------------------------------------------------------------------------
@dataclass
class EmbeddingModel:
    """What /v1/embeddings needs: a name, ``embed(texts) -> (N, D)`` L2-normalised rows, and a token count."""

    name: str
    embed: Callable[[list[str]], torch.Tensor]
    count_tokens: Callable[[list[str]], int] = lambda texts: 0


class _Server:
    def __init__(self, engine, *, tokenizer, model_name: str, render_chat, stop_ids, recommended_sampling,
                 embedding: EmbeddingModel | None, aliases, metrics: ServerMetrics):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.render_chat, self.stop_ids = render_chat, frozenset(stop_ids)
        self.recommended = dict(recommended_sampling or {})
        self.embedding = embedding
        self.names = {model_name, *aliases}
        self.metrics = metrics
        self.created = int(time.time())
        self.embed_lock = asyncio.Lock()  # one embedding batch at a time: torch already uses every core

    # -- shared checks -----------------------------------------------------------------------------------------
    @property
    def context(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab(self) -> int:
        return min(self.engine.engine.vocab_size, getattr(self.tok, "vocab_size", 1 << 62))

    def admit(self) -> None:
        if getattr(self.engine, "draining", False):
            raise ApiError(503, "the server is shutting down: retry on another instance", code="draining",
                           type="service_unavailable", headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})

    def check_model(self, name: str | None, embedding: bool = False) -> None:
        if name is None:
            return
        if embedding:
            if self.embedding is not None and name in (self.embedding.name, "default"):
                return
            served = repr(self.embedding.name) if self.embedding else "no embedding model (--embedding-model)"
        else:
            if name in self.names:
                return
            served = repr(self.model_name)
        raise ApiError(404, f"the model {name!r} does not exist: this server serves {served}", param="model",
                       code="model_not_found")

    def budget(self, P: int, M: int | None, prompt_param: str) -> int | None:
        L = self.context
        if P == 0:
            raise ApiError(400, "the prompt is empty: give at least one token", param=prompt_param)
        if M is not None and P + M > L:
            raise ApiError(400, f"the prompt has {P} tokens and max_tokens is {M}: {P + M} tokens, more than the "
                                f"model's context of {L} tokens; lower max_tokens to {max(0, L - P)} or shorten the "
                                f"prompt", param="max_tokens", code="context_length_exceeded")
        if M is None and P >= L:
            raise ApiError(400, f"the prompt has {P} tokens and the model's context is {L} tokens: no room for a "
                                f"reply; shorten the {prompt_param}", param=prompt_param,
                           code="context_length_exceeded")
        return M

    def check_common(self, body: p._Sampling) -> None:
        max_n = self.engine.engine.config.max_n
        if body.n is not None and body.n > max_n:
            raise ApiError(400, f"n: must be <= {max_n} on this server (got {body.n})", param="n")
        for key in body.logit_bias or {}:
            if int(key) >= self.vocab:
                raise ApiError(400, f"logit_bias: token id {key} is outside the vocabulary [0, {self.vocab})",
                               param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only with stream: true", param="stream_options")

    def params(self, body: p._Sampling, sampling, max_tokens: int | None, logprobs: int | None,
               prompt_logprobs: bool = False) -> RequestParams:
        return RequestParams(max_tokens=max_tokens, sampling=sampling, n=body.n or 1,
                             stop_ids=frozenset() if body.ignore_eos else self.stop_ids,
                             ignore_eos=bool(body.ignore_eos), logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def new_generation(self, prefix: str, prompts: list[tuple[list[int], str]], params: RequestParams,
                       stops: list[str]) -> Generation:
        rid = f"{prefix}-{secrets.token_hex(12)}"
        n = params.n
        jobs = [Job(f"{rid}-{k}", ids, params, k * n, text) for k, (ids, text) in enumerate(prompts)]
        choices = [Choice(i, TextTracker(self.tok, stops)) for i in range(len(jobs) * n)]
        return Generation(jobs, choices, RequestTimer(self.metrics), rid)

    async def start(self, gen: Generation):
        try:
            return await start_jobs(self.engine, gen.jobs)
        except EngineFull as e:
            if getattr(self.engine, "draining", False):  # began draining after admit(): EngineDraining
                self.admit()
            raise ApiError(429, str(e), code="engine_full", type="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineError as e:
            raise ApiError(400, str(e), param=e.param, code=e.code) from None

    async def encode(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.tok.encode, text)  # a 2 MB prompt takes a while: off the event loop

    # -- completions -------------------------------------------------------------------------------------------
    async def completions(self, body: p.CompletionRequest, request: Request):
        self.admit()
        self.check_model(body.model)
        self.check_common(body)
        prompts = []
        for item in body.prompt:
            if isinstance(item, str):
                prompts.append((await self.encode(item), item))
            else:
                bad = next((t for t in item if not 0 <= t < self.vocab), None)
                if bad is not None:
                    raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab})",
                                   param="prompt")
                prompts.append((item, self.tok.decode(item)))
        # OpenAI's default of 16 new tokens, cut to the room left when the client did not ask for more.
        M = body.max_tokens if "max_tokens" in body.model_fields_set else None
        for ids, _ in prompts:
            self.budget(len(ids), M, "prompt")
        if M is None:
            M = min(16, self.context - max(len(ids) for ids, _ in prompts))
        scoring = bool(body.echo) and body.logprobs is not None
        if M == 0 and not scoring:
            raise ApiError(400, "max_tokens: 0 generates nothing; use it with echo: true and logprobs to score the "
                                "prompt", param="max_tokens")
        params = self.params(body, body.sampling(), M, body.logprobs, prompt_logprobs=scoring)
        gen = self.new_generation("cmpl", prompts, params, body.stop or [])
        started = await self.start(gen)
        if body.stream:
            return _EventStream(self._stream_completion(gen, started, body))
        await self._run(gen, started)
        return p.CompletionResponse(id=gen.id, created=gen.created, model=self.model_name,
                                    choices=[self._completion_choice(gen, c, body) for c in gen.choices],
                                    usage=gen.usage())

    def _completion_logprobs(self, gen: Generation, c: Choice, body: p.CompletionRequest, entries,
                             echo: bool) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs()
        base = 0
        if echo:
            job = gen.jobs[c.index // gen.jobs[0].params.n]
            base = self._echo_logprobs(job, out)
        for tid, lp, offset in entries:
            self._add_completion_logprob(out, tid, lp, base + offset, body.logprobs)
        return out

    def _echo_logprobs(self, job: Job, out: p.CompletionLogprobs) -> int:
        """The prompt's tokens first (the first has no log-prob: nothing precedes it) -> the prompt's length."""
        tracker = TextTracker(self.tok, skip_special=False)
        lps = job.prompt_logprobs or [None] * len(job.prompt_ids)
        for tid, lp in zip(job.prompt_ids, lps, strict=False):
            offset = len(tracker.text) + len(tracker.pending)
            tracker.push([tid])
            if lp is None:
                out.tokens.append(token_piece(self.tok, tid)[0])
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                out.text_offset.append(offset)
            else:
                self._add_completion_logprob(out, tid, lp, offset, len(lp.top))
        return len(job.prompt_text)

    def _add_completion_logprob(self, out: p.CompletionLogprobs, tid: int, lp: TokenLogprob, offset: int,
                                k: int | None) -> None:
        out.tokens.append(token_piece(self.tok, tid)[0])
        out.token_logprobs.append(lp.logprob)
        # OpenAI: the top k, plus the sampled token when it is not among them.
        top = {token_piece(self.tok, t)[0]: v for t, v in lp.top[:k or 0]}
        top.setdefault(token_piece(self.tok, tid)[0], lp.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)

    def _completion_choice(self, gen: Generation, c: Choice, body: p.CompletionRequest) -> p.CompletionChoice:
        job = gen.jobs[c.index // gen.jobs[0].params.n]
        text = (job.prompt_text if body.echo else "") + c.tracker.text
        lps = None
        if body.logprobs is not None:
            lps = self._completion_logprobs(gen, c, body, c.logprobs, echo=bool(body.echo))
        return p.CompletionChoice(index=c.index, text=text, logprobs=lps, finish_reason=c.finish_reason)

    async def _stream_completion(self, gen: Generation, started, body: p.CompletionRequest):
        def chunk(choices, usage=None):
            return _event(p.CompletionChunk(id=gen.id, created=gen.created, model=self.model_name, choices=choices,
                                            usage=usage))

        async for touched in self._touched(gen, started):
            for c, text, n_lp in touched:
                lps = None
                if body.logprobs is not None:
                    lps = self._completion_logprobs(gen, c, body, c.logprobs[len(c.logprobs) - n_lp:], echo=False)
                if body.echo and not c.sent_first:  # the prompt goes out once, with the choice's first chunk
                    c.sent_first = True
                    text = gen.jobs[c.index // gen.jobs[0].params.n].prompt_text + text
                if text or c.done or n_lp:
                    yield chunk([p.CompletionChoice(index=c.index, text=text, logprobs=lps,
                                                    finish_reason=c.finish_reason)])
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], gen.usage())
        yield "data: [DONE]\n\n"

    # -- chat ----------------------------------------------------------------------------------------------------
    async def chat(self, body: p.ChatCompletionRequest, request: Request):
        self.admit()
        self.check_model(body.model)
        self.check_common(body)
        if body.response_format is not None and body.response_format.type != "text":
            raise ApiError(400, f"response_format: {body.response_format.type!r} is not supported by this server "
                                "(only 'text')", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        try:
            text = self.render_chat([m.as_dict() for m in body.messages])
        except (LlmlabError, ValueError, TypeError) as e:  # the template refused these messages
            raise ApiError(400, f"messages: {e}", param="messages") from None
        except Exception as e:  # a template's raise_exception() or a sandbox limit: still the messages' fault
            raise ApiError(400, f"messages: the chat template refused them: {str(e)[:200]}", param="messages") from None
        ids = await self.encode(text)
        M = self.budget(len(ids), body.token_budget(), "messages")
        sampling = body.sampling(self.recommended)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.params(body, sampling, M, logprobs)
        gen = self.new_generation("chatcmpl", [(ids, text)], params, body.stop or [])
        started = await self.start(gen)
        if body.stream:
            return _EventStream(self._stream_chat(gen, started, body))
        await self._run(gen, started)
        choices = [p.ChatChoice(index=c.index, message=p.ChatResponseMessage(content=c.tracker.text),
                                logprobs=self._chat_logprobs(c.logprobs, body) if body.logprobs else None,
                                finish_reason=c.finish_reason) for c in gen.choices]
        return p.ChatCompletionResponse(id=gen.id, created=gen.created, model=self.model_name, choices=choices,
                                        usage=gen.usage())

    def _chat_logprobs(self, entries, body: p.ChatCompletionRequest) -> p.ChatLogprobs:
        content = []
        for tid, lp, _ in entries:
            token, data = token_piece(self.tok, tid)
            tops = []
            for t, v in lp.top[:body.top_logprobs or 0]:
                s, b = token_piece(self.tok, t)
                tops.append(p.TopLogprob(token=s, logprob=v, bytes=list(b)))
            content.append(p.ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(data), top_logprobs=tops))
        return p.ChatLogprobs(content=content)

    async def _stream_chat(self, gen: Generation, started, body: p.ChatCompletionRequest):
        def chunk(choices, usage=None):
            return _event(p.ChatCompletionChunk(id=gen.id, created=gen.created, model=self.model_name,
                                                choices=choices, usage=usage))

        # OpenAI sends each choice's role first, with empty content.
        yield chunk([p.ChatChunkChoice(index=c.index, delta=p.ChatDelta(role="assistant", content=""))
                     for c in gen.choices])
        async for touched in self._touched(gen, started):
            for c, text, n_lp in touched:
                if not (text or c.done or n_lp):
                    continue
                lps = self._chat_logprobs(c.logprobs[len(c.logprobs) - n_lp:], body) if body.logprobs else None
                yield chunk([p.ChatChunkChoice(index=c.index, delta=p.ChatDelta(content=text or None), logprobs=lps,
                                               finish_reason=c.finish_reason)])
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], gen.usage())
        yield "data: [DONE]\n\n"

    # -- running a generation ----------------------------------------------------------------------------------
    async def _touched(self, gen: Generation, started):
        """Per engine output: the choices it changed. Ends when every choice is done; closing the merged
        reader aborts engine requests still running (a choice that hit a stop string)."""
        try:
            async with contextlib.aclosing(merged_outputs(started)) as outputs:
                async for k, out in outputs:
                    yield gen.apply(k, out)
                    if gen.all_done():
                        break
            for c in gen.choices:  # the engine finished without saying why (should not happen): say "abort"
                if not c.done:
                    c.finish_reason = "abort"
        finally:
            gen.timer.done()

    async def _run(self, gen: Generation, started) -> None:
        async for _ in self._touched(gen, started):
            pass

    # -- embeddings ------------------------------------------------------------------------------------------
    async def embeddings(self, body: p.EmbeddingRequest):
        self.admit()
        self.check_model(body.model, embedding=True)
        if self.embedding is None:
            raise ApiError(404, "this server has no embedding model: start it with --embedding-model "
                                "all-minilm-l6-v2", param="model", code="model_not_found")
        async with self.embed_lock:
            vecs = await asyncio.to_thread(self.embedding.embed, body.input)
            tokens = await asyncio.to_thread(self.embedding.count_tokens, body.input)
        vecs = vecs.float()
        if body.dimensions is not None:
            if body.dimensions > vecs.shape[1]:
                raise ApiError(400, f"dimensions: must be <= {vecs.shape[1]} for {self.embedding.name} "
                                    f"(got {body.dimensions})", param="dimensions")
            # Matryoshka truncation: keep the first dimensions, then unit length again.
            vecs = torch.nn.functional.normalize(vecs[:, :body.dimensions], dim=-1)
        data = [p.Embedding(index=i, embedding=_encode_vector(v, body.encoding_format)) for i, v in enumerate(vecs)]
        return p.EmbeddingResponse(data=data, model=self.embedding.name,
                                   usage=p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    def models(self) -> p.ModelList:
        cards = [p.ModelCard(id=self.model_name, created=self.created, max_model_len=self.context)]
        if self.embedding is not None:
            cards.append(p.ModelCard(id=self.embedding.name, created=self.created))
        return p.ModelList(data=cards)


def _encode_vector(v: torch.Tensor, fmt: str | None):
    if fmt == "base64":  # OpenAI: little-endian float32 bytes, base64
        return base64.b64encode(v.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


async def _cancel_on_disconnect(request: Request, work):
    """Run ``work`` (a coroutine) until it ends or the client disconnects; then cancel it (its engine requests
    are aborted). Starlette does not cancel a plain handler when the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    return task.result()


_ERRORS = {status: {"model": p.ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 500, 503)}
# With stream: true each server-sent event is {"data": <a chunk object as JSON text, or [DONE]>} (how OpenAPI
# tools, schemathesis among them, read a text/event-stream body: one object per event).
_STREAMED = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}, "required": ["data"]}}}}}


def create_app(engine, *, tokenizer, model_name: str, render_chat: Callable[[list[dict]], str],
               stop_ids: set[int], recommended_sampling: dict | None = None, embedding: EmbeddingModel | None = None,
               api_key: str | None = None, aliases: tuple[str, ...] = (), max_body_bytes: int = MAX_BODY_BYTES
               ) -> FastAPI:
    """The FastAPI app over a started ``AsyncEngine``.

    - ``tokenizer``: the served model's (``encode``, ``decode``, ``token_bytes``, ``special_ids``);
    - ``render_chat(messages) -> str``: the chat template with the generation prompt (``LLM.render_chat``);
    - ``stop_ids``: ids that end a reply (EOS, end of turn; ``LLM.stop_ids()``), for both endpoints;
    - ``recommended_sampling``: the model file's sampling advice, under which chat defaults apply;
    - ``embedding``: serves /v1/embeddings when given;
    - ``aliases``: other names accepted in the ``model`` field (it may also be left out)."""
    metrics = ServerMetrics(engine.stats)
    server = _Server(engine, tokenizer=tokenizer, model_name=model_name, render_chat=render_chat, stop_ids=stop_ids,
                     recommended_sampling=recommended_sampling, embedding=embedding, aliases=aliases, metrics=metrics)
    app = FastAPI(title="llmlab", summary="OpenAI-compatible API of llmlab's serving engine", version="1",
                  docs_url="/docs", redoc_url=None)
    app.state.server, app.state.metrics = server, metrics
    bearer = [HTTPBearer(auto_error=False)] if api_key else []  # documents the scheme; Gate enforces it
    deps = [Depends(b) for b in bearer]

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def onvalidation_error(request: Request, e: RequestValidationError):
        return api_error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(e).__name__}); see the server log",
                              type="server_error", code="internal_error")

    @app.get("/health", response_model=p.Health, responses={503: {"model": p.Health}})
    async def health():
        if getattr(engine, "draining", False):
            return JSONResponse({"status": "draining"}, status_code=503,
                                headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})
        return p.Health(status="ok")

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, responses={404: {"model": p.ErrorResponse}})
    async def index():
        page = importlib.resources.files("llmlab.serve").joinpath("web/index.html")
        if not page.is_file():
            raise ApiError(404, "the web chat page is not installed (llmlab/serve/web/index.html)", code="not_found")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/v1/models", response_model=p.ModelList, responses=_ERRORS, dependencies=deps)
    async def models():
        return server.models()

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses={**_ERRORS, **_STREAMED},
              dependencies=deps)
    async def completions(body: p.CompletionRequest, request: Request):
        return await _cancel_on_disconnect(request, server.completions(body, request))

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, responses={**_ERRORS, **_STREAMED},
              dependencies=deps)
    async def chat(body: p.ChatCompletionRequest, request: Request):
        return await _cancel_on_disconnect(request, server.chat(body, request))

    @app.post("/v1/embeddings", response_model=p.EmbeddingResponse, responses=_ERRORS, dependencies=deps)
    async def embeddings(body: p.EmbeddingRequest, request: Request):
        return await _cancel_on_disconnect(request, server.embeddings(body))

    app.add_middleware(Gate, api_key=api_key, metrics=metrics, max_body=max_body_bytes)
    return app
