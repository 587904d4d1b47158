"""The pruning results table: magnitude, Wanda and SparseGPT on SmolLM2-135M-Instruct.

For each row: the sparsity achieved over the pruned layers (every linear layer inside the blocks), perplexity
on the fixed held-out text (``compress/calibrate.heldout_text``: standard-library docstrings disjoint from the
calibration text) and the time the pruning took. The baseline is the GGUF dequantized to float32. The rows are
the papers' two comparisons: 50% unstructured (Wanda's claim: Wanda beats magnitude) and 2:4 (SparseGPT's
weight updates beat Wanda's mask alone at N:M). Writes a JSON of the rows and a Markdown table.

    python benchmarks/prune_table.py --calib-samples 16 --calib-len 512   # the README table (30 min, loaded 2 cores)
    python benchmarks/prune_table.py --quick                                # small budgets (a smoke run)

SparseGPT needs enough calibration tokens for its Hessian: at --quick's 512 it falls behind Wanda.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from llmlab.common import write_text_atomic
from llmlab.compress.prune import CALIBRATED, PruneConfig, prune_model_, sparsity_totals
from llmlab.eval.perplexity import perplexity
from table_harness import table_harness

ROWS = [  # (method, pattern)
    ("magnitude", "unstructured"), ("wanda", "unstructured"), ("sparsegpt", "unstructured"),
    ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets: 1024 held-out tokens, 4 x 128 calibration "
                                                        "tokens (default: off)")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured rows' sparsity (default: 0.5)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored (default: 4096)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--calib-len", type=int, default=512, help="calibration window length (default: 512)")
    p.add_argument("--only", default="", help="comma-separated rows 'method pattern' to run, e.g. 'wanda 2:4' "
                                              "(default: all)")
    p.add_argument("--out", default="docs/pruning", help="where the JSON and Markdown go (default: docs/pruning)")
    args = p.parse_args()
    if args.quick:
        args.ppl_tokens, args.calib_samples, args.calib_len = 1024, 4, 128
    only = {r.strip() for r in args.only.split(",") if r.strip()}
    rows = [r for r in ROWS if not only or f"{r[0]} {r[1]}" in only]
    h = table_harness(args.ppl_tokens, args.window, args.calib_samples, args.calib_len)
    base, ids, n_bytes, windows, flags = h.base, h.ids, h.n_bytes, h.windows, h.flags
    results = []

    def measure(label: str, method: str, pattern: str, model, sparsity: float, seconds: float) -> None:
        ppl = perplexity(model, ids, args.window, n_bytes)
        row = {"label": label, "method": method, "pattern": pattern, "sparsity": round(sparsity, 4),
               "perplexity": round(ppl.perplexity, 3), "bits_per_byte": round(ppl.bits_per_byte, 4),
               "prune_s": round(seconds, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)

    measure("dense (GGUF dequantized)", "dense", "", base.model, 0.0, 0.0)
    for method, pattern in rows:
        model = copy.deepcopy(base.model)
        config = PruneConfig(method, args.sparsity if pattern == "unstructured" else None, pattern).resolved()
        t0 = time.perf_counter()
        layers = prune_model_(model, config, windows if method in CALIBRATED else None, progress=False)
        seconds = time.perf_counter() - t0
        measure(config.label(), method, pattern, model, sparsity_totals(model, layers)["layers"], seconds)
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"calibration": f"{args.calib_samples} x {args.calib_len}", "ppl_tokens": len(ids),
            "window": args.window, "python": platform.python_version(), "torch": torch.__version__,
            "cpu_flags": flags}
    write_text_atomic(out / "results.json", json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(results))
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md", file=sys.stderr)


def markdown(results: list[dict]) -> str:
    lines = ["| method | sparsity of the pruned layers | perplexity | bits/byte | prune (s) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['sparsity']:.1%} | {r['perplexity']:.2f} | {r['bits_per_byte']:.3f} | "
                     f"{r['prune_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
