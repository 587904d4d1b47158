"""The low-rank results table: truncated SVD vs SVD-LLM's whitened SVD on SmolLM2-135M-Instruct.

For each row: the weights kept in the factored layers, the model's parameters, the written folder's size
(float16 tensors, as the quantization table), perplexity on the fixed held-out text (``compress/calibrate.
heldout_text``, the harness of ``prune_table.py`` and ``quant_table.py``) and the time the factorisation (and
the recovery fine-tune) took. The rows compare the two methods at the same rank (MLP layers only) and at the
same energy (every linear layer in the blocks), then SVD-LLM with a recovery fine-tune of the factors and with
8-bit factors. Writes a JSON of the rows and a Markdown table.

    python benchmarks/lowrank_table.py --calib-samples 16 --calib-len 512   # the README table (loaded 2 cores)
    python benchmarks/lowrank_table.py --quick                                # small budgets (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlab.api import parameter_count
from llmlab.common import write_text_atomic
from llmlab.compress.lowrank import CALIBRATED, LowRankConfig, lowrank_model_, parameter_totals, quantize_model_factors_
from llmlab.eval.perplexity import perplexity
from llmlab.formats.convert import write_loaded
from llmlab.train.recover import recover_
from table_harness import table_harness

ROWS = [  # (label, LowRankConfig keywords, recovery steps)
    ("svd rank 256 (mlp)", {"method": "svd", "rank": 256, "layers": "mlp"}, 0),
    ("svd-llm rank 256 (mlp)", {"method": "svd-llm", "rank": 256, "layers": "mlp"}, 0),
    ("svd-llm rank 256 (mlp) + 8-bit factors",
     {"method": "svd-llm", "rank": 256, "layers": "mlp", "factor_bits": 8}, 0),
    ("svd rank 128 (mlp)", {"method": "svd", "rank": 128, "layers": "mlp"}, 0),
    ("svd-llm rank 128 (mlp) + recovery", {"method": "svd-llm", "rank": 128, "layers": "mlp"}, 20),
    ("svd energy 0.9 (all)", {"method": "svd", "energy": 0.9, "layers": "all"}, 0),
    ("svd-llm energy 0.9 (all)", {"method": "svd-llm", "energy": 0.9, "layers": "all"}, 0),
]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets: 1024 held-out tokens, 4 x 128 calibration "
                                                        "tokens, 4 recovery steps (default: off)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored (default: 4096)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--calib-len", type=int, default=512, help="calibration window length (default: 512)")
    p.add_argument("--recover-scale", type=float, default=1.0, help="multiply the rows' recovery steps (default: 1)")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="recovery learning rate (default: 1e-4)")
    p.add_argument("--recover-batch", type=int, default=2, help="recovery windows per step (default: 2)")
    p.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
    p.add_argument("--out", default="docs/lowrank", help="where the JSON and Markdown go (default: docs/lowrank)")
    args = p.parse_args()
    if args.quick:
        args.ppl_tokens, args.calib_samples, args.calib_len, args.recover_scale = 1024, 4, 128, 0.1
    only = {r.strip() for r in args.only.split(",") if r.strip()}
    rows = [r for r in ROWS if not only or r[0] in only]
    h = table_harness(args.ppl_tokens, args.window, args.calib_samples, args.calib_len)
    base, ids, n_bytes, windows, flags = h.base, h.ids, h.n_bytes, h.windows, h.flags
    results = []
    tmp = tempfile.TemporaryDirectory()

    def measure(label: str, loaded, totals: dict | None, size: int, seconds: float, extra: dict) -> None:
        ppl = perplexity(loaded.model, ids, args.window, n_bytes)
        row = {"label": label, "kept": None if totals is None else round(totals["share_kept"], 4),
               "layer_parameters_after": None if totals is None else totals["layer_parameters_after"],
               "dense_layers": 0 if totals is None else len(totals["dense_layers"]),
               "parameters": parameter_count(loaded.model) if totals is None else totals["model_parameters"],
               "file_mb": round(size / 1e6, 1), "perplexity": round(ppl.perplexity, 3),
               "bits_per_byte": round(ppl.bits_per_byte, 4), "seconds": round(seconds, 1), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    dense_dir = Path(tmp.name) / "dense"
    write_loaded(base, dense_dir, dtype="float16")
    measure("dense (GGUF dequantized)", base, None, folder_bytes(dense_dir), 0.0, {})
    for i, (label, kw, steps) in enumerate(rows):
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)
        cfg = LowRankConfig(**kw).resolved()
        t0 = time.perf_counter()
        layers = lowrank_model_(loaded.model, cfg, windows if cfg.method in CALIBRATED else None, progress=False)
        extra = {}
        steps = round(steps * args.recover_scale)
        if steps:
            before = perplexity(loaded.model, ids, args.window, n_bytes)
            rec = recover_(loaded.model, loaded.config, windows, ids[: args.window].reshape(1, -1), steps,
                           lr=args.recover_lr, batch_size=args.recover_batch, progress=False)
            extra = {"recover_steps": steps, "perplexity_before_recovery": round(before.perplexity, 3),
                     "recover_s": rec["seconds"]}
        if cfg.factor_bits:
            quantize_model_factors_(loaded.model, layers, cfg.factor_bits)
        seconds = time.perf_counter() - t0
        folder = Path(tmp.name) / f"row{i}"
        spec = {"method": cfg.method, "modules": {n: st["rank"] for n, st in layers.items() if not st["dense"]},
                "factor_bits": cfg.factor_bits}
        write_loaded(loaded, folder, dtype="float16", lowrank_spec=spec)
        measure(label, loaded, parameter_totals(loaded.model, layers, cfg.factor_bits), folder_bytes(folder),
                seconds, extra)
        del loaded
    tmp.cleanup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"calibration": f"{args.calib_samples} x {args.calib_len}", "ppl_tokens": len(ids),
            "window": args.window, "recover_lr": args.recover_lr, "recover_batch": args.recover_batch,
            "python": platform.python_version(), "torch": torch.__version__, "cpu_flags": flags}
    write_text_atomic(out / "results.json", json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(results))
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md", file=sys.stderr)


def _ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.2g}"  # a collapsed model: its order of magnitude


def markdown(results: list[dict]) -> str:
    lines = ["| method (layers factored) | weights kept in those layers | left dense | parameters | file (MB) | "
             "perplexity | bits/byte | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        kept = "—" if r["kept"] is None else f"{r['kept']:.1%}"
        ppl = _ppl(r["perplexity"])
        if "perplexity_before_recovery" in r:
            ppl = f"{_ppl(r['perplexity_before_recovery'])} → {ppl} ({r['recover_steps']} recovery steps)"
        lines.append(f"| {r['label']} | {kept} | {r['dense_layers']} | {r['parameters'] / 1e6:.1f} M | "
                     f"{r['file_mb']} | {ppl} | {r['bits_per_byte']:.3f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
