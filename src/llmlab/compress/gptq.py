"""GPTQ: weight quantization with second-order error feedback, one layer at a time.

GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers (Frantar, Ashkboos, Hoefler,
Alistarh, 2022, arXiv:2210.17323). A linear layer's weight W (N, K) is quantized one input column at a time;
each column's rounding error is pushed onto the columns not yet quantized, weighted by the inverse of the
layer-input Hessian H = 2/n sum x x^T (K, K), so that ||WX - QX||^2 over the calibration inputs X grows as
little as possible. ``gptq_quantize_weight`` is the algorithm of the paper's reference code (IST-DASLab/gptq,
``GPTQ.fasterquant``), step for step, so it gives the same integer codes (``tests/test_gptq.py``):

1. dead inputs (H_ii = 0: that input is always 0) get H_ii = 1 and a zero weight column;
2. act order (optional): columns are visited by descending H_ii, the inputs with the most energy first;
3. dampening: damp * mean(diag H) is added to the diagonal, so the Cholesky factorisation exists;
4. U = the upper Cholesky factor of H^-1: the paper's Cholesky reformulation (Section 4, step 3). Row j of U,
   divided by U_jj, is how column j's error moves the later columns once columns < j are fixed;
5. lazy batch updates (step 2): inside a block of ``block_size`` columns the rank-1 updates touch only the block;
   the columns after it get the whole block's errors in one matrix product.

The grid is ``minmax_grid`` (the reference's ``Quantizer.find_params``, min-max with 0 inside the range), per
output channel, per tensor or per group of input columns. Groups stay contiguous in the original column order,
so the codes pack into GGML blocks (``QuantLinear.packed_blocks``):
- without act order, a group's parameters are found when its first column is reached, on W as updated so far.
  As in the reference, "so far" means up to the start of the current lazy block: W holds the block's columns as
  they were when the block began (the updates inside the block go to its copy W1);
- with act order, static groups (AutoGPTQ / GPTQModel ``static_groups=True``): each group's parameters come
  from W before any update. The reference's dynamic groups would follow the permuted order, a set of scattered
  columns per group that needs an index per column (``g_idx``), which GGML blocks cannot express.

``quantize_gptq_`` runs a decoder block by block (``sequential.BlockInputs``: block i sees the outputs of the
already quantized blocks 0 .. i-1) and, inside a block, "true sequential" as GPTQModel: the layers that share an
input (q/k/v; gate/up) form a stage, stages run in forward order ([q,k,v], o, [gate,up], down), and each stage's
Hessian is collected with the earlier stages already quantized, so o_proj corrects for q/k/v's error.

Shapes: W (N, K) out x in features; H (K, K); codes (N, K); scale, zero (N, G) with G = K / group_size
(per channel (N, 1), per tensor (1, 1)).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.hessian import HessianAccumulator, input_stages, single_thread, upper_inverse_cholesky
from llmlab.compress.sequential import BlockInputs
from llmlab.compress.spec import QuantSpec, check_bits, check_group, replace_module_, target_linears
from llmlab.nn.quant_linear import QuantLinear, minmax_grid

# spec.options and their defaults; static_groups None = the same as act_order (the only packable choice)
OPTIONS = {"damp": 0.01, "act_order": False, "block_size": 128, "static_groups": None}


def _check(bits: int, group_size: int, act_order: bool, static: bool, damp: float, block_size: int) -> None:
    check_bits("gptq", bits)
    if group_size < -1:
        raise LlmlabError(f"--group-size {group_size}: use 0 (per channel), -1 (per tensor) or a positive width")
    if act_order and group_size > 0 and not static:
        raise LlmlabError("GPTQ act_order with dynamic groups scatters each group over the columns: "
                          "use static_groups=True (the default with act_order)")
    if not 0 <= damp < 1:
        raise LlmlabError(f"GPTQ damp {damp}: use a fraction of the mean Hessian diagonal in [0, 1), e.g. 0.01")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise LlmlabError(f"GPTQ block_size {block_size!r}: use a positive number of columns, e.g. 128")


@torch.no_grad()
@single_thread()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
                         act_order: bool = False, static_groups: bool | None = None, block_size: int = 128,
                         damp: float = 0.01, scale_dtype: torch.dtype = torch.float16):
    """GPTQ for one layer (module docstring). W (N, K), H (K, K); ``group_size`` 0 = per channel, -1 = per tensor.
    Works in float32 as the reference; scales are rounded to ``scale_dtype`` before any code is computed with them.

    Returns (codes (N, K) float with the unsigned integers 0 .. 2^bits - 1 in the original column order,
    scale (N, G) in ``scale_dtype``, zero (N, G) float, stats {"error": the reference's summed Losses, the
    H-weighted squared error 1/2 sum (w - q)^2 / U_jj^2; "seconds"; "damp": the fraction used})."""
    t0 = time.perf_counter()
    static = act_order if static_groups is None else static_groups
    _check(bits, group_size, act_order, static, damp, block_size)
    W = W.detach().float().clone()  # (N, K), updated in place as columns are fixed
    H = H.detach().float().clone()  # (K, K)
    n, k = W.shape
    if group_size > 0 and k % group_size:
        raise LlmlabError(f"--group-size {group_size} does not divide the layer's {k} input features: "
                          "use a divisor of every layer's width (e.g. 32 or 64), 0 (per channel) or -1 (per tensor)")
    g = group_size if group_size > 0 else k  # columns sharing one set of grid parameters
    maxq = 2 ** bits - 1

    def grid(x):
        return minmax_grid(x, bits, symmetric, scale_dtype)

    scale = torch.zeros(n, k // g, device=W.device)  # (N, G) float32 holding scale_dtype values
    zero = torch.zeros(n, k // g, device=W.device)
    if group_size <= 0:  # the reference finds this grid first, on W before dead columns are zeroed
        s, z = grid(W if group_size == 0 else W.reshape(1, n * k))  # (N,) or (1,)
        scale[:, 0], zero[:, 0] = s, z

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if group_size > 0 and static:
        scale, zero = grid(W.reshape(n, k // g, g))  # (N, G): every group from W before any update

    perm = torch.arange(k, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)  # (K,) visiting order
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = upper_inverse_cholesky(H, damp)  # (K, K) upper

    dynamic = group_size > 0 and not static
    group_of = (perm // g).tolist()  # the (original-order) group of each visited column
    codes = torch.zeros_like(W)  # (N, K) in visiting order
    error = torch.zeros((), device=W.device)
    for b1 in range(0, k, block_size):
        b2 = min(b1 + block_size, k)
        W1 = W[:, b1:b2].clone()  # (N, B): the block, updated column by column
        err = torch.zeros_like(W1)  # (N, B): each column's error / U_jj, for the update after the block
        Hinv1 = Hinv[b1:b2, b1:b2]  # (B, B)
        for i in range(b2 - b1):
            j = b1 + i
            if dynamic and j % g == 0:  # reads W, not W1: see the module docstring
                scale[:, j // g], zero[:, j // g] = grid(W[:, j:j + g])
            s, z = scale[:, group_of[j]], zero[:, group_of[j]]  # (N,)
            w = W1[:, i]  # (N,)
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, j] = q
            e = (w - s * (q - z)) / Hinv1[i, i]  # the rounding error, scaled
            W1[:, i:] -= e.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))  # (N, 1) @ (1, B - i): rank-1 update
            err[:, i] = e
        error += err.pow(2).sum() / 2  # the reference's Losses, (w - q)^2 / U_jj^2 / 2 (rounded once less)
        W[:, b2:] -= err.matmul(Hinv[b1:b2, b2:])  # (N, B) @ (B, K - b2): the lazy update

    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    if group_size == -1:
        scale, zero = scale[:1], zero[:1]  # (1, 1)
    stats = {"error": error.item(), "seconds": time.perf_counter() - t0, "damp": damp}
    return codes, scale.to(scale_dtype), zero, stats


class _StopForward(Exception):
    """Raised by a stage's hook once it holds the stage's input: the rest of the block need not run."""


def _stage_hessian(inputs: BlockInputs, layer: nn.Module) -> tuple[HessianAccumulator, float]:
    """(H of ``layer``'s inputs over every calibration window, seconds of the whole pass). The block runs only up
    to the layer: each linear layer here runs once per block forward, so its first call is all of its input."""
    acc = HessianAccumulator(layer.in_features, layer.weight.device)

    def hook(_module, args):
        acc.add(args[0])
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    t0 = time.perf_counter()
    try:
        for x in inputs:
            with contextlib.suppress(_StopForward):
                inputs.run(x=x)
    finally:
        handle.remove()
    return acc, time.perf_counter() - t0


def _float_twin(q: QuantLinear) -> nn.Linear:
    """A float layer with ``q``'s dequantized weight: the same product, without dequantizing the codes again in
    every call of the later stages' passes. It stands in until the block's outputs are computed."""
    twin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    twin.weight = nn.Parameter(q.dequantized(), requires_grad=False)
    if q.bias is not None:
        twin.bias = nn.Parameter(q.bias.detach().clone(), requires_grad=False)
    return twin


def resolve_options(spec: QuantSpec) -> dict:
    """spec.options with the defaults filled in and checked (unknown keys are an error: a typo would be silent)."""
    unknown = sorted(set(spec.options) - set(OPTIONS))
    if unknown:
        raise LlmlabError(f"unknown GPTQ option(s) {', '.join(unknown)}: known ones are {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **spec.options}
    opts["act_order"] = bool(opts["act_order"])
    if opts["static_groups"] is None:
        opts["static_groups"] = opts["act_order"]
    _check(spec.bits, spec.group_size, opts["act_order"], bool(opts["static_groups"]), opts["damp"],
           opts["block_size"])
    return opts


@torch.no_grad()
def quantize_gptq_(model: nn.Module, spec: QuantSpec, windows: torch.Tensor, progress: bool = True) -> dict:
    """Quantize every linear layer of ``model``'s blocks with GPTQ in place (QuantLinear, float16 scales so they
    pack), calibrated on ``windows`` (n, T) token ids. Fills ``spec.modules`` and ``spec.options`` (defaults
    included). Returns {layer name: {"error", "seconds" (the solve), "damp", "hessian_seconds" (accumulating
    x x^T), "forward_seconds" (running the block up to the layer), "samples", "stage" (the layers sharing
    this H)}}; the pass of a stage is shared by its layers."""
    from tqdm import tqdm

    if spec.method != "gptq":
        raise LlmlabError(f"quantize_gptq_ got a spec for {spec.method!r}: use QuantSpec(method='gptq', ...)")
    if spec.act != "none":
        raise LlmlabError(f"GPTQ quantizes weights only: use act='none', not {spec.act!r}")
    if windows.dim() != 2 or windows.numel() == 0:
        raise LlmlabError(f"GPTQ needs calibration windows (n, T) with n, T >= 1, got shape {tuple(windows.shape)}: "
                          "give calibration text (calibrate.token_windows)")
    opts = resolve_options(spec)
    targets = target_linears(model)
    for name, layer in targets:
        check_group(name, layer, spec.group_size)

    stats: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(targets), desc="gptq", unit="layer", disable=not progress, dynamic_ncols=True)
    try:
        inputs = BlockInputs(model, windows)
        for b in range(inputs.n_blocks):
            prefix = f"layers.{b}."
            block = inputs.block()
            names = [n[len(prefix):] for n, _ in targets if n.startswith(prefix)]
            done = []
            for stage in input_stages(inputs, names):
                acc, pass_seconds = _stage_hessian(inputs, block.get_submodule(stage[0]))
                for local in stage:
                    layer = block.get_submodule(local)
                    codes, scale, zero, st = gptq_quantize_weight(
                        layer.weight, acc.H, spec.bits, spec.group_size, spec.symmetric, opts["act_order"],
                        opts["static_groups"], opts["block_size"], opts["damp"], torch.float16)
                    done.append((local, QuantLinear.from_codes(codes, scale, zero, spec.bits, spec.group_size,
                                                               spec.symmetric, bias=layer.bias)))
                    replace_module_(block, local, _float_twin(done[-1][1]))
                    stats[prefix + local] = {**st, "hessian_seconds": acc.seconds, "samples": acc.n,
                                             "forward_seconds": pass_seconds - acc.seconds,
                                             "stage": [prefix + s for s in stage]}
                    bar.set_postfix_str(f"{prefix + local} {st['seconds']:.2f}s error {st['error']:.3g}",
                                        refresh=False)
                    bar.update(1)
            inputs.advance()
            for local, quantized in done:
                replace_module_(block, local, quantized)
    finally:
        bar.close()
        model.train(was_training)
    spec.modules = [n for n, _ in targets]
    spec.options = opts
    return stats
