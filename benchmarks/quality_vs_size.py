"""Quality against size for every compression method on SmolLM2-135M-Instruct: one PNG from the four results
tables (quantization, unstructured pruning, low-rank, structured pruning), no model runs.

Each table measured perplexity on its own held-out text and token count, so the y axis is each row's perplexity
divided by the unpruned / unquantized row *of the same table* (1.0 = no loss; log scale). The x axis is the
model's size in MB:

- quantization, low-rank and structured rows: the folder's size as written (``file_mb`` in their JSON);
- unstructured and N:M pruning rows: the dense float16 folder less the zeroed weights at 2 bytes each (what a
  sparse format would store, indices not counted); the zeros are stored densely by ``llmlab prune``, so the
  folder itself does not shrink — the plot shows what the sparsity is worth, the README says so.

    python benchmarks/quality_vs_size.py                      # -> docs/compression/quality_vs_size.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TABLES = {"quantization": "docs/quantization", "pruning": "docs/pruning", "lowrank": "docs/lowrank",
          "structured": "docs/structured"}


def _rows(folder: Path) -> list[dict]:
    data = json.loads((folder / "results.json").read_text())
    return data["rows"] if isinstance(data, dict) else data


def block_linear_parameters(model_name: str = "smollm2-135m-instruct") -> tuple[int, float]:
    """(weights of the linear layers inside the transformer blocks, the dense float16 folder's MB) of the model:
    the weights ``llmlab prune`` sparsifies (embeddings, norms and the head stay dense)."""
    from torch import nn

    from llmlab.api import load

    model = load(model_name).model
    blocks = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ".layers." in f".{name}")
    total = sum(p.numel() for p in model.parameters())
    return blocks, total * 2 / 1e6


def points(root: Path, block_weights: int, dense_mb: float) -> dict[str, list[tuple[float, float, str]]]:
    """family -> [(size MB, perplexity / the table's baseline, label)], the baseline rows left out."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    for table, sub in TABLES.items():
        rows = _rows(root / sub)
        base = rows[0]["perplexity"]  # each table's first row is its unpruned / unquantized model
        for r in rows[1:]:
            if table == "quantization":
                family, size = f"quantization: {r['method']}", r["file_mb"]
            elif table == "pruning":
                family = f"pruning: {r['method']} ({r['pattern']})"
                size = dense_mb - r["sparsity"] * block_weights * 2 / 1e6
            elif table == "lowrank":
                family, size = f"low-rank: {r['label'].split()[0]}", r["file_mb"]
            else:
                family, size = f"structured: {r['label'].split()[0]}", r["file_mb"]
            out.setdefault(family, []).append((float(size), r["perplexity"] / base, r["label"]))
    return out


def plot(series: dict[str, list[tuple[float, float, str]]], dense_mb: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    markers = {"quantization": "o", "pruning": "s", "low-rank": "^", "structured": "D"}
    for family, pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[family.split(":")[0]], linestyle="-",
                linewidth=0.8, markersize=5, label=family)
    ax.scatter([dense_mb], [1.0], marker="*", s=180, color="black", zorder=5, label="unquantized, unpruned (float16)")
    ax.set_yscale("log")
    ax.set_xlabel("model size, MB (folder as written; pruning: non-zero weights at 2 bytes)")
    ax.set_ylabel("perplexity / the same table's baseline (log)")
    ax.set_title("SmolLM2-135M-Instruct: quality vs size of every compression method")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # atomic: never a half-written PNG


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=".", help="the repository root holding docs/<table>/results.json (default: .)")
    p.add_argument("--out", default="docs/compression/quality_vs_size.png",
                   help="the PNG to write (default: docs/compression/quality_vs_size.png)")
    args = p.parse_args(argv)
    root = Path(args.root)
    missing = [sub for sub in TABLES.values() if not (root / sub / "results.json").exists()]
    if missing:
        print(f"quality_vs_size: no results.json in {', '.join(missing)}: run the tables' benchmarks first",
              file=sys.stderr)
        return 2
    block_weights, dense_mb = block_linear_parameters()
    series = points(root, block_weights, dense_mb)
    for family, pts in sorted(series.items()):
        for size, rel, label in sorted(pts):
            print(f"{family:<34} {label:<44} {size:8.1f} MB  ppl x{rel:.3g}")
    plot(series, dense_mb, Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
