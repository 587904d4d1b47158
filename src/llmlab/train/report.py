"""Run-folder outputs: ``metrics.jsonl`` (one JSON object per line), the loss / learning-rate curve as
PNG, and ``summary.md``. Written by rank 0 only; every file is replaced atomically."""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.common import save_png, write_text_atomic


class Metrics:
    """Append-only metrics.jsonl; on resume, lines after the resumed step are dropped first so the file
    is exactly what an uninterrupted run writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))

    def reset(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def plot_curves(records: list[dict], path: Path, title: str = "training") -> Path | None:
    """Train loss (and validation loss where evaluated) against step, learning rate beneath. PNG."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train loss")
    if len(train) > 20:  # a moving average shows the trend through the noise
        w = max(5, len(train) // 50)
        ys = [t[1] for t in train]
        smooth = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot([t[0] for t in train], smooth, lw=1.5, label=f"train loss (mean of {w})")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, ms=3, label="validation loss")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    lrs = [(r["step"], r["lr"]) for r in records if r.get("kind") == "train" and "lr" in r]
    ax_lr.plot(*zip(*lrs), color="tab:green", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    return path


def write_summary(path: Path, lines: list[str]) -> None:
    """summary.md; in a training run folder the HTML report is regenerated to include it."""
    from llmlab.train.html_report import write_run_report

    write_text_atomic(path, "\n".join(lines) + "\n")
    if (Path(path).parent / "metrics.jsonl").is_file():
        write_run_report(Path(path).parent)
