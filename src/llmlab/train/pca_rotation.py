"""An orthogonal rotation of the pooled embedding, initialised from PCA, so its first m coordinates hold the
most variance before Matryoshka truncation.

PCA (Pearson 1901; Hotelling 1933) of the pooled embeddings x_1..x_N (N, D) of a corpus: the covariance

    mu = mean_i x_i,  C = (1 / (N - 1)) sum_i (x_i - mu)(x_i - mu)^T = V diag(lambda) V^T,  lambda_1 >= ... >= lambda_D

and the projection y = W x + b with W = V^T (D, D): row k is the k-th principal axis, so coordinate k of y has
variance lambda_k, and the first m coordinates are the top-m components -- the best rank-m linear reconstruction
of x (Eckart-Young). W is orthogonal (W W^T = I): with b = 0 every full-size cosine is unchanged, only what the
truncations keep changes. ``center=True`` also subtracts the mean, b = -W mu (cosines of centred vectors).
Kusupati et al. 2022 ("Matryoshka Representation Learning", arXiv:2205.13147, Sec. 4.1) compare MRL against
exactly this kind of post-hoc low-rank projection (their SVD baseline); here it is the starting point of the
projection that Matryoshka training then trains with the encoder (``train/contrastive.py``, ``--projection pca``).

Signs are fixed as scikit-learn's ``svd_flip`` does: each axis's largest-magnitude entry is positive. The
projection is ``models.bert.BertModel.projection``, saved as sentence-transformers' ``Dense`` module
(``formats/st_modules.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.infer.embed import MAX_TOKENS, embed_texts


def pca_axes(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D) vectors -> (axes (D, D), one per row, by falling variance; variances (D,); mean (D,)), float32."""
    N, D = emb.shape
    if N < 2:
        raise LlmlabError(f"PCA of {N} vector(s): give at least 2 texts")
    x = emb.double()
    mu = x.mean(0)  # (D,)
    cov = (x - mu).T @ (x - mu) / (N - 1)  # (D, D)
    lam, vecs = torch.linalg.eigh(cov)  # ascending; columns are the axes
    lam, axes = lam.flip(0).clamp(min=0), vecs.flip(1).T  # (D,), (D, D) rows = axes, largest variance first
    idx = axes.abs().argmax(1)  # sklearn's svd_flip: the largest-magnitude entry of each axis positive
    axes = axes * torch.sign(axes[torch.arange(D), idx])[:, None]
    return axes.float(), lam.float(), mu.float()


def pca_projection(emb: torch.Tensor, center: bool = False) -> nn.Linear:
    """(N, D) pooled embeddings -> Linear(D, D) with W = the principal axes (rows), b = -W mu or 0."""
    axes, _, mu = pca_axes(emb)
    D = emb.shape[1]
    linear = nn.Linear(D, D)
    with torch.no_grad():
        linear.weight.copy_(axes)
        linear.bias.copy_(-(axes @ mu) if center else torch.zeros(D))
    return linear


def attach_pca_projection_(model: nn.Module, tokenizer, texts: list[str], *, pooling: str = "mean",
                           max_tokens: int = MAX_TOKENS, center: bool = False) -> nn.Linear:
    """Embed ``texts`` with the encoder as it is (any projection removed first), set ``model.projection`` to
    their PCA rotation and return it. Needs at least as many texts as the embedding size (a full-rank
    covariance)."""
    D = model.config.dim
    if len(texts) < D:
        raise LlmlabError(f"PCA of {len(texts)} texts for a {D}-d encoder: a full rotation needs at least {D} "
                          "texts: give more pairs, or --projection none")
    model.projection = None
    was_training = model.training
    emb = embed_texts(model.eval(), tokenizer, texts, pooling=pooling, normalize=False,
                      max_tokens=max_tokens)  # (N, D)
    model.train(was_training)
    model.projection = pca_projection(emb, center).to(next(model.parameters()).device)
    return model.projection
