"""The structured-pruning results table: LLM-Pruner and LoRAPrune on SmolLM2-135M-Instruct.

For each row: the pruned model's shape and parameters, the written folder's size (float16 tensors, as the other
compress tables), perplexity on the fixed held-out text (``compress/calibrate.heldout_text``, the harness of
``prune_table.py``) before and after the LoRA recovery (LLM-Pruner) or after the LoRAPrune fine-tune, and batch-1
decode tok/s of the float32 model (128-token prompt, the marginal rate of the new tokens, ``decode.py``'s
``rates``) next to the unpruned model's, measured in the same process. Writes a JSON of the rows and a Markdown
table.

    python benchmarks/structured_table.py --calib-samples 16 --calib-len 256   # the README table (loaded 2 cores)
    python benchmarks/structured_table.py --quick                                # small budgets (a smoke run)
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

from decode import prompt_ids, rates
from llmlab.api import parameter_count
from llmlab.common import write_text_atomic
from llmlab.compress.structured import StructuredConfig, llm_pruner_keep, shrink
from llmlab.eval.perplexity import perplexity
from llmlab.formats.convert import write_loaded
from llmlab.infer.generate import generate
from llmlab.train.loraprune import loraprune_select
from llmlab.train.recover import recovery
from lowrank_table import folder_bytes
from table_harness import table_harness

ROWS = [  # (label, method, sparsity)
    ("llm-pruner 20% + LoRA", "llm-pruner", 0.2),
    ("loraprune 20%", "loraprune", 0.2),
    ("llm-pruner 50% + LoRA", "llm-pruner", 0.5),
    ("loraprune 50%", "loraprune", 0.5),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets: 1024 held-out tokens, 4 x 128 calibration "
                                                        "tokens, 4 LoRA steps, 8 decode tokens, 1 run (default: off)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored (default: 4096)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default: 16)")
    p.add_argument("--calib-len", type=int, default=256, help="calibration window length (default: 256)")
    p.add_argument("--steps", type=int, default=20, help="LoRA steps: recovery / LoRAPrune fine-tune (default: 20)")
    p.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate (default: 1e-4)")
    p.add_argument("--batch", type=int, default=2, help="LoRA windows per step (default: 2)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode tokens timed (default: 64)")
    p.add_argument("--runs", type=int, default=3, help="timed decode runs, median (default: 3)")
    p.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
    p.add_argument("--no-dense", action="store_true", help="leave out the unpruned model's own row (its decode rate "
                                                           "is still measured beside each row) (default: off)")
    p.add_argument("--out", default="docs/structured", help="where the JSON and Markdown go (default: "
                                                             "docs/structured)")
    args = p.parse_args()
    if args.quick:
        args.ppl_tokens, args.calib_samples, args.calib_len, args.steps = 1024, 4, 128, 4
        args.new_tokens, args.runs = 8, 1
    only = {r.strip() for r in args.only.split(",") if r.strip()}
    rows = [r for r in ROWS if not only or r[0] in only]
    h = table_harness(args.ppl_tokens, args.window, args.calib_samples, args.calib_len)
    base, ids, n_bytes, windows = h.base, h.ids, h.n_bytes, h.windows
    p128 = prompt_ids(base.tokenizer, 128)
    results = []
    tmp = tempfile.TemporaryDirectory()
    lora = {"lr": args.lr, "batch_size": args.batch, "ppl_tokens": min(args.ppl_tokens, args.window),
            "window": args.window, "progress": False}

    def measure(label: str, loaded, seconds: float, extra: dict) -> None:
        folder = Path(tmp.name) / f"row{len(results)}"
        write_loaded(loaded, folder, dtype="float16")
        ppl = perplexity(loaded.model, ids, args.window, n_bytes)
        speed: dict = {}
        pairs = (("pruned", loaded.model), ("dense", base.model)) if loaded is not base else (("dense", base.model),)
        for name, model in pairs:  # side by side: the load drifts
            rates(speed, name, lambda n, m=model: generate(m, [p128], n), args.new_tokens, args.runs)
        c = loaded.config
        row = {"label": label, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "ffn_dim": c.ffn_dim,
               "parameters": parameter_count(loaded.model), "file_mb": round(folder_bytes(folder) / 1e6, 1),
               "perplexity": round(ppl.perplexity, 3), "bits_per_byte": round(ppl.bits_per_byte, 4),
               "decode_tok_s": round(speed.get("pruned decode", speed["dense decode"]), 1),
               "dense_decode_tok_s": round(speed["dense decode"], 1),
               "seconds": round(seconds, 1), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    if not args.no_dense:
        measure("dense (GGUF dequantized)", base, 0.0, {})
    for label, method, sparsity in rows:
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)
        cfg = StructuredConfig(method, sparsity, "query").resolved()
        t0 = time.perf_counter()
        extra: dict = {"lora_steps": args.steps}
        if method == "llm-pruner":
            keep = llm_pruner_keep(loaded.model, loaded.config, cfg, windows, progress=False)
            loaded.model, loaded.config = shrink(loaded.model, loaded.config, keep)
            before = perplexity(loaded.model, ids, args.window, n_bytes)
            extra["perplexity_before_recovery"] = round(before.perplexity, 3)
            recovery(args.steps, lora_rank=8, **lora)(loaded.model, loaded, windows)
        else:
            keep, _info = loraprune_select(cfg, args.steps, rank=8, **lora)(loaded.model, loaded, windows)
            loaded.model, loaded.config = shrink(loaded.model, loaded.config, keep)
        measure(label, loaded, time.perf_counter() - t0, extra)
        del loaded
    tmp.cleanup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"calibration": f"{args.calib_samples} x {args.calib_len}", "ppl_tokens": len(ids), "window": args.window,
            "lora": {"steps": args.steps, "rank": 8, "lr": args.lr, "batch": args.batch},
            "decode": f"batch 1, 128-token prompt, {args.new_tokens} new tokens, float32, median of {args.runs}",
            "python": platform.python_version(), "torch": torch.__version__, "cpu_flags": h.flags}
    write_text_atomic(out / "results.json", json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(results))
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md", file=sys.stderr)


def markdown(results: list[dict]) -> str:
    lines = ["| method | heads / KV heads / FFN | parameters | file (MB) | perplexity before → after LoRA | "
             "bits/byte | decode tok/s (unpruned, same run) | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ppl = f"{r['perplexity']:.2f}"
        if "perplexity_before_recovery" in r:
            ppl = f"{r['perplexity_before_recovery']:.2f} → {ppl}"
        elif "lora_steps" in r:
            ppl = f"— → {ppl} (pruned during the fine-tune)"
        lines.append(f"| {r['label']} | {r['n_heads']} / {r['n_kv_heads']} / {r['ffn_dim']} | "
                     f"{r['parameters'] / 1e6:.1f} M | {r['file_mb']} | {ppl} | {r['bits_per_byte']:.3f} | "
                     f"{r['decode_tok_s']} ({r['dense_decode_tok_s']}) | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
