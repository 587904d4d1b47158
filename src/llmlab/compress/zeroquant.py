"""ZeroQuant: group-wise int8/int4 weights, token-wise dynamic int8 activations, and layer-by-layer knowledge
distillation (LKD).

Yao, Aminabadi, Zhang, Wu, Li & He 2022, "ZeroQuant: Efficient and Affordable Post-Training Quantization for
Large-Scale Transformers", arXiv:2206.01861.

- Weights: symmetric absmax codes per group, w = s * q with s = max|w_group| / (2^(b-1) - 1) (float16) and
  q = round(w / s) in [-(2^(b-1) - 1), 2^(b-1) - 1]: the grid of SmoothQuant's weights and of ``absmax``
  quantization here; ``spec.bits`` 8 or 4 (the paper's W8 and W4/8). The paper's eq. 1 (and DeepSpeed's
  ``SymQuantizer``) uses s = max|w_group| / 2^(b-1) and also the code -2^(b-1). Not the symmetric
  ``minmax_grid`` of RTN / GPTQ / QAT: like GPTQ's reference quantizer it leaves the low end at 0 for a group
  with no negative weight, clipping that group's upper half, which small groups hit.
  Groups: the paper partitions each matrix into g groups of whole output rows (Q-BERT's scheme; DeepSpeed's
  example configs use 64 per matrix), and argues that finer groups are more accurate. ``spec.group_size`` keeps
  the meaning it has for every method here: k > 0 = k input columns per group inside each row (the
  fine-grained groups of ZeroQuant-V2, arXiv:2303.08302; ``make_spec``'s default is 64, which at 4 bits is
  what keeps the error small), 0 = one scale per output row (the finest row partition, g = N: at least as
  fine as the paper's for N >= 64), -1 = one per tensor.
- Activations: each token's input to every quantized linear is quantized to int8 with its own absmax scale at
  run time (``QuantLinear(act="token")``), simulated in float as the SmoothQuant repository does.
- LKD (``spec.options["lkd_steps"]`` > 0, default 0 = off; ``lkd_lr``, default 1e-4 at 4 bits, 1e-5 at 8):
  block by block (``BlockInputs``), a student copy of the block whose linears are QAT layers
  (``nn/fake_quant.FakeQuantLinear`` on the absmax grid: a trainable float weight that computes on its grid,
  and per-token quantized inputs, both with the straight-through estimator) is trained with Adam to match the
  float block's output on the same inputs (MSE); its layers are then frozen into codes (``to_quant_linear``:
  the same outputs, bit for bit). Without LKD the layers are frozen untrained: round-to-nearest on the same
  grid. The paper feeds both blocks the float model's hidden states; here the inputs come through the blocks
  already quantized, as ``BlockInputs`` does for every sequential method. Micro-batches are taken in order:
  LKD is deterministic.

Shapes: W (N, K) -> codes (N, K) int8, scales (N, K / group) float16; block states (b, T, dim);
windows (n, T) int64 (needed only for LKD).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llmlab.common import LlmlabError
from llmlab.compress.sequential import BlockInputs
from llmlab.compress.spec import QuantSpec, check_bits, check_group, replace_module_, target_linears
from llmlab.models.decoder import DecoderLM
from llmlab.nn.fake_quant import FakeQuantLinear
from llmlab.nn.quant_linear import QuantLinear, absmax_scale, group_view

# spec.options and their defaults (LKD off). Adam moves each weight by about lr per step: the default keeps that a
# small fraction of the quantization step (max|w| / 7 at 4 bits, / 127 at 8); measured on llama-tiny, 1e-4 at
# 8 bits overshoots (the block error grows) while 1e-5 lowers it.
OPTIONS = {"lkd_steps": 0, "lkd_lr": None}
DEFAULT_LR = {4: 1e-4, 8: 1e-5}


class AbsmaxFakeQuantLinear(FakeQuantLinear):
    """The QAT layer on the absmax grid (module docstring): zero at 2^(b-1), so the unsigned codes
    round(w / s) + 2^(b-1) are the signed absmax codes shifted, and ``to_quant_linear`` stores them signed."""

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = absmax_scale(group_view(self.weight.detach(), self.group_size), self.bits, torch.float16)
        return scale, torch.full_like(scale, 2 ** (self.bits - 1))  # (rows, groups) each


def _student_layer(layer: nn.Linear, spec: QuantSpec) -> FakeQuantLinear:
    return AbsmaxFakeQuantLinear.from_linear(layer, bits=spec.bits, group_size=spec.group_size, symmetric=True,
                                             act_bits=spec.act_bits)


def _weight_stats(float_weight: torch.Tensor, q: QuantLinear) -> dict:
    """Against the float weight the layer replaced (before any distillation)."""
    w = float_weight.detach().float()
    return {"weight_rmse": float((q.dequantized() - w).pow(2).mean().sqrt()),
            "weight_rms": float(w.pow(2).mean().sqrt())}


def _block_mse(inputs: BlockInputs, block: nn.Module, targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        errs = [F.mse_loss(inputs.run(block, x), t).item() for x, t in zip(inputs, targets)]
    return sum(errs) / len(errs)


def _distill_block(inputs: BlockInputs, names: list[str], spec: QuantSpec, steps: int, lr: float) -> dict:
    """LKD of block ``inputs.index``: train a fake-quantized student against the float block, then put the
    student's quantized layers into the model. ``names`` are the block's linears, relative to the block; returns
    their stats."""
    teacher = inputs.block()
    with torch.no_grad():
        targets = [inputs.run(teacher, x) for x in inputs]  # (b, T, dim) each
    student = copy.deepcopy(teacher)
    for name in names:
        replace_module_(student, name, _student_layer(student.get_submodule(name), spec))
    for p in student.parameters():  # only the quantized layers' weights and biases learn
        p.requires_grad_(False)
    params = [p for n in names for p in student.get_submodule(n).parameters()]
    for p in params:
        p.requires_grad_(True)
    before = _block_mse(inputs, student, targets)
    xs, opt = list(inputs), torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():  # also when the caller quantizes under no_grad
        for step in range(steps):
            i = step % len(xs)  # micro-batches in order: deterministic
            loss = F.mse_loss(inputs.run(student, xs[i]), targets[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    report = {}
    for name in names:  # the model's block is now the quantized student
        float_weight = teacher.get_submodule(name).weight
        q = student.get_submodule(name).to_quant_linear()
        replace_module_(teacher, name, q)
        report[name] = _weight_stats(float_weight, q)
    after = _block_mse(inputs, teacher, targets)
    return {name: {**stats, "block_mse_before": before, "block_mse_after": after} for name, stats in report.items()}


def quantize_zeroquant_(model: nn.Module, spec: QuantSpec, windows: torch.Tensor | None = None,
                        progress: bool = True) -> dict[str, dict]:
    """Replace every target linear of ``model`` by its ZeroQuant layer (module docstring), with LKD when
    ``spec.options["lkd_steps"]`` > 0 (needs ``windows``); fill ``spec`` (``act`` = "token", ``modules``).
    Returns per-layer stats: the weight's RMS error (against the float weight it replaced) and RMS and, with
    LKD, the block's output MSE before and after distillation (the block's layers share those two)."""
    if spec.method != "zeroquant":
        raise LlmlabError(f"quantize_zeroquant_ got a spec for {spec.method!r}: use QuantSpec(method='zeroquant')")
    check_bits("zeroquant", spec.bits)
    if not spec.symmetric:
        raise LlmlabError("--method zeroquant quantizes weights symmetrically (absmax): drop the asymmetric option")
    if spec.act not in ("none", "token"):
        raise LlmlabError(f"--method zeroquant quantizes activations per token: --act {spec.act} is not supported")
    spec.options = {**OPTIONS, **spec.options}  # the defaults are recorded with the model
    if spec.options["lkd_lr"] is None:
        spec.options["lkd_lr"] = DEFAULT_LR[spec.bits]
    steps, lr = int(spec.options["lkd_steps"]), float(spec.options["lkd_lr"])
    if steps < 0 or lr <= 0:
        raise LlmlabError(f"ZeroQuant LKD needs lkd_steps >= 0 and lkd_lr > 0, got {steps} and {lr}")
    if steps and windows is None:
        raise LlmlabError("ZeroQuant's layer-by-layer distillation (lkd_steps > 0) needs calibration windows")
    if steps and not isinstance(model, DecoderLM):
        raise LlmlabError("ZeroQuant's distillation runs decoder blocks (Llama, GPT-2): use lkd_steps 0")
    layers = target_linears(model)
    for name, layer in layers:
        check_group(name, layer, spec.group_size)
    spec.act = "token"
    spec.modules = [name for name, _ in layers]
    report: dict[str, dict] = {}
    if steps:
        inputs = BlockInputs(model, windows)
        for i in tqdm(range(inputs.n_blocks), desc="zeroquant lkd", unit="block", disable=not progress,
                      leave=False):
            names = [n for n, m in inputs.block().named_modules() if isinstance(m, nn.Linear)]
            for n, stats in _distill_block(inputs, names, spec, steps, lr).items():
                report[f"layers.{i}.{n}"] = stats
            inputs.advance()
        return {name: report[name] for name in spec.modules}  # in forward order
    for name, layer in tqdm(layers, desc="zeroquant", unit="layer", disable=not progress, leave=False):
        q = _student_layer(layer, spec).to_quant_linear()  # untrained: round-to-nearest
        report[name] = _weight_stats(layer.weight, q)
        replace_module_(model, name, q)
    return report
