"""Layer-input statistics and the linear algebra shared by the second-order methods (GPTQ, SparseGPT).

Both methods minimise ||W X - W' X||^2 over calibration inputs X for one linear layer at a time, through the
layer-input Hessian H = 2/n sum x x^T (K, K) and the upper Cholesky factor of its dampened inverse
(GPTQ, arXiv:2210.17323, Section 4; SparseGPT, arXiv:2301.00774, Section 3.4 "the Cholesky trick"):

- ``HessianAccumulator``: H as a running average, as the reference code's ``add_batch`` builds it;
- ``dampened_cholesky``: L with L L^T = H + damp * mean(diag H) I, retrying with more dampening (SVD-LLM's
  whitening, ``lowrank.py``, uses L itself);
- ``upper_inverse_cholesky``: U with U^T U = (H + damp * mean(diag H) I)^-1;
- ``single_thread``: the column loops run on one thread (why: the docstring below);
- ``input_stages``: a block's linear layers grouped by the input tensor they share (q/k/v; gate/up), so each
  group's statistics are collected once; ``collect_stages`` collects them in one pass over the block.

Shapes: x (..., K); H (K, K); U (K, K) upper triangular.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from llmlab.common import LlmlabError
from llmlab.compress.sequential import BlockInputs

DAMP_STEP = 0.01  # added to damp while the Cholesky factorisation fails (GPTQModel's damp_auto_increment idea)


def dampened_cholesky(H: torch.Tensor, damp: float, method: str) -> tuple[torch.Tensor, float]:
    """(L, damp used): L (K, K) lower triangular with L L^T = H + damp * mean(diag H) I. A factorisation that
    fails (H singular in float32) is retried with more dampening rather than stopping the whole run."""
    mean = torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    while True:
        Hd = H.clone()
        Hd[diag, diag] += damp * mean
        try:
            return torch.linalg.cholesky(Hd), damp  # (K, K) lower
        except torch.linalg.LinAlgError:
            if damp >= 1:
                raise LlmlabError(f"{method}: the Hessian is not positive definite even with damp 1: the calibration "
                                  "inputs are degenerate; give more or other calibration text") from None
            damp = min(1.0, damp + DAMP_STEP)


def upper_inverse_cholesky(H: torch.Tensor, damp: float, method: str = "GPTQ") -> tuple[torch.Tensor, float]:
    """(U, damp used): U (K, K) upper triangular with U^T U = (H + damp * mean(diag H) I)^-1 (dampening raised
    as ``dampened_cholesky`` does)."""
    L, damp = dampened_cholesky(H, damp, method)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), damp


@contextlib.contextmanager
def single_thread():
    """The solve runs on one thread: its column loop is thousands of operations on a few thousand numbers each,
    where a second thread's hand-offs cost more than it saves, and MKL's multi-threaded ``cholesky_inverse`` can
    collapse when the cores are shared (K = 1536 on a busy 2-core machine: 20 s on 2 threads, 0.14 s on 1). The
    Hessians (the large products) keep the caller's threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HessianAccumulator:
    """H = 2/n sum x x^T (K, K) float32, kept as a running average like the reference's ``add_batch`` (every
    partial sum is already scaled, so large calibration sets do not grow it). n counts sequences (the batch
    rows of each input, 1 for a 2-D input) as the reference does; the sum runs over every token."""

    def __init__(self, k: int, device: torch.device):
        self.H = torch.zeros(k, k, device=device)
        self.n, self.seconds = 0, 0.0

    def add(self, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        b = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1])  # (tokens, K)
        self.H *= self.n / (self.n + b)
        self.n += b
        x = math.sqrt(2 / self.n) * x.float()
        self.H += x.t().matmul(x)  # (K, tokens) @ (tokens, K)
        self.seconds += time.perf_counter() - t0


def input_stages(inputs: BlockInputs, names: list[str]) -> list[list[str]]:
    """The block's linear layers ``names`` grouped by shared input (the same tensor object, as q/k/v and gate/up
    receive), in forward order, from one pass over the first window. A layer that did not run there (an MoE
    expert no token was routed to) is a stage of its own at the end."""
    block, calls = inputs.block(), []
    hooks = [block.get_submodule(nm).register_forward_pre_hook(lambda _m, a, nm=nm: calls.append((nm, a[0])))
             for nm in names]
    try:
        inputs.run(x=inputs.states[0][:1])  # (1, T, dim)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    last = None
    for nm, x in calls:
        if any(nm in s for s in stages):
            continue
        if stages and x is last:
            stages[-1].append(nm)
        else:
            stages.append([nm])
        last = x
    seen = {nm for s in stages for nm in s}
    return stages + [[nm] for nm in names if nm not in seen]


def collect_stages(inputs: BlockInputs, stages: list[list[str]], make) -> dict[str, object]:
    """One pass of every window through the (unchanged) block, feeding the input of each stage's first layer to
    an accumulator ``make(layer)``; {stage's first layer name: accumulator}."""
    block = inputs.block()
    accs = {stage[0]: make(block.get_submodule(stage[0])) for stage in stages}
    handles = [block.get_submodule(nm).register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0]))
               for nm, acc in accs.items()]
    try:
        for x in inputs:
            inputs.run(x=x)
    finally:
        for h in handles:
            h.remove()
    return accs
