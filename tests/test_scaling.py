"""``llmlab scaling``: power-law fits recover known laws; a tiny sweep writes its plot and fits."""

import json
import subprocess
import sys

import pytest

from llmlab.data.corpus import stdlib_root
from llmlab.data.shards import PrepareConfig, prepare
from llmlab.train.scaling import fit_power_law, frontier


def test_fit_recovers_a_known_law():
    xs = [1e4, 3e4, 1e5, 3e5, 1e6, 3e6]
    ys = [1.7 + 40.0 * x**-0.3 for x in xs]
    fit = fit_power_law(xs, ys)
    assert abs(fit["alpha"] - 0.3) < 0.02 and abs(fit["E"] - 1.7) < 0.05 and fit["rms_log"] < 0.01


def test_frontier_is_the_lower_envelope():
    pts = [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0), (5, 3.5)]
    assert frontier(pts) == [(1, 5.0), (2, 4.0), (4, 3.0)]


def test_tiny_sweep_from_the_cli(tmp_path):
    root = stdlib_root()
    files = [str(p) for p in sorted((root / "json").glob("*.py"))]
    prepare(PrepareConfig(inputs=files, out=str(tmp_path / "s"), vocab_size=300, val_fraction=0.2),
            show_progress=False)
    cmd = [sys.executable, "-m", "llmlab", "scaling", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "sw"),
           "--sizes", "16x1,32x1,48x1", "--steps", "8", "--batch-size", "2", "--seq-len", "16", "--evals", "4",
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "sw" / "scaling.json").read_text())
    assert [run["name"] for run in summary["runs"]] == ["d16-l1", "d32-l1", "d48-l1"]
    assert summary["runs"][0]["params"] < summary["runs"][1]["params"] < summary["runs"][2]["params"]
    assert "L(N) =" in r.stdout and (tmp_path / "sw" / "scaling.png").stat().st_size > 10_000


@pytest.mark.parametrize("sizes,msg", [("64", "not DIMxLAYERS"), ("64x2", "at least two"), ("4x1,64x2", "too small")])
def test_bad_sizes(tmp_path, sizes, msg):
    r = subprocess.run([sys.executable, "-m", "llmlab", "scaling", "--sizes", sizes, "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
