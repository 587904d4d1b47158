"""BPE training: llmlab's pure-Python trainer vs Hugging Face ``tokenizers``' BpeTrainer (Rust), same
corpus (the first --mb MB of the Python standard library's sources), same vocabulary size, same
pre-tokenizer (GPT-2 regex + byte level). Prints time (median of --runs), bytes per token on the
corpus, whether the merges are identical, and the ratios last.

    python benchmarks/bpe_train.py [--mb 2] [--vocab-size 4096] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from llmlab.data.corpus import default_sources
from llmlab.tokenizer.bpe_train import train_bpe

SPECIALS = ["<|endoftext|>"]


def corpus(mb: float) -> list[str]:
    texts, total = [], 0
    for path in default_sources():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode())
        if total >= mb * 1e6:
            break
    return texts


def _fmt(times: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=2.0, help="MB of stdlib source to train on (default: 2)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    p.add_argument("--runs", type=int, default=3, help="runs; the median time is reported (default: 3)")
    args = p.parse_args()
    texts = corpus(args.mb)
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"corpus: {len(texts)} files, {n_bytes / 1e6:.2f} MB; vocab {args.vocab_size}")
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        ours = train_bpe(texts, args.vocab_size, special_tokens=SPECIALS)
        times.append(time.perf_counter() - t)
    ours_time = statistics.median(times)
    ours_bpt = n_bytes / sum(len(ours.encode_reference(t)) for t in texts)
    print(f"llmlab      {ours_time:8.2f} s   {ours_bpt:.4f} bytes/token   (runs: {_fmt(times)})")
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        print("tokenizers: skipped (not installed: pip install -e '.[test]')")
        return
    times = []
    for _ in range(args.runs):
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        t = time.perf_counter()
        hf.train_from_iterator(texts, trainer)
        times.append(time.perf_counter() - t)
    hf_time = statistics.median(times)
    hf_bpt = n_bytes / sum(len(e.ids) for e in hf.encode_batch(texts))
    print(f"tokenizers  {hf_time:8.2f} s   {hf_bpt:.4f} bytes/token   (runs: {_fmt(times)})")
    hf_merges = json.loads(hf.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in hf_merges]
    print(f"merges identical: {merges == ours.merges} ({len(ours.merges)} merges)")
    print("ratios:")
    print(f"  speed llmlab / tokenizers: {hf_time / ours_time:.2f}x")
    print(f"  bytes per token llmlab / tokenizers: {ours_bpt / hf_bpt:.4f} (goal: within 1%)")


if __name__ == "__main__":
    main()
