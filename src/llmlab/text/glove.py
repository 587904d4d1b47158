"""GloVe: global vectors from a weighted least-squares fit to the logarithm of co-occurrence counts.

Paper: J. Pennington, R. Socher & C. D. Manning, "GloVe: Global Vectors for Word Representation", EMNLP 2014.

1. Count: X_ij sums 1/d over every time word j occurs d <= window words from word i in the same sentence, on
   either side (the paper's distance weighting, section 4.2: "word pairs that are d words apart contribute 1/d
   to the total count"). X is symmetric.
2. Fit word vectors w_i, context vectors w~_j and biases b_i, b~_j to the non-zero entries by minimising

       J = sum_{ij: X_ij > 0} f(X_ij) (w_i . w~_j + b_i + b~_j - log X_ij)^2        (paper, eq. 8)

   with the weighting f(x) = (x / x_max)^alpha for x < x_max, else 1 (eq. 9; x_max = 100, alpha = 3/4), which
   keeps rare, noisy pairs from dominating and caps the weight of very frequent ones.
3. Optimise with AdaGrad (Duchi et al. 2011) over the entries in a new random order each epoch, every squared
   gradient accumulator starting at 1 and the rate fixed at 0.05, as the reference glove.c does. Updates are
   vectorised over ``batch * 16`` entries at a time; the step is the gradient of J / 2 (glove.c's cost), the
   factor 2 folding into the rate. ``glove_loss`` is the reference (autograd) path and ``glove_grads`` the
   gradient written out (tests/test_word_vectors.py checks both on a hand-computed case).
4. The vectors are W + W~ (section 4.2: "we choose to use the sum W + W~ as our word vectors").

Shapes: V words, D = dim; the co-occurrences are E entries (rows (E,), cols (E,), counts (E,)).
"""

from __future__ import annotations

import time

import torch

from llmlab.text.vectors import VectorConfig, WordVectors, build_vocab, config_record, encode


def cooccurrences(ids: torch.Tensor, sent: torch.Tensor, vocab_size: int,
                  window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, counts) of the non-zero X_ij, counts float64, both orders of every pair, sorted by i*V + j."""
    keys, weights = [], []
    for d in range(1, min(window, len(ids) - 1) + 1):
        same = sent[d:] == sent[:-d]  # pairs d apart inside one sentence
        a, b = ids[:-d][same], ids[d:][same]
        keys += [a * vocab_size + b, b * vocab_size + a]
        weights += [torch.full((2 * len(a),), 1.0 / d, dtype=torch.float64)]
    if not keys:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0, dtype=torch.float64)
    uniq, inv = torch.unique(torch.cat(keys), return_inverse=True)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.cat(weights))
    return uniq // vocab_size, uniq % vocab_size, counts


def weighting(x: torch.Tensor, x_max: float, power: float) -> torch.Tensor:
    """f(x) = (x / x_max)^power below x_max, 1 above."""
    return (x / x_max).clamp(max=1.0) ** power


def glove_loss(W, Wc, b, bc, rows, cols, x, x_max: float = 100.0, power: float = 0.75) -> torch.Tensor:
    """J over the given entries (the paper's eq. 8, no factor 1/2). Reference path (autograd)."""
    diff = (W[rows] * Wc[cols]).sum(1) + b[rows] + bc[cols] - x.log()  # (E,)
    return (weighting(x, x_max, power) * diff ** 2).sum()


def glove_grads(W, Wc, b, bc, rows, cols, x, x_max: float = 100.0, power: float = 0.75):
    """Per-entry gradients of J / 2: (for w_i (E, D), for w~_j (E, D), for b_i and b~_j (E,)) and J."""
    w, wc = W[rows], Wc[cols]  # (E, D), (E, D)
    diff = (w * wc).sum(1) + b[rows] + bc[cols] - x.log()  # (E,)
    fdiff = weighting(x, x_max, power) * diff  # (E,)
    return fdiff[:, None] * wc, fdiff[:, None] * w, fdiff, float((fdiff * diff).sum())


def adagrad_(param: torch.Tensor, sq: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    """AdaGrad on the rows ``index`` of ``param``: the gradients of repeated rows summed first, then
    param -= lr * g / sqrt(accumulated g^2 before this step), and g^2 added to the accumulator (glove.c's order)."""
    touched, inv = torch.unique(index, return_inverse=True)
    gt = torch.zeros((len(touched),) + param.shape[1:], dtype=param.dtype).index_add_(0, inv, grad)  # (U, ...)
    param[touched] -= lr * gt / sq[touched].sqrt()
    sq[touched] += gt * gt


def train_glove(sentences: list[list[str]], cfg: VectorConfig, progress: bool = False) -> WordVectors:
    from tqdm import tqdm

    cfg.check()
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = build_vocab(sentences, cfg.min_count)
    ids, sent = encode(sentences, vocab)
    V, D, lr = len(vocab.words), cfg.dim, cfg.resolved_lr()
    start = time.perf_counter()
    rows, cols, counts = cooccurrences(ids, sent, V, cfg.window)
    x = counts.float()
    # glove.c's initialisation: uniform in [-0.5/D, 0.5/D) for vectors and biases; accumulators at 1.
    W, Wc = [(torch.rand(V, D, generator=gen) - 0.5) / D for _ in range(2)]
    b, bc = [(torch.rand(V, generator=gen) - 0.5) / D for _ in range(2)]
    sq = [torch.ones_like(t) for t in (W, Wc, b, bc)]
    E, step = len(x), cfg.batch * 16
    bar = tqdm(total=cfg.epochs * E, desc="glove", unit="pair", unit_scale=True, disable=not progress,
               dynamic_ncols=True, leave=False)
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(E, generator=gen)
        total = 0.0
        for s in range(0, E, step):
            e = order[s:s + step]
            r, c = rows[e], cols[e]
            gw, gwc, gb, cost = glove_grads(W, Wc, b, bc, r, c, x[e], cfg.x_max, cfg.weight_power)
            adagrad_(W, sq[0], r, gw, lr)
            adagrad_(Wc, sq[1], c, gwc, lr)
            adagrad_(b, sq[2], r, gb, lr)
            adagrad_(bc, sq[3], c, gb, lr)
            total += cost
            bar.update(len(e))
        losses.append(total / max(E, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    record = config_record(cfg) | {"words": len(ids), "vocab": V, "cooccurrences": E, "seconds": round(seconds, 3),
                                   "loss_per_epoch": [round(v, 6) for v in losses],
                                   "words_per_second": round(cfg.epochs * len(ids) / max(seconds, 1e-9))}
    return WordVectors(vocab.words, W + Wc, vocab.counts.tolist(), record)
