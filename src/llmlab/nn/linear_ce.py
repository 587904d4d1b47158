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

``reduction="none"`` gives the per-row losses (N,), minus the targets' log-probabilities (DPO's and PPO's
sequence log-probabilities, ``train/dpo.py``). Their incoming gradient is a vector, one value per row, so the
weight's gradient sum_i g_i (softmax_i - onehot_i)^T x_i cannot be formed ahead: with a frozen weight and no
bias gradient (LoRA), the rows' input gradients (softmax_i - onehot_i) W are formed in the forward pass as above
and scaled by g_i in the backward; with a trainable weight, the backward forms each chunk's logits again
(one more head product per chunk, as activation checkpointing would) and scales them by g_i before the two
products.
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


def _chunk_logits(xc: torch.Tensor, wr: torch.Tensor, bias: torch.Tensor | None, rnd) -> torch.Tensor:
    """xc (n, D) @ wr (V, D)^T (+ bias) -> (n, V) logits in float32 (float64 for float64 operands)."""
    logits = rnd(torch.mm(xc, wr.t()))  # (n, V): native autocast applies here
    if bias is not None:
        logits = logits + bias
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast


def _grad_buffers(x, weight, bias, want_x: bool, want_w: bool, want_b: bool) -> tuple:
    """Empty gradients of x (N, D), weight (V, D) and bias (V,) (None where not wanted); the weight's and the
    bias's accumulate in float32 (float64 for float64 weights)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    return (torch.empty_like(x) if want_x else None,
            torch.zeros(weight.shape, dtype=acc, device=x.device) if want_w else None,
            torch.zeros(weight.shape[0], dtype=acc, device=x.device) if want_b and bias is not None else None)


def _add_chunk_grads(g: torch.Tensor, xc: torch.Tensor, wr: torch.Tensor, i: int, grads: tuple, rnd,
                     rounding: bool) -> None:
    """g (n, V), the gradient at the logits of rows [i, i + n) with inputs xc (n, D): into ``grads``.
    ``rounding``: emulated bf16 is on (``rnd`` rounds)."""
    grad_x, grad_w, grad_b = grads
    if grad_x is not None:
        grad_x[i:i + g.shape[0]] = rnd(torch.mm(g, wr))  # (n, D)
    if grad_w is not None:
        if rounding or torch.is_autocast_enabled(g.device.type) or not g.dtype == xc.dtype == grad_w.dtype:
            grad_w += rnd(torch.mm(g.t(), xc))  # (V, D): the product rounded (or cast) before it is added
        else:  # (V, D) += (V, n) @ (n, D) in place: no (V, D) product beside the buffer (113 MB for SmolLM2)
            grad_w.addmm_(g.t(), xc)
    if grad_b is not None:
        grad_b += g.sum(0)


def _emulation_and_rounding():
    """The active emulated-bf16 mode (or None), a context pausing it, and the rounding it stands for."""
    emulated = active_emulation()
    pause = emulated.pause() if emulated is not None else contextlib.nullcontext()
    return emulated, pause, (lambda t: t) if emulated is None else (lambda t: round_to(t, emulated.dtype))


class _LinearCrossEntropyRows(torch.autograd.Function):
    """``reduction="none"``: per-row losses (N,) (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, label_smoothing, chunk_rows):
        want_x = ctx.needs_input_grad[0]
        recompute = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        grad_x = torch.empty_like(x) if want_x and not recompute else None  # (N, D), per-row unit gradients
        emulated, pause, rnd = _emulation_and_rounding()
        losses = []
        with pause:
            xr, wr = rnd(x), rnd(weight)  # (N, D), (V, D)
            for i in range(0, x.shape[0], chunk_rows):
                logits = _chunk_logits(xr[i:i + chunk_rows], wr, bias, rnd)  # (n, V)
                loss, g = _chunk_loss_and_grad(logits, target[i:i + chunk_rows], label_smoothing, 1.0,
                                               grad_x is not None)
                losses.append(loss)
                if g is not None:
                    grad_x[i:i + chunk_rows] = rnd(torch.mm(rnd(g), wr))  # (n, D): d loss_row / d x_row
        ctx.recompute, ctx.args = recompute, (label_smoothing, chunk_rows, emulated)
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(*((x, weight, bias, target) if recompute else (grad_x,)))
        return torch.cat(losses) if losses else x.new_zeros(0, dtype=torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,): d total / d loss_row
        if not ctx.recompute:
            (grad_x,) = ctx.saved_tensors
            return (None if grad_x is None else grad_x * grad_out[:, None].to(grad_x.dtype),
                    None, None, None, None, None)
        x, weight, bias, target = ctx.saved_tensors
        label_smoothing, chunk_rows, emulated = ctx.args
        grads = _grad_buffers(x, weight, bias, *ctx.needs_input_grad[:3])

        def rnd(t):
            return t if emulated is None else round_to(t, emulated.dtype)

        device, on, dtype = ctx.autocast
        _, pause, _ = _emulation_and_rounding()  # the forward's rounding is ``emulated``'s; none twice
        with torch.autocast(device, dtype=dtype, enabled=on), pause:
            xr, wr = rnd(x), rnd(weight)
            for i in range(0, x.shape[0], chunk_rows):
                xc = xr[i:i + chunk_rows]  # (n, D)
                _, g = _chunk_loss_and_grad(_chunk_logits(xc, wr, bias, rnd), target[i:i + chunk_rows],
                                            label_smoothing, 1.0, True)
                g = rnd(g.mul_(grad_out[i:i + chunk_rows, None]))  # (n, V): d total / d logits
                _add_chunk_grads(g, xc, wr, i, grads, rnd, emulated is not None)
        grad_x, grad_w, grad_b = grads
        return (grad_x, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, label_smoothing, chunk_rows, reduction):
        N = x.shape[0]
        n_valid = int((target != IGNORE_INDEX).sum())
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        want = want_x or want_w or want_b  # False under no_grad (evaluation): the loss alone
        grads = _grad_buffers(x, weight, bias, want_x, want_w, want_b)  # (N, D), (V, D), (V,) or None
        # Emulated bf16 (nn/autocast.py) rounds every operand and result of every product; here x, the weight
        # and each chunk's gradient are rounded once and the mode is paused, which gives the same numbers with
        # fewer passes (the gradient takes part in two products, the weight in two per chunk).
        emulated, pause, rnd = _emulation_and_rounding()
        losses = []
        with pause:
            xr, wr = rnd(x), rnd(weight)  # (N, D), (V, D)
            for i in range(0, N, chunk_rows):
                xc = xr[i:i + chunk_rows]  # (n, D)
                logits = _chunk_logits(xc, wr, bias, rnd)  # (n, V)
                loss, g = _chunk_loss_and_grad(logits, target[i:i + chunk_rows], label_smoothing, scale, want)
                losses.append(loss)
                if g is None:
                    continue
                _add_chunk_grads(rnd(g), xc, wr, i, grads, rnd, emulated is not None)  # g (n, V): d loss / d logits
        total = torch.cat(losses).sum() * scale
        ctx.save_for_backward(*grads)
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
    over the non-ignored rows, their sum with ``reduction="sum"``, or with ``reduction="none"`` the per-row
    losses (N,), 0 on ignored rows, as ``F.cross_entropy(..., reduction="none")``). ``chunk_rows`` rows are processed
    at a time (0: 1024). Chunks of fewer rows hold less memory but cost time on a CPU: each chunk adds a pass
    over the (V, D) weight gradient and its products are skinnier. Forward + backward time against the
    unfused head at V = 50304, D = 384, 2048 rows, 2 threads (AVX2 EPYC, medians of 3, loaded machine):
    256-row chunks 1.10x, 512 rows 0.91x, 1024 rows 0.82x, 2048 rows 0.78x; peak memory of a GPT-2 training
    step (batch 8 x 256) 1280 MiB against 2603 MiB."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x (N, D) and weight (V, D) expected, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if target.shape != x.shape[:1]:
        raise ValueError(f"target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    chunk_rows = chunk_rows or 1024
    if reduction == "none":
        return _LinearCrossEntropyRows.apply(x, weight, bias, target, float(label_smoothing), int(chunk_rows))
    return _LinearCrossEntropy.apply(x, weight, bias, target, float(label_smoothing), int(chunk_rows), reduction)


def plain_linear_cross_entropy(x, weight, target, bias=None, *, label_smoothing: float = 0.0,
                               reduction: str = "mean") -> torch.Tensor:
    """The unfused reference: the full logits, then ``F.cross_entropy`` (what ``linear_cross_entropy`` equals)."""
    logits = F.linear(x, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction=reduction)
