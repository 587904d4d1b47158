"""Every fine-tuning method on one built-in task, the same budget: held-out exact match before / after,
trainable parameters, peak RSS and time, as a Markdown table (the README's fine-tuning table).

Each method runs as its own ``llmlab sft`` process (so peak RSS is that method's), with the same data,
steps, batch and seed; only ``--method`` (and ``--qlora-base``) change, each at its default learning rate.

    python benchmarks/sft_methods.py                      # all methods, the no-flag defaults of llmlab sft
    python benchmarks/sft_methods.py --steps 30 --methods lora,qlora --out runs/sft-methods
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from llmlab.nn.cpu_kernels import speed_flags

# (label, extra flags)
VARIANTS = {
    "full": ["--method", "full"],
    "lora": ["--method", "lora"],
    "qlora": ["--method", "qlora", "--qlora-base", "nf4"],
    "qlora-gguf": ["--method", "qlora", "--qlora-base", "packed"],
    "adapter": ["--method", "adapter"],
    "prefix": ["--method", "prefix"],
    "prompt": ["--method", "prompt"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--out", default="runs/sft-methods", help="parent folder of the runs (default: runs/sft-methods)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to every llmlab sft run (after --)")
    args = p.parse_args()
    extra = [a for a in args.extra if a != "--"]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in VARIANTS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        out = Path(args.out) / name
        cmd = [sys.executable, "-m", "llmlab", "sft", *VARIANTS[name], "--out", str(out), "--no-resume",
               "--no-progress", *extra]
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr[-1500:], file=sys.stderr)
            rows.append((name, None, wall))
            continue
        s = json.loads((out / "summary.json").read_text())
        rows.append((name, s, wall))
        print(f"  {name}: {100 * s['accuracy_before']:.0f}% -> {100 * s['accuracy_after']:.0f}%, "
              f"{s['trainable_params']:,} trainable, {s['peak_rss_mb']:.0f} MB, {wall / 60:.1f} min", flush=True)
    print(f"\nCPU flags: {speed_flags()}; flags: {' '.join(extra) or '(llmlab sft defaults)'}\n")
    print("| method | held-out exact match before → after | trainable parameters | peak RSS | time (train / total) |")
    print("|---|---|---|---|---|")
    for name, s, wall in rows:
        if s is None:
            print(f"| {name} | failed | | | {wall / 60:.1f} min |")
            continue
        print(f"| {name} | {100 * s['accuracy_before']:.0f}% → **{100 * s['accuracy_after']:.0f}%** | "
              f"{s['trainable_params']:,} ({100 * s['trainable_params'] / s['total_params']:.2f}%) | "
              f"{s['peak_rss_mb'] / 1024:.2f} GB | {s['train_seconds'] / 60:.1f} / {wall / 60:.1f} min |")


if __name__ == "__main__":
    main()
