"""Top-p (nucleus) masking of one row of SmolLM2-sized logits (49,152), as the engine samples each sequence:
transformers' TopPLogitsWarper (a full sort) against llmlab's ``warp`` (top-k of 64 or 1,024 first, the sort only
when the nucleus is wider). Logits are real: SmolLM2-135M-Instruct's next-token logits after a few prompts, at
temperature 0.7 and top-p 0.9 (the Self-Instruct defaults). The same masks are asserted; medians of --runs.

    python benchmarks/top_p.py [--runs 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from llmlab.api import load
from llmlab.infer.sample import SamplingParams, warp
from llmlab.nn.cpu_kernels import cpu_description
from paged_attention import median_times  # noqa: E402  (this folder's script: python benchmarks/top_p.py)

PROMPTS = ["1. Instruction: Give three tips for staying healthy.\n1. Output:\n", "The capital of France is",
           "def fibonacci(n):\n", "Write a haiku about the sea.", "###\n4. Instruction:"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200, help="timed calls per row and side (default: 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = load("smollm2-135m-instruct")
    with torch.inference_mode():
        rows = [llm.model(torch.tensor([llm.tokenizer.encode(p)]))[0, -1:].float() for p in PROMPTS]  # (1, V) each
    p = SamplingParams(temperature=0.7, top_p=0.9)
    ids = torch.zeros(1, 1, dtype=torch.long)

    def peer(row: torch.Tensor) -> torch.Tensor:
        return TopPLogitsWarper(p.top_p)(ids, TemperatureLogitsWarper(p.temperature)(ids, row.clone()))

    per_row = []  # (peer s, llmlab s) per row, medians over --runs interleaved calls
    for row in rows:
        assert torch.equal(warp(row, p).isinf(), peer(row).isinf())
        per_row.append(median_times([lambda r=row: peer(r), lambda r=row: warp(r, p)], args.runs))
    sizes = [int(warp(row, p).isfinite().sum()) for row in rows]
    ms = [statistics.median(t[i] for t in per_row) * 1e3 for i in (0, 1)]
    print(f"{cpu_description()}; {len(rows)} rows x {args.runs} runs, {args.threads} thread(s); nucleus sizes {sizes}")
    print(f"median over rows: transformers TopPLogitsWarper {ms[0]:.3f} ms per row, llmlab warp {ms[1]:.3f} ms")
    print(f"speedup: {ms[0] / ms[1]:.1f}x")


if __name__ == "__main__":
    main()
