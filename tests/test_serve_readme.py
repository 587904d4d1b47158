"""The README's "Serving" section as written: `llmlab serve` with no flags, the OpenAI client snippet, the
curl lines and the offline API block; and the flags the command-line list shows, all at once."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import need

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def _section() -> str:
    text = README.read_text()
    return text[text.index("## Serving"):text.index("## What is inside")]


def _blocks(kind: str) -> list[str]:
    """The section's fenced blocks of one language ("" = none): odd pieces between the fences."""
    pieces = _section().split("```")[1::2]
    return [body for lang, _, body in (p.partition("\n") for p in pieces) if lang.strip() == kind]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextlib.contextmanager
def _serve(*flags: str, port: int):
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 180
        while _port_free(port):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline, "the server did not start in 180 s"
            time.sleep(0.3)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()


def test_readme_serve_client_and_curl_as_written(smollm_path):
    need("openai")
    if not _port_free(8000):
        pytest.skip("port 8000 is in use here; `llmlab serve` with no flags needs it")
    with _serve(port=8000) as proc:
        (client_code,) = [b for b in _blocks("python") if "from openai import OpenAI" in b]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(client_code, "README.md", "exec"), {})
        lines = out.getvalue().splitlines()
        assert lines[0].strip() and float(lines[-1]) < 0  # a reply, the streamed text, a log-likelihood
        (shell,) = [b for b in _blocks("") if b.startswith("curl")]
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and '"chat.completion"' in done.stdout and "llmlab_kv" in done.stdout
    assert "llmlab serve: http://127.0.0.1:8000" in proc.stdout.read()


def test_readme_offline_api_block_as_written(smollm_path):
    (code,) = [b for b in _blocks("python") if "from llmlab.serve.engine import" in b]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().strip().splitlines()
    assert len(lines) >= 3 and lines[-1].startswith("[")  # two replies, then the best beam's ids


def test_readme_serve_flags_all_at_once(smollm_path, minilm_path):
    need("httpx")
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--port", str(port), "--api-key", "KEY", "--embedding-model", "all-minilm-l6-v2", "--kv-cache", "1GiB",
             "--max-num-seqs", "64", "--max-batched-tokens", "512", "--speculative-tokens", "0",
             "--no-prefix-caching", "--drain-timeout", "30"]
    with _serve(*flags, port=port):
        base = f"http://127.0.0.1:{port}/v1"
        key = {"Authorization": "Bearer KEY"}
        assert httpx.get(f"{base}/models").status_code == 401
        r = httpx.post(f"{base}/embeddings", headers=key, json={"input": ["hello"], "model": "all-minilm-l6-v2"},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
