"""benchmarks/quality_vs_size.py: the one PNG over the four compression tables (issue 14's "quality vs size for
every method"), run on the tables the repository ships."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("quality_vs_size", ROOT / "benchmarks" / "quality_vs_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_points_follow_each_table_and_the_sparse_size(tmp_path):
    q = _script()
    # the SmolLM2 shapes by hand: 30 blocks of q, o (576 x 576), k, v (576 x 192), gate, up, down (576 x 1536)
    block_weights = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    series = q.points(ROOT, block_weights, 269.1)
    wanda = dict((label, (size, rel)) for size, rel, label in series["pruning: wanda (unstructured)"])
    size, rel = wanda["wanda 50% unstructured"]
    assert size == pytest.approx(269.1 - 0.5 * block_weights * 2 / 1e6)  # half the block weights, 2 bytes each
    rows = json.loads((ROOT / "docs/pruning/results.json").read_text())["rows"]
    want = next(r for r in rows if r["label"] == "wanda 50% unstructured")["perplexity"] / rows[0]["perplexity"]
    assert rel == pytest.approx(want)
    gptq = {label: (size, rel) for size, rel, label in series["quantization: gptq"]}
    assert gptq["GPTQ 4-bit g32"][0] == pytest.approx(119.9)  # the folder as written
    assert all(len(pts) for pts in series.values()) and len(series) >= 15


def test_the_command_writes_the_png_and_refuses_missing_tables(tmp_path, capsys, monkeypatch):
    """The README's command as written (from the repository root), its PNG sent to a temporary file."""
    assert "\npython benchmarks/quality_vs_size.py\n" in (ROOT / "README.md").read_text()
    q = _script()
    monkeypatch.chdir(ROOT)
    out = tmp_path / "plot.png"
    assert q.main(["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))
    # the real model's count of block linear weights is the hand count above
    assert q.block_linear_parameters()[0] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    partial = tmp_path / "repo"
    shutil.copytree(ROOT / "docs" / "quantization", partial / "docs" / "quantization")
    assert q.main(["--root", str(partial), "--out", str(tmp_path / "x.png")]) == 2
    assert "docs/pruning" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
