"""A run folder as one self-contained HTML page, ``RUN/report.html``: loss (train and validation), learning-rate,
gradient-norm and throughput curves drawn as inline SVG from ``metrics.jsonl``, the evaluation table, the run's
configuration files, its summary, samples and answers, and its PNG figures embedded. Written at the end of every
training run and whenever a command writes the run's summary; ``llmlab report RUN`` regenerates it. No
JavaScript and no network: the file can be mailed or archived as it is."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from llmlab.common import LlmlabError, write_text_atomic

CONFIGS = ("config.json", "train_config.json", "sft_config.json", "dpo_config.json", "distill_config.json")
TEXTS = ("summary.md", "sample.txt")
W, H, PAD = 420, 180, 36  # chart size and margin, pixels


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one dict per line; a line that is not JSON is an error naming it."""
    path = run_dir / "metrics.jsonl"
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise LlmlabError(f"{path}:{n}: not a JSON object (a damaged metrics file; the report needs each "
                              "line whole)") from None
    return records


def svg_chart(series: dict[str, list[tuple[float, float]]], title: str, log_y: bool = False) -> str:
    """A line chart of one or more (x, y) series as an inline SVG element; empty string when there is no data."""
    import math

    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
              for k, v in series.items()}
    points = [p for v in series.values() for p in v]
    if not points:
        return ""

    def fy(y: float) -> float:
        return math.log10(y) if log_y else y

    xs, ys = [p[0] for p in points], [fy(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - PAD + (fy(y) - y0) / (y1 - y0) * -(H - 2 * PAD)

    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    parts = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="{PAD}" y="{PAD}" width="{W - 2 * PAD}" height="{H - 2 * PAD}" fill="none" stroke="#999"/>',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="12">{html.escape(title)}</text>']
    label_y = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.4g}")
    parts.append(f'<text x="{PAD - 3}" y="{PAD + 4}" text-anchor="end" font-size="9">{label_y(y1)}</text>')
    parts.append(f'<text x="{PAD - 3}" y="{H - PAD}" text-anchor="end" font-size="9">{label_y(y0)}</text>')
    parts.append(f'<text x="{PAD}" y="{H - PAD + 12}" font-size="9">{x0:g}</text>')
    parts.append(f'<text x="{W - PAD}" y="{H - PAD + 12}" text-anchor="end" font-size="9">{x1:g}</text>')
    for i, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        colour = colours[i % len(colours)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="2.5" fill="{colour}"/>')
        else:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.2"/>')
        parts.append(f'<text x="{W - PAD - 4}" y="{PAD + 12 + 11 * i}" text-anchor="end" font-size="9" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def throughput(train: list[dict]) -> list[tuple[float, float]]:
    """(step, tokens/s) between consecutive records that carry ``seconds`` (elapsed, resumes included)."""
    out = []
    timed = [r for r in train if "seconds" in r and "tokens" in r]
    for a, b in zip(timed, timed[1:]):
        dt = b["seconds"] - a["seconds"]
        if dt > 0:
            out.append((b["step"], (b["tokens"] - a["tokens"]) / dt))
    return out


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("" if v is None else str(v))


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report.html`` from what the run folder holds; returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise LlmlabError(f"{run_dir}: no metrics.jsonl, so not a training run folder (give the folder a "
                          "pretrain / sft / dpo / distill / embed train run wrote)")
    records = read_records(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    setup = next((r for r in records if r.get("kind") == "setup"), None)
    charts = [
        svg_chart({"train": [(r["step"], r.get("loss")) for r in train],
                   "validation": [(r["step"], r.get("val_loss")) for r in evals]}, "loss (nats/token)"),
        svg_chart({"lr": [(r["step"], r.get("lr")) for r in train]}, "learning rate"),
        svg_chart({"grad norm": [(r["step"], r.get("grad_norm")) for r in train]}, "gradient norm (before clipping)",
                  log_y=True),
        svg_chart({"tokens/s": throughput(train)}, "throughput (tokens/s)"),
    ]
    sections = [f"<h1>Run report: {html.escape(run_dir.resolve().name)}</h1>",
                f"<p>{len(train)} optimizer steps logged"
                + (f", {train[-1].get('tokens', 0):,} tokens" if train else "")
                + (f", {train[-1]['seconds']:.0f} s" if train and "seconds" in train[-1] else "") + "</p>",
                '<div class="charts">' + "".join(c for c in charts if c) + "</div>"]
    if evals:
        columns = ["step"] + sorted({k for r in evals for k in r} - {"kind", "step"})
        sections.append("<h2>Evaluations</h2>" + _table(evals, columns))
    if setup:
        sections.append("<h2>Set-up</h2>" + _table([setup], [k for k in setup if k != "kind"]))
    for name in TEXTS:
        if (run_dir / name).is_file():
            text = (run_dir / name).read_text(encoding="utf-8", errors="replace")
            sections.append(f"<h2>{name}</h2><pre>{html.escape(text)}</pre>")
    answers = run_dir / "answers.jsonl"
    if answers.is_file():
        rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()[:20] if line.strip()]
        if rows:
            sections.append("<h2>Answers (first 20)</h2>" + _table(rows, list(rows[0])))
    for png in sorted(run_dir.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        sections.append(f'<h2>{png.name}</h2><img alt="{png.name}" src="data:image/png;base64,{data}">')
    for name in CONFIGS:
        if (run_dir / name).is_file():
            text = (run_dir / name).read_text(encoding="utf-8", errors="replace")
            sections.append(f"<details><summary>{name}</summary><pre>{html.escape(text)}</pre></details>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
             ".charts{display:flex;flex-wrap:wrap;gap:8px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}pre{background:#f6f6f6;padding:8px;"
             "overflow:auto;font-size:12px}img{max-width:100%}")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>llmlab run report</title>'
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")
    out = run_dir / "report.html"
    write_text_atomic(out, page)
    return out
