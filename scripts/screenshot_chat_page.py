"""Screenshot of the chat page of ``llmlab serve`` for the docs: starts the server with the default (embedded
SmolLM2) model, has a short conversation in headless Chromium and saves a 1200x800 PNG.

    python scripts/screenshot_chat_page.py                      # -> docs/img/chat-page.png
    python scripts/screenshot_chat_page.py --out /tmp/chat.png

Needs chromium, chromedriver (apt-get install chromium chromium-driver) and selenium (pip install selenium).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Hi! What can you help me with?", "Write a short poem about the sea."]
# The default (embedded SmolLM2) model; a small KV cache and a short drain keep start and stop quick.
SERVE = [sys.executable, "-m", "llmlab", "serve", "--host", "127.0.0.1", "--kv-cache", "256MiB", "--drain-timeout", "2"]
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1200,800"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llmlab serve did not come up (exit code {proc.poll()})") from None
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "chat-page.png")
    ap.add_argument("--max-tokens", type=int, default=80, help="per reply (default: 80)")
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        raise SystemExit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(SERVE + ["--port", str(port)])
    profile = tempfile.TemporaryDirectory()
    driver = None
    try:
        _wait_healthy(base, server)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROME_FLAGS + [f"--user-data-dir={profile.name}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        # The viewport exactly 1200x800 (the window size includes no browser chrome in headless, but be exact).
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1200, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        driver.get(base + "/")
        WebDriverWait(driver, 10).until(lambda d: "model:" in d.find_element(By.ID, "model-name").text)

        driver.execute_script("document.getElementById('settings').open = true")
        field = driver.find_element(By.ID, "max-tokens")  # the page's sampling defaults otherwise
        field.clear()
        field.send_keys(str(args.max_tokens))
        driver.execute_script("document.getElementById('settings').open = false")

        for question in QUESTIONS:
            driver.find_element(By.ID, "prompt").send_keys(question)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 120).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-done") == "true")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(10)
        profile.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
