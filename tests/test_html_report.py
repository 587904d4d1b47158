"""Run reports (train/html_report.py): the curves drawn from metrics.jsonl, throughput from the logged elapsed
seconds, the evaluation table, text escaped, figures embedded byte for byte, regeneration by `llmlab report`
and by a summary write, and bad run folders."""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.train.html_report import svg_chart, throughput, write_run_report
from llmlab.train.report import write_summary

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def _run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "setup", "step": 0, "world_size": 1, "micro_batch": 4}]
    for step in range(1, 11):
        records.append({"kind": "train", "step": step, "loss": 5.0 - 0.3 * step, "lr": 1e-3 * step / 10,
                        "grad_norm": 2.0 / step, "tokens": 1024 * step, "seconds": 0.5 * step})
        if step % 5 == 0:
            records.append({"kind": "eval", "step": step, "val_loss": 4.0 - 0.1 * step, "val_ppl": 10.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "loss.png").write_bytes(PNG)
    (run / "config.json").write_text('{"dim": 64}')
    return run


def test_report_has_the_curves_tables_texts_and_figures(tmp_path):
    run = _run_folder(tmp_path)
    (run / "sample.txt").write_text("def f(): <script>alert(1)</script>")
    out = write_run_report(run)
    page = out.read_text()
    assert out == run / "report.html" and page.count("<svg") == 4
    assert page.count("<polyline") == 5  # train + validation loss, lr, grad norm, throughput
    assert "<script>" not in page and "&lt;script&gt;" in page  # run text is escaped, and the page has no JS
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page)[1]
    assert base64.b64decode(png) == PNG
    assert "<th>val_loss</th>" in page and "<td>3.5</td>" in page and "config.json" in page
    assert "10 optimizer steps logged, 10,240 tokens, 5 s" in page


def test_throughput_and_chart_scaling():
    train = [{"step": s, "tokens": 100 * s, "seconds": 0.25 * s} for s in range(1, 5)]
    assert throughput(train) == [(2, 400.0), (3, 400.0), (4, 400.0)]
    assert throughput([{"step": 1, "tokens": 5}]) == []  # runs from before seconds were logged: no curve
    svg = svg_chart({"a": [(0, 1.0), (10, 3.0)]}, "t")
    xs_ys = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', svg)[1].split()]
    assert xs_ys[0] == (36.0, 144.0) and xs_ys[1] == (384.0, 36.0)  # the corners of the plot box
    assert svg_chart({"a": [(0, float("nan"))]}, "t") == ""
    assert "1e+03" in svg_chart({"g": [(0, 1.0), (1, 1000.0)]}, "t", log_y=True)


def test_summary_write_regenerates_the_report(tmp_path):
    run = _run_folder(tmp_path)
    write_summary(run / "summary.md", ["# Summary", "held-out exact match 40%"])
    assert "held-out exact match 40%" in (run / "report.html").read_text()
    write_summary(tmp_path / "elsewhere.md", ["x"])  # not a run folder: no report
    assert not (tmp_path / "report.html").exists()


def test_bad_run_folders(tmp_path):
    with pytest.raises(LlmlabError, match="no metrics.jsonl, so not a training run folder"):
        write_run_report(tmp_path)
    run = _run_folder(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st\n')
    with pytest.raises(LlmlabError, match=r"metrics.jsonl:14: not a JSON object"):
        write_run_report(run)
    assert not (run / "report.html").exists()


def test_readme_command_and_bad_input(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.startswith("llmlab report "))
    args = shlex.split(command.split(" #")[0])[1:]  # as written: llmlab report runs/pretrain
    (tmp_path / "runs").mkdir()
    _run_folder(tmp_path).rename(tmp_path / "runs" / "pretrain")
    r = subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "runs/pretrain/report.html", r.stderr
    r = subprocess.run([sys.executable, "-m", "llmlab", "report", str(tmp_path / "nope")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr
