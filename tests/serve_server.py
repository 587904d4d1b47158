"""In-process OpenAI-compatible servers and HTTP helpers for the serving tests (``test_serve_fuzz.py``,
``test_serve_load.py``).

A server here is the whole stack: ``Engine`` -> ``AsyncEngine`` (its stepping thread) -> ``create_app`` ->
uvicorn on a free loopback port, in a daemon thread of the test process. While one is up PyTorch runs on one
thread (``Served`` sets it and puts the old value back on ``close``): the machine's cores are shared by the
engine thread, the event loop, the client and other jobs, and OpenMP workers spinning against each other make
every step slower, not faster.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable

import httpx
import torch

from llmlab.models import build_model, get_preset
from llmlab.serve.async_engine import AsyncEngine
from llmlab.serve.engine import Engine, EngineConfig
from llmlab.serve.http import create_app

ERROR_KEYS = {"message", "type", "param", "code"}


class Served:
    """``create_app`` over a started engine, served by uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, model, llm, config: EngineConfig, *, model_name: str = "test", **app_kw):
        import uvicorn

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.engine = AsyncEngine(Engine(model, config))
        self.engine.start()
        app = create_app(self.engine, tokenizer=llm.tokenizer, model_name=model_name, render_chat=llm.render_chat,
                         stop_ids=llm.stop_ids(), **app_kw)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.shutdown()
        torch.set_num_threads(self._threads)

    # -- requests ----------------------------------------------------------------------------------------------
    def post(self, path: str, body, *, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
        """POST a dict (as JSON) or raw str / bytes, with Content-Type application/json unless overridden."""
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return self.http.post(path, content=content, timeout=timeout,
                              headers={"content-type": "application/json", **(headers or {})})

    def metrics(self) -> dict[str, float]:
        return scrape(self.http.get("/metrics").text)

    def wait_idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and every KV block is free; -> the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if idle(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


def idle(m: dict[str, float]) -> bool:
    return (m["llmlab_requests_running"] == 0 and m["llmlab_requests_waiting"] == 0
            and m["llmlab_kv_blocks_free"] == m["llmlab_kv_blocks_total"])


def scrape(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{label="v"}': value} (no labels: just the name)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def tiny_llama(vocab_size: int | None = None, context: int | None = None, seed: int = 0):
    """llama-tiny (2 layers, dim 64), optionally with another vocabulary size / context, with its random weights
    sharpened (as ``test_serve_engine.py``): fewer near-ties, so greedy tokens do not depend on the batch."""
    cfg = get_preset("llama-tiny")
    cfg = dataclasses.replace(cfg, vocab_size=vocab_size or cfg.vocab_size, max_seq_len=context or cfg.max_seq_len)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def error_of(r: httpx.Response, statuses: Callable[[int], bool] = lambda s: 400 <= s < 500) -> dict:
    """The OpenAI error object of a refused request, checking its shape; fails on a 5xx or a success."""
    assert statuses(r.status_code), f"{r.status_code}: {r.text[:300]}"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    assert len(err["message"]) < 1000 and "Traceback" not in err["message"], err
    return err


def sse(raw: bytes) -> list[dict]:
    """The JSON events of a complete text/event-stream body: checks the framing (``data: `` events separated by
    blank lines, valid UTF-8 throughout) and that ``data: [DONE]`` comes last, once."""
    text = raw.decode("utf-8")  # strict: a split character would fail here
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events and events[-1] == "data: [DONE]", events[-3:]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [json.loads(e[len("data: "):]) for e in events[:-1]]
