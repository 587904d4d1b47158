"""The output head and the cross-entropy as one chunked operation that never holds the (N, vocab) logits.

A language model's last step, ``F.cross_entropy(lm_head(h).float(), y)``, is the widest matrix product of a
small model (GPT-2 at vocab 50304: 2048 tokens x 50304 logits = 412 MB in float32 per batch) and then five
or six passes over that tensor: the product's output, its float copy, ``log_softmax``, and in the backward
pass the gradient of each. Here the rows are cut into chunks; for each chunk the logits are formed, the loss
and its gradient with respect to the logits (``softmax - onehot``) are computed at once, and the gradients of
the input and the weight are accumulated right away, so only one (chunk, vocab) block is ever alive. This
is what Liger-Kernel's fused linear cross-entropy does on GPUs (Hsu et al. 2024, arXiv:2410.10989); the
memory argument is the one of Wijmans et al. 2024 ("Cut Your Losses in Large-Vocabulary Language Models",
arXiv:2411.09009). The gradients are computed in the forward pass (the loss is the graph's last node, so the
incoming gradient is a scalar that the backward pass only multiplies in).

Precision follows whatever autocast is active: under ``torch.autocast`` the chunk products are ordinary
``torch.mm`` calls that run in bf16 as ``lm_head`` would; under ``nn/autocast.EmulatedAutocast`` the mode is
paused and the operands and results are rounded to bf16 here, each once (the input, the weight, each chunk's
logits and gradient), which gives the numbers the mode and an autograd backward through it would give.
Softmax, loss and its gradient are computed in float32.

    loss = linear_cross_entropy(h.reshape(-1, D), model.lm_head.weight, y.reshape(-1))
    # equals F.cross_entropy(F.linear(h, W).float().reshape(-1, V), y.reshape(-1)) in value and gradients
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llmlab.nn.autocast import active_emulation, round_to

IGNORE_INDEX = -100


def _chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, scale: float,
                         want_grad: bool):
    """logits (n, V) float32 (overwritten), target (n,) with -100 ignored -> per-row loss (n,) and
    ``scale`` * d loss_row / d logits (n, V), formed in place of the logits: five passes over them (max,
    subtract, exp, sum, multiply) and no (n, V) temporary, where ``torch.logsumexp`` alone allocates one."""
    valid = target != IGNORE_INDEX  # (n,)
    safe = torch.where(valid, target, 0)
    picked = logits.gather(1, safe[:, None]).squeeze(1)  # (n,) the targets' logits
    mean = logits.mean(-1) if label_smoothing else None  # (n,)
    top = logits.amax(-1)  # (n,)
    e = logits.sub_(top[:, None]).exp_()  # (n, V) exp(logit - max), in place
    total = e.sum(-1)  # (n,)
    lse = top + total.log()  # (n,)
    nll = lse - picked
    if label_smoothing:
        # PyTorch's convention: (1 - e) * nll + e * mean over classes of -log p
        nll = (1 - label_smoothing) * nll + label_smoothing * (lse - mean)
    nll = torch.where(valid, nll, 0.0)
    if not want_grad:
        return nll, None
    grad = e.mul_((scale / total)[:, None])  # scale * softmax
    if label_smoothing:
        grad -= label_smoothing * scale / grad.shape[1]
    grad[torch.arange(len(safe)), safe] -= (1 - label_smoothing) * scale
    if not bool(valid.all()):
        grad[~valid] = 0.0  # ignored rows: no gradient (only those rows are touched)
    return nll, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, label_smoothing, chunk_rows, reduction):
        N = x.shape[0]
        n_valid = int((target != IGNORE_INDEX).sum())
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        want = want_x or want_w or want_b  # False under no_grad (evaluation): the loss alone
        acc = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for float64 weights
        grad_x = torch.empty_like(x) if want_x else None  # (N, D)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if want_w else None  # (V, D)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if want_b else None  # (V,)
        # Emulated bf16 (nn/autocast.py) rounds every operand and result of every product; here x, the weight
        # and each chunk's gradient are rounded once and the mode is paused, which gives the same numbers with
        # fewer passes (the gradient takes part in two products, the weight in two per chunk).
        emulated = active_emulation()
        pause = emulated.pause() if emulated is not None else contextlib.nullcontext()

        def rnd(t):
            return t if emulated is None else round_to(t, emulated.dtype)

        losses = []
        with pause:
            xr, wr = rnd(x), rnd(weight)  # (N, D), (V, D)
            for i in range(0, N, chunk_rows):
                xc = xr[i:i + chunk_rows]  # (n, D)
                logits = rnd(torch.mm(xc, wr.t()))  # (n, V): native autocast applies here
                if bias is not None:
                    logits = logits + bias
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast
                loss, g = _chunk_loss_and_grad(logits, target[i:i + chunk_rows], label_smoothing, scale, want)
                losses.append(loss)
                if g is None:
                    continue
                g = rnd(g)  # (n, V): d loss / d logits
                if want_x:
                    grad_x[i:i + chunk_rows] = rnd(torch.mm(g, wr))  # (n, D)
                if want_w:
                    grad_w += rnd(torch.mm(g.t(), xc))  # (V, D)
                if want_b:
                    grad_b += g.sum(0)
        total = torch.cat(losses).sum() * scale
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        one = bool(grad_out == 1)  # the usual case (loss.backward()): no pass over the (V, D) gradient

        def scaled(g, dtype=None):
            g = g if one else g * grad_out
            return g if dtype is None else g.to(dtype)

        return (None if grad_x is None else scaled(grad_x), None if grad_w is None else scaled(grad_w, w_dtype),
                None if grad_b is None else scaled(grad_b, b_dtype), None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, *, label_smoothing: float = 0.0,
                         reduction: str = "mean", chunk_rows: int = 0) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), target)`` without the (N, V) logits.

    x (N, D), weight (V, D), bias (V,) or None, target (N,) int64 with -100 ignored -> scalar loss (mean
    over the non-ignored rows, or their sum with ``reduction="sum"``). ``chunk_rows`` rows are processed
    at a time (0: 1024). Chunks of fewer rows hold less memory but cost time on a CPU: each chunk adds a pass
    over the (V, D) weight gradient and its products are skinnier. Forward + backward time against the
    unfused head at V = 50304, D = 384, 2048 rows, 2 threads (AVX2 EPYC, medians of 3, loaded machine):
    256-row chunks 1.10x, 512 rows 0.91x, 1024 rows 0.82x, 2048 rows 0.78x; peak memory of a GPT-2 training
    step (batch 8 x 256) 1280 MiB against 2603 MiB."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x (N, D) and weight (V, D) expected, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if target.shape != x.shape[:1]:
        raise ValueError(f"target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    chunk_rows = chunk_rows or 1024
    return _LinearCrossEntropy.apply(x, weight, bias, target, float(label_smoothing), int(chunk_rows), reduction)


def plain_linear_cross_entropy(x, weight, target, bias=None, *, label_smoothing: float = 0.0,
                               reduction: str = "mean") -> torch.Tensor:
    """The unfused reference: the full logits, then ``F.cross_entropy`` (what ``linear_cross_entropy`` equals)."""
    logits = F.linear(x, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction=reduction)
