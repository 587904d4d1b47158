"""Vector store search at scale: llmlab's ``VectorStore`` (infer/index.py) with its exact ``IndexFlatIP`` and its
HNSW graph, against a bare FAISS ``IndexFlatIP`` on the same vectors (the peer: what the store adds per query).

Synthetic unit vectors in clusters (a mixture of Gaussians, closer to sentence embeddings than isotropic noise, on
which graph search is at its worst), queries drawn the same way. For each size: the time to write the store (SQLite
transaction + FAISS + atomic save), the time to rebuild the vectors as HNSW from the database, the files' sizes,
query latency p50 / p99 of ``dense`` (top 10) for the bare index, the store's flat index and its HNSW, recall@10
against exact search, and the process's peak RSS. Ratios print last (store flat / bare flat: the store's overhead;
HNSW / store flat: below 1, HNSW is faster).

    python benchmarks/index.py [--sizes 10000,100000] [--dim 384] [--queries 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from llmlab.infer.index import IndexConfig, VectorStore
from llmlab.nn.cpu_kernels import cpu_description
from llmlab.text.chunk import Chunk


def clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """(n, dim) unit vectors: a random center plus noise of half its norm."""
    noise = rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def latencies(fn, queries: np.ndarray) -> tuple[float, float, list]:
    """(p50 ms, p99 ms, results) of fn(q) over the queries, after one warm-up call."""
    fn(queries[0])
    times, out = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="vector counts (default: 10000,100000)")
    ap.add_argument("--dim", type=int, default=384, help="vector size (default: 384, all-MiniLM-L6-v2's)")
    ap.add_argument("--queries", type=int, default=300, help="queries timed per index (default: 300)")
    ap.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (default: 1)")
    ap.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (default: 32)")
    ap.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth (default: 128)")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"# {cpu_description()}; FAISS {faiss.__version__}, {args.threads} thread(s); dim {args.dim}")
    rng = np.random.default_rng(0)
    fp = {"model": "synthetic", "dim": args.dim, "probe": [1.0] + [0.0] * (args.dim - 1)}
    ratios = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        centers = rng.standard_normal((max(10, n // 100), args.dim)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        vecs, queries = clustered(n, args.dim, rng, centers), clustered(args.queries, args.dim, rng, centers)
        with tempfile.TemporaryDirectory() as tmp:
            config = IndexConfig(model="synthetic", hnsw_above=n + 1, hnsw_m=args.hnsw_m, ef_search=args.ef_search)
            store = VectorStore.create(Path(tmp) / "idx", config, fp)
            rows = [(f"doc{i}", "", {}, [Chunk(0, 1, f"doc {i}", 2)], vecs[i:i + 1]) for i in range(n)]
            t = time.perf_counter()
            store.write(rows, [], fp)
            write_s = time.perf_counter() - t
            sizes = {p.name: p.stat().st_size for p in store.folder.iterdir() if not p.name.startswith(".")}
            ids = np.array([r[0] for r in store.db.execute("SELECT id FROM chunks ORDER BY id")])

            bare = faiss.IndexFlatIP(args.dim)
            bare.add(vecs)
            b50, b99, exact = latencies(lambda q, b=bare: b.search(q[None], 10)[1][0], queries)
            f50, f99, flat = latencies(lambda q, s=store: s.dense(q, fp, 10), queries)
            assert all([cid for cid, _ in got] == list(ids[e]) for got, e in zip(flat, exact))  # same answers

            store.config.hnsw_above = 1
            t = time.perf_counter()
            store._rebuild_vectors()  # HNSW from the vectors in the database, saved
            hnsw_s = time.perf_counter() - t
            h50, h99, approx = latencies(lambda q, s=store: s.dense(q, fp, 10), queries)
            recall = np.mean([len({cid for cid, _ in got} & set(ids[e])) / 10 for got, e in zip(approx, exact)])
            hnsw_bytes = (store.folder / "vectors.faiss").stat().st_size
            store.close()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\n{n:,} vectors: store write {write_s:.1f} s (SQLite + flat FAISS + save), HNSW rebuild "
              f"{hnsw_s:.1f} s; index.db {sizes['index.db'] / 2**20:.1f} MiB, vectors.faiss flat "
              f"{sizes['vectors.faiss'] / 2**20:.1f} MiB, HNSW {hnsw_bytes / 2**20:.1f} MiB; peak RSS {rss:.0f} MiB")
        print(f"  bare IndexFlatIP   p50 {b50:7.3f} ms  p99 {b99:7.3f} ms  recall@10 1.000")
        print(f"  store, flat        p50 {f50:7.3f} ms  p99 {f99:7.3f} ms  recall@10 1.000")
        print(f"  store, HNSW M={args.hnsw_m} ef={args.ef_search}  p50 {h50:7.3f} ms  p99 {h99:7.3f} ms  "
              f"recall@10 {recall:.3f}")
        ratios[n] = (f50 / b50, h50 / f50)
    print()
    for n, (overhead, speed) in ratios.items():
        print(f"{n:,} vectors: store flat / bare flat p50 = {overhead:.2f}; store HNSW / store flat p50 = {speed:.2f}")


if __name__ == "__main__":
    main()
