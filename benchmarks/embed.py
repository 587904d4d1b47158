"""Sentence-embedding throughput (sentences/s): llmlab's ``LLM.embed`` against sentence-transformers'
``SentenceTransformer.encode`` (the peer), both loading all-MiniLM-L6-v2 from the same folder, on the same
sentences (queries and documents of the built-in retrieval set, up to 256 tokens, the peer's max_seq_length) with
the same batch size, at 1 and 2 torch threads. llmlab runs twice: in float32, and with ``precision="auto"`` (bf16
matrix products on a CPU with AVX512-BF16/AMX, else float32: the default). Each figure is the median of --runs
timed runs after one warm-up (each run times the three in turn); the cosine of each llmlab embedding to the
peer's (the minimum over the sentences) is printed with them. Ratios (llmlab / peer) are printed last.

    python benchmarks/embed.py [--texts 256] [--runs 3] [--batch-sizes 1,32,128] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from llmlab.api import load  # noqa: E402
from llmlab.formats.load import DEFAULT_EMBED, embedded_path  # noqa: E402
from llmlab.infer.embed import embed_dtype  # noqa: E402
from llmlab.nn.cpu_kernels import cpu_description  # noqa: E402
from llmlab.text.retrieval_set import builtin_test_set  # noqa: E402


def sentences(n: int) -> list[str]:
    """n texts spread evenly over the built-in test set's queries then documents (short and long mixed)."""
    rset = builtin_test_set()
    texts = list(rset.queries.values()) + list(rset.corpus.values())
    step = max(1, len(texts) // n)
    return texts[::step][:n]


def rates(fns: dict, n: int, runs: int) -> dict[str, float]:
    """{name: fn} -> {name: sentences/s}, the median of ``runs`` runs after one warm-up each; every run times
    each fn in turn, so load from other processes falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: n / statistics.median(t) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=256, help="sentences per run (default: 256)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure; the median is printed (default: 3)")
    ap.add_argument("--batch-sizes", default="1,32,128", help="batch sizes (default: 1,32,128)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts (default: 1,2)")
    args = ap.parse_args()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed: pip install -e '.[test]'")
        return 1
    path = embedded_path(DEFAULT_EMBED)
    texts = sentences(args.texts)
    llm = load(path)
    peer = SentenceTransformer(str(path), device="cpu")
    auto = embed_dtype("auto", torch.device("cpu"))
    print(f"{cpu_description()}; load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}")
    print(f"{len(texts)} sentences, up to {peer.max_seq_length} tokens; llmlab auto = {auto}; "
          f"median of {args.runs} runs")
    ref = torch.tensor(peer.encode(texts, batch_size=32))
    cos = {p: torch.nn.functional.cosine_similarity(llm.embed(texts, precision=p), ref).min().item()
           for p in ("float32", "auto")}
    print(f"cosine to sentence-transformers (min over sentences): float32 {cos['float32']:.7f}, "
          f"auto {cos['auto']:.7f}")
    print(f"{'threads':>7} {'batch':>5} {'sentence-transformers':>22} {'llmlab fp32':>12} {'llmlab auto':>12}")
    ratios = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            r = rates({"st": lambda b=bs: peer.encode(texts, batch_size=b),
                       "fp32": lambda b=bs: llm.embed(texts, batch_size=b, precision="float32"),
                       "auto": lambda b=bs: llm.embed(texts, batch_size=b, precision="auto")}, len(texts), args.runs)
            st, fp32, ours = r["st"], r["fp32"], r["auto"]
            ratios.append((threads, bs, fp32 / st, ours / st))
            print(f"{threads:>7} {bs:>5} {st:>22.1f} {fp32:>12.1f} {ours:>12.1f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("ratio llmlab / sentence-transformers (fp32, auto): " + "; ".join(
        f"{t} thr bs {b}: {r32:.2f}x, {r:.2f}x" for t, b, r32, r in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
