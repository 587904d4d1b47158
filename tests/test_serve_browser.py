"""The chat page of ``llmlab serve`` end to end in headless Chromium: the real server with the embedded SmolLM2
streams into the page; Stop cancels the request on the server; model output never becomes HTML.

Skips when chromium / chromedriver are missing (``make setup-test`` installs them where it can)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Flags for a machine without internet: no background traffic, no sandbox (containers), fresh profile per run.
# The default (embedded SmolLM2) model; a small KV cache and a short drain keep start and stop quick.
SERVE = [sys.executable, "-m", "llmlab", "serve", "--host", "127.0.0.1", "--kv-cache", "256MiB", "--drain-timeout", "2"]
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,800"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def gauge(metrics_text: str, name: str) -> float:
    """A Prometheus gauge's value from the text exposition (``serve/metrics.py`` names them)."""
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics_text, re.M)
    assert m, f"no {name} in /metrics:\n{metrics_text[:2000]}"
    return float(m.group(1))


def busy(server: str) -> float:
    """Requests the engine is decoding or has queued."""
    text = _get(server + "/metrics").decode()
    return gauge(text, "llmlab_requests_running") + gauge(text, "llmlab_requests_waiting")


@pytest.fixture(scope="module")
def server():
    """``llmlab serve`` on a free loopback port with the default (embedded SmolLM2) model."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(SERVE + ["--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    _get(base + "/health", timeout=1)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"llmlab serve did not come up (exit {proc.poll()}):\n"
                                    f"{log.read().decode(errors='replace')[-3000:]}")
                    time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.TemporaryDirectory()
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield d
    finally:
        d.quit()
        profile.cleanup()


@pytest.fixture
def page(server, driver):
    """The chat page freshly loaded, with its model name shown."""
    driver.get(server + "/")
    WebDriverWait(driver, 10).until(lambda d: "model:" in d.find_element(By.ID, "model-name").text)
    return driver


def _set(driver, element_id: str, value) -> None:
    """Type into a field (opening the settings panel first: its fields are hidden while it is collapsed)."""
    driver.execute_script("document.getElementById('settings').open = true")
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def _last_assistant(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


# Records (text length, done) of the newest assistant bubble on every DOM change, so the test sees each streamed
# update however fast the model is, instead of hoping to poll at the right moments.
WATCH = """
window.__seen = [];
new MutationObserver(() => {
  const all = document.querySelectorAll('.msg.assistant');
  const last = all[all.length - 1];
  if (last) window.__seen.push([last.querySelector('.text').textContent.length, last.dataset.done]);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true,
                                                  attributes: true});
"""


def test_page_shows_the_served_model(page, server):
    served = json.loads(_get(server + "/v1/models"))["data"][0]["id"]
    assert page.find_element(By.ID, "model-name").text == f"model: {served}"
    # The chat defaults and the controls the page promises.
    assert page.find_element(By.ID, "temperature").get_attribute("value") == "0.7"
    assert page.find_element(By.ID, "top-p").get_attribute("value") == "0.9"
    assert page.find_element(By.ID, "max-tokens").get_attribute("value") == "512"
    assert page.find_element(By.ID, "stop").get_attribute("disabled") is not None


def test_reply_streams_in_with_stats(page):
    page.find_element(By.TAG_NAME, "summary").click()  # the settings panel opens on click
    assert page.find_element(By.ID, "temperature").is_displayed()
    _set(page, "temperature", 0)
    _set(page, "max-tokens", 24)
    page.execute_script(WATCH)
    page.find_element(By.ID, "prompt").send_keys("Say hello and introduce yourself.")
    page.find_element(By.ID, "send").click()

    bubble = _last_assistant(page)
    WebDriverWait(page, 30, poll_frequency=0.05).until(lambda d: bubble.get_attribute("data-done") == "true")
    text = bubble.find_element(By.CLASS_NAME, "text").text
    assert text.strip()
    growing = sorted({n for n, done in page.execute_script("return window.__seen") if done == "false" and n > 0})
    assert len(growing) >= 2, f"the reply arrived in one piece, not streamed: {growing}"
    stats = page.find_element(By.ID, "stats").text
    assert re.search(r"\d+ tokens? · \d+\.\d tokens/s · TTFT \d+ ms", stats), stats
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()
    assert page.find_element(By.CSS_SELECTOR, ".msg.user").text == "Say hello and introduce yourself."


def test_stop_cancels_the_stream_on_the_server(page, server):
    _set(page, "max-tokens", 400)
    page.find_element(By.ID, "prompt").send_keys("Write a long story about a dragon who learns to cook.")
    page.find_element(By.ID, "send").click()
    bubble = _last_assistant(page)
    out = bubble.find_element(By.CLASS_NAME, "text")
    WebDriverWait(page, 30, poll_frequency=0.05).until(lambda d: len(out.text) > 10)
    assert bubble.get_attribute("data-done") == "false", "the reply finished before Stop could be pressed"

    page.find_element(By.ID, "stop").click()
    t0 = time.monotonic()
    WebDriverWait(page, 2, poll_frequency=0.02).until(lambda d: bubble.get_attribute("data-done") == "true")
    assert time.monotonic() - t0 < 2
    stopped_at = out.text
    assert "stopped" in page.find_element(By.ID, "stats").text
    time.sleep(0.5)
    assert out.text == stopped_at, "text kept arriving after Stop"

    # The server noticed the disconnect and cancelled the request.
    deadline = time.monotonic() + 5
    while (left := busy(server)) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == 0, "the request kept running on the server after Stop"

    # The page is ready for the next message.
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()


# A fake fetch for /v1/chat/completions: a stream whose events are split across reads (also inside a multi-byte
# character), or a 400 with OpenAI's error body. Exercises the page's parsing and rendering exactly.
FAKE_FETCH = """
const [mode, pieces] = arguments;
window.__requests = [];
window.fetch = async (url, init) => {
  if (!String(url).includes('/chat/completions')) return fetch0(url, init);
  window.__requests.push(JSON.parse(init.body));
  window.__headers = init.headers;
  if (mode === 'error') return new Response(JSON.stringify({error: {message: 'max_tokens is too large'}}),
                                            {status: 400, headers: {'Content-Type': 'application/json'}});
  const bytes = new TextEncoder().encode(pieces.join(''));
  // Reads of 7 bytes, and one cut right after the lead byte of each 3-byte UTF-8 character.
  const cuts = new Set([bytes.length]);
  bytes.forEach((b, i) => { if (i % 7 === 0) cuts.add(i); if (b >= 0xe0) cuts.add(i + 1); });
  const ends = [...cuts].sort((a, b) => a - b);
  return new Response(new ReadableStream({
    async start(c) {
      for (let i = 0; i + 1 < ends.length; i++) { c.enqueue(bytes.slice(ends[i], ends[i + 1]));
                                                 await new Promise(r => setTimeout(r, 1)); }
      c.close();
    }}), {status: 200, headers: {'Content-Type': 'text/event-stream'}});
};
"""


def _fake(driver, mode: str, deltas: list[str] = ()) -> None:
    events = [f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\r\n\r\n",
              ": keep-alive comment\n\n"]
    events += [f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': d}}]}, ensure_ascii=False)}\n\n"
               for d in deltas]
    events += [f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n",
               "data: [DONE]\n\n"]
    driver.execute_script("window.fetch0 = window.fetch0 || window.fetch;" + FAKE_FETCH, mode, events)


def test_model_output_is_literal_text_and_sse_is_parsed_across_reads(page):
    deltas = ["<b>bold</b>", " <script>window.__pwned = 1</script>", "\n  <img src=x onerror=\"window.__pwned=2\">",
              " héllo 日本", "  spaced\tout"]
    _fake(page, "ok", deltas)
    prompt = page.find_element(By.ID, "prompt")
    prompt.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line", Keys.ENTER)  # Enter sends

    bubble = _last_assistant(page)
    WebDriverWait(page, 10).until(lambda d: bubble.get_attribute("data-done") == "true")
    text_el = bubble.find_element(By.CLASS_NAME, "text")
    assert page.execute_script("return arguments[0].textContent", text_el) == "".join(deltas)
    assert page.execute_script("return arguments[0].children.length", text_el) == 0  # no elements were created
    assert page.execute_script("return window.__pwned") is None
    assert page.find_element(By.CSS_SELECTOR, ".msg.user").text == "first line\nsecond line"
    request = page.execute_script("return window.__requests[0]")
    assert "model" in request and request["stream"] is True
    assert request["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    assert (request["temperature"], request["top_p"], request["max_tokens"]) == (0.7, 0.9, 512)
    assert "5 tokens" in page.find_element(By.ID, "stats").text

    # The unit itself: renderText never parses markup.
    assert page.execute_script(
        "const d = document.createElement('div'); window.llmlab.renderText(d, '<i>x</i>');"
        "return [d.textContent, d.children.length]") == ["<i>x</i>", 0]

    # The next request carries the conversation, with the system prompt first.
    _set(page, "system", "Be brief.")
    prompt.send_keys("again", Keys.ENTER)
    WebDriverWait(page, 10).until(lambda d: _last_assistant(d).get_attribute("data-done") == "true")
    roles = [m["role"] for m in page.execute_script("return window.__requests[1]")["messages"]]
    assert roles == ["system", "user", "assistant", "user"]

    # New chat clears the conversation.
    page.find_element(By.ID, "new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, "#messages .msg") == []


def test_server_errors_are_shown(page):
    _fake(page, "error")
    page.find_element(By.ID, "prompt").send_keys("hi", Keys.ENTER)
    bubble = _last_assistant(page)
    WebDriverWait(page, 10).until(lambda d: bubble.get_attribute("data-done") == "true")
    assert "max_tokens is too large" in bubble.find_element(By.CLASS_NAME, "error").text
    assert page.find_element(By.ID, "send").is_enabled()


def test_api_key_is_sent_as_bearer(page):
    _fake(page, "ok", ["ok"])
    _set(page, "api-key", "sk-test")
    page.find_element(By.ID, "prompt").send_keys("hi", Keys.ENTER)
    WebDriverWait(page, 10).until(lambda d: _last_assistant(d).get_attribute("data-done") == "true")
    assert page.execute_script("return window.__headers")["Authorization"] == "Bearer sk-test"
    assert page.execute_script("return localStorage.getItem('llmlab.apiKey')") == "sk-test"
    page.execute_script("localStorage.removeItem('llmlab.apiKey')")
