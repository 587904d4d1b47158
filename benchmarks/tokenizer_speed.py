"""Tokenizer encode throughput (MB/s) on ~210 KB of mixed text: llmlab's pure-Python reference path,
llmlab's ``encode_batch`` through the ``tokenizers`` library, and ``tokenizers`` itself (the peer) —
for SmolLM2's byte-level BPE and MiniLM's WordPiece. Cold caches each run; medians of several runs; ratios printed last.

    python benchmarks/tokenizer_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.formats.gguf import GGUFFile  # noqa: E402
from llmlab.formats.gguf_model import tokenizer_from_gguf  # noqa: E402
from llmlab.formats.load import DEFAULT_CHAT, DEFAULT_EMBED, embedded_path  # noqa: E402
from llmlab.tokenizer.hf_json import load_tokenizer_json  # noqa: E402
from tests.mixed_text import build, lines  # noqa: E402


def mbps(fn, text: str, runs: int, fresh) -> float:
    times = []
    for _ in range(runs):
        tok = fresh()
        t0 = time.perf_counter()
        fn(tok, text)
        times.append(time.perf_counter() - t0)
    return len(text.encode()) / statistics.median(times) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (default: 5)")
    args = ap.parse_args()
    text = build()
    g = GGUFFile(embedded_path(DEFAULT_CHAT))
    bpe_ref = mbps(lambda t, x: t.encode_reference(x), text, args.runs,
                   lambda: tokenizer_from_gguf(g, use_tokenizers_lib=False))
    rows = [("SmolLM2 BPE", "llmlab reference (pure Python)", bpe_ref)]
    minilm = embedded_path(DEFAULT_EMBED)
    wp_ref = mbps(lambda t, x: t.encode(x), text, args.runs, lambda: load_tokenizer_json(minilm))
    rows.append(("MiniLM WordPiece", "llmlab reference (pure Python)", wp_ref))
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    if tokenizers is not None:
        peer = tokenizer_from_gguf(g).tokenizers_lib  # the same spec, straight through the peer
        bpe_peer = mbps(lambda t, x: t.encode(x, add_special_tokens=False), text, args.runs, lambda: peer)
        rows.append(("SmolLM2 BPE", "tokenizers (peer), one text", bpe_peer))
        ls = lines(text)
        bpe_lib = mbps(lambda t, x: t.encode_batch(ls), text, args.runs, lambda: tokenizer_from_gguf(g))
        rows.append(("SmolLM2 BPE", "llmlab encode_batch (tokenizers lib)", bpe_lib))
        bpe_peer_batch = mbps(lambda t, x: t.encode_batch(ls, add_special_tokens=False), text, args.runs,
                              lambda: peer)
        rows.append(("SmolLM2 BPE", "tokenizers (peer), batch of lines", bpe_peer_batch))

        def fresh_wp():
            t = tokenizers.Tokenizer.from_file(str(minilm / "tokenizer.json"))
            t.no_truncation()
            return t

        wp_peer = mbps(lambda t, x: t.encode(x, add_special_tokens=False), text, args.runs, fresh_wp)
        rows.append(("MiniLM WordPiece", "tokenizers (peer)", wp_peer))
    else:
        print("tokenizers: skipped (not installed: pip install -e '.[test]')")
    for model, path, rate in rows:
        print(f"{model:<17} {path:<36} {rate:8.2f} MB/s")
    if tokenizers is not None:
        print(f"ratios vs tokenizers: BPE one text {bpe_ref / bpe_peer:.2f}x; "
              f"BPE batch {bpe_lib / bpe_peer_batch:.2f}x; WordPiece one text {wp_ref / wp_peer:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
