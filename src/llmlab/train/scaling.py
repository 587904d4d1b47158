"""A mini scaling-law sweep: several model sizes trained on the same data with the same loop, then
validation loss fitted against parameters and against compute.

- Kaplan et al. 2020 (arXiv:2001.08361): L(N) = E + A / N^alpha with N the non-embedding parameters.
- Hoffmann et al. 2022 (arXiv:2203.15556, "Chinchilla"): compute C = 6 N D FLOPs for D training
  tokens; the compute-efficient frontier is the lowest loss any model reached at each compute (past
  the first quarter of its training), and L(C) = E + B / C^beta is fitted to it.

The fit of ``y = E + A x^-a`` is by a grid over the irreducible loss E (below the smallest observed
loss) with a least-squares line through log(y - E) against log(x) for each E; the best E wins.
Writes ``scaling.json`` and ``scaling.png`` to the sweep folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.common import LlmlabError, human_count, save_png, write_text_atomic
from llmlab.train.loop import TrainConfig, train
from llmlab.train.pretrain import DEFAULT_DATA, ModelFlags, PretrainConfig, build_task
from llmlab.train.report import Metrics


@dataclass
class ScalingConfig:
    data: str = field(default=DEFAULT_DATA, metadata={"help": "shard folder (default corpus prepared if missing)"})
    out: str = field(default="runs/scaling", metadata={"help": "sweep folder"})
    sizes: str = field(default="32x2,64x2,96x3,128x4", metadata={
        "help": "models as DIMxLAYERS, comma-separated (heads = dim/32, at least 2)"})
    steps: int = field(default=400, metadata={"help": "optimizer steps per model (same data for all)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    evals: int = field(default=8, metadata={"help": "evaluations per model (points on the compute curves)"})
    seed: int = field(default=1337, metadata={"help": "seed"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def parse_sizes(self) -> list[tuple[int, int]]:
        out = []
        for item in self.sizes.split(","):
            try:
                dim, layers = (int(x) for x in item.lower().strip().split("x"))
            except ValueError:
                raise LlmlabError(f"--sizes: {item!r} is not DIMxLAYERS (e.g. 64x2)") from None
            if dim < 8 or layers < 1:
                raise LlmlabError(f"--sizes: {item!r} is too small (dim >= 8, layers >= 1)")
            out.append((dim, layers))
        if len(out) < 2:
            raise LlmlabError("--sizes needs at least two models to fit a trend")
        return out


def fit_power_law(xs: list[float], ys: list[float]) -> dict:
    """Fit y = E + A * x^(-a); returns E, A, a and the RMS error in log space."""
    if len(xs) < 2:
        raise ValueError("need at least two points")
    lx = [math.log(x) for x in xs]
    best = None
    y_min = min(ys)
    for i in range(200):
        E = y_min * i / 200  # 0 <= E < min(y)
        ly = [math.log(y - E) for y in ys]
        n, mx, my = len(lx), sum(lx) / len(lx), sum(ly) / len(ly)
        sxx = sum((x - mx) ** 2 for x in lx) or 1e-12
        slope = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx
        icpt = my - slope * mx
        rms = math.sqrt(sum((icpt + slope * x - y) ** 2 for x, y in zip(lx, ly)) / n)
        if best is None or rms < best["rms_log"]:
            best = {"E": E, "A": math.exp(icpt), "alpha": -slope, "rms_log": rms}
    return best


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower envelope: points (compute, loss) whose loss is below every point of less compute."""
    out, best = [], float("inf")
    for c, loss in sorted(points):
        if loss < best:
            out.append((c, loss))
            best = loss
    return out


def non_embedding_params(model) -> int:
    """Kaplan et al.'s N: parameters outside the token/position embeddings (a tied head counts as embedding)."""
    embed = {id(p) for name, p in model.named_parameters() if name.split(".")[0].startswith("embed")}
    return sum(p.numel() for p in model.parameters() if id(p) not in embed)


def run_scaling(cfg: ScalingConfig) -> dict:
    sizes = cfg.parse_sizes()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for dim, layers in sizes:
        heads = max(2, dim // 32)
        while dim % heads:
            heads -= 1
        tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                           warmup=max(1, cfg.steps // 20), eval_every=max(1, cfg.steps // cfg.evals), eval_batches=4,
                           save_every=0, seed=cfg.seed, progress=cfg.progress, keep_checkpoints=1, log_every=5)
        task = build_task(PretrainConfig(data=cfg.data), ModelFlags(dim=dim, n_layers=layers, n_heads=heads), tcfg)
        n = non_embedding_params(task.model)
        name = f"d{dim}-l{layers}"
        print(f"llmlab scaling: {name}: {human_count(n)} non-embedding parameters", flush=True)
        task.name = f"scaling {name}"
        result = train(task, tcfg, out / name)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        records = Metrics(out / name / "metrics.jsonl").read()
        evals = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
        runs.append({"name": name, "dim": dim, "layers": layers, "params": n, "final_val_loss": result.val_loss,
                     "seconds": round(result.seconds, 1),
                     "curve": [(6 * n * s * tokens_per_step, loss) for s, loss in evals]})
    fit_n = fit_power_law([r["params"] for r in runs], [r["final_val_loss"] for r in runs])
    # Early evaluations (warmup, the first quarter of training) are a transient, not the power law.
    front = frontier([pt for r in runs for pt in r["curve"][len(r["curve"]) // 4:]])
    fit_c = fit_power_law([c for c, _ in front], [loss for _, loss in front]) if len(front) >= 2 else None
    summary = {"runs": runs, "fit_loss_vs_params": fit_n, "fit_loss_vs_compute": fit_c, "frontier": front,
               "tokens": cfg.steps * cfg.batch_size * cfg.seq_len}
    write_text_atomic(out / "scaling.json", json.dumps(summary, indent=2) + "\n")
    plot_scaling(summary, out / "scaling.png")
    return summary


def plot_scaling(summary: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_c, ax_n) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in summary["runs"]:
        cs, ls = zip(*r["curve"])
        ax_c.plot(cs, ls, "o-", ms=3, lw=1, label=f"{r['name']} ({human_count(r['params'])})")
    fit_c = summary["fit_loss_vs_compute"]
    if fit_c:
        cs = [c for c, _ in summary["frontier"]]
        grid = [min(cs) * (max(cs) / min(cs)) ** (i / 50) for i in range(51)]
        ax_c.plot(grid, [fit_c["E"] + fit_c["A"] * c ** -fit_c["alpha"] for c in grid], "k--", lw=1.2,
                  label=f"frontier fit: {fit_c['E']:.2f} + {fit_c['A']:.3g}·C^-{fit_c['alpha']:.3f}")
    ax_c.set_xscale("log")
    ax_c.set_xlabel("training compute C = 6·N·D (FLOPs)")
    ax_c.set_ylabel("validation loss (nats/token)")
    ax_c.set_title("loss vs compute")
    ax_c.grid(alpha=0.3, which="both")
    ax_c.legend(fontsize=8)
    ns = [r["params"] for r in summary["runs"]]
    ls = [r["final_val_loss"] for r in summary["runs"]]
    fit_n = summary["fit_loss_vs_params"]
    grid = [min(ns) * (max(ns) / min(ns)) ** (i / 50) for i in range(51)]
    ax_n.plot(ns, ls, "o", ms=6, label=f"after {human_count(summary['tokens'])} tokens")
    ax_n.plot(grid, [fit_n["E"] + fit_n["A"] * n ** -fit_n["alpha"] for n in grid], "k--", lw=1.2,
              label=f"fit: {fit_n['E']:.2f} + {fit_n['A']:.3g}·N^-{fit_n['alpha']:.3f}")
    ax_n.set_xscale("log")
    ax_n.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_n.set_xlabel("non-embedding parameters N")
    ax_n.set_title("loss vs model size")
    ax_n.grid(alpha=0.3, which="both")
    ax_n.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
