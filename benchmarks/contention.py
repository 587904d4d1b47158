"""Decode speed on a shared CPU: SmolLM2-135M-Instruct greedy decode with 1 thread and with every physical core,
on a quiet machine and beside busy processes (each a Python busy loop, one per core given by --busy), for llmlab's
packed path (native C step, the default int8r kernels) and llama-cpp-python on the same GGUF (if installed).

Why: a parallel region that ends in a barrier (OpenMP's, and llama.cpp's thread pool) waits for every thread,
including one the OS has descheduled for the busy process, once per region; a decode step has about 150 of them.
llmlab's kernels use their own pool (nn/csrc/pool.h) whose calling thread claims the work a late thread has not
started, so using every core should cost little when a core is taken. The figures are the marginal ms per new token
(--new-tokens minus 1, after a 128-token prompt; `noise` where the noise outran it), median of --runs, printed
with the CPU flags and the load average.

    python benchmarks/contention.py [--runs 3] [--busy 1] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch

from decode import median_time, prompt_ids  # benchmarks/decode.py: the same prompt and timing
from llmlab.api import load
from llmlab.infer.generate import generate
from llmlab.nn.cpu_kernels import physical_cores, speed_flags


def ms_per_token(gen, n: int, runs: int) -> float:
    """The marginal time of a new token: (time of n new tokens - time of 1) / (n - 1), in ms; NaN when the noise
    of the two timings outran the difference (too few --new-tokens or --runs on a loaded machine)."""
    ms = 1000 * (median_time(lambda: gen(n), runs) - median_time(lambda: gen(1), runs)) / (n - 1)
    return ms if ms > 0 else math.nan


def cell(ms: float) -> str:
    return "noise" if math.isnan(ms) else f"{ms:.2f}"


def llama_cpp_maker(gguf: str, ids: list[int]):
    """threads -> gen(n) for llama-cpp-python on the same file, or None when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None

    def make(threads: int):
        llm = Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

        def gen(n: int) -> None:
            llm.reset()
            for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), 1):
                if i >= n:
                    break

        return gen

    return make


class Busy:
    """k busy processes (Python busy loops) for the duration of a with-block."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.k)]
        time.sleep(0.5)  # let them reach their loops
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (default: 3)")
    p.add_argument("--busy", type=int, default=1, help="busy processes in the loaded condition (default: 1)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per timed run (default: 64)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python even if installed "
                   "(default: off)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.busy < 1 or args.new_tokens < 2:
        p.error(f"--runs and --busy must be >= 1 and --new-tokens >= 2, got {args.runs}, {args.busy}, "
                f"{args.new_tokens}")
    cores = physical_cores()
    loaded = load("smollm2-135m-instruct", packed=True)
    model = loaded.model
    ids = prompt_ids(loaded.tokenizer, 128)
    print(f"SmolLM2-135M-Instruct, packed (default kernels); {cores} physical core(s); CPU flags: {speed_flags()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    def ours(n: int) -> None:
        generate(model, [ids], n)

    peers = {"llmlab": lambda threads: ours}
    maker = None if args.no_llama_cpp else llama_cpp_maker(loaded.loaded.source, ids)
    if maker is None:
        print("llama.cpp: skipped (" + ("--no-llama-cpp" if args.no_llama_cpp else "llama-cpp-python not installed")
              + ")")
    else:
        peers["llama.cpp"] = maker

    rows: dict[tuple[str, str, int], float] = {}
    for condition, busy in (("quiet", 0), (f"{args.busy} busy", args.busy)):
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            for name, make in peers.items():
                gen = make(threads)
                with Busy(busy):
                    rows[(name, condition, threads)] = ms_per_token(gen, args.new_tokens, args.runs)
                print(f"{name:10s} {condition:8s} {threads} thread(s): {cell(rows[(name, condition, threads)]):>8s} "
                      f"ms/token (load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nms per new token, median of {args.runs}; {args.busy} busy process(es) beside it in the loaded columns")
    conditions = ("quiet", f"{args.busy} busy")
    print("| | " + " | ".join(f"{c}, {t} thread(s)" for c in conditions for t in sorted({1, cores})) + " |")
    print("|---|" + "---|" * (2 * len({1, cores})))
    for name in peers:
        print(f"| {name} | " + " | ".join(cell(rows[(name, c, t)]) for c in conditions
                                          for t in sorted({1, cores})) + " |")
    if any(math.isnan(v) for v in rows.values()):
        print("noise: the timing noise outran the difference between n and 1 new tokens; raise --new-tokens or --runs")
    if cores > 1:
        for name in peers:
            busy = conditions[1]
            print(f"{name}: {cores} threads beside the busy process take "
                  f"{rows[(name, busy, cores)] / rows[(name, busy, 1)]:.2f}x the time of 1 thread "
                  f"(quiet: {rows[(name, 'quiet', cores)] / rows[(name, 'quiet', 1)]:.2f}x)")


if __name__ == "__main__":
    main()
