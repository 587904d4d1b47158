"""The learning-path site (mkdocs.yml, docs/): builds with `mkdocs build --strict` (broken links, anchors and
pages missing from the nav fail it), every technique page has the parts the path promises, the code shown is
read from the modules at build time, the nav and the index follow one storyline, the README's relative links
point at files that exist, and the built site works in a real browser (headless Chromium: every nav link opens
a page, its figures load, its equations are typeset by the vendored MathJax; nothing is fetched from the
network: every script, stylesheet and font is part of the site).

The site is built once per module (``site`` fixture)."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs" / "path").glob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` of the whole site into a temporary folder, once for every test here."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("material", reason="mkdocs-material is in the test extra: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("docs") / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalise(command: str) -> str:
    return " ".join(command.split(" #")[0].split())


def _readme_commands() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line for block in re.findall(r"```[\w-]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]+)`", text)
    return {_normalise(line) for line in lines if line.strip()}


def test_site_builds_strictly(site):
    for page in PAGES:
        html = (site / "path" / page.stem / "index.html").read_text(encoding="utf-8")
        assert "<!-- code:" not in html and re.search(r"\.py</code>, lines \d+–\d+", html), page.name


def _nav_pages() -> list[str]:
    """The docs/path pages in mkdocs.yml's nav, in order (read as text: the nav is one page per line)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    return re.findall(r"^\s+- [^:]+: (path/[\w-]+\.md)", text, re.M)


def test_nav_and_index_tell_one_storyline():
    nav = _nav_pages()
    assert sorted(nav) == sorted(f"path/{p.name}" for p in PAGES), "every page once in the nav, no other"
    index = re.findall(r"\]\((path/[\w-]+\.md)\)", (ROOT / "docs" / "index.md").read_text(encoding="utf-8"))
    assert list(dict.fromkeys(index)) == nav, "docs/index.md lists the pages in the nav's order"
    story = ["text-features", "tokenizers", "word-vectors", "recurrent-networks", "transformer", "bert-t5",
             "pretraining", "scaling-laws", "decoding", "fine-tuning", "alignment", "quantization", "pruning",
             "distillation", "low-rank", "serving", "retrieval", "evaluation"]
    positions = [nav.index(f"path/{name}.md") for name in story if f"path/{name}.md" in nav]
    assert positions == sorted(positions), "the storyline of the kernel-paper collection (issue 18)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_has_paper_equation_code_command_and_figure(page):
    text = page.read_text(encoding="utf-8")
    assert re.search(r"\*\*Paper\.\*\*.*(arxiv\.org/abs/\d{4}\.\d{4,5}|19[4-9]\d|20\d\d)", text, re.S), "cite the paper"
    assert text.count("$$") >= 2, "a display equation"
    directives = re.findall(r"^<!-- code: (\S+) (\S+) -->$", text, re.M)
    assert directives, "the lines that implement it, as a code directive"
    for path, name in directives:
        assert _hooks().code_block(path, name).count("\n") > 3
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [_normalise(line) for block in blocks for line in block.splitlines() if line.strip()]
    assert commands, "one command that runs on a laptop"
    readme = _readme_commands()
    for command in commands:  # the README's commands are each run by a test, so these are too
        assert command in readme, f"{page.name}: {command!r} is not a README command"
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figures, "a figure the command produces"
    for figure in figures:
        assert (page.parent / figure).resolve().is_file(), figure


def test_code_directive_shows_the_source_and_refuses_unknown_names():
    from mkdocs.exceptions import PluginError

    hooks = _hooks()
    block = hooks.code_block("src/llmlab/compress/gptq.py", "gptq_quantize_weight")
    assert "@torch.no_grad()" in block and "def gptq_quantize_weight(" in block  # decorators included
    method = hooks.code_block("src/llmlab/nn/rope.py", "RotaryEmbedding.forward")
    assert "def forward(" in method and "class RotaryEmbedding" not in method
    with pytest.raises(PluginError, match="defines no top-level 'no_such_function'"):
        hooks.code_block("src/llmlab/nn/rope.py", "no_such_function")
    with pytest.raises(PluginError, match="no file src/llmlab/nope.py"):
        hooks.code_block("src/llmlab/nope.py", "f")
    page = "text\n<!-- code: src/llmlab/nn/rope.py rotate_half -->\nmore"
    out = hooks.on_page_markdown(page, None, None, None)
    assert "def rotate_half(" in out and "<!-- code:" not in out and out.endswith("more")


def test_readme_relative_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert local, "the README links its figures and docs"
    missing = [t for t in local if t and not (ROOT / t).exists()]
    assert not missing, missing


def _readme_lines(prefix: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.startswith(prefix)]


def test_docs_figures_readme_command_and_bad_input(tmp_path):
    """The README's ``python scripts/docs_figures.py ...`` lines run as written (in a scratch folder, so the
    committed figures stay as they are); an unknown figure is one line and exit 2."""
    commands = _readme_lines("python scripts/docs_figures.py")
    assert commands, "the README runs the figure script"
    for command in commands:
        argv = shlex.split(command)
        r = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        only = re.findall(r"--only (\S+)", command)
        for name in only[0].split(",") if only else []:
            assert (tmp_path / "docs" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "docs_figures.py"), "--only", "rnn,nope",
                        "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown figure nope" in r.stderr
    assert not (tmp_path / "bad").exists()


EXTERNAL = re.compile(r"""<(script|link|img|iframe|source)\b[^>]*\b(src|href)=["']?(https?:)?//""", re.I)


def test_built_site_fetches_nothing_from_the_network(site):
    """Offline: no page loads a script, stylesheet, font or image from another host (MathJax is vendored under
    docs/javascripts/mathjax, the theme's Google Fonts are off), and the MathJax every page loads is in the site
    with the fonts it fetches relative to itself."""
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > len(PAGES)
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert not EXTERNAL.search(html), (page.relative_to(site), EXTERNAL.search(html).group(0))
    mathjax = site / "javascripts" / "mathjax"
    html = (site / "path" / "alignment" / "index.html").read_text(encoding="utf-8")
    assert '<script src="../../javascripts/mathjax/tex-chtml.js"' in html
    assert (mathjax / "tex-chtml.js").stat().st_size > 10**6 and (mathjax / "LICENSE").is_file()
    assert (mathjax / "output" / "chtml" / "fonts" / "woff-v2" / "MathJax_Main-Regular.woff").is_file()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    failed: list[str] = []  # paths answered with an error status: a file the site lacks

    def log_request(self, code="-", size="-") -> None:  # no access log on the test's output, failures recorded
        if str(code).isdigit() and int(code) >= 400:
            self.failed.append(f"{code} {self.path}")

    def log_message(self, *args) -> None:
        pass


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
def test_built_site_in_a_real_browser(site):
    """Served over HTTP as a host would serve it (directory URLs): the index opens in Chromium, every link of its
    nav answers 200, and one technique page shows its figure (decoded), its equations typeset by the vendored
    MathJax (no host but the test server resolves) and the source its directive pulled in; no request the pages
    make goes unanswered (a MathJax extension or font the vendored copy lacks would)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.page_load_strategy = "eager"  # the DOM; MathJax is awaited below
    profile = tempfile.TemporaryDirectory()
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(base)
        assert "learning path" in driver.find_element(By.TAG_NAME, "h1").text
        links = list(dict.fromkeys(a.get_attribute("href").split("#")[0] for a in
                                   driver.find_elements(By.CSS_SELECTOR, "a.md-nav__link[href]")
                                   if a.get_attribute("href").startswith(base)))
        paths = [link for link in links if "/path/" in link]
        assert len(paths) == len(PAGES), paths
        for link in links:
            with urllib.request.urlopen(link, timeout=10) as r:
                assert r.status == 200 and b"<h1" in r.read(), link
        link = driver.find_element(By.CSS_SELECTOR, ".md-sidebar--primary a.md-nav__link[href$='path/alignment/']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
        link.click()  # the nav as a reader uses it
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Alignment")
        images = driver.execute_script(
            "return Promise.all([...document.images].map(i => i.decode().then(() => [i.src, i.naturalWidth],"
            " () => [i.src, 0])))")
        assert images and all(width > 0 for _, width in images), images
        typeset = driver.execute_script(  # a returned promise is awaited (WebDriver's execute script)
            "return new Promise(ok => { const wait = () => window.MathJax && MathJax.startup && "
            "MathJax.startup.promise ? MathJax.startup.promise.then(() => ok([...document.querySelectorAll("
            "'div.arithmatex')].map(d => [d.querySelectorAll('mjx-container').length, d.textContent]))) : "
            "setTimeout(wait, 50); wait(); })")
        assert len(typeset) == 2 and all(n == 1 and "\\[" not in text for n, text in typeset), typeset
        resources = driver.execute_script(
            "return document.fonts.ready.then(() => performance.getEntriesByType('resource').map(r => r.name))")
        assert any(r.endswith("mathjax/tex-chtml.js") for r in resources), resources
        assert any("/mathjax/output/chtml/fonts/woff-v2/MathJax_" in r for r in resources), resources
        assert all(r.startswith(base) for r in resources), [r for r in resources if not r.startswith(base)]
        code = [c.text for c in driver.find_elements(By.CSS_SELECTOR, ".highlight code")]
        assert any("def dpo_loss(" in c for c in code) and any("def ppo_policy_loss(" in c for c in code)
        assert driver.find_elements(By.CSS_SELECTOR, "script[src*='mathjax']"), "MathJax is linked"
        assert not QuietHandler.failed, QuietHandler.failed
    finally:
        driver.quit()
        profile.cleanup()
        server.shutdown()
