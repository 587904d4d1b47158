"""Encoding speed of a distilled sentence encoder against its teacher: both embed the same texts (the built-in
retrieval test set's queries and the first documents, ``llmlab embed distill``'s evaluation texts) with llmlab's
``embed_texts``, batch 32, 64 tokens, one model after the other per run, so load from other processes falls on both
alike; medians of ``--runs`` runs. The ratio (student sentences/s / teacher sentences/s) is printed last.

    python benchmarks/embed_distill.py --student runs/embed-distill/model --texts 512 --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="all-minilm-l6-v2",
                    help="the teacher encoder: an embedded model name or a folder (default: all-minilm-l6-v2)")
    ap.add_argument("--student", default="runs/embed-distill/model",
                    help="the distilled student's folder, written by `llmlab embed distill` "
                         "(default: runs/embed-distill/model)")
    ap.add_argument("--texts", type=int, default=512, help="texts embedded per run (default: 512)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs; the median is printed (default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = ap.parse_args()
    for flag, value in (("--texts", args.texts), ("--runs", args.runs), ("--threads", args.threads)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    if "/" in args.student and not Path(args.student).exists():
        ap.error(f"--student {args.student}: no such folder; make it with `llmlab embed distill --out "
                 f"{Path(args.student).parent}` first")
    torch.set_num_threads(args.threads)
    from llmlab.formats.load import load_model
    from llmlab.infer.embed import embed_texts
    from llmlab.nn.cpu_kernels import cpu_description
    from llmlab.text.retrieval_set import builtin_test_set

    rset = builtin_test_set()
    texts = (list(rset.queries.values()) + list(rset.corpus.values()))[:args.texts]
    models = {name: load_model(src) for name, src in (("teacher", args.teacher), ("student", args.student))}
    rates: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        embed_texts(m.model.eval(), m.tokenizer, texts[:32])  # warm-up
    for _ in range(args.runs):
        for name, m in models.items():
            t0 = time.perf_counter()
            embed_texts(m.model, m.tokenizer, texts)
            rates[name].append(len(texts) / (time.perf_counter() - t0))
    print(f"{cpu_description()}, {args.threads} threads, {len(texts)} texts, {args.runs} runs")
    for name, m in models.items():
        c = m.config
        print(f"{name}: {c.n_layers} x {c.dim}, {sum(p.numel() for p in m.model.parameters()):,} parameters, "
              f"median {statistics.median(rates[name]):.1f} sentences/s (runs: "
              f"{', '.join(f'{r:.1f}' for r in rates[name])})")
    print(f"ratio student / teacher: {statistics.median(rates['student']) / statistics.median(rates['teacher']):.2f}x")


if __name__ == "__main__":
    main()
