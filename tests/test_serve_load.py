"""The OpenAI-compatible server under load: streamed text, KV-cache pressure, client cancellations, SIGTERM.

What the tests prove (in-process servers from ``tests/serve_server.py``; ``llmlab serve`` as a real process for
the signal):

- streaming is exact on multi-byte text: for Chinese, Japanese, Thai and emoji (ZWJ families, flags) prompts to
  SmolLM2, greedy, every SSE delta is valid UTF-8 with no U+FFFD the full text does not have, the deltas add up to
  the non-streamed text, each choice has exactly one chunk with a ``finish_reason``, and the stream ends with
  ``data: [DONE]``; a stop string that spans a token boundary (inside a character where the output allows) never
  reaches the client, streamed or not;
- KV pressure: 24 concurrent greedy requests on a cache that holds a few of them all complete, the engine
  preempted (``llmlab_preemptions_total`` > 0), and every output is token-identical to the request run alone;
- cancellation: of 100 concurrent streams every tenth client hangs up after its first chunks; exactly those
  are aborted, the others finish, and the server goes back to idle: nothing running or waiting, every KV block free;
- SIGTERM: with streams in flight ``llmlab serve`` keeps generating for them during the drain (a short one
  finishes normally, long ones end with ``finish_reason: "abort"`` after ``--drain-timeout``), answers new
  requests 503 + Retry-After while draining, then closes its socket (connection refused) and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from llmlab.infer.generate import generate
from llmlab.serve.engine import EngineConfig
from llmlab.serve.text import TextTracker, token_piece
from tests.serve_server import Served, error_of, idle, sse, tiny_llama

PROMPTS = {  # chat prompts, and what greedy SmolLM2 answers (checked below: the test needs non-ASCII replies)
    "chinese": "北京是中国的首都。请用中文回答：北京有什么好吃的？",  # Chinese
    "japanese": "日本語で自己紹介してください。",  # Japanese
    "emoji": "Reply only with emoji: 👩‍👩‍👧‍👦 🇫🇷 🇯🇵 👍🏽 😀🎉",  # a ZWJ family and a flag
    "thai": "สวัสดีครับ พูดภาษาไทยได้ไหม",  # Thai, cut by max_tokens inside a character: U+FFFD at the end
}
RAW = {"chinese (completions)": "北京是中国的首都，", "japanese (completions)": "東京は日本の首都で、"}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def real(smollm):
    served = Served(smollm.model, smollm, EngineConfig(kv_blocks=128), model_name="smollm2")
    yield served
    served.close()


def _parallel(fn, items):
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


# ---- streaming correctness ----------------------------------------------------------------------------------------
def _chat_body(prompt: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0, **kw}


def _streamed(served: Served, path: str, body: dict) -> tuple[list[str], list[str | None], list[dict]]:
    """-> (text deltas, finish reasons of the chunks that carry one, events) of choice 0, checking the framing."""
    r = served.post(path, {**body, "stream": True}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = sse(r.content)
    deltas, finals = [], []
    for e in events:
        for c in e["choices"]:
            assert c["index"] == 0
            text = c["delta"].get("content") if path.endswith("chat/completions") else c["text"]
            if text:
                text.encode("utf-8")  # strict: a lone surrogate (half an emoji) would fail
                deltas.append(text)
            if c["finish_reason"] is not None:
                finals.append(c["finish_reason"])
    return deltas, finals, events


def _full(served: Served, path: str, body: dict) -> dict:
    r = served.post(path, body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _generated_bytes(full: dict) -> bytes:
    """The raw bytes of a non-streamed choice's tokens, from its log-probs (the stop token left out)."""
    if "message" in full:
        entries = [bytes(e["bytes"]) for e in full["logprobs"]["content"]]
    else:  # completions: a token that is part of a character is written 'bytes:\\xe5\\x8c'
        entries = [bytes.fromhex(t[len("bytes:"):].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                   for t in full["logprobs"]["tokens"]]
    return b"".join(entries[:-1] if full["finish_reason"] == "stop" else entries)


def test_streamed_multibyte_text_equals_the_full_text(real):
    jobs = [(name, "/v1/chat/completions", _chat_body(prompt)) for name, prompt in PROMPTS.items()]
    jobs += [(name, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
             for name, prompt in RAW.items()]  # raw completions too: the model continues the text itself

    def run(job):
        name, path, body = job
        if body.get("stream"):
            return _streamed(real, path, body)
        return _full(real, path, {**body, "logprobs": True if "chat" in path else 0})  # for the token bytes

    # Streamed and non-streamed requests all at once: they share the engine's steps.
    results = _parallel(run, [j for j in jobs] + [(n, p, {**b, "stream": True}) for n, p, b in jobs])
    fulls, streams = results[:len(jobs)], results[len(jobs):]
    problems = []
    for (name, path, _), full, (deltas, finals, events) in zip(jobs, fulls, streams):
        text = full["message"]["content"] if "message" in full else full["text"]
        reference = _generated_bytes(full).decode("utf-8", errors="replace")  # a full decode of the same tokens
        if text != reference:
            problems.append(f"{name}: full text {text!r} != the decoded tokens {reference!r}")
        joined = "".join(deltas)
        if joined != text:
            problems.append(f"{name}: streamed {joined!r} != full {text!r}")
        if "\ufffd" not in text and any("\ufffd" in d for d in deltas):
            problems.append(f"{name}: a delta has U+FFFD: {deltas!r}")
        if finals != [full["finish_reason"]]:
            problems.append(f"{name}: finish reasons {finals} (full: {full['finish_reason']})")
        if path.endswith("chat/completions") and events[0]["choices"][0]["delta"] != {"role": "assistant",
                                                                                      "content": ""}:
            problems.append(f"{name}: first chunk {events[0]}")
    assert not problems, "\n".join(problems)
    # The prompts did produce what the test is about: non-ASCII text, multi-token characters.
    texts = {name: full["message"]["content"] if "message" in full else full["text"]
             for (name, _, _), full in zip(jobs, fulls)}
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in texts["chinese"] + texts["chinese (completions)"]) > 10, texts
    assert any("\u3040" <= ch <= "\u30ff" for ch in texts["japanese"]), texts
    assert "\u200d" in texts["emoji"] and any(0x1F1E6 <= ord(ch) <= 0x1F1FF for ch in texts["emoji"]), texts
    assert any("\u0e00" <= ch <= "\u0e7f" for ch in texts["thai"]), texts


def _token_boundary_stop(text: str, token_bytes: list[bytes]) -> tuple[str, int]:
    """A 2-character stop string of ``text`` whose first occurrence spans a token boundary, preferring one that
    falls inside a character (a multi-byte character split across tokens) -> (stop, its index)."""
    data = text.encode("utf-8")
    char_at, pos = [], 0  # byte offset -> index of the character holding it
    for i, ch in enumerate(text):
        char_at += [i] * len(ch.encode("utf-8"))
        pos += len(ch.encode("utf-8"))
    cuts, pos = [], 0
    for b in token_bytes:
        pos += len(b)
        if 0 < pos < len(data):
            cuts.append(pos)
    inside = [c for c in cuts if char_at[c] == char_at[c - 1]]  # the cut splits a character
    candidates = [(char_at[c], char_at[c] + 2) for c in inside] + [(char_at[c - 1], char_at[c] + 1) for c in cuts]
    for start, end in candidates:
        stop = text[start:end]
        if start >= 1 and len(stop) == 2 and stop.strip() and text.find(stop) == start:
            return stop, start
    raise AssertionError(f"no stop string spans a token boundary in {text!r}")


@pytest.mark.parametrize("name", ["japanese", "emoji"])
def test_stop_string_across_tokens_never_leaks(real, name):
    body = _chat_body(PROMPTS[name])
    full = _full(real, "/v1/chat/completions", {**body, "logprobs": True})
    text = full["message"]["content"]
    stop, at = _token_boundary_stop(text, [bytes(e["bytes"]) for e in full["logprobs"]["content"]])
    want = text[:at]
    cut, (deltas, finals, _) = _parallel(
        lambda stream: _streamed(real, "/v1/chat/completions", {**body, "stop": [stop]}) if stream
        else _full(real, "/v1/chat/completions", {**body, "stop": [stop]}), [False, True])
    assert cut["message"]["content"] == want and cut["finish_reason"] == "stop", (stop, text, cut)
    assert "".join(deltas) == want and finals == ["stop"], (stop, text, deltas)
    assert not any(stop in "".join(deltas[:i + 1]) for i in range(len(deltas)))


# ---- KV pressure --------------------------------------------------------------------------------------------------
KV_BLOCKS, BLOCK = 40, 4  # 160 positions; 24 requests of 34-54 positions need ~1,000


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama()  # vocab 512, context 256: SmolLM2's tokenizer decodes its ids


@pytest.fixture(scope="module")
def pressured(tiny_model, smollm):
    served = Served(tiny_model, smollm, EngineConfig(block_size=BLOCK, kv_blocks=KV_BLOCKS, max_num_seqs=24,
                                                     max_batched_tokens=96), model_name="tiny")
    yield served
    served.close()


def _prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def test_kv_pressure_preempts_and_matches_lone_runs(pressured, tiny_model, smollm):
    prompts = _prompts(24, 10, 31, seed=5)
    tok = smollm.tokenizer

    def one(prompt):
        return _full(pressured, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                   "ignore_eos": True, "logprobs": 0})

    got = _parallel(one, prompts)
    m = pressured.wait_idle()
    assert m["llmlab_preemptions_total"] > 0, "the KV budget was meant to force preemption"
    assert idle(m), m
    for prompt, choice in zip(prompts, got):
        alone = generate(tiny_model, [prompt], MAX_TOKENS)[0].ids
        tracker = TextTracker(tok)
        text = tracker.push(alone) + tracker.finish()
        assert choice["finish_reason"] == "length"
        assert choice["logprobs"]["tokens"] == [token_piece(tok, t)[0] for t in alone], prompt
        assert choice["text"] == text


# ---- cancellation -------------------------------------------------------------------------------------------------
CROWD_CONTEXT = 1024


@pytest.fixture(scope="module")
def crowded(smollm):
    served = Served(tiny_llama(context=CROWD_CONTEXT), smollm,
                    EngineConfig(kv_blocks=1024, max_num_seqs=64, max_batched_tokens=512), model_name="tiny")
    yield served
    served.close()


def test_cancelled_streams_are_aborted_and_free_their_blocks(crowded):
    """100 concurrent streams; every tenth client closes its connection after two chunks. Those would run to
    the end of the context (about a thousand steps): only an abort stops them. ``logprobs: 0`` makes every token
    a chunk (random byte tokens are often held back as incomplete UTF-8)."""
    prompts = _prompts(100, 5, 30, seed=7)
    before = crowded.metrics().get('llmlab_sequences_finished_total{reason="abort"}', 0)

    async def one(client: httpx.AsyncClient, i: int):
        cancel = i % 10 == 0
        body = {"prompt": prompts[i], "max_tokens": CROWD_CONTEXT - len(prompts[i]) if cancel else 8, "stream": True,
                "temperature": 0, "ignore_eos": True, "logprobs": 0}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if cancel and len(events) == 2:
                        return None  # leaving the block closes the connection mid-stream
        assert events[-1] == "[DONE]"
        return [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]

    async def crowd():
        async with httpx.AsyncClient(base_url=crowded.url, timeout=60,
                                     limits=httpx.Limits(max_connections=128)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    results = asyncio.run(crowd())
    kept = [r for i, r in enumerate(results) if i % 10]
    assert all(r is None for i, r in enumerate(results) if i % 10 == 0)
    assert all([f for f in r if f] == ["length"] for r in kept), kept
    m = crowded.wait_idle(timeout=10)
    assert idle(m), {k: v for k, v in m.items() if "requests_" in k or "kv_blocks" in k}
    assert m.get('llmlab_sequences_finished_total{reason="abort"}', 0) - before == 10, m
    assert m['llmlab_sequences_finished_total{reason="length"}'] >= 90


# ---- SIGTERM --------------------------------------------------------------------------------------------------------
DRAIN = 5.0


class _Reader(threading.Thread):
    """Reads one chat stream in the background, timestamping each event."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[tuple[float, str]] = []
        self.error: BaseException | None = None

    def run(self):
        body = {"messages": [{"role": "user", "content": "Write a long story about the sea."}],
                "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line[len("data: "):]))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def content_after(self, t: float) -> int:
        return sum(1 for ts, e in self.events if ts > t and '"content":"' in e and '"content":""' not in e)

    def finish_reasons(self) -> list[str]:
        out = []
        for _, e in self.events:
            if e != "[DONE]":
                out += [c["finish_reason"] for c in json.loads(e)["choices"] if c["finish_reason"]]
        return out


def test_sigterm_drains_in_flight_streams_then_exits_0():
    """``llmlab serve`` as a process (SmolLM2, one thread). During the drain the socket stays open and new
    requests get 503 + Retry-After; once it is over the process closes the socket (connection refused)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmlab", "serve", "--port", "0", "--drain-timeout", str(DRAIN), "--kv-cache", "256MiB",
         "--max-num-seqs", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("llmlab serve: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        readers = [_Reader(url, 1000) for _ in range(3)] + [_Reader(url, 8)]
        for r in readers:
            r.start()
        deadline = time.monotonic() + 60
        while not all(r.content_after(0) or r.error for r in readers):
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.02)
        assert not any(r.error for r in readers), [r.error for r in readers]
        term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/health").status_code == 503
        refused = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert error_of(refused, lambda s: s == 503)["code"] == "draining" and "retry-after" in refused.headers
        for r in readers:
            r.join(DRAIN + 15)
            assert not r.is_alive() and r.error is None, r.error
            assert r.events[-1][1] == "[DONE]"
        *long, short = readers
        assert short.finish_reasons() == ["length"]
        for r in long:
            assert r.finish_reasons() == ["abort"]
            assert r.content_after(term + 0.5) > 0  # it kept generating during the drain
        assert proc.wait(timeout=DRAIN + 15) == 0
        assert time.monotonic() - term < DRAIN + 15
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
