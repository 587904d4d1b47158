"""Classic NLP speed: llmlab's TF-IDF, logistic regression and Kneser-Ney LM vs scikit-learn / NLTK, same
corpus (the built-in standard-library docstrings), same options, one process. Also the classifier's sparse
gradient path (``SparseMatmul``) against autograd through ``torch.sparse.mm``. Median of --runs; the results must
agree (TF-IDF to 1e-12, the classifier's held-out accuracy, the LM's perplexity), and the ratios print last
(above 1: llmlab is slower).

    python benchmarks/text_features.py [--runs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmlab.text.classify import ClassifyConfig, LogisticRegression, SparseMatmul, to_csr
from llmlab.text.features import FeatureConfig, Vectorizer
from llmlab.text.ngram_lm import KneserNeyLM, NgramConfig, pad
from llmlab.text.normalize import tokenize_sentences
from llmlab.text.tasks import docstring_task, lm_corpus


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement; the median is shown (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nltk.lm import KneserNeyInterpolated
    from nltk.util import everygrams
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression

    task = docstring_task()
    ratios = {}
    for name, cfg, sk in [("tfidf words 1-2", FeatureConfig(ngram_max=2), dict(ngram_range=(1, 2))),
                          ("tfidf chars 2-4", FeatureConfig(analyzer="char", ngram_min=2, ngram_max=4),
                           dict(analyzer="char", ngram_range=(2, 4)))]:
        t_ours, x = timed(lambda cfg=cfg: Vectorizer(cfg).fit_transform(task.train_texts), args.runs)
        t_ref, y = timed(lambda sk=sk: TfidfVectorizer(**sk).fit_transform(task.train_texts), args.runs)
        err = (x.to_dense() - torch.from_numpy(y.toarray())).abs().max().item()
        print(f"{name}: llmlab {t_ours:.3f} s, scikit-learn {t_ref:.3f} s, max difference {err:.1e}")
        ratios[name] = t_ours / t_ref

    vec = Vectorizer(FeatureConfig())
    x, xt = vec.fit_transform(task.train_texts), vec.transform(task.test_texts)
    sk_vec = TfidfVectorizer().fit(task.train_texts)
    sk_x, sk_xt = sk_vec.transform(task.train_texts), sk_vec.transform(task.test_texts)
    y, yt = torch.tensor(task.train_labels), torch.tensor(task.test_labels)
    l2 = ClassifyConfig().l2
    t_ours, ours = timed(lambda: LogisticRegression(ClassifyConfig()).fit(x, y, len(task.labels)), args.runs)
    # Both to the same optimum: scikit-learn's default tol=1e-4 stops short of it on this problem.
    t_ref, ref = timed(lambda: SkLogisticRegression(C=1 / (l2 * len(y)), tol=1e-8, max_iter=1000).fit(sk_x, y.numpy()),
                       args.runs)
    acc_ours = (ours.predict(xt) == yt).double().mean().item()
    acc_ref = (torch.from_numpy(ref.predict(sk_xt)) == yt).double().mean().item()
    as_ref = LogisticRegression(ClassifyConfig(), dtype=torch.float64)
    as_ref.weight, as_ref.bias = torch.from_numpy(ref.coef_.T.copy()), torch.from_numpy(ref.intercept_.copy())
    ours64 = LogisticRegression(ClassifyConfig(), dtype=torch.float64)
    ours64.weight, ours64.bias = ours.weight.double(), ours.bias.double()
    print(f"logistic regression (sparse input): llmlab {t_ours:.3f} s (objective {ours64.loss(x, y).item():.8f}, "
          f"{100 * acc_ours:.1f}% held out), scikit-learn lbfgs tol 1e-8 {t_ref:.3f} s (objective "
          f"{as_ref.loss(x, y).item():.8f}, {100 * acc_ref:.1f}%)")
    ratios["logistic regression"] = t_ours / t_ref

    w = torch.zeros(x.shape[1], len(task.labels), requires_grad=True)
    g = torch.randn(x.shape[0], len(task.labels))
    xf = x.float()
    x_csr, xt_csr = to_csr(xf), to_csr(xf.t())

    def step_custom():
        for _ in range(20):
            SparseMatmul.apply(x_csr, xt_csr, w).backward(g)

    def step_autograd():
        for _ in range(20):
            torch.sparse.mm(xf, w).backward(g)

    t_custom, _ = timed(step_custom, args.runs)
    t_auto, _ = timed(step_autograd, args.runs)
    print(f"20 forward+backward x @ W: SparseMatmul {t_custom:.3f} s, autograd torch.sparse.mm {t_auto:.3f} s")
    ratios["SparseMatmul / autograd"] = t_custom / t_auto

    train_text, heldout_text = lm_corpus()
    train = [s for s in tokenize_sentences(train_text) if s][:300]
    heldout = [s for s in tokenize_sentences(heldout_text) if s][:60]
    lm = KneserNeyLM(NgramConfig(order=3))
    t_ours, _ = timed(lambda: lm.fit(train) and lm.perplexity(heldout), args.runs)
    padded = [pad(lm.lookup(s), 3) for s in train]
    grams = [tuple(p[i - 2:i + 1]) for s in heldout for p in [pad(lm.lookup(s), 3)] for i in range(2, len(p))]

    def nltk_run():
        ref = KneserNeyInterpolated(3, discount=0.75)
        ref.fit([list(everygrams(p, max_len=3)) for p in padded], [w for p in padded for w in p])
        return ref.perplexity(grams)

    t_ref, ppl_ref = timed(nltk_run, 1)
    print(f"Kneser-Ney trigram fit + perplexity (300 / 60 sentences): llmlab {t_ours:.3f} s "
          f"(perplexity {lm.perplexity(heldout):.4f}), NLTK {t_ref:.3f} s ({ppl_ref:.4f})")
    ratios["Kneser-Ney"] = t_ours / t_ref
    print("time ratios llmlab / peer: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
