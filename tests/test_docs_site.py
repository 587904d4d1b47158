"""The learning-path site (mkdocs.yml, docs/): builds with `mkdocs build --strict` (broken links, anchors and
pages missing from the nav fail it), every technique page has the parts the path promises, the code shown is
read from the modules at build time, and the README's relative links point at files that exist."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs" / "path").glob("*.md"))


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


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("material", reason="mkdocs-material is in the test extra: pip install -e '.[test]'")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for page in PAGES:
        html = (site / "path" / page.stem / "index.html").read_text(encoding="utf-8")
        assert "<!-- code:" not in html and re.search(r"\.py</code>, lines \d+–\d+", html), page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_has_paper_equation_code_command_and_figure(page):
    text = page.read_text(encoding="utf-8")
    assert re.search(r"\*\*Paper\.\*\*.*(arxiv\.org/abs/\d{4}\.\d{4,5}|20\d\d)", text, re.S), "cite the paper"
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
