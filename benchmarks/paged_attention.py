"""Paged decode attention micro-benchmark: one layer of SmolLM2-135M (H=9 query heads, H_kv=3, D=64),
one new query per sequence, float32, median time per call of

- gather: ``paged_decode_reference``, the batched gather of every block table + masked attention;
- kernel: the C kernel walking the block tables in place (``nn/paged_decode.py``);
- contiguous: ``grouped_attention`` on keys/values already in a contiguous (n, H_kv, S, D) cache, the
  non-paged baseline (no gather, no mask: every sequence has the same length here).

Blocks are scattered over the pool at random, as after a while of serving. Ratios are printed last.

    python benchmarks/paged_attention.py [--runs 20] [--threads 2] [--block-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmlab.nn.attention import grouped_attention
from llmlab.nn.paged_attention import paged_decode_reference
from llmlab.nn.paged_decode import paged_decode_kernel, paged_decode_status

H, HKV, D = 9, 3, 64  # SmolLM2-135M


def median_times(fns: list, runs: int) -> list[float]:
    """Median seconds per call of each fn, the fns interleaved call by call so that load from other
    processes falls on all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def setup(n: int, ctx: int, bs: int, seed: int = 0):
    """A pool holding n sequences of ctx positions on shuffled blocks, their tables, and the same keys
    and values as a contiguous (n, H_kv, ctx, D) cache."""
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-ctx // bs)
    n_blocks = n * per_seq + 1
    k_layer = torch.randn(n_blocks, HKV, bs, D, generator=g)  # (n_blocks, Hkv, bs, D)
    v_layer = torch.randn(n_blocks, HKV, bs, D, generator=g)
    tables = torch.randperm(n_blocks, generator=g)[:n * per_seq].reshape(n, per_seq).to(torch.int32)
    ctx_lens = torch.full((n,), ctx, dtype=torch.int32)
    q = torch.randn(n, H, D, generator=g)  # (n, H, D)
    k = k_layer[tables.long()].transpose(1, 2).reshape(n, HKV, per_seq * bs, D)[:, :, :ctx].contiguous()
    v = v_layer[tables.long()].transpose(1, 2).reshape(n, HKV, per_seq * bs, D)[:, :, :ctx].contiguous()
    return q, k_layer, v_layer, tables, ctx_lens, k, v  # k, v (n, Hkv, ctx, D)


def measure(n: int, ctx: int, bs: int, kernel, runs: int) -> list[float]:
    """Seconds per call: gather reference, C kernel (nan without one), contiguous grouped_attention."""
    q, k_layer, v_layer, tables, ctx_lens, k, v = setup(n, ctx, bs)
    scale = D ** -0.5
    fns = [lambda: paged_decode_reference(q, k_layer, v_layer, tables, ctx_lens, scale),
           lambda: grouped_attention(q[:, :, None], k, v, None, scale)]  # q (n, H, 1, D)
    if kernel is not None:
        fns.append(lambda: kernel(q, k_layer, v_layer, tables, ctx_lens, scale))
    t = median_times(fns, runs)
    return [t[0], t[2] if kernel is not None else float("nan"), t[1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="timed calls per measurement (default: 20)")
    ap.add_argument("--threads", type=int, default=2, help="torch and kernel threads (default: 2)")
    ap.add_argument("--block-size", type=int, default=16, help="positions per KV block (default: 16)")
    ap.add_argument("--seqs", default="1,8,32,64", help="numbers of sequences, comma-separated (default: 1,8,32,64)")
    ap.add_argument("--ctx", default="128,512,1024",
                    help="context lengths per sequence, comma-separated (default: 128,512,1024)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel = paged_decode_kernel()
    print(f"paged decode kernel: {paged_decode_status()}")
    print(f"threads {args.threads}, block size {args.block_size}, H={H} H_kv={HKV} D={D}, float32")
    rows = []
    with torch.inference_mode():
        for n in (int(x) for x in args.seqs.split(",")):
            for ctx in (int(x) for x in args.ctx.split(",")):
                rows.append((n, ctx, *measure(n, ctx, args.block_size, kernel, args.runs)))
    print(f"\n{'seqs':>5} {'ctx':>5} {'gather ms':>10} {'kernel ms':>10} {'contig ms':>10}")
    for n, ctx, tg, tk, tc in rows:
        print(f"{n:>5} {ctx:>5} {tg * 1e3:>10.3f} {tk * 1e3:>10.3f} {tc * 1e3:>10.3f}")
    print(f"\n{'seqs':>5} {'ctx':>5} {'gather/kernel':>14} {'contig/kernel':>14}")
    for n, ctx, tg, tk, tc in rows:
        print(f"{n:>5} {ctx:>5} {tg / tk:>14.2f} {tc / tk:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
