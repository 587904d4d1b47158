"""The learning path's figures that no training command draws: each is computed here with the project's own
modules (or read from a results file a benchmark wrote), never drawn by hand.

    python scripts/docs_figures.py                      # every figure -> docs/figures/ (about a minute on 2 cores)
    python scripts/docs_figures.py --only rnn,distill   # some of them

- ngram.png: held-out perplexity of Kneser-Ney by order and discount (text/ngram_lm.py, the docstring task);
- bpe.png: bytes per held-out token vs the number of BPE merges (tokenizer/bpe_train.py, tokenizer/bpe.py);
- rnn.png: the gradient reaching each earlier input, Elman RNN vs GRU vs LSTM (nn/rnn.py at initialisation);
- alignment.png: the DPO loss of the margin, PPO's clipped objective of the ratio (train/dpo.py, train/ppo.py);
- pruning.png: held-out perplexity of the pruning table (docs/pruning/results.json);
- distill.png: forward vs reverse KL fits of a one-peak student to a two-peak teacher (train/distill_losses.py);
- lowrank.png: held-out perplexity vs file size, SVD vs SVD-LLM (docs/lowrank/results.json);
- retrieval.png: query x document cosine similarities of all-MiniLM-L6-v2 (infer/embed.py, the built-in set).

The output folder is relative to the working directory (``--out``); results files are read from the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing



def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: ``--help`` and bad flags stay fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Lay the figure out and write it atomically (``common.save_png``)."""
    from llmlab.common import save_png

    fig.tight_layout()
    save_png(fig, path)


def ngram(out: Path) -> None:
    """Perplexity by order for several discounts: the counts do not depend on D, so each order is fit once."""
    plt = _pyplot()
    from llmlab.text.ngram_lm import KneserNeyLM, NgramConfig
    from llmlab.text.normalize import tokenize_sentences
    from llmlab.text.tasks import lm_corpus

    train, heldout = lm_corpus()
    train_s, heldout_s = tokenize_sentences(train), tokenize_sentences(heldout)
    orders, discounts = [2, 3, 4, 5], [0.1, 0.5, 0.75, 1.0]
    ppl = {d: [] for d in discounts}
    for n in orders:
        lm = KneserNeyLM(NgramConfig(order=n)).fit(train_s)
        for d in discounts:
            lm.cfg.discount = d
            ppl[d].append(lm.perplexity(heldout_s))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for d in discounts:
        ax.plot(orders, ppl[d], marker="o", label=f"D = {d}")
    ax.set(xlabel="order n", ylabel="held-out perplexity", xticks=orders,
           title="Interpolated Kneser-Ney on the stdlib docstrings")
    ax.legend()
    _save(fig, out / "ngram.png")


def bpe(out: Path) -> None:
    """One BPE training; a tokenizer with the first k merges is the one training would stop at after k merges."""
    plt = _pyplot()
    from llmlab.text.tasks import lm_corpus
    from llmlab.tokenizer.bpe import ByteBPE
    from llmlab.tokenizer.bpe_train import train_bpe

    train, heldout = lm_corpus()
    full = train_bpe([train], 256 + 4096)
    steps = [0, 64, 128, 256, 512, 1024, 2048, len(full.merges)]
    n_bytes = len(heldout.encode("utf-8"))
    ratio = []
    for k in steps:
        vocab = {t: i for t, i in full.vocab.items() if i < 256 + k}
        tok = ByteBPE(vocab, full.merges[:k], full.pre_steps, use_tokenizers_lib=False)
        ratio.append(n_bytes / len(tok.encode(heldout)))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([256 + k for k in steps], ratio, marker="o")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="vocabulary size (256 bytes + merges)", ylabel="bytes per token (held out)",
           title="Byte-level BPE trained on the stdlib docstrings")
    ax.grid(alpha=0.3)
    _save(fig, out / "bpe.png")


def rnn(out: Path) -> None:
    """|| d h_T / d x_t || for every t at initialisation: the Elman RNN's shrinks geometrically with T - t."""
    plt = _pyplot()
    import torch

    from llmlab.nn.rnn import Recurrent

    T, size, seeds = 60, 64, 8
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode, label in [("rnn_tanh", "Elman RNN (tanh)"), ("gru", "GRU"), ("lstm", "LSTM")]:
        norms = torch.zeros(T)
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = Recurrent(mode, size, size, batch_first=True)
            x = torch.randn(1, T, size, requires_grad=True)
            y, _ = net(x)
            y[0, -1].sum().backward()
            norms += x.grad[0].norm(dim=-1) / seeds  # (T,)
        ax.plot(range(T - 1, -1, -1), norms.tolist(), label=label)
    ax.set(yscale="log", xlabel="steps back from the last output, T - t",
           ylabel=r"$\|\partial\, \mathbf{1}^\top h_T / \partial x_t\|$",
           title="Gradient through time at initialisation (mean of 8)")
    ax.legend()
    _save(fig, out / "rnn.png")


def alignment(out: Path) -> None:
    plt = _pyplot()
    import torch

    from llmlab.train.dpo import dpo_loss
    from llmlab.train.ppo import ppo_policy_loss

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    h = torch.linspace(-40, 40, 401)
    zero = torch.zeros_like(h)
    for eps in (0.0, 0.1):
        losses, _, _ = dpo_loss(h, zero, zero, zero, beta=0.1, label_smoothing=eps)
        left.plot(h.tolist(), losses.tolist(), label="DPO" if eps == 0 else f"conservative DPO, eps {eps}")
    left.set(xlabel=r"log-ratio margin $h$ (chosen - rejected, vs the reference)", ylabel="loss",
             title=r"DPO, $\beta$ = 0.1")
    left.legend()
    ratio = torch.linspace(0.0, 2.0, 401)
    for a in (1.0, -1.0):
        objective = [-float(ppo_policy_loss(torch.log(r.clamp_min(1e-9))[None], torch.zeros(1), torch.tensor([a]),
                                            torch.ones(1), clip=0.2)[0]) for r in ratio]
        right.plot(ratio.tolist(), objective, label=f"A = {a:+.0f}")
    right.axvline(1.0, color="grey", lw=0.5)
    right.set(xlabel=r"probability ratio $\pi_\theta / \pi_{old}$", ylabel=r"$L^{CLIP}$ (one token)",
              title="PPO's clipped objective, clip 0.2")
    right.legend()
    _save(fig, out / "alignment.png")


def pruning(out: Path) -> None:
    plt = _pyplot()
    rows = json.loads((ROOT / "docs" / "pruning" / "results.json").read_text())["rows"]
    dense = next(r["perplexity"] for r in rows if r["method"] == "dense")
    methods, patterns = ["magnitude", "wanda", "sparsegpt"], ["unstructured", "2:4"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    width = 0.38
    for j, pattern in enumerate(patterns):
        values = [next(r["perplexity"] for r in rows if r["method"] == m and r["pattern"] == pattern)
                  for m in methods]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(methods))], values, width,
                      label="50% unstructured" if pattern == "unstructured" else "2:4")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(dense, color="black", lw=0.8, ls="--", label=f"dense {dense:.2f}")
    ax.set(yscale="log", xticks=range(len(methods)), xticklabels=methods, ylabel="held-out perplexity",
           title="SmolLM2-135M, every block linear pruned")
    ax.legend()
    _save(fig, out / "pruning.png")


def distill(out: Path) -> None:
    """A student that can only make one peak, fitted to a two-peak teacher by each KL: forward KL covers both
    modes (mass between them), reverse KL picks one. Reverse KL has a second, wide stationary point (from a
    start midway between the peaks Adam stays there, at KL 2.3 against 0.51 on a peak): it starts at 60."""
    plt = _pyplot()
    import torch

    from llmlab.train.distill_losses import forward_kl, reverse_kl

    v = torch.arange(100, dtype=torch.float64)
    teacher = torch.logsumexp(torch.stack([-(v - 25) ** 2 / 50 + math.log(0.4), -(v - 70) ** 2 / 50 + math.log(0.6)]),
                              0)[None]  # (1, V) logits of a two-peak distribution

    def fit(loss_fn, mu0: float, sigma0: float, lr: float) -> torch.Tensor:
        mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
        log_sigma = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([mu, log_sigma], lr=lr)
        for _ in range(600):
            student = (-(v - mu) ** 2 / (2 * log_sigma.exp() ** 2))[None]  # (1, V): one peak, any place and width
            opt.zero_grad()
            loss_fn(student, teacher).backward()
            opt.step()
        return torch.softmax(student.detach()[0], -1)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.fill_between(v.tolist(), torch.softmax(teacher[0], -1).tolist(), color="lightgrey", label="teacher")
    ax.plot(v.tolist(), fit(forward_kl, 45.0, 10.0, 0.2).tolist(), label=r"student, forward KL($p_T \| p_S$)")
    ax.plot(v.tolist(), fit(reverse_kl, 60.0, 4.0, 0.05).tolist(), label=r"student, reverse KL($p_S \| p_T$)")
    ax.set(xlabel="token id", ylabel="probability", title="One-peak student fitted to a two-peak teacher")
    ax.legend()
    _save(fig, out / "distill.png")


def lowrank(out: Path) -> None:
    plt = _pyplot()
    rows = json.loads((ROOT / "docs" / "lowrank" / "results.json").read_text())["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in rows:
        method = "dense" if r["kept"] is None else ("svd-llm" if r["label"].startswith("svd-llm") else "svd")
        style = {"dense": ("black", "*"), "svd": ("tab:red", "o"), "svd-llm": ("tab:blue", "s")}[method]
        ax.scatter(r["file_mb"], r["perplexity"], color=style[0], marker=style[1])
        ax.annotate(r["label"].replace(" (GGUF dequantized)", ""), (r["file_mb"], r["perplexity"]),
                    fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.set(yscale="log", xlabel="model file (MB, float16 tensors)", ylabel="held-out perplexity",
           title="SmolLM2-135M factored: SVD (red) vs SVD-LLM (blue)")
    ax.set_xlim(right=330)
    _save(fig, out / "lowrank.png")


def retrieval(out: Path) -> None:
    """The in-batch score matrix MNRL trains on: row i's positive is column i, every other column a negative."""
    plt = _pyplot()

    from llmlab import load
    from llmlab.text.retrieval_set import docstring_pairs

    pairs = docstring_pairs(("collections", "json"))[:8]
    enc = load("all-minilm-l6-v2")
    q = enc.embed([p.query for p in pairs])  # (8, 384), unit rows
    d = enc.embed([p.document for p in pairs])
    sim = (q @ d.T).float()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    im = ax.imshow(sim.numpy(), cmap="viridis")
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if sim[i, j] > sim.mean() else "white")
    ax.set(xlabel="document (the rest of a docstring)", ylabel="query (a docstring's first sentence)",
           title="all-MiniLM-L6-v2: cos(query, document)")
    ax.set_yticks(range(len(pairs)), [p.query[:38] for p in pairs], fontsize=6)
    ax.set_xticks(range(len(pairs)), [str(j) for j in range(len(pairs))])
    fig.colorbar(im)
    _save(fig, out / "retrieval.png")


FIGURES = {f.__name__: f for f in (ngram, bpe, rnn, alignment, pruning, distill, lowrank, retrieval)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/figures", help="output folder (default: docs/figures)")
    p.add_argument("--only", default=",".join(FIGURES),
                   help=f"comma-separated figures (default: all: {','.join(FIGURES)})")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"error: unknown figure {', '.join(unknown)}: choose from {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for name in names:
        t0 = time.perf_counter()
        FIGURES[name](out)
        print(f"{out / (name + '.png')}  {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
