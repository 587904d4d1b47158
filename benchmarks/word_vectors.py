"""Word vectors vs gensim: skip-gram, CBOW (word2vec) and fastText skip-gram trained by llmlab and by gensim on
the same corpus (the built-in one: Python help topics + standard-library docstrings) with the same settings
(dim, window, negative, min_count, epochs, sample, seed; gensim with --threads workers, llmlab with --threads
torch threads). For each: training words/s, analogy and similarity accuracy on the built-in test set, and the
top-10 neighbour overlap with gensim over the test set's words, next to the overlap of two gensim runs that
differ only in the seed (the noise floor). The words/s ratios print last (above 1: llmlab is faster).

    python benchmarks/word_vectors.py [--epochs 5] [--threads 2] [--methods sg,cbow,fasttext]
"""

from __future__ import annotations

import argparse
import time

import torch

from llmlab.text.vector_eval import PLOT_WORDS, evaluate, neighbor_overlap, train_vectors
from llmlab.text.vectors import VectorConfig, WordVectors, builtin_documents, vector_sentences


def gensim_vectors(sentences, cfg: VectorConfig, workers: int, seed: int) -> tuple[WordVectors, float]:
    from gensim.models import FastText, Word2Vec

    common = dict(vector_size=cfg.dim, window=cfg.window, min_count=cfg.min_count, negative=cfg.negative,
                  hs=0, epochs=cfg.epochs, sample=cfg.sample, seed=seed, workers=workers,
                  sg=int(cfg.arch == "sg"), alpha=cfg.resolved_lr(), min_alpha=cfg.min_lr)
    start = time.perf_counter()
    if cfg.method == "fasttext":
        model = FastText(sentences, min_n=cfg.min_n, max_n=cfg.max_n, bucket=cfg.bucket, **common)
    else:
        model = Word2Vec(sentences, **common)
    seconds = time.perf_counter() - start
    kv = model.wv
    return WordVectors(list(kv.index_to_key), torch.from_numpy(kv.vectors.copy()), config=cfg.__dict__), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5, help="passes over the corpus (default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="gensim workers and torch threads (default: 2)")
    ap.add_argument("--methods", default="sg,cbow,fasttext", help="which to run (default: sg,cbow,fasttext)")
    ap.add_argument("--dim", type=int, default=100, help="vector size (default: 100)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sentences = vector_sentences(builtin_documents())
    words = sum(map(len, sentences))
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    simd = [x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if x in flags]
    print(f"corpus: {words:,} words in {len(sentences):,} sentences; {args.epochs} epochs, dim {args.dim}, "
          f"{args.threads} threads; CPU flags: {' '.join(simd)}")
    probe = list(PLOT_WORDS)
    ratios = {}
    for name in args.methods.split(","):
        method, arch = ("fasttext", "sg") if name == "fasttext" else ("word2vec", name)
        cfg = VectorConfig(method=method, arch=arch, dim=args.dim, epochs=args.epochs, bucket=200_000)
        start = time.perf_counter()
        ours = train_vectors(sentences, cfg)
        t_ours = time.perf_counter() - start
        ref, t_ref = gensim_vectors(sentences, cfg, args.threads, seed=cfg.seed)
        ref2, _ = gensim_vectors(sentences, cfg, args.threads, seed=cfg.seed + 1)
        e_ours, e_ref = evaluate(ours), evaluate(ref)
        wps_ours, wps_ref = args.epochs * words / t_ours, args.epochs * words / t_ref
        overlap, floor = neighbor_overlap(ours, ref, probe), neighbor_overlap(ref, ref2, probe)
        print(f"{name:>9}: llmlab {wps_ours:>9,.0f} words/s ({t_ours:5.1f} s), "
              f"analogy {100 * e_ours['analogy']:5.1f}%, similarity {100 * e_ours['similarity']:5.1f}% | "
              f"gensim {wps_ref:>9,.0f} words/s ({t_ref:5.1f} s), analogy {100 * e_ref['analogy']:5.1f}%, "
              f"similarity {100 * e_ref['similarity']:5.1f}% | top-10 overlap llmlab-gensim {overlap:.2f}, "
              f"gensim-gensim(seed+1) {floor:.2f}")
        ratios[name] = wps_ours / wps_ref
    print("(shared machine: other jobs ran on the same 2 cores)")
    print("words/s ratio llmlab / gensim: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
