"""A linear classifier baseline: multinomial logistic regression on sparse text features, trained with torch.

    p(y | x) = softmax(x W + b),   loss = mean_i -log p(y_i | x_i) + (l2 / 2) * ||W||^2

minimised with full-batch L-BFGS (Liu & Nocedal, "On the limited memory BFGS method for large scale
optimization", 1989): the loss is convex, so the optimum does not depend on the seed, and it equals
scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` (same objective, intercept not penalised; tested). The
features come from ``features.Vectorizer``; on the built-in task (``tasks.docstring_task``) this is the
classic bag-of-words / TF-IDF baseline that later models are compared with (README, Classic NLP).

Shapes: x (N, V) sparse float; W (V, C); b (C,); logits (N, C).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from llmlab.common import LlmlabError, read_text_file
from llmlab.text.features import FeatureConfig, Vectorizer
from llmlab.text.tasks import TextTask, docstring_task


def to_csr(x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with it is what we need
        warnings.simplefilter("ignore", UserWarning)
        return x.to_sparse_csr()


class SparseMatmul(torch.autograd.Function):
    """x @ w for a fixed sparse x, with w's gradient x^T @ g from a CSR copy of x^T made once: autograd's own
    backward through ``torch.sparse.mm`` transposes x on every call (2.5-5x slower per step on the built-in
    task, benchmarks/text_features.py)."""

    @staticmethod
    def forward(ctx, x_csr: torch.Tensor, xt_csr: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xt_csr)
        return x_csr @ w  # (N, V) @ (V, C) -> (N, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (xt_csr,) = ctx.saved_tensors
        return None, None, xt_csr @ grad  # (V, N) @ (N, C) -> (V, C)


@dataclass
class ClassifyConfig:
    l2: float = field(default=1e-4, metadata={"help": "L2 penalty on the weights (per example)"})
    max_iter: int = field(default=200, metadata={"help": "L-BFGS iterations at most"})

    def check(self) -> None:
        if not self.l2 >= 0.0 or self.max_iter < 1:
            raise LlmlabError(f"--l2 {self.l2} / --max-iter {self.max_iter}: need l2 >= 0 and max-iter >= 1")


class LogisticRegression:
    """Softmax regression; ``fit(x, y, n_classes)``, ``logits(x)``, ``predict(x)``."""

    def __init__(self, cfg: ClassifyConfig | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg or ClassifyConfig()
        self.cfg.check()
        self.dtype = dtype
        self.weight: torch.Tensor | None = None  # (V, C)
        self.bias: torch.Tensor | None = None  # (C,)

    def logits(self, x: torch.Tensor, xt: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) logits of x (N, V), dense or sparse; ``xt``: x^T as CSR, for training."""
        if self.weight is None or self.bias is None:
            raise LlmlabError("predict before fit: call fit(x, y, n_classes) first")
        x = x.to(self.dtype)
        if xt is not None:
            return SparseMatmul.apply(x, xt, self.weight) + self.bias
        return (torch.sparse.mm(x, self.weight) if x.is_sparse else x @ self.weight) + self.bias

    def fit(self, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> LogisticRegression:
        x = x.to(self.dtype)
        xt = None
        if x.is_sparse:
            x, xt = to_csr(x), to_csr(x.t())
        self.weight = torch.zeros(x.shape[1], n_classes, dtype=self.dtype, requires_grad=True)
        self.bias = torch.zeros(n_classes, dtype=self.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], max_iter=self.cfg.max_iter, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.loss(x, y, xt)
            loss.backward()
            return loss

        opt.step(closure)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        return self

    def loss(self, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor | None = None) -> torch.Tensor:
        assert self.weight is not None
        ce = torch.nn.functional.cross_entropy(self.logits(x, xt), y)
        return ce + 0.5 * self.cfg.l2 * self.weight.pow(2).sum()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def labelled_task(path: str) -> TextTask:
    """A task from a JSONL file of ``{"text": ..., "label": ...}`` lines; the held-out fifth is fixed by the
    CRC-32 of each text (as for the built-in task)."""
    import json

    from llmlab.text.tasks import is_held_out

    lines = read_text_file(path, f"--data {path}", "a JSONL file of text/label objects").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not isinstance(rec.get("label"), str):
            raise LlmlabError(f"--data {path}:{i}: need a JSON object with string 'text' and 'label' fields")
        rows.append((rec["text"], rec["label"]))
    labels = sorted({label for _, label in rows})
    if len(labels) < 2:
        raise LlmlabError(f"--data {path}: {len(rows)} examples with {len(labels)} label(s); a classifier needs "
                          "at least two labels")
    task = TextTask(labels, [], [], [], [])
    for text, label in rows:
        held = is_held_out(text)
        (task.test_texts if held else task.train_texts).append(text)
        (task.test_labels if held else task.train_labels).append(labels.index(label))
    return task


def run_classify(features: FeatureConfig, cfg: ClassifyConfig, task: TextTask | None = None,
                 top_terms: int = 5) -> dict:
    """Fit the features on the training texts, train, and score accuracy on the held-out texts."""
    start = time.perf_counter()
    if top_terms < 0:
        raise LlmlabError(f"--top-terms {top_terms}: must be >= 0")
    cfg.check()
    task = task or docstring_task()
    if not task.train_texts or not task.test_texts:
        raise LlmlabError(f"{len(task.train_texts)} training and {len(task.test_texts)} held-out texts: the task "
                          "needs both (give more examples)")
    vec = Vectorizer(features)
    x_train = vec.fit_transform(task.train_texts)
    x_test = vec.transform(task.test_texts)
    y_train, y_test = torch.tensor(task.train_labels), torch.tensor(task.test_labels)
    model = LogisticRegression(cfg).fit(x_train, y_train, len(task.labels))
    majority = torch.bincount(y_train, minlength=len(task.labels)).argmax()
    names = vec.feature_names()
    assert model.weight is not None
    top = model.weight.topk(min(top_terms, len(names)), dim=0).indices  # (top_terms, C)
    return {
        "features": len(names), "classes": len(task.labels), "train": len(y_train), "test": len(y_test),
        "train_accuracy": (model.predict(x_train) == y_train).double().mean().item(),
        "test_accuracy": (model.predict(x_test) == y_test).double().mean().item(),
        "majority_accuracy": (y_test == majority).double().mean().item(),
        "top_terms": {label: [names[i] for i in top[:, c].tolist()] for c, label in enumerate(task.labels)},
        "seconds": round(time.perf_counter() - start, 2),
    }
