"""The optimizer step fused into the backward pass: each parameter is updated as soon as its gradient is
complete, and the gradient is freed right after, so the full set of gradients never exists at once.

Lv, Yang, Liu, Gao, Guo, Qiu, "Full Parameter Fine-tuning for Large Language Models with Limited Resources"
(LOMO), 2023, arXiv:2306.09782, section 3.2: fuse the update into backward so that at most the gradients of
the parameters being processed are held (the paper does it for SGD). PyTorch's tutorial "How to save memory by
fusing the optimizer step into the backward pass" (2023) and torchtune's ``optimizer_in_bwd`` do it for any
optimizer: one optimizer per parameter, stepped from ``Tensor.register_post_accumulate_grad_hook``.

Why it is the same update. AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101, Algorithm 2; ``train/optim.py``)
is elementwise per parameter tensor: for parameter i at step t, with its own gradient g_i and moments m_i, v_i,

    m_i <- b1 m_i + (1 - b1) g_i,   v_i <- b2 v_i + (1 - b2) g_i^2
    theta_i <- theta_i (1 - lr_t wd_i) - lr_t (m_i / (1 - b1^t)) / (sqrt(v_i / (1 - b2^t)) + eps)

Nothing in it reads another parameter's gradient, so the update of theta_i may run the moment g_i is final
(autograd has accumulated every use of theta_i, tied weights included: one AccumulateGrad node per leaf) and
g_i can be dropped. Gradient memory falls from sum_i |g_i| (540 MB for SmolLM2-135M in float32) to the few
gradients alive at one time (the largest, the tied 49152 x 576 embedding, is 113 MB). Each per-parameter
optimizer is the one ``build_adamw`` would build (the fused kernel or ``AdamW8bit``) over one tensor, so the
result is the plain step's bit for bit (tested).

It is exact only where the update of theta_i needs nothing but g_i. Not so, and so refused by
``TrainConfig.validate`` / the loop's setup:

- global-norm gradient clipping (the scale min(1, c / ||g||) needs every g_i first): ``--grad-clip 0``;
- gradient accumulation (g_i is a sum over micro-batches): no ``--micro-batch`` below the batch;
- DDP / FSDP (ranks average g_i after the hook has used it): one process;
- float16 loss scaling (the scale is checked for inf over every gradient before any update): bfloat16 or float32;
- skipping a step whose gradient is non-finite (``--on-nan skip``: parameters updated earlier in the same
  backward cannot be taken back). With ``--on-nan stop`` a non-finite gradient leaves its own parameter
  untouched, the loop stops with the usual message, and no checkpoint is written after it. A non-finite loss
  is seen before backward, so that step does not run at all.

The learning-rate schedule: the loop writes ``lr`` into every per-parameter optimizer's group before the
step's forward, as it does for one optimizer (``param_groups`` lists them all). Checkpoints: the loop hands
``optimizers`` to ``torch.distributed.checkpoint``'s state-dict functions, which key the state by parameter
name, so a checkpoint holds the same tensors as the plain optimizer's and resumes exactly (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class OptimizerInBackward:
    """One optimizer per trainable parameter (``make([group with that one parameter])``), stepped by a hook when
    the parameter's gradient is complete; the gradient is set to None right after. ``param_groups`` is every
    per-parameter group (set ``lr`` there before backward); ``step()`` and ``zero_grad()`` have nothing left to
    do; ``pop_grad_norm()`` is the global L2 norm of the gradients that passed since the last call."""

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer]):
        self.optimizers: list[torch.optim.Optimizer] = []
        self._sq_norm = 0.0  # sum of squared gradient norms this step (float64 on the host)
        self._handles = []
        for group in groups:
            for p in group["params"]:
                opt = make([{**group, "params": [p]}])
                self.optimizers.append(opt)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(opt)))

    def _hook(self, opt: torch.optim.Optimizer):
        def step_and_free(p: torch.Tensor) -> None:
            norm = float(torch.linalg.vector_norm(p.grad))  # inf / nan when any element is
            self._sq_norm += norm * norm
            if math.isfinite(norm):  # a non-finite gradient leaves its parameter as it was (the loop stops)
                opt.step()
            p.grad = None
        return step_and_free

    @property
    def param_groups(self) -> list[dict]:
        """Every per-parameter optimizer's group, read afresh: ``load_state_dict`` replaces the group dicts, so a
        list kept from construction would take the loop's learning rate and reach no optimizer after a resume."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def pop_grad_norm(self) -> float:
        """The L2 norm over every gradient stepped since the last call (what ``clip_grad_norm_`` returns)."""
        norm, self._sq_norm = math.sqrt(self._sq_norm), 0.0
        return norm

    def step(self) -> None:
        """Nothing: every parameter was updated during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def remove_hooks(self) -> None:
        """Detach the hooks: later backward passes on the model update nothing."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
