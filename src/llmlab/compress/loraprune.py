"""LoRAPrune's importance: the weights' gradient estimated from the LoRA factors and their gradients.

Zhang, Chen, Zhuang, Shen, Zhuang, "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient
Fine-Tuning", 2023, arXiv:2305.18403. LLM-Pruner's Taylor importance |w * dL/dw| needs the gradient of every
frozen weight, as much memory as full fine-tuning. During LoRA fine-tuning (W frozen, W + s B A in the forward) an
SGD step on A and B moves the product by

    (B - dL/dB)(A - dL/dA) - B A = -(dL/dB A + B dL/dA) + dL/dB dL/dA

(learning rate 1), which LoRAPrune takes as the step of W itself, so the gradient of W is estimated from the
factors' gradients alone (the paper's Eq. 7-8; the reference code aim-uofa/LoRAPrune ``compute_sensitivity``):

    G = dL/dB A + B dL/dA - dL/dB dL/dA                               (N, K)
    I = |G * (W + s B A)|                                              (N, K), s = LoRA's alpha / r

summed over each dependency group (``structured.unit_scores``, every projection's group sums divided by their
L2 norm, as the reference code), and smoothed over the fine-tuning steps by a moving average (Eq. 10):

    Ibar_t = 0.9 Ibar_{t-1} + 0.1 I_t                                  (Ibar_0 = 0)

The units are removed progressively while LoRA trains (``train/loraprune.py``): the share removed follows the
reference code's cubic schedule (``scheduled_sparsity``), removed units stay removed (masked by
``structured.UnitMasks``), and at the end LoRA is merged and the model shrunk like LLM-Pruner's.

Shapes: W (N, K); A (r, K); B (N, r); their gradients alike.
"""

from __future__ import annotations

import torch

BETA = 0.9  # the moving average's weight on the past (the reference code's 0.9 / 0.1)


def lora_weight_gradient(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor
                         ) -> torch.Tensor:
    """G = dL/dB A + B dL/dA - dL/dB dL/dA, (N, K): LoRAPrune's estimate of dL/dW."""
    a, b, grad_a, grad_b = a.float(), b.float(), grad_a.float(), grad_b.float()
    return grad_b @ a + b @ grad_a - grad_b @ grad_a


def loraprune_scores(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor,
                     grad_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """|G * (W + s B A)| per weight, (N, K)."""
    return (lora_weight_gradient(a, b, grad_a, grad_b) * (w.float() + scaling * (b.float() @ a.float()))).abs()


def moving_average(previous: torch.Tensor | None, new: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """beta * previous + (1 - beta) * new (``previous`` None: the average starts at zero)."""
    return (1 - beta) * new if previous is None else beta * previous + (1 - beta) * new


def scheduled_sparsity(step: int, total: int, final: float, initial_warmup: float = 0.1,
                       final_warmup: float = 0.2) -> float:
    """The share to remove after ``step`` of ``total`` steps: 0 for the first ``initial_warmup`` of the steps, the
    ``final`` value for the last ``final_warmup``, and in between the cubic ramp
    S_t = S (1 - (1 - (t - t0) / (T - t0 - t1))^3) (the reference code's ``schedule_sparsity_ratio``, initial 0)."""
    t0, t1 = initial_warmup * total, final_warmup * total
    if step <= t0:
        return 0.0
    if step > total - t1:
        return final
    return final * (1 - (1 - (step - t0) / (total - t0 - t1)) ** 3)
