"""Errors in OpenAI's shape and the gate every HTTP request passes before FastAPI parses it.

OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``. Pydantic's validation errors are
rewritten as one line that names the field and the limit ("temperature: must be <= 2 (got 3.5)"), with
``param`` the field's path. The gate (pure ASGI middleware) answers 401 / 413 / 415 / 400 for a missing key,
an oversized body, a non-JSON content type, bytes that are not UTF-8 and text that is not a JSON object, so
the routes only ever see a well-formed object; it also counts every answer for ``/metrics``.
"""

from __future__ import annotations

import hmac
import json
import math
import re

from fastapi.responses import JSONResponse

from llmlab.serve.metrics import ServerMetrics

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics", "/")


class ApiError(Exception):
    """An expected failure, answered as OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def api_error_response(e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)


def _path(loc) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _shown(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = json.dumps(value) if isinstance(value, (str, bool, int, float)) or value is None else None
    if text is None or len(text) > 60:
        return type(value).__name__ if text is None else text[:57] + "..."
    return text


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "list": "a list", "dict": "an object", "model": "an object", "model_attributes": "an object"}


def describe_validation_error(err: dict) -> str:
    """One pydantic error -> 'must be <= 2 (got 3.5)' style text."""
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    limits = {"less_than_equal": ("<=", "le"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
              "greater_than": (">", "gt")}
    if kind in limits:
        op, key = limits[kind]
        limit = ctx.get(key)
        text = f"must be {op} {int(limit) if isinstance(limit, float) and limit.is_integer() else limit}"
    elif kind == "finite_number":
        text = "must be a finite number"
    elif kind == "missing":
        return "is required"
    elif kind == "literal_error":
        text = f"must be one of {ctx.get('expected')}"
    elif kind in ("too_long", "too_short"):
        bound = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
        text = f"must have at {'most' if kind == 'too_long' else 'least'} {bound} items"
    elif kind in ("string_too_long", "string_too_short"):
        bound = ctx.get("max_length") if kind == "string_too_long" else ctx.get("min_length")
        text = f"must have at {'most' if kind == 'string_too_long' else 'least'} {bound} characters"
    elif kind == "value_error":
        text = str(ctx.get("error", err.get("msg", "")))
    elif kind.removesuffix("_type").removesuffix("_parsing") in _TYPE_WORDS:
        text = f"must be {_TYPE_WORDS[kind.removesuffix('_type').removesuffix('_parsing')]}"
    elif kind == "int_from_float":
        text = "must be an integer"
    else:
        text = err.get("msg", "is invalid")
    return f"{text} (got {_shown(err.get('input'))})"


def validation_error(errors: list[dict]) -> ApiError:
    first = errors[0]
    param = _path(first.get("loc", ()))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ApiError(400, f"{param or 'body'}: {describe_validation_error(first)}{more}", param=param)


# ---- the gate: authentication and the body checks, before FastAPI parses anything ------------------------------
class Gate:
    """Pure ASGI middleware. For /v1 routes: the API key (401). For requests with a body: the size limit
    (413, from Content-Length or while reading), the content type (415), UTF-8 (400) and JSON syntax
    (400), so that FastAPI only ever sees a well-formed JSON object, replayed from memory. It also counts
    every answer by endpoint and status for /metrics."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics, max_body: int):
        self.app, self.api_key, self.metrics, self.max_body = app, api_key, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            problem = self._unauthorized(scope) if path.startswith("/v1") else None
            if problem is None and scope["method"] in ("POST", "PUT", "PATCH"):
                problem, receive = await self._read_body(scope, receive)
            if problem is not None:
                await api_error_response(problem)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _unauthorized(self, scope) -> ApiError | None:
        if self.api_key is None:
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return None
        return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive):
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"application/json").decode("latin-1").split(";")[0].strip().lower()
        if ctype != "application/json":
            return ApiError(415, f"Content-Type {ctype!r} is not supported: send 'Content-Type: application/json'",
                            code="unsupported_media_type"), receive
        length = headers.get(b"content-length")
        too_big = ApiError(413, f"the request body is larger than {self.max_body} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return too_big, receive
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return ApiError(400, "the client went away"), receive
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return too_big, receive
            if not message.get("more_body", False):
                break
        problem = _check_json(bytes(body))
        return problem, _replay(bytes(body), receive)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_json(body: bytes) -> ApiError | None:
    if not body.strip():
        return ApiError(400, "the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return ApiError(400, f"the request body is not UTF-8 (byte {e.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except (ValueError, RecursionError) as e:  # integers beyond Python's digit limit; absurd nesting
        return ApiError(400, f"the request body is not valid JSON: {str(e).splitlines()[0][:100]}")
    if not isinstance(value, dict):
        return ApiError(400, f"the request body must be a JSON object, got {type(value).__name__}")
    if _SURROGATE_ESCAPE.search(text):  # only an escape can make one: a raw surrogate is not UTF-8
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # an unpaired one: no text the tokenizer (or the reply) could hold
            return ApiError(400, "the request body is not valid JSON text: a string holds an unpaired UTF-16 "
                                 "surrogate escape (\\ud800-\\udfff); send characters as UTF-8")
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the real channel, which reports the client's disconnect

    return replay
