"""Request and response bodies of the OpenAI API subset the server speaks, as pydantic v2 models.

Spec: the OpenAI API reference (https://platform.openai.com/docs/api-reference): ``POST /v1/completions``
(legacy), ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``, and the error object
``{"error": {"message", "type", "param", "code"}}``. The response models exist for the OpenAPI schema
(``response_model=``), so a schema-driven tester (schemathesis) can check every answer.

Validation policy:
- every number has explicit bounds and NaN / +-Infinity are refused (``allow_inf_nan=False``); JSON
  ``NaN`` / ``Infinity`` tokens parse in Python, so the bound is what stops them;
- strict types where OpenAI is strict: ``"5"`` or ``5.0`` is not an integer, ``"true"`` not a boolean
  (``StrictInt`` / ``StrictBool``); a float field takes an integer (``1`` means ``1.0``);
- ``null`` means "not given", as in OpenAI's API; unknown fields are ignored (``extra="ignore"``);
- fields that take several shapes (``prompt``, ``stop``, ``input``, message ``content``) are checked by one
  function each, so a wrong value gets one clear message instead of one per union member; their
  ``WithJsonSchema`` keeps the published schema exact.

Sampling defaults (``to_sampling``): completions use OpenAI's (temperature 1, top_p 1: sampling). A chat
request that sets neither ``temperature`` nor ``top_p`` gets a chat user's sampling
(``infer.sample.CHAT_DEFAULTS`` under the model file's recommendation) instead of greedy decoding, which
loops on small models; once the client sets either, OpenAI's defaults fill in the rest. ``top_p: 0`` (allowed
by OpenAI) keeps only the most likely token: greedy. Extras beyond OpenAI (vLLM's names): ``top_k``
(0 or -1 = off), ``min_p``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from llmlab.infer.sample import SamplingParams, chat_sampling

MAX_STOP = 16  # OpenAI allows 4; lm-evaluation-harness tasks sometimes pass a few more
MAX_STOP_CHARS = 256
MAX_BATCH = 64  # prompts in one completions request / texts in one embeddings request is 2048 below
MAX_EMBED_INPUTS = 2048  # OpenAI's limit
MAX_MESSAGES = 1024
MAX_TOKENS_LIMIT = 1 << 20  # a bound for the schema; the model's context is the real limit
MAX_LOGIT_BIAS = 1024
INT64 = 1 << 63


def _num(lo: float, hi: float, **kw) -> Any:
    return Annotated[StrictFloat, Field(ge=lo, le=hi, allow_inf_nan=False, **kw)]


def _int(lo: int, hi: int) -> Any:
    return Annotated[StrictInt, Field(ge=lo, le=hi)]


Temperature = _num(0, 2)
TopP = _num(0, 1)
Penalty = _num(-2, 2)
MinP = _num(0, 1)
RepetitionPenalty = Annotated[StrictFloat, Field(gt=0, le=10, allow_inf_nan=False)]
TopK = _int(-1, 1 << 20)
Seed = _int(-INT64, INT64 - 1)


# ---- fields with several shapes: one check each, one message --------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _stop(value):
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings (got {len(items)})")
    for s in items:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters (got {len(s)})")
    return items


_STOP_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
    {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
     "maxItems": MAX_STOP},
    {"type": "null"}]}
Stop = Annotated[list[str] | None, BeforeValidator(_stop), WithJsonSchema(_STOP_SCHEMA)]


def _prompt(value):
    """-> a list of prompts, each a string or a list of token ids (the range check needs the vocabulary)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_int(t) for t in value)):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a list of token ids, or a non-empty list of those")
    if len(value) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} prompts in one request (got {len(value)})")
    for p in value:
        if not (isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p))):
            raise ValueError("must be a string, a list of token ids, or a list of those (each non-empty)")
    return value


_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string"}, _IDS,
    {"type": "array", "items": {"anyOf": [{"type": "string"}, _IDS]}, "minItems": 1, "maxItems": MAX_BATCH}]}
Prompt = Annotated[list[str | list[int]], BeforeValidator(_prompt), WithJsonSchema(_PROMPT_SCHEMA)]


def _embed_input(value):
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ValueError("must be a string or a non-empty list of strings (token-id input is not supported)")
    if len(value) > MAX_EMBED_INPUTS:
        raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs in one request (got {len(value)})")
    return value


_INPUT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                                "maxItems": MAX_EMBED_INPUTS}]}
EmbedInput = Annotated[list[str], BeforeValidator(_embed_input), WithJsonSchema(_INPUT_SCHEMA)]


def _content(value):
    """A message's content: a string, or OpenAI's list of parts of which only text parts are supported."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts '
                                 "(only text is supported)")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError("must be a string or a list of text parts")


_CONTENT_SCHEMA = {"anyOf": [
    {"type": "string"}, {"type": "null"},
    {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}
Content = Annotated[str, BeforeValidator(_content), WithJsonSchema(_CONTENT_SCHEMA)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: StrictBool | None = None


class _Sampling(_Request):
    """Parameters shared by completions and chat."""

    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: _int(1, 128) | None = None  # the engine's max_n is the real limit (checked against it: 400 param "n")
    stream: StrictBool | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS)
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    # Extras (vLLM's names).
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: StrictBool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias):
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (digits), got {key!r}")
        return bias

    def openai_sampling(self) -> dict:
        """The sampling fields the client gave (None = not given), in SamplingParams' names."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": max(self.top_k or 0, 0) or None,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                "seed": self.seed,
                "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None}


def _greedy_for_zero_top_p(values: dict) -> dict:
    if values.get("top_p") == 0:  # keep only the most likely token: greedy, without a zero top_p in the warper
        values = {**values, "top_p": 1.0, "temperature": 0.0}
    return values


def openai_sampling(req: _Sampling) -> SamplingParams:
    """OpenAI's defaults (temperature 1, top_p 1) under the client's values."""
    values = {"temperature": 1.0, "top_p": 1.0}
    values.update({k: v for k, v in req.openai_sampling().items() if v is not None})
    return SamplingParams(**_greedy_for_zero_top_p(values)).validate()


class CompletionRequest(_Sampling):
    """POST /v1/completions. Defaults as OpenAI's: max_tokens 16, temperature 1, top_p 1."""

    prompt: Prompt
    max_tokens: _int(0, MAX_TOKENS_LIMIT) | None = 16
    logprobs: _int(0, 5) | None = None
    echo: StrictBool | None = None

    def sampling(self) -> SamplingParams:
        return openai_sampling(self)


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content  # required (null = empty), as in OpenAI's API, except in an assistant turn
    name: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _assistant_content_optional(cls, data):
        if isinstance(data, dict) and data.get("role") == "assistant" and "content" not in data:
            return {**data, "content": None}
        return data

    def as_dict(self) -> dict:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. max_tokens (or max_completion_tokens) defaults to the room left in the
    context; sampling defaults to the chat defaults (module docstring)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: _int(1, MAX_TOKENS_LIMIT) | None = None
    max_completion_tokens: _int(1, MAX_TOKENS_LIMIT) | None = None
    logprobs: StrictBool | None = None
    top_logprobs: _int(0, 20) | None = None
    response_format: ResponseFormat | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling(self, recommended: dict | None = None) -> SamplingParams:
        given = self.openai_sampling()
        if given["temperature"] is None and given["top_p"] is None:
            return chat_sampling(recommended, **given)
        return openai_sampling(self)


class EmbeddingRequest(_Request):
    input: EmbedInput
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: _int(1, 1 << 16) | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None


# ---- responses ----------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class _Envelope(BaseModel):
    """The fields every completion object and streamed chunk carries."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionChunk(_Envelope):
    """One Server-Sent Event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(CompletionResponse):
    """One Server-Sent Event of a streamed completion: the response object itself (OpenAI's text_completion)."""


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmlab"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
