"""SparseGPT: one-shot pruning with second-order weight updates, one layer at a time.

SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (Frantar & Alistarh, 2023,
arXiv:2301.00774). Pruning weight w_j of a row is an Optimal Brain Surgeon step (Hassibi & Stork 1993): the
remaining weights of the row move to cancel its effect on the outputs over the calibration inputs, through the
inverse of the layer-input Hessian H = 2/n sum x x^T (K, K). SparseGPT makes this affordable for every row at
once by visiting the columns left to right, as GPTQ does (``gptq.py``; the machinery is shared in
``hessian.py``):

1. dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column; H is dampened by ``damp`` * mean(diag H);
2. U = the upper Cholesky factor of H^-1: row j of U, divided by U_jj, is how column j's error moves the later
   columns once the earlier ones are fixed (the paper's Section 3.4);
3. adaptive mask selection (Section 3.3): the mask of each block of ``block_size`` (128) columns is chosen
   when the block is reached, on the weights as updated so far, by the OBS saliency w^2 / U_jj^2: the lowest
   ``floor(S * N * B)`` of the block (unstructured), or of every group of M columns (N:M, chosen when the
   group's first column is reached, keeping N);
4. column by column, a pruned weight's value (a kept weight's error is 0) divided by U_jj is pushed onto the
   block's later columns (rank-1 update); the columns after the block get the block's errors in one product.

This is the algorithm of the paper's reference code (IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``), step
for step, with one difference: its unstructured mask is ``saliency <= sorted[k]``, which prunes k + 1
weights per block (and one at sparsity 0); ours prunes exactly k, so the sparsity achieved is the target.
``tests/test_prune.py`` shows the weights are identical to a transcription of the reference's
``fasterprune`` for N:M, and for unstructured when our k equals its k + 1.

Shapes: W (N, K) out x in features; H (K, K); mask (N, K) bool, True = pruned.
"""

from __future__ import annotations

import time

import torch

from llmlab.common import LlmlabError
from llmlab.compress.hessian import single_thread, upper_inverse_cholesky
from llmlab.compress.sparsity import Pattern, check_sparsity, mask_lowest, mask_n_m

UNSTRUCTURED = Pattern()


def check_options(pattern: Pattern, damp: float, block_size: int) -> None:
    if not 0 <= damp < 1:
        raise LlmlabError(f"SparseGPT damp {damp}: use a fraction of the mean Hessian diagonal in [0, 1), e.g. 0.01")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise LlmlabError(f"SparseGPT block_size {block_size!r}: use a positive number of columns, e.g. 128")
    if pattern.structured and block_size % pattern.m:
        raise LlmlabError(f"SparseGPT block_size {block_size} is not a multiple of the pattern's M ({pattern.m}): "
                          "an N:M group must not straddle two blocks")


@torch.no_grad()
@single_thread()
def sparsegpt_prune_weight(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: Pattern = UNSTRUCTURED,
                           block_size: int = 128, damp: float = 0.01):
    """SparseGPT for one layer (module docstring). W (N, K), H (K, K); ``sparsity`` is used when ``pattern`` is
    unstructured. Works in float32 as the reference.

    Returns (the pruned, updated weight (N, K) float32, mask (N, K) bool, stats {"error": the reference's summed
    Losses, 1/2 sum w_pruned^2 / U_jj^2 as the weights were when pruned; "seconds"; "damp": the fraction used})."""
    t0 = time.perf_counter()
    check_sparsity(sparsity)
    check_options(pattern, damp, block_size)
    W = W.detach().float().clone()  # (N, K), updated in place as columns are fixed
    H = H.detach().float().clone()  # (K, K)
    n, k = W.shape
    if pattern.structured and k % pattern.m:
        raise LlmlabError(f"--pattern {pattern}: the layer's {k} input features are not a multiple of {pattern.m}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp = upper_inverse_cholesky(H, damp, "SparseGPT")  # (K, K) upper

    mask = torch.zeros(n, k, dtype=torch.bool, device=W.device)
    error = torch.zeros((), device=W.device)
    for b1 in range(0, k, block_size):
        b2 = min(b1 + block_size, k)
        W1 = W[:, b1:b2].clone()  # (N, B): the block, updated column by column
        Q1 = torch.zeros_like(W1)  # (N, B): the block's final values
        err = torch.zeros_like(W1)  # (N, B): each column's change / U_jj, for the update after the block
        Hinv1 = Hinv[b1:b2, b1:b2]  # (B, B)
        d = torch.diag(Hinv1)  # (B,)
        if pattern.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # filled group by group below
        else:
            mask1 = mask_lowest(W1 ** 2 / d.reshape(1, -1) ** 2, sparsity, dim=None)  # (N, B): OBS saliency
        for i in range(b2 - b1):
            if pattern.structured and i % pattern.m == 0:
                saliency = W1[:, i:i + pattern.m] ** 2 / d[i:i + pattern.m].reshape(1, -1) ** 2  # (N, M)
                mask1[:, i:i + pattern.m] = mask_n_m(saliency, pattern.n, pattern.m)
            w = W1[:, i]  # (N,)
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            e = (w - q) / d[i]  # the OBS step, scaled: zero for a kept weight
            W1[:, i:] -= e.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))  # (N, 1) @ (1, B - i): rank-1 update
            err[:, i] = e
        W[:, b1:b2] = Q1
        mask[:, b1:b2] = mask1
        error += err.pow(2).sum() / 2
        W[:, b2:] -= err.matmul(Hinv[b1:b2, b2:])  # (N, B) @ (B, K - b2): the lazy update
    stats = {"error": error.item(), "seconds": time.perf_counter() - t0, "damp": damp}
    return W, mask, stats
