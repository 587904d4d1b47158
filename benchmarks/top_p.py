"""Top-p (nucleus) masking of one row of SmolLM2-sized logits (49,152), as the engine samples each sequence:
transformers' TopPLogitsWarper (a full sort) against llmlab's ``warp`` (top-k of 64 or 1,024 first, the sort only
when the nucleus is wider). Logits are real: SmolLM2-135M-Instruct's next-token logits after a few prompts, at
temperature 0.7 and top-p 0.9 (the Self-Instruct defaults). The same masks are asserted; medians of --runs.

    python benchmarks/top_p.py [--runs 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from llmlab.api import load
from llmlab.infer.sample import SamplingParams, warp
from llmlab.nn.cpu_kernels import cpu_description

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
    peer_times, ours_times, kept = [], [], []
    for row in rows:
        expected = TopPLogitsWarper(p.top_p)(ids, TemperatureLogitsWarper(p.temperature)(ids, row.clone()))
        got = warp(row, p)
        assert torch.equal(got.isinf(), expected.isinf())
        kept.append(int(got.isfinite().sum()))
        for _ in range(args.runs):
            t = time.perf_counter()
            TopPLogitsWarper(p.top_p)(ids, TemperatureLogitsWarper(p.temperature)(ids, row.clone()))
            peer_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            warp(row, p)
            ours_times.append(time.perf_counter() - t)
    print(f"{cpu_description()}; {len(rows)} rows x {args.runs} runs, {args.threads} thread(s); "
          f"nucleus sizes {kept}")
    peer, mine = statistics.median(peer_times), statistics.median(ours_times)
    print(f"transformers TopPLogitsWarper: {peer * 1e3:.3f} ms per row; llmlab warp: {mine * 1e3:.3f} ms per row")
    print(f"speedup: {peer / mine:.1f}x")


if __name__ == "__main__":
    main()
