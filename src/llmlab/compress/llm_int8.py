"""LLM.int8(): vector-wise int8 weights and mixed-precision decomposition of outlier activation columns.

Dettmers, Lewis, Belkada & Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
Scale", arXiv:2208.07339.

Weights, as bitsandbytes computes them (``int8_vectorwise_quant``, used by ``Int8Params`` and
``Linear8bitLt(has_fp16_weights=False)``): per output row, SCB = max_k |W[n, k]| and
CB = round(W * (127 / SCB)). The layer stores CB and SCB / 127 as float32 scales. At run time
(``QuantLinear(act="llm-int8")``) every input column that holds a value with |x| >= ``threshold`` (6.0 in the
paper) is multiplied in float with the dequantized weight columns; the rest of x is quantized per token
(absmax after zeroing the outliers) and multiplied with CB in integers. Threshold 0 turns the decomposition
off, as in bitsandbytes.

What differs from bitsandbytes, and why (``tests/test_llm_int8.py`` measures each):
- bitsandbytes casts weights and activations to float16 first; here they stay in the model's dtype, so the
  codes are identical for float16-representable weights, and the product is float32 (the int8 x int8 sums are
  exact in float32 up to K = 1040 inputs; beyond, they round where bitsandbytes' int32 sums do not).
- bitsandbytes' CPU/default ``int8_mm_dequant`` multiplies by the constant 6.200124e-05, which is 1.8e-5
  (relative) more than 1 / 127^2 = 6.2000124e-05 (its CUDA kernel uses 6.200012e-05); here the scale is
  exactly row absmax * SCB / 127^2.

Outlier statistics: given calibration windows, the quantized model runs them in micro-batches of ``BATCH``
windows (outlier columns are decided per matrix product, so they depend on the batch) and reports, per layer,
the outlier columns per product (max, mean), their fraction of the input width, and the fraction of tokens
holding at least one outlier value.

Shapes: W (N, K) -> CB (N, K) int8, scales (N, 1) float32; x (..., K) -> (..., N); windows (n, T) int64.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import run_with_hooks
from llmlab.compress.spec import QuantSpec, check_bits, replace_module_, target_linears
from llmlab.nn.quant_linear import QuantLinear

BATCH = 8  # calibration windows per forward pass (as ``input_absmax``)


def int8_vectorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (CB (N, K) int8, SCB (N,) float32): bitsandbytes' row-wise absmax int8 codes."""
    w = w.detach().float()
    scb = w.abs().amax(dim=1)  # (N,)
    # multiply by 127 / SCB (not divide by SCB / 127): bitsandbytes' rounding, bit for bit
    cb = torch.round(w * (127.0 / scb.unsqueeze(-1))).nan_to_num(0.0)  # an all-zero row: 0 * inf -> codes 0
    return cb.to(torch.int8), scb


def llm_int8_linear(layer: nn.Linear, threshold: float) -> QuantLinear:
    cb, scb = int8_vectorwise(layer.weight)
    return QuantLinear(cb, (scb / 127.0).unsqueeze(1), None, 8, 0, layer.bias, act="llm-int8",
                       threshold=threshold)  # scales (N, 1): per output channel


@torch.no_grad()
def outlier_stats(model: nn.Module, names: list[str], windows: torch.Tensor,
                  batch: int = BATCH) -> dict[str, dict]:
    """Run ``windows`` through ``model`` and summarise, per LLM.int8() layer in ``names``, the outlier
    decomposition of each matrix product (module docstring)."""
    seen: dict[str, list[tuple[int, float]]] = {n: [] for n in names}

    def hook(name):
        def record(module, inputs, _output):
            x = inputs[0].reshape(-1, module.in_features)  # (M, K)
            tokens = (x.abs() >= module.threshold).any(dim=1).float().mean() if module.threshold > 0 else 0.0
            seen[name].append((module.last_outliers, float(tokens)))
        return record

    run_with_hooks(model, windows, {n: hook(n) for n in names}, batch)
    out = {}
    for name in names:
        cols = torch.tensor([c for c, _ in seen[name]], dtype=torch.float32)  # (products,)
        width = model.get_submodule(name).in_features
        out[name] = {"outlier_cols_max": int(cols.max()), "outlier_cols_mean": float(cols.mean()),
                     "outlier_col_frac": float(cols.mean() / width),
                     "outlier_token_frac": sum(t for _, t in seen[name]) / len(seen[name])}
    return out


def quantize_llm_int8_(model: nn.Module, spec: QuantSpec, windows: torch.Tensor | None = None,
                       progress: bool = True) -> dict[str, dict]:
    """Replace every target linear of ``model`` by its LLM.int8() layer (threshold ``spec.threshold``); fill
    ``spec`` (``act`` = "llm-int8", ``modules``). Returns per-layer stats: the weight's RMS error and RMS and,
    given ``windows``, the outlier statistics."""
    if spec.method != "llm-int8":
        raise LlmlabError(f"quantize_llm_int8_ got a spec for {spec.method!r}: use QuantSpec(method='llm-int8')")
    check_bits("llm-int8", spec.bits)
    if spec.act not in ("none", "llm-int8"):
        raise LlmlabError(f"--method llm-int8 decides its own activation scheme: --act {spec.act} is not supported")
    if spec.group_size != 0:
        raise LlmlabError(f"--method llm-int8 quantizes weights per output row (vector-wise): --group-size "
                          f"{spec.group_size} is not supported, use 0")
    if spec.threshold < 0:
        raise LlmlabError(f"--threshold {spec.threshold}: the outlier threshold must be >= 0 (0 = no outliers)")
    layers = target_linears(model)
    spec.act, spec.symmetric = "llm-int8", True
    spec.modules = []
    report: dict[str, dict] = {}
    for name, layer in tqdm(layers, desc="llm.int8()", unit="layer", disable=not progress, leave=False):
        q = llm_int8_linear(layer, spec.threshold)
        w = layer.weight.detach().float()
        report[name] = {"weight_rmse": float((q.dequantized() - w).pow(2).mean().sqrt()),
                        "weight_rms": float(w.pow(2).mean().sqrt())}
        replace_module_(model, name, q)
        spec.modules.append(name)
    if windows is not None:
        was_training = model.training
        model.eval()
        for name, stats in outlier_stats(model, spec.modules, windows).items():
            report[name].update(stats)
        model.train(was_training)
    return report
