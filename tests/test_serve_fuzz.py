"""Hostile and malformed request bodies against the OpenAI-compatible server: it refuses them, and stays up.

What the tests prove, on a real uvicorn (in-process, ``tests/serve_server.py``) over a tiny random Llama with
SmolLM2's tokenizer and chat template (a 64-token context: a body that happens to be valid costs little):

- a table of hand-written hostile bodies (invalid, truncated, non-UTF-8, non-object, 10,000-deep JSON; a 10 MB
  string; wrong types for every field; out-of-vocabulary and negative token ids; 1,000 stop strings; huge ``n``;
  empty, unknown-role and content-less messages; a non-JSON Content-Type; lone UTF-16 surrogates) each gets the
  4xx it should, with OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` naming the field;
- a seeded mutator of valid bodies (field-level and byte-level mutations) and a Hypothesis strategy of arbitrary
  JSON objects never get a 5xx and never hang (a client timeout); every 4xx is OpenAI-shaped, every 200 is a
  well-formed response or event stream;
- schemathesis, driven by the server's own ``/openapi.json``, finds no server error and no response that breaks
  the published schema (positive and negative generation, bounded per operation);
- after each barrage ``/health`` answers 200, a normal request still succeeds, and the engine is idle with every
  KV block free (nothing leaked by refused or broken requests).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random

import httpx
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from llmlab.serve.engine import EngineConfig
from llmlab.serve.http import EmbeddingModel
from tests.serve_server import Served, error_of, idle, sse, tiny_llama

CONTEXT = 64
CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}
EMBEDDING = {"input": ["a cat", "a dog"]}
BASES = {CHAT_PATH: CHAT, COMPLETIONS_PATH: COMPLETION, EMBEDDINGS_PATH: EMBEDDING}
SAMPLING_FIELDS = ["model", "temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "logit_bias", "user", "top_k", "min_p", "repetition_penalty", "ignore_eos",
                   "stream_options", "max_tokens"]
FIELDS = {
    CHAT_PATH: ["messages", *SAMPLING_FIELDS, "max_completion_tokens", "logprobs", "top_logprobs", "response_format"],
    COMPLETIONS_PATH: ["prompt", *SAMPLING_FIELDS, "logprobs", "echo"],
    EMBEDDINGS_PATH: ["input", "model", "encoding_format", "dimensions", "user"],
}
JSON = {"content-type": "application/json"}


def _fake_embed(texts: list[str]) -> torch.Tensor:
    """Deterministic unit vectors from a hash of each text: exercises /v1/embeddings without an encoder."""
    rows = [list(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest()[:16]) for t in texts]
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32) + 1.0, dim=-1)


@pytest.fixture(scope="module")
def server(smollm):
    served = Served(tiny_llama(vocab_size=smollm.config.vocab_size, context=CONTEXT), smollm,
                    EngineConfig(kv_blocks=256, max_n=8), model_name="tiny",
                    embedding=EmbeddingModel("fake-embed", _fake_embed, lambda texts: sum(map(len, texts))))
    yield served
    served.close()


def _still_serving(server: Served) -> None:
    """/health is 200, a normal request of each kind succeeds, and the engine went back to idle."""
    assert server.http.get("/health").status_code == 200
    r = server.post(CHAT_PATH, {**CHAT, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
    r = server.post(COMPLETIONS_PATH, {**COMPLETION, "stream": True})
    assert r.status_code == 200 and sse(r.content)[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.post(EMBEDDINGS_PATH, EMBEDDING).status_code == 200
    m = server.wait_idle()
    assert idle(m), {k: v for k, v in m.items() if "requests_" in k or "kv_blocks" in k}


def _with_raw(base: dict, name: str, raw: str) -> str:
    """``base`` as JSON text with ``name`` set to the raw JSON token ``raw`` (NaN, 1e999, ...)."""
    return json.dumps({k: v for k, v in base.items() if k != name})[:-1] + f', "{name}": {raw}}}'


def _check(r, status: int | None = None, param: str | None = None) -> None:
    """A refusal: ``status`` (any 4xx when None), OpenAI-shaped, ``param`` naming the field (a prefix)."""
    err = error_of(r, (lambda s: s == status) if status else (lambda s: 400 <= s < 500))
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), (param, err)


# ---- the table of hostile bodies ------------------------------------------------------------------------------
DEEP = "[" * 10_000 + "]" * 10_000
BIG = "x" * (10 << 20)

# (body (dict, or raw str / bytes), status or None for any 4xx, param prefix or None), for both generation paths.
TRANSPORT = [
    (b"", 400, None), (b"   \n", 400, None), (b"{", 400, None), (b"{not json", 400, None),
    (b"{'prompt': 'x'}", 400, None), (b'{"prompt": }', 400, None), (b'{"prompt": "x",}', 400, None),
    (b'{"prompt": "x"', 400, None), (b'{"prompt": "x"}}', 400, None), (b'{"prompt": "unterminated}', 400, None),
    (b"[]", 400, None), (b"[1, 2]", 400, None), (b"42", 400, None), (b'"a string"', 400, None), (b"null", 400, None),
    (b"true", 400, None), (b"-0.0e1", 400, None),
    (DEEP, 400, None), ('{"prompt": ' + DEEP + ', "messages": ' + DEEP + "}", 400, None),
    ('{"a": ' * 10_000 + "1" + "}" * 10_000, 400, None), ("9" * 5000, 400, None),
    ('{"max_tokens": ' + "9" * 5000 + "}", 400, None),
    (b'{"prompt": "\xff\xfe", "messages": "\xc3"}', 400, None), ("{}".encode("utf-16"), 400, None),
    ('{"prompt": "caf\u00e9"}'.encode("latin-1"), 400, None), (b"\x00\x01\x02", 400, None),
    ('{"prompt": "' + BIG + '", "messages": [{"role": "user", "content": "' + BIG + '"}]}', 413, None),
]
COMPLETION_FIELDS = [
    ({}, 400, "prompt"), ({"prompt": None}, 400, "prompt"), ({"prompt": 5}, 400, "prompt"),
    ({"prompt": True}, 400, "prompt"), ({"prompt": {}}, 400, "prompt"), ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"), ({"prompt": [999999]}, 400, "prompt"), ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": [1, -5, 2]}, 400, "prompt"), ({"prompt": [2**63]}, 400, "prompt"), ({"prompt": [1.5]}, 400, "prompt"),
    ({"prompt": [True]}, 400, "prompt"), ({"prompt": ["a", 1]}, 400, "prompt"),
    ({"prompt": [[1], [999999]]}, 400, "prompt"),
    ({"prompt": [[1], "x", None]}, 400, "prompt"), ({"prompt": ["x"] * 65}, 400, "prompt"),
    ({"prompt": [5] * (CONTEXT + 1)}, 400, "prompt"), ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [[1] * 3] * 2 + [[]]}, 400, "prompt"),
    ({**COMPLETION, "max_tokens": -1}, 400, "max_tokens"), ({**COMPLETION, "max_tokens": "16"}, 400, "max_tokens"),
    ({**COMPLETION, "max_tokens": 10**9}, 400, "max_tokens"), ({**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ({**COMPLETION, "logprobs": 6}, 400, "logprobs"), ({**COMPLETION, "logprobs": True}, 400, "logprobs"),
    ({**COMPLETION, "echo": "yes"}, 400, "echo"), ({**COMPLETION, "echo": 1}, 400, "echo"),
]
CHAT_FIELDS = [
    ({}, 400, "messages"), ({"messages": None}, 400, "messages"), ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"), ({"messages": {}}, 400, "messages"), ({"messages": [1]}, 400, "messages"),
    ({"messages": [[]]}, 400, "messages"), ({"messages": [{}]}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "system"}, {"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "banana", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": None, "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": 5, "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "USER", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, None]}, 400, "messages[1]"),
    ({"messages": [{"role": "user", "content": "x"}] * 1025}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({**CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ({**CHAT, "max_tokens": CONTEXT}, 400, "max_tokens"), ({**CHAT, "logprobs": "yes"}, 400, "logprobs"),
    ({**CHAT, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"), ({**CHAT, "top_logprobs": 3}, 400,
                                                                             "top_logprobs"),
    ({**CHAT, "response_format": "text"}, 400, "response_format"),
    ({**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({**CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
]
# Shared sampling fields, each wrong in several ways (added to both generation bodies).
SAMPLING = [
    ("n", 10**9, "n"), ("n", 0, "n"), ("n", -5, "n"), ("n", 9, "n"), ("n", 2**64, "n"), ("n", "2", "n"),
    ("n", 2.0, "n"),
    ("stop", [f"s{i}" for i in range(1000)], "stop"), ("stop", [""], "stop"), ("stop", "x" * 1000, "stop"),
    ("stop", [1, 2], "stop"), ("stop", {"a": 1}, "stop"), ("stop", 5, "stop"), ("stop", [None], "stop"),
    ("temperature", -1, "temperature"), ("temperature", "hot", "temperature"), ("temperature", [], "temperature"),
    ("temperature", True, "temperature"), ("temperature", 1e308, "temperature"),
    ("top_p", 1.5, "top_p"), ("top_p", "0.5", "top_p"), ("top_k", -2, "top_k"), ("top_k", 0.5, "top_k"),
    ("min_p", -0.1, "min_p"), ("repetition_penalty", 0, "repetition_penalty"),
    ("presence_penalty", 5, "presence_penalty"), ("frequency_penalty", -2.5, "frequency_penalty"),
    ("seed", 2**64, "seed"), ("seed", "1", "seed"), ("seed", 1.5, "seed"),
    ("logit_bias", {"abc": 1}, "logit_bias"), ("logit_bias", {"1": "x"}, "logit_bias"),
    ("logit_bias", {"99999999": 1}, "logit_bias"), ("logit_bias", [], "logit_bias"), ("logit_bias", {"1": 1e9},
                                                                                        "logit_bias"),
    ("logit_bias", {str(i): 1.0 for i in range(1025)}, "logit_bias"), ("logit_bias", {"-1": 1}, "logit_bias"),
    ("model", 5, "model"), ("model", ["tiny"], "model"), ("user", 5, "user"), ("user", "u" * 300, "user"),
    ("stream", "true", "stream"), ("stream", 1, "stream"), ("ignore_eos", "no", "ignore_eos"),
    ("stream_options", {"include_usage": True}, "stream_options"), ("stream_options", "x", "stream_options"),
]
RAW_SAMPLING = [("temperature", "NaN"), ("top_p", "Infinity"), ("presence_penalty", "-Infinity"),
                ("frequency_penalty", "1e999"), ("seed", "1e999"), ("n", "NaN"), ("max_tokens", "Infinity")]


def _table():
    for path, base, fields in ((COMPLETIONS_PATH, COMPLETION, COMPLETION_FIELDS), (CHAT_PATH, CHAT, CHAT_FIELDS)):
        for body, status, param in TRANSPORT + fields:
            yield path, body, status, param
        for name, value, param in SAMPLING:
            yield path, {**base, name: value}, 400, param
        for name, raw in RAW_SAMPLING:
            yield path, _with_raw(base, name, raw), 400, name
        yield path, {**base, "model": "gpt-4"}, 404, "model"
        # Valid JSON text, invalid Unicode: a lone UTF-16 surrogate in a string the server must encode.
        key = "prompt" if path == COMPLETIONS_PATH else "messages"
        for s in ("\\ud800", "x\\udfffy", "\\ud83d"):
            text = '"' + s + '"' if key == "prompt" else '[{"role": "user", "content": "' + s + '"}]'
            yield path, f'{{"{key}": {text}, "max_tokens": 2}}', 400, None
        yield path, '{"stop": ["\\ud800"], ' + json.dumps(base)[1:], 400, None
    for body, status, param in [
        ({}, 400, "input"), ({"input": None}, 400, "input"), ({"input": 5}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": [1, 2, 3]}, 400, "input"), ({"input": [[1]]}, 400, "input"), ({"input": ["x"] * 2049}, 400, "input"),
        ({**EMBEDDING, "dimensions": 0}, 400, "dimensions"), ({**EMBEDDING, "dimensions": 10**6}, 400, "dimensions"),
        ({**EMBEDDING, "dimensions": 17}, 400, "dimensions"), ({**EMBEDDING, "encoding_format": "binary"}, 400,
                                                                "encoding_format"),
        ({**EMBEDDING, "model": "nope"}, 404, "model"), ({**EMBEDDING, "user": 1}, 400, "user"),
        ('{"input": "\\ud800"}', 400, None), (DEEP, 400, None), (b"\xff", 400, None), (b"[]", 400, None),
    ]:
        yield EMBEDDINGS_PATH, body, status, param


TABLE = list(_table())
NOT_JSON = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
            "application/jsonx", "text/json", "image/png"]


def test_hostile_bodies_get_a_clear_4xx(server):
    """Every body of the table: its 4xx, in OpenAI's error shape, naming the field; never a 5xx or a hang."""
    assert len(TABLE) >= 200
    failures = []
    for path, body, status, param in TABLE:
        try:
            _check(server.post(path, body, headers={"connection": "close"}), status, param)
        except (AssertionError, ValueError, httpx.HTTPError) as e:
            shown = body if isinstance(body, dict) else (body[:80] if len(body) < 10_000 else f"{body[:40]!r}...")
            failures.append(f"{path} {str(shown)[:120]}: {str(e)[:300]}")
    assert not failures, f"{len(failures)} of {len(TABLE)} bodies:\n" + "\n".join(failures)
    _still_serving(server)


@pytest.mark.parametrize("ctype", NOT_JSON)
def test_content_type_not_json_is_415(server, ctype):
    for path, base in BASES.items():
        err = error_of(server.post(path, base, headers={"content-type": ctype}), lambda s: s == 415)
        assert "Content-Type" in err["message"]


def test_json_content_type_spellings_are_accepted(server):
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert server.post(COMPLETIONS_PATH, COMPLETION, headers={"content-type": ctype}).status_code == 200


# ---- the seeded mutator ---------------------------------------------------------------------------------------
WEIRD = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, -2**63 - 1, 10**30, 0.5, -0.0, 1e308, -1e308, "", "x", "0",
         "true", "null", "\u0000", "\u00e9\u6771\U0001F600", "\u202e", "x" * 5000, [], [None], [1, 2], [[1]], ["a"],
         [{}], {}, {"a": 1}, {"type": "text"}, [{"role": "user"}], {"role": "user", "content": "x"}]
RAW_WEIRD = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "1E-400", "9" * 400, '"\\ud800"', '"\\u0000"', "[[[[[]]]]]"]
NOISE = b'{}[]",:\\ \x00\xff\xc3\n0e-'


def _mutate_value(rng: random.Random, body: dict, path: str) -> dict | str:
    body = copy.deepcopy(body)
    op = rng.randrange(8)
    fields = FIELDS[path]
    if op == 0:
        body[rng.choice(fields)] = rng.choice(WEIRD)
    elif op == 1 and body:
        del body[rng.choice(sorted(body))]
    elif op == 2:  # inside the messages / prompt / input
        if path == CHAT_PATH:
            msgs = body.setdefault("messages", [{"role": "user", "content": "x"}])
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
                msgs[rng.randrange(len(msgs))][rng.choice(["role", "content", "name", "extra"])] = rng.choice(WEIRD)
            else:
                body["messages"] = [rng.choice(WEIRD)]
        else:
            key = "prompt" if path == COMPLETIONS_PATH else "input"
            body[key] = [rng.choice(WEIRD) for _ in range(rng.randrange(1, 4))]
    elif op == 3:
        body[f"unknown_{rng.randrange(100)}"] = rng.choice(WEIRD)  # unknown fields are ignored
    elif op == 4:
        name, raw = rng.choice(fields), rng.choice(RAW_WEIRD)
        return _with_raw(body, name, raw)
    elif op == 5:
        return json.dumps(rng.choice([[body], {"body": body}, [body, body]]))
    elif op == 6:
        key = rng.choice(fields)
        body[key] = {"nested": body.get(key), "deeper": [body.get(key)] * 2}
    else:
        body["stream"] = True
    return body


def _mutate_bytes(rng: random.Random, text: bytes) -> bytes:
    op = rng.randrange(4)
    i = rng.randrange(len(text) + 1)
    if op == 0:
        return text[:i]  # truncated
    if op == 1:
        return text[:i] + bytes([rng.choice(NOISE)]) + text[i:]
    if op == 2 and text:
        i = min(i, len(text) - 1)
        return text[:i] + bytes([text[i] ^ (1 << rng.randrange(8))]) + text[i + 1:]
    j = rng.randrange(len(text) + 1)
    return text[:i] + text[min(i, j):max(i, j)] + text[i:]  # a duplicated slice


def _mutants(n: int, seed: int = 20240601):
    rng = random.Random(seed)
    for k in range(n):
        path = [CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH][k % 3]
        body: dict | str | bytes = BASES[path]
        for _ in range(rng.randrange(1, 4)):
            body = _mutate_value(rng, body, path) if isinstance(body, dict) else body
        if rng.random() < 0.35:
            text = body if isinstance(body, (str, bytes)) else json.dumps(body)
            body = _mutate_bytes(rng, text.encode() if isinstance(text, str) else text)
        yield path, body


def _survives(server: Served, path: str, body) -> str | None:
    """Sends one fuzzed body; -> None if the answer is acceptable, else what was wrong."""
    try:  # a connection each: after a 5xx uvicorn drops the connection, and the next body would be blamed
        r = server.post(path, body, headers={"connection": "close"}, timeout=30)
    except Exception as e:  # a hang (timeout) or a dropped connection
        return f"no answer: {type(e).__name__}: {e}"
    try:
        if r.status_code == 200:
            if r.headers["content-type"].startswith("text/event-stream"):
                events = sse(r.content)
                assert all(e["object"] in ("chat.completion.chunk", "text_completion") for e in events)
            else:
                data = r.json()
                assert data["data"] if path == EMBEDDINGS_PATH else data["choices"], data
        else:
            error_of(r)
    except Exception as e:
        return f"{r.status_code} {type(e).__name__}: {str(e)[:300]}"
    return None


def test_mutated_valid_bodies_never_5xx(server):
    """180 seeded mutants of valid bodies (fields replaced by odd values or raw tokens, deleted, nested, wrapped;
    bytes truncated, flipped, inserted, duplicated): a 200 or an OpenAI-shaped 4xx, never a 5xx or a hang."""
    failures = []
    for path, body in _mutants(180):
        problem = _survives(server, path, body)
        if problem:
            failures.append(f"{path} {str(body)[:200]!r}: {problem}")
    assert not failures, f"{len(failures)} mutants:\n" + "\n".join(failures)
    _still_serving(server)


# ---- Hypothesis: arbitrary JSON objects ---------------------------------------------------------------------------
# Text: any code point, and half the time some unpaired surrogates (st.characters never makes those).
_text = st.text(max_size=12) | st.lists(st.characters() | st.integers(0xD800, 0xDFFF).map(chr),
                                        max_size=12).map("".join)
_leaf = st.none() | st.booleans() | st.integers() | st.integers(-3, 70) | st.floats() | _text
_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=10)
_message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "developer",
                                                                         "tool", "", "x"]) | _json,
                                               "content": _text | _json, "name": _json})


_stop = _text | st.lists(_text, max_size=4)
_SAMPLING = {"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "n": st.integers(1, 3), "stop": _stop,
             "stream": st.booleans(), "seed": st.integers(0, 2**32), "presence_penalty": st.floats(-2, 2),
             "top_k": st.integers(-1, 50), "ignore_eos": st.booleans()}
# Bodies of the right shape with odd text (they reach the tokenizer, the engine and the detokenizer).
_PLAUSIBLE = {
    CHAT_PATH: st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                     "content": _text}), min_size=1, max_size=3),
         "max_tokens": st.integers(1, 4)}, optional={**_SAMPLING, "logprobs": st.booleans()}),
    COMPLETIONS_PATH: st.fixed_dictionaries(
        {"prompt": _text | st.lists(st.integers(0, 49151), min_size=1, max_size=8), "max_tokens": st.integers(0, 4)},
        optional={**_SAMPLING, "echo": st.booleans(), "logprobs": st.integers(0, 5)}),
    EMBEDDINGS_PATH: st.fixed_dictionaries(
        {"input": _text | st.lists(_text, min_size=1, max_size=3)},
        optional={"dimensions": st.integers(1, 20), "encoding_format": st.sampled_from(["float", "base64"])}),
}


def _bodies(path: str):
    """Plausible bodies, the required fields with any other fields of any JSON value, or any object at all."""
    fields = FIELDS[path]
    required = {CHAT_PATH: {"messages": st.lists(_message, max_size=3) | _json},
                COMPLETIONS_PATH: {"prompt": _text | st.lists(st.integers(-2, 60000), max_size=6) | _json},
                EMBEDDINGS_PATH: {"input": _text | st.lists(_text, max_size=3) | _json}}
    base = required[path] if path == EMBEDDINGS_PATH else {**required[path], "max_tokens": st.integers(-1, 8) | _json}
    return (_PLAUSIBLE[path]
            | st.fixed_dictionaries(base, optional={f: _json for f in fields if f not in base})
            | st.dictionaries(st.sampled_from(fields) | st.text(max_size=6), _json, max_size=6))


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH])
def test_hypothesis_bodies_never_5xx(server, path):
    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(body=_bodies(path))
    def check(body):
        problem = _survives(server, path, json.dumps(body))
        assert problem is None, problem

    check()
    _still_serving(server)


# ---- schemathesis against the published schema ---------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(server):
    """Every operation of /openapi.json, positive and negative bodies (25 examples each): no 5xx, and every
    answer conforms to the schema the server publishes (the error object included)."""
    schemathesis = pytest.importorskip("schemathesis",
                                       reason="schemathesis is not installed (pip install -e '.[test]')")
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=30)
    failures, ran = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:

            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                case.call_and_validate(base_url=server.url, checks=[not_a_server_error, response_schema_conformance],
                                       timeout=30)

            try:
                check()
            except Exception as e:  # FailureGroup, or a Hypothesis error: report them all together
                failures.append(f"{op.label} ({mode}): {str(e)[:1500]}")
            ran.append(f"{op.label} {mode}")
    assert {"POST /v1/chat/completions positive", "POST /v1/completions negative"} <= set(ran), ran
    assert not failures, "\n\n".join(failures)
    _still_serving(server)
