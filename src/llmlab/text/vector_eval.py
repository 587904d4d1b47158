"""Scoring and picturing word vectors, and the ``llmlab vectors`` entry points.

- The built-in test set (``vector_eval.txt`` beside this file, written for the built-in corpus): similarity
  triplets "word related unrelated", right when cos(word, related) > cos(word, unrelated), and analogy sections
  of word pairs sharing one relation (plural, past tense, third person, opposite), every ordered choice of two
  pairs one question a : b :: c : d.
- Analogies by 3CosAdd (Mikolov et al. 2013, arXiv:1301.3781, section 4.1; the name from Levy & Goldberg
  2014): the answer is the vocabulary word nearest b - a + c by cosine, over unit vectors, with a, b and c
  excluded. A question whose four words are not all in the vocabulary is skipped and counted as not covered.
- A 2-D picture: the chosen words' unit vectors, centred, projected on their first two principal components
  (PCA by SVD), or laid out by exact t-SNE (van der Maaten & Hinton 2008), drawn to a PNG.

Shapes: vectors (V, D); questions (Q, 4) word ids; the projection (n, 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from llmlab.common import LlmlabError, save_png
from llmlab.text.vectors import VectorConfig, WordVectors, builtin_documents, vector_sentences

PLOT_WORDS = ("list", "tuple", "dict", "dictionary", "mapping", "sequence", "string", "str", "bytes", "character",
              "integer", "int", "float", "read", "write", "open", "close", "encode", "decode", "encoding", "thread",
              "lock", "acquire", "release", "socket", "server", "client", "request", "response", "exception",
              "error", "raise", "raised", "true", "false", "key", "value", "async", "await", "yield", "generator",
              "iterator", "function", "method", "class", "module")


@dataclass
class EvalSet:
    similarity: list[tuple[str, str, str]] = field(default_factory=list)
    analogies: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # section -> word pairs

    def questions(self, section: str) -> list[tuple[str, str, str, str]]:
        pairs = self.analogies[section]
        return [(a, b, c, d) for i, (a, b) in enumerate(pairs) for j, (c, d) in enumerate(pairs) if i != j]


def read_eval_set(text: str | None = None) -> EvalSet:
    """Parse the test-set format (see ``vector_eval.txt``); None reads the built-in set."""
    if text is None:
        text = resources.files("llmlab.text").joinpath("vector_eval.txt").read_text(encoding="utf-8")
    out, section = EvalSet(), None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip().lower()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            section = line[1:].split()
            if section[0] == "analogy" and len(section) == 2:
                out.analogies.setdefault(section[1], [])
            elif section != ["similarity"]:
                raise LlmlabError(f"test set line {n}: unknown section {line!r} (use ': similarity' or ': analogy "
                                  "NAME')")
            continue
        words = line.split()
        if section == ["similarity"] and len(words) == 3:
            out.similarity.append(tuple(words))
        elif section and section[0] == "analogy" and len(words) == 2:
            out.analogies[section[1]].append(tuple(words))
        else:
            raise LlmlabError(f"test set line {n}: {raw!r} does not fit its section (3 words for similarity, 2 "
                              "for an analogy pair)")
    return out


def analogy_answers(wv: WordVectors, questions: list[tuple[str, str, str, str]]) -> list[str | None]:
    """3CosAdd's answer to each question (None when a word is missing), all questions in one product."""
    known = [q for q in questions if all(w in wv.index for w in q)]
    answers: dict[tuple, str] = {}
    if known:
        ids = torch.tensor([[wv.index[w] for w in q[:3]] for q in known])  # (Q, 3)
        u = wv.unit[ids]  # (Q, 3, D)
        scores = (u[:, 1] - u[:, 0] + u[:, 2]) @ wv.unit.T  # (Q, V)
        scores.scatter_(1, ids, float("-inf"))  # a, b and c are never the answer
        for q, best in zip(known, scores.argmax(1).tolist()):
            answers[q] = wv.words[best]
    return [answers.get(q) for q in questions]


def evaluate(wv: WordVectors, eval_set: EvalSet | None = None) -> dict:
    """Similarity and per-section analogy accuracy over the covered items, with the coverage counts."""
    eval_set = eval_set or read_eval_set()
    sims = [(w, r, u) for w, r, u in eval_set.similarity if all(x in wv.index for x in (w, r, u))]
    sim_right = sum(wv.similarity(w, r) > wv.similarity(w, u) for w, r, u in sims)
    sections, right, asked, total = {}, 0, 0, 0
    for name in eval_set.analogies:
        qs = eval_set.questions(name)
        got = analogy_answers(wv, qs)
        ok = sum(g == q[3] for g, q in zip(got, qs))
        n = sum(g is not None for g in got)
        sections[name] = {"accuracy": ok / n if n else 0.0, "questions": n, "total": len(qs)}
        right, asked, total = right + ok, asked + n, total + len(qs)
    return {"similarity": sim_right / len(sims) if sims else 0.0, "similarity_items": len(sims),
            "similarity_total": len(eval_set.similarity), "analogy": right / asked if asked else 0.0,
            "analogy_questions": asked, "analogy_total": total, "sections": sections}


def neighbor_overlap(a: WordVectors, b: WordVectors, words: list[str], k: int = 10) -> float:
    """Mean over ``words`` (those in both vocabularies) of |top-k(a) & top-k(b)| / k."""
    shared = [w for w in words if w in a.index and w in b.index]
    if not shared:
        raise LlmlabError("no word is in both vocabularies: nothing to compare")
    return sum(len({x for x, _ in a.neighbors(w, k)} & {x for x, _ in b.neighbors(w, k)}) / k
               for w in shared) / len(shared)


def project_2d(vectors: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, 2): unit rows, centred, on their first two principal components."""
    x = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)  # vh (min(n, D), D)
    return (x.double() @ vh[:2].T).float()  # (n, 2)


def tsne_conditionals(x: torch.Tensor, perplexity: float) -> torch.Tensor:
    """t-SNE's p_j|i: for each point a Gaussian over the others whose precision is found by bisection so that the
    row has the given perplexity (exp of its entropy in nats). x (n, D) float64 -> (n, n), rows summing to 1."""
    n = len(x)
    d2 = torch.cdist(x, x).pow(2)  # (n, n)
    target = math.log(perplexity)
    beta = torch.ones(n, dtype=x.dtype)
    lo, hi = torch.zeros(n, dtype=x.dtype), torch.full((n,), math.inf, dtype=x.dtype)
    diagonal = torch.eye(n, dtype=torch.bool)
    for _ in range(200):  # bisection on the precision, all rows at once
        p = torch.softmax((-d2 * beta[:, None]).masked_fill(diagonal, -math.inf), 1)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
        too_flat = entropy > target  # a flatter row needs a higher precision
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    return p


def tsne_affinities(x: torch.Tensor, perplexity: float) -> torch.Tensor:
    """The symmetrised input affinities P = (p_j|i + p_i|j) / 2n: (n, n), summing to 1."""
    p = tsne_conditionals(x, perplexity)
    return (p + p.T) / (2 * len(x))


def tsne_2d(vectors: torch.Tensor, perplexity: float | None = None, steps: int = 750, seed: int = 0) -> torch.Tensor:
    """t-SNE (L. van der Maaten & G. Hinton, "Visualizing Data using t-SNE", JMLR 2008): 2-D points whose
    Student-t affinities Q match P (``tsne_affinities``) in KL(P || Q), by gradient descent with momentum and the
    paper's early exaggeration (P x 12 for the first 250 steps), from the PCA layout scaled to a small spread.
    Exact O(n^2): meant for the tens to hundreds of words in a picture. (n, D) -> (n, 2)."""
    n = len(vectors)
    x = vectors.double() / vectors.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    P = tsne_affinities(x, perplexity or max(2.0, min(30.0, (n - 1) / 3)))
    y = project_2d(vectors).double()
    y = (y / y[:, 0].std().clamp_min(1e-12) * 1e-4).requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    y.data += 1e-6 * torch.randn(y.shape, generator=gen, dtype=y.dtype)  # break exact ties
    lr, velocity = max(n / 12 / 4, 50.0), torch.zeros_like(y)
    off = ~torch.eye(n, dtype=torch.bool)
    for step in range(steps):
        exaggeration, momentum = (12.0, 0.5) if step < 250 else (1.0, 0.8)
        w = (1 + torch.cdist(y, y).pow(2)).reciprocal() * off  # (n, n) Student-t kernel
        q = w / w.sum()
        kl = (exaggeration * P * (torch.log((exaggeration * P).clamp_min(1e-300)) - torch.log(q.clamp_min(1e-300)))
              ).sum()
        (grad,) = torch.autograd.grad(kl, y)
        velocity = momentum * velocity - lr * grad
        y = (y + velocity).detach().requires_grad_(True)
    return y.detach().float()


def plot_words(wv: WordVectors, path: str | Path, words: list[str] | None = None, projection: str = "pca") -> list[str]:
    """Draw the chosen words (default ``PLOT_WORDS``; those the vectors know) in 2-D by PCA or t-SNE; returns the
    words drawn."""
    chosen = [w for w in (words or PLOT_WORDS) if w in wv]
    if len(chosen) < 3:
        raise LlmlabError(f"only {len(chosen)} of the words to plot have vectors: a picture needs 3 or more "
                          "(choose words in the vocabulary with --words)")
    stacked = torch.stack([wv.vector(w) for w in chosen])
    xy = tsne_2d(stacked) if projection == "tsne" else project_2d(stacked)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.5))
    ax.scatter(xy[:, 0], xy[:, 1], s=12, color="tab:blue")
    for w, (x, y) in zip(chosen, xy.tolist()):
        ax.annotate(w, (x, y), fontsize=9, xytext=(3, 2), textcoords="offset points")
    cfg = wv.config
    ax.set_title(f"{cfg.get('method', 'vectors')} {cfg.get('arch', '') if cfg.get('method') != 'glove' else ''}"
                 f" (dim {wv.vectors.shape[1]}): {'t-SNE' if projection == 'tsne' else 'PCA'} of {len(chosen)} words")
    if projection != "tsne":
        ax.set_xlabel("first principal component")
        ax.set_ylabel("second principal component")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    return chosen


def train_vectors(sentences: list[list[str]], cfg: VectorConfig, progress: bool = False) -> WordVectors:
    """Train ``cfg.method`` on sentences (lists of words)."""
    cfg.check()
    if cfg.method == "glove":
        from llmlab.text.glove import train_glove

        return train_glove(sentences, cfg, progress)
    from llmlab.text.word2vec import train_word2vec

    return train_word2vec(sentences, cfg, progress)


def run_vectors(cfg: VectorConfig, documents: list[str] | None, out: str | Path, progress: bool = False) -> dict:
    """``llmlab vectors train``: the corpus (built-in when ``documents`` is None), training, the test set, the
    folder. Returns the folder's config record with the evaluation."""
    start = time.perf_counter()
    sentences = vector_sentences(builtin_documents() if documents is None else documents)
    if not sentences:
        raise LlmlabError("the corpus is empty (no words found): give files with text")
    wv = train_vectors(sentences, cfg, progress)
    wv.config["eval"] = evaluate(wv)
    wv.config["total_seconds"] = round(time.perf_counter() - start, 3)
    wv.save(out)
    return wv.config
