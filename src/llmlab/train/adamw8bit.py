"""AdamW with 8-bit blockwise-quantized moment estimates: about 2 bytes of optimizer state per parameter
instead of 8.

Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
arXiv:2110.02861. The update is AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) computed in fp32; only the
*stored* state is 8-bit. For each parameter of at least ``MIN_8BIT_SIZE`` (4096) values, every step:

1. Dequantize both moments: cut the flat state into blocks of ``BLOCK_SIZE`` (256) values; each value is
   ``code[index] * absmax[block]``, with one fp32 absmax per block.
2. Update in fp32, exactly as ``torch.optim.AdamW``: decoupled weight decay ``p *= 1 - lr * wd``;
   ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 * v + (1 - beta2) * g^2``; bias corrections
   ``1 - beta^step``; ``p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``.
3. Re-quantize: per block, ``absmax = max |x|`` and each value becomes the index of the nearest code value of
   ``x / absmax`` (ties to the lower index).

The codes are the 256-value "dynamic tree" maps (Dettmers 2015, arXiv:1511.04561): a run of zero bits sets a
decimal exponent (10^-6 .. 10^0) and the remaining bits a linear fraction, so small values keep their relative
precision. The first moment is signed and uses the signed map (``llmlab.nn.nf4.dynamic_code_8bit``, the one
NF4's double quantization uses); the second moment is never negative, so it uses the unsigned map, which
spends the sign bit on one more fraction bit (``dynamic_code_8bit(signed=False)``). Blockwise absmax keeps one
outlier from flattening a whole tensor's precision, which is what makes 8-bit Adam stable (paper, section 2).

As in bitsandbytes (``min_8bit_size``), parameters with fewer than 4096 values keep fp32 moments: they are
biases and norm gains, few bytes in all, and the ones whose precision matters most. Their update is
``torch.optim.AdamW``'s bit for bit (tested). Moments are fp32 whatever the parameter's dtype.

Memory stays bounded for any parameter size: a step processes ``chunk_size`` values at a time (a whole
number of blocks, so the result does not depend on it; tested), holding a few fp32 temporaries of that size.

State per parameter (all fp32 except the codes): 8-bit ``exp_avg_codes``, ``exp_avg_sq_codes`` (uint8, the
parameter's shape) and ``exp_avg_absmax``, ``exp_avg_sq_absmax`` (ceil(N/256),); or fp32 ``exp_avg``,
``exp_avg_sq`` (the parameter's shape); and ``step`` (int). That is 2 + 8/256 = 2.03 bytes per parameter
against 8 for fp32 AdamW (``state_bytes``). ``state_dict()`` / ``load_state_dict()`` round-trip exactly, so a
resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llmlab.common import LlmlabError
from llmlab.nn.nf4 import dequantize_blockwise, dynamic_code_8bit, quantize_blockwise

BLOCK_SIZE = 256  # values per fp32 absmax: bitsandbytes' blockwise optimizers (the paper used 2048)
MIN_8BIT_SIZE = 4096  # smaller parameters keep fp32 moments (bitsandbytes' min_8bit_size)
CHUNK_SIZE = 1 << 20  # values per piece of a step: bounds the fp32 temporaries to a few MiB


def adamw_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on fp32 tensors of one shape, in place on ``p``, ``m``, ``v``.

    The operations and their order are ``torch.optim.AdamW``'s (single-tensor path), so that fp32 moments give
    its results bit for bit.
    """
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / bias_correction1))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's state (any optimizer: compare with ``torch.optim.AdamW``)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments (module docstring). The hyper-parameters mean what they mean in
    ``torch.optim.AdamW``, with the same defaults; ``block_size``, ``min_8bit_size`` and ``chunk_size`` are
    fixed for the optimizer's life and not saved in the state dict (``load_state_dict`` checks the shapes)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE, chunk_size: int = CHUNK_SIZE):
        if not lr >= 0.0:
            raise LlmlabError(f"AdamW8bit: learning rate {lr} is negative; use lr >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise LlmlabError(f"AdamW8bit: betas {tuple(betas)} must each be in [0, 1)")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise LlmlabError(f"AdamW8bit: eps {eps} and weight_decay {weight_decay} must be >= 0")
        if block_size <= 0 or chunk_size <= 0 or chunk_size % block_size:
            raise LlmlabError(f"AdamW8bit: chunk_size {chunk_size} must be a positive multiple of block_size "
                              f"{block_size}, so that a chunk never splits a block")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.block_size, self.min_8bit_size, self.chunk_size = block_size, min_8bit_size, chunk_size
        # the maps are constants of the method, not state: rebuilt here, never saved
        self.code1 = dynamic_code_8bit()  # signed, for exp_avg
        self.code2 = dynamic_code_8bit(signed=False)  # unsigned, for exp_avg_sq

    def is_8bit(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are stored in 8 bits (else fp32)."""
        return p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = 0
        if self.is_8bit(p):
            n_blocks = -(-p.numel() // self.block_size)
            # codes 0 with absmax 0 dequantize to exactly zero, whatever code[0] is
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"{name}_codes"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                state[f"{name}_absmax"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise LlmlabError("AdamW8bit: sparse gradients and complex parameters are not supported; "
                                      "use torch.optim.AdamW for them")
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                if self.is_8bit(p):
                    self._step_8bit(p, state, hyper)
                else:
                    work = p.detach().float()  # p itself when fp32: updated in place
                    adamw_update_(work, p.grad.float(), state["exp_avg"], state["exp_avg_sq"],
                                  step=state["step"], **hyper)
                    if p.dtype != torch.float32:
                        p.detach().copy_(work)
        return loss

    def _step_8bit(self, p: torch.Tensor, state: dict, hyper: dict) -> None:
        """Dequantize, update, re-quantize, one chunk of whole blocks at a time."""
        n, block = p.numel(), self.block_size
        flat = p.detach().reshape(-1)  # (N,): a view unless p is not contiguous
        grad = p.grad.reshape(-1)  # (N,)
        codes1, codes2 = state["exp_avg_codes"].view(-1), state["exp_avg_sq_codes"].view(-1)  # (N,) each
        absmax1, absmax2 = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]  # (n_blocks,) each
        for start in range(0, n, self.chunk_size):
            end = min(n, start + self.chunk_size)
            b0, b1 = start // block, -(-end // block)  # the chunk's blocks
            m = dequantize_blockwise(codes1[start:end], absmax1[b0:b1], self.code1, block)  # (end - start,) fp32
            v = dequantize_blockwise(codes2[start:end], absmax2[b0:b1], self.code2, block)
            work = flat[start:end].float()  # the parameter's own memory when fp32 and contiguous
            adamw_update_(work, grad[start:end].float(), m, v, step=state["step"], **hyper)
            if flat.dtype != torch.float32:
                flat[start:end].copy_(work)
            codes1[start:end], absmax1[b0:b1] = quantize_blockwise(m, self.code1, block)
            codes2[start:end], absmax2[b0:b1] = quantize_blockwise(v, self.code2, block)
        if not p.is_contiguous():  # flat was a copy
            p.detach().copy_(flat.view(p.shape))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts floating-point state to each parameter's dtype; ours stays fp32 (a bf16 absmax would
        # change every later step), so take the saved tensors again, as saved
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for index, p in enumerate(params):
            if self.state[p]:
                self._check_state(index, p, self.state[p])

    def _check_state(self, index: int, p: torch.Tensor, state: dict) -> None:
        n_blocks = -(-p.numel() // self.block_size)
        shape = tuple(p.shape)
        if self.is_8bit(p):
            want = {"exp_avg_codes": (torch.uint8, shape), "exp_avg_sq_codes": (torch.uint8, shape),
                    "exp_avg_absmax": (torch.float32, (n_blocks,)), "exp_avg_sq_absmax": (torch.float32, (n_blocks,))}
        else:
            want = {"exp_avg": (torch.float32, shape), "exp_avg_sq": (torch.float32, shape)}
        got = {k: (v.dtype, tuple(v.shape)) for k, v in state.items() if torch.is_tensor(v)}
        if got != want or not isinstance(state.get("step"), int):
            raise LlmlabError(
                f"AdamW8bit.load_state_dict: the state of parameter {index} (shape {tuple(p.shape)}) is "
                f"{sorted(got)}, expected {sorted(want)} and an int step: it was saved by another optimizer "
                f"(torch.optim.AdamW?) or with another block_size/min_8bit_size; resume with the optimizer and "
                f"settings it was saved with")
