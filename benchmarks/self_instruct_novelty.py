"""The Self-Instruct novelty check (ROUGE-L < 0.7 against every pool instruction): rouge-score's scorer over the
pool, as Self-Instruct's and Alpaca's scripts run it, against llmlab's NoveltyPool (bag-of-words bound, LCS only
where the bound reaches 0.7). The same decisions are asserted; medians of --runs.

    python benchmarks/self_instruct_novelty.py [--pool 400] [--candidates 400] [--runs 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from rouge_score import rouge_scorer

from llmlab.data.self_instruct import NoveltyPool, read_seed_tasks
from llmlab.nn.cpu_kernels import cpu_description


def texts(n: int, rng: random.Random) -> list[str]:
    """Instructions like a pool's: seed instructions with words dropped, swapped and mixed in from others."""
    seeds = [t.instruction.split() for t in read_seed_tasks()]
    out = []
    for _ in range(n):
        words = list(rng.choice(seeds))
        for _ in range(rng.randint(0, 4)):
            other = rng.choice(seeds)
            words[rng.randrange(len(words))] = rng.choice(other)
        out.append(" ".join(words))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=400)
    ap.add_argument("--candidates", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(0)
    pool_texts, candidates = texts(args.pool, rng), texts(args.candidates, rng)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenize = scorer._tokenizer.tokenize
    pool_tokens = [tokenize(p) for p in pool_texts]
    peer_times, ours_times = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        ref = [max(rouge_scorer._score_lcs(tokenize(c), p).fmeasure for p in pool_tokens) < 0.7 for c in candidates]
        peer_times.append(time.perf_counter() - t)
        pool = NoveltyPool(pool_texts)
        t = time.perf_counter()
        ours = [pool.is_novel(c) for c in candidates]
        ours_times.append(time.perf_counter() - t)
        assert ours == ref
    print(f"{cpu_description()}; {args.candidates} candidates x {args.pool} pool instructions, "
          f"{sum(ref)} novel; LCS run on {pool.lcs_runs} of {pool.comparisons} pairs")
    peer, mine = statistics.median(peer_times), statistics.median(ours_times)
    print(f"rouge-score (pre-tokenized pool, Alpaca's loop): {peer:.3f} s; llmlab NoveltyPool: {mine:.3f} s")
    print(f"speedup: {peer / mine:.1f}x")


if __name__ == "__main__":
    main()
