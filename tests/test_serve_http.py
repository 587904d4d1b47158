"""The OpenAI-compatible server end to end: a real uvicorn on a loopback port, the official ``openai`` client,
and raw HTTP for the error contract (OpenAI's error object, 400 never 5xx for bad input).

Two in-process servers, one per module: a tiny random Llama with SmolLM2's tokenizer and a 64-token context
(the error matrix and the context boundary, where the model does not matter), and the real SmolLM2 with an
API key (outputs, log-probs, streaming, embeddings). The SIGTERM drain runs ``llmlab serve`` as a subprocess.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest
import torch

pytest.importorskip("llmlab.serve.async_engine", reason="the lead's AsyncEngine is not there yet")

from llmlab.models.config import ModelConfig  # noqa: E402
from llmlab.models.registry import build_model  # noqa: E402
from llmlab.serve.async_engine import AsyncEngine  # noqa: E402
from llmlab.serve.engine import Engine, EngineConfig  # noqa: E402
from llmlab.serve.http import EmbeddingModel, create_app  # noqa: E402

openai = pytest.importorskip("openai")
TINY_CONTEXT = 64
KEY = "test-key"


class _Served:
    """An app on 127.0.0.1 (a free port) in a uvicorn thread."""

    def __init__(self, app, engine):
        import uvicorn

        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()


def _serve(model, llm, engine_config: EngineConfig, **kw) -> _Served:
    engine = AsyncEngine(Engine(model, engine_config))
    engine.start()
    app = create_app(engine, tokenizer=llm.tokenizer, model_name=kw.pop("model_name"), render_chat=llm.render_chat,
                     stop_ids=llm.stop_ids(), **kw)
    return _Served(app, engine)


@pytest.fixture(scope="module")
def tiny(smollm):
    """A 2-layer random Llama (64-token context) speaking SmolLM2's tokens and chat template."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=smollm.config.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=128, max_seq_len=TINY_CONTEXT)
    served = _serve(build_model(cfg).eval(), smollm, EngineConfig(kv_blocks=128, max_n=8), model_name="tiny")
    yield served
    served.close()


@pytest.fixture(scope="module")
def real(smollm, minilm):
    def count(texts):
        return sum(len(minilm.tokenizer.encode(t, add_special=True)) for t in texts)

    served = _serve(smollm.model, smollm, EngineConfig(kv_blocks=512), model_name="smollm2-135m-instruct",
                    api_key=KEY, embedding=EmbeddingModel("all-minilm-l6-v2", minilm.embed, count),
                    aliases=("default",))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(real):
    return openai.OpenAI(base_url=f"{real.url}/v1", api_key=KEY, max_retries=0, timeout=120)


_http = httpx.Client(timeout=60)  # one connection pool: a client per request costs ~50 ms (TLS setup)


def _post(served, path: str, body, headers=None, key=None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    hdrs = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    return _http.post(served.url + path, content=content, headers=hdrs)


def _error(r: httpx.Response, status: int, param: str | None = "unset") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "unset":
        assert err["param"] == param, err
    return err


def _sse(r: httpx.Response) -> list:
    """The JSON events of a text/event-stream body, checking the framing and the final [DONE]."""
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    events = [block for block in r.text.split("\n\n") if block.strip()]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


# ---- the error contract (tiny model) ------------------------------------------------------------------------------
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"prompt": "hi", "max_tokens": 1}
BAD_ANY = ["NaN", "Infinity", "-Infinity", "1e400", str(10**40), '"abc"', "[1]", "{}", "true"]
# parameter -> (valid values, invalid values) as raw JSON text, beyond BAD_ANY; null is always valid ("not given").
NUMERIC = {
    "temperature": (["0", "2", "0.7", "1"], ["-1", "-0.001", "2.001", "3"]),
    "top_p": (["0", "1", "0.5"], ["-1", "1.001", "2"]),
    "n": (["1", "8"], ["0", "9", "-1", "1.5", "129"]),
    "presence_penalty": (["-2", "2", "0"], ["-3", "-2.01", "2.01", "3"]),
    "frequency_penalty": (["-2", "2", "0"], ["-3", "2.01", "3"]),
    "seed": (["0", str(-2**63), str(2**63 - 1), "42"], [str(2**63), str(-2**63 - 1), "1.5"]),
    "top_k": (["-1", "0", "1", "50"], ["-2", "1.5"]),
    "min_p": (["0", "1", "0.1"], ["-1", "1.01", "2"]),
    "repetition_penalty": (["0.01", "10", "1.1"], ["0", "-1", "10.01", "11"]),
    "max_tokens": (["1", "2"], ["-1", "1.5", "0.5"]),
}
ENDPOINT_ONLY = {
    "/v1/completions": {"logprobs": (["0", "5"], ["-1", "6", "1.5"])},
    "/v1/chat/completions": {"top_logprobs": (["0", "20"], ["-1", "21", "1.5"]),
                             "max_completion_tokens": (["1"], ["0", "-1", "1.5"])},
}


def _raw_body(base: dict, name: str, raw: str) -> str:
    body = {**base}
    if name == "top_logprobs":
        body["logprobs"] = True
    text = json.dumps(body)
    return text[:-1] + f', "{name}": {raw}}}'


def _matrix():
    for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        for name, (good, bad) in {**NUMERIC, **ENDPOINT_ONLY[path]}.items():
            for raw in good + ["null"]:
                yield path, base, name, raw, True
            for raw in bad + BAD_ANY:
                yield path, base, name, raw, False


MATRIX = list(_matrix())


@pytest.mark.parametrize("stream", [False, True])
def test_numeric_parameter_matrix(tiny, stream):
    """Every numeric parameter at and beyond its bounds, NaN, +-Infinity, 10**40, wrong types, null: invalid
    -> 400 naming the parameter, valid -> 200; never a 5xx. Both endpoints, streamed and not."""
    failures = []
    for path, base, name, raw, valid in MATRIX:
        base_s = {**base, "stream": stream}
        r = _post(tiny, path, _raw_body(base_s, name, raw))
        got = r.status_code
        ok = got == 200 if valid else (got == 400 and r.json()["error"]["param"] == name)
        if not ok:
            failures.append(f"{path} {name}={raw} stream={stream}: {got} {r.text[:200]}")
        elif valid and stream:
            _sse(r)
    assert not failures, "\n".join(failures)


def test_error_message_names_field_and_limit(tiny):
    err = _error(_post(tiny, "/v1/chat/completions", {**CHAT, "temperature": 3.5}), 400, "temperature")
    assert err["message"] == "temperature: must be <= 2 (got 3.5)" and err["type"] == "invalid_request_error"
    err = _error(_post(tiny, "/v1/completions", _raw_body(COMPLETION, "top_p", "NaN")), 400, "top_p")
    assert "finite" in err["message"] and "NaN" in err["message"]
    err = _error(_post(tiny, "/v1/completions", {**COMPLETION, "max_tokens": "5"}), 400, "max_tokens")
    assert "integer" in err["message"]
    err = _error(_post(tiny, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}), 400)
    assert err["param"] == "messages[0].role"


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({**CHAT, "stop": [""]}, "stop"),
    ({**CHAT, "stop": ["x"] * 17}, "stop"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "model": 5}, "model"),
])
def test_chat_body_errors(tiny, body, param):
    _error(_post(tiny, "/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [[1, 2], "x", 3]}, "prompt"),
    ({"prompt": ["x"] * 65}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "echo": 1}, "echo"),
])
def test_completion_body_errors(tiny, body, param):
    _error(_post(tiny, "/v1/completions", body), 400, param)


def test_transport_errors(tiny):
    url = tiny.url + "/v1/chat/completions"
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, content=b'{"messages": "\xff\xfe"}', headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, content=b"", headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, content=b"{}", headers={"content-type": "text/plain"}), 415)
    _error(httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}),
           400)
    _error(httpx.post(url, content="9" * 5000, headers={"content-type": "application/json"}), 400)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (3 << 20)}]})
    _error(httpx.post(url, content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(40):
            yield b" " * (100 << 10)

    _error(httpx.post(url, content=chunks(), headers={"content-type": "application/json"}), 413)
    _error(httpx.get(tiny.url + "/v1/nothing"), 404)
    _error(httpx.get(url), 405)


def test_unknown_model_and_aliases(tiny):
    err = _error(_post(tiny, "/v1/chat/completions", {**CHAT, "model": "gpt-4"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert _post(tiny, "/v1/chat/completions", {**CHAT, "model": "tiny"}).status_code == 200
    _error(_post(tiny, "/v1/embeddings", {"input": "x"}), 404)  # no embedding model on this server


def test_n_above_engine_limit_is_refused_before_allocation(tiny):
    before = tiny.engine.stats().kv_blocks_used
    err = _error(_post(tiny, "/v1/completions", {**COMPLETION, "n": 9}), 400, "n")
    assert "8" in err["message"]
    assert tiny.engine.stats().kv_blocks_used == before


def _chat_text_with_tokens(llm, target: int) -> str:
    """User content whose rendered chat prompt is exactly ``target`` tokens."""
    for filler in (" a", " b c", " ok"):
        for k in range(200):
            content = ("x" + filler * k)
            if len(llm.tokenizer.encode(llm.render_chat([{"role": "user", "content": content}]))) == target:
                return content
    raise AssertionError(f"no content renders to {target} tokens")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_context_boundary(tiny, smollm, endpoint):
    L = TINY_CONTEXT
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    prompt_param = "prompt" if endpoint == "completions" else "messages"

    def body(P, **kw):
        if endpoint == "completions":
            return {"prompt": [42] * P, **kw}
        return {"messages": [{"role": "user", "content": _chat_text_with_tokens(smollm, P)}], **kw}

    assert _post(tiny, path, body(L - 1)).status_code == 200
    for P in (L, L + 1):
        err = _error(_post(tiny, path, body(P)), 400, prompt_param)
        assert f"{P} tokens" in err["message"] and f"{L} tokens" in err["message"]
    assert _post(tiny, path, body(L - 1, max_tokens=1)).status_code == 200
    for P, M in ((L, 1), (L - 1, 2), (L + 1, 1)):
        err = _error(_post(tiny, path, body(P, max_tokens=M)), 400, "max_tokens")
        assert f"{P} tokens" in err["message"] and f"max_tokens is {M}" in err["message"] and str(L) in err["message"]
    if endpoint == "chat":  # without max_tokens a chat reply may fill the context
        r = _post(tiny, path, body(L - 3, ignore_eos=True, temperature=0))
        assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"


def test_batch_prompts_and_token_prompts(tiny):
    r = _post(tiny, "/v1/completions", {"prompt": ["a", [1, 2, 3], "b"], "max_tokens": 2, "n": 2, "temperature": 0})
    choices = r.json()["choices"]
    assert r.status_code == 200 and sorted(c["index"] for c in choices) == list(range(6))


def test_health_models_metrics(tiny):
    assert httpx.get(tiny.url + "/health").json() == {"status": "ok"}
    page = httpx.get(tiny.url + "/")  # the web chat page, open without a key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    cards = httpx.get(tiny.url + "/v1/models").json()["data"]
    assert cards[0]["id"] == "tiny" and cards[0]["max_model_len"] == TINY_CONTEXT
    _post(tiny, "/v1/completions", COMPLETION)
    text = httpx.get(tiny.url + "/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    for name in ("llmlab_kv_blocks_total", "llmlab_requests_waiting", "llmlab_generation_tokens_total",
                 "llmlab_time_to_first_token_seconds_bucket", "llmlab_request_latency_seconds_count",
                 'llmlab_http_requests_total{endpoint="/v1/completions",status="200"}',
                 "llmlab_prefix_cache_hit_rate", 'llmlab_sequences_finished_total{reason="length"}'):
        assert name in text.text, name


def test_openapi_schema_documents_errors(tiny):
    schema = httpx.get(tiny.url + "/openapi.json").json()
    op = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "404", "429", "503"} <= set(op["responses"])
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["temperature"]["anyOf"][0]["maximum"] == 2


# ---- the real model through the official client ---------------------------------------------------------------
def test_auth(real, client):
    r = _post(real, "/v1/chat/completions", CHAT)
    assert _error(r, 401)["code"] == "invalid_api_key"
    _error(_post(real, "/v1/chat/completions", CHAT, key="wrong"), 401)
    assert httpx.get(real.url + "/health").status_code == 200  # open
    bad = openai.OpenAI(base_url=f"{real.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert {m.id for m in client.models.list().data} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def test_completion_and_usage(client, smollm):
    r = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=6,
                                  temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion" and c.text and c.finish_reason in ("stop", "length")
    P = len(smollm.tokenizer.encode("The capital of France is"))
    assert r.usage.prompt_tokens == P and r.usage.total_tokens == P + r.usage.completion_tokens
    assert smollm.generate("The capital of France is", 6) == c.text  # the engine's greedy == the reference loop


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="default", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=12,
              temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content and text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_stop_string(client):
    kw = dict(model="default", messages=[{"role": "user", "content": "Count from 1 to 10."}], max_tokens=24,
              temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full.strip()[2:5]
    assert stop and stop in full
    cut = client.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == cut.message.content


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content).startswith(
        r.choices[0].message.content[:1])


def test_echo_logprobs_scores_the_prompt(client, smollm):
    """lm-evaluation-harness's local-completions log-likelihood request: echo + logprobs + max_tokens 0."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = smollm.tokenizer.encode(prompt)
    r = client.completions.create(model="default", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    with torch.no_grad():
        logits = smollm.model(torch.tensor([ids]))
        ref = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), ref, atol=2e-3)
    assert "".join(lp.tokens) == prompt
    # max_tokens 1 (what the harness sends): the prompt's entries, then the one new token's.
    r1 = client.completions.create(model="default", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(r1.choices[0].logprobs.token_logprobs) == len(ids) + 1
    assert r1.choices[0].text.startswith(prompt)


def test_n_and_seed(client):
    kw = dict(model="default", prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # n samples, not one sample n times
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          n=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_embeddings(client, minilm):
    texts = ["a cat sat on the mat", "quantum chromodynamics"]
    r = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    ref = minilm.embed(texts)
    got = torch.tensor([d.embedding for d in r.data])
    assert torch.allclose(got, ref, atol=1e-5) and r.usage.prompt_tokens > 0
    small = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], dimensions=64)
    v = torch.tensor(small.data[0].embedding)
    assert v.shape == (64,) and math.isclose(v.norm().item(), 1.0, rel_tol=1e-5)
    assert torch.allclose(v, torch.nn.functional.normalize(ref[0, :64], dim=0), atol=1e-5)
    raw = client.embeddings.with_raw_response.create(model="default", input=texts[0],
                                                    encoding_format="base64").http_response.json()
    decoded = torch.frombuffer(bytearray(base64.b64decode(raw["data"][0]["embedding"])), dtype=torch.float32)
    assert torch.allclose(decoded, ref[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="default", input=texts[0], dimensions=385)


def _engine_idle(served, timeout=20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = served.engine.stats()
        if s.running == 0 and s.waiting == 0:
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_aborts(real):
    """A client that goes away mid-generation frees its sequence, streamed or not."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    aborted = real.engine.stats().finished.get("abort", 0)
    with httpx.stream("POST", real.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # got a token: hang up
    assert _engine_idle(real)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1.5 s and closes the connection
        httpx.post(real.url + "/v1/chat/completions", json={**body, "stream": False},
                   headers={"authorization": f"Bearer {KEY}"}, timeout=1.5)
    assert _engine_idle(real)
    assert real.engine.stats().finished.get("abort", 0) >= aborted + 2


# ---- the command ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["serve", "--kv-cache", "12XB"], "is not a size"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--model", "/nonexistent/model.gguf"], "no such file"),
    (["serve", "--max-n", "0"], "--max-n"),
])
def test_serve_flag_errors(argv, needle, capsys):
    from llmlab.cli import main

    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_command_drains_on_sigterm(smollm_path):
    """``llmlab serve`` as a real process: ready line, a stream in flight, SIGTERM -> /health 503, new requests
    503, the stream ends (finished or aborted after --drain-timeout), exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", "--port", "0", "--drain-timeout", "2",
                             "--kv-cache", "64MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("llmlab serve: http://127.0.0.1:") and "(model smollm2-135m-instruct)" in line, \
            line + proc.stderr.read()
        url = line.split()[2]
        body = {"messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 1000,
                "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            for text in lines:
                if text.startswith("data: {") and '"content":"' in text and '"content":""' not in text:
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(url + "/health").status_code == 503
            refused = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
            assert _error(refused, 503)["code"] == "draining" and "retry-after" in refused.headers
            events = [t for t in lines if t.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        finals = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]
                  if json.loads(e[6:])["choices"]]
        assert finals[-1] == "abort"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
