"""``llmlab quantize``: post-training quantization of a model's linear layers into a quantized model folder.

Round-to-nearest methods live here; the calibrated ones in their own modules (``gptq``, ``llm_int8``,
``smoothquant``, ``zeroquant``); NF4 is QLoRA's (``nn/nf4.py``):

- ``absmax``: symmetric, s = max|w| / (2^(b-1) - 1), q = round(w / s) (``absmax_quantize`` is the 8-bit
  per-tensor textbook version, as in the llm-course "Introduction to Weight Quantization" notebook);
- ``zeropoint``: asymmetric, s = (max - min) / (2^b - 1), z = round(-min / s), q = clamp(round(w / s) + z)
  (``zeropoint_quantize``: the notebook's int8 version);
- ``rtn``: round-to-nearest on GPTQ's grid (``minmax_grid``): the baseline GPTQ improves on, same bits and groups;
- ``nf4``: 4-bit NormalFloat with blockwise absmax (Dettmers et al. 2023, arXiv:2305.14314).

Each granularity: per tensor (``group_size`` -1), per output channel (0) or per group of input columns. Scales
are stored in float16 with the codes computed from the stored scale, so a layer whose codes fit a GGML block
type runs on the packed integer kernels with exactly these values (``QuantLinear.packed_blocks``).

Shapes: weights (N, K); groups (N, K / group, group).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import calibration_text, token_windows
from llmlab.compress.spec import METHOD_BITS, QuantSpec, check_bits, check_group, replace_module_, target_linears
from llmlab.nn.nf4 import NF4Linear
from llmlab.nn.quant_linear import QuantLinear, absmax_scale, group_view, minmax_grid, quantize_to_grid

# methods that need calibration windows (LLM.int8() uses them only to count outliers)
CALIBRATED = ("gptq", "smoothquant", "zeroquant", "llm-int8")
DEFAULTS = {  # (bits, group size, symmetric) when not given on the command line
    "absmax": (8, 0, True), "zeropoint": (8, 0, False), "rtn": (4, 32, False), "gptq": (4, 32, False),
    "nf4": (4, 64, True), "llm-int8": (8, 0, True), "smoothquant": (8, 0, True), "zeroquant": (8, 64, True),
}


# ---- the notebook's worked example ------------------------------------------------------------------------
def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor int8 absmax: (int8 codes, dequantized float). scale = 127 / max|x|."""
    scale = 127 / x.abs().max()
    q = torch.round(x * scale)
    return q.to(torch.int8), q / scale


def zeropoint_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor int8 zero-point: (int8 codes, dequantized float). scale = 255 / (max - min), zero-point =
    round(-scale * min - 128), codes clipped to [-128, 127]."""
    span = x.max() - x.min()
    span = torch.where(span == 0, torch.ones_like(span), span)
    scale = 255 / span
    zero = torch.round(-scale * x.min() - 128)
    q = torch.clip(torch.round(x * scale + zero), -128, 127)
    return q.to(torch.int8), (q - zero) / scale


# ---- layer-wise round-to-nearest ---------------------------------------------------------------------------
def quantize_absmax_layer(w: torch.Tensor, bits: int, group_size: int, bias=None, **act) -> QuantLinear:
    g = group_view(w.float(), group_size)  # (rows, groups, group)
    scale = absmax_scale(g, bits, torch.float16)  # (rows, groups)
    qmax = 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(g / scale[..., None]), -qmax, qmax).reshape(w.shape)
    return QuantLinear(q.to(torch.int8), scale.half(), None, bits, group_size, bias, **act)


def quantize_zeropoint_layer(w: torch.Tensor, bits: int, group_size: int, bias=None) -> QuantLinear:
    g = group_view(w.float(), group_size)
    maxq = 2 ** bits - 1
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    span = torch.where(hi == lo, torch.ones_like(hi), hi - lo)
    scale = (span / maxq).half().float()  # (rows, groups)
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    q = quantize_to_grid(g, scale, zero, bits).reshape(w.shape)
    return QuantLinear(q, scale.half(), zero, bits, group_size, bias)


def quantize_rtn_layer(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, bias=None) -> QuantLinear:
    g = group_view(w.float(), group_size)
    scale, zero = minmax_grid(g, bits, symmetric, torch.float16)
    q = quantize_to_grid(g, scale, zero, bits).reshape(w.shape)
    return QuantLinear.from_codes(q, scale.half(), zero, bits, group_size, symmetric, bias)


def quantize_rtn_(model: nn.Module, spec: QuantSpec, windows=None, progress: bool = True) -> dict[str, dict]:
    """absmax / zeropoint / rtn / nf4, layer by layer (no calibration data)."""
    report = {}
    for name, layer in target_linears(model):
        w, b = layer.weight.detach(), layer.bias
        if spec.method == "absmax":
            new = quantize_absmax_layer(w, spec.bits, spec.group_size, b, act=spec.act, act_bits=spec.act_bits)
        elif spec.method == "zeropoint":
            new = quantize_zeropoint_layer(w, spec.bits, spec.group_size, b)
        elif spec.method == "nf4":
            new = NF4Linear.from_linear(layer, torch.float32, spec.group_size or 64, spec.options["double_quant"])
        else:
            new = quantize_rtn_layer(w, spec.bits, spec.group_size, spec.symmetric, b)
        deq = new.dequantize() if isinstance(new, NF4Linear) else new.dequantized()
        report[name] = {"weight_rmse": float((deq - w.float()).pow(2).mean().sqrt()),
                        "weight_rms": float(w.float().pow(2).mean().sqrt())}
        replace_module_(model, name, new)
        spec.modules.append(name)
    return report


def method_fn(method: str) -> Callable:
    """The function that quantizes a model in place for ``method``: (model, spec, windows, progress) -> report."""
    if method == "gptq":
        from llmlab.compress.gptq import quantize_gptq_
        return quantize_gptq_
    if method == "llm-int8":
        from llmlab.compress.llm_int8 import quantize_llm_int8_
        return quantize_llm_int8_
    if method == "smoothquant":
        from llmlab.compress.smoothquant import quantize_smoothquant_
        return quantize_smoothquant_
    if method == "zeroquant":
        from llmlab.compress.zeroquant import quantize_zeroquant_
        return quantize_zeroquant_
    return quantize_rtn_


def make_spec(method: str, bits: int | None = None, group_size: int | None = None, symmetric: bool | None = None,
              **fields) -> QuantSpec:
    """A QuantSpec with the method's defaults (``DEFAULTS``) for what is not given, validated."""
    if method not in DEFAULTS:
        raise LlmlabError(f"unknown method {method!r}: choose one of {', '.join(DEFAULTS)}")
    d_bits, d_group, d_sym = DEFAULTS[method]
    spec = QuantSpec(method, d_bits if bits is None else bits, d_group if group_size is None else group_size,
                     d_sym if symmetric is None else symmetric, **fields)
    check_bits(method, spec.bits)
    if spec.group_size < -1:
        raise LlmlabError(f"--group-size {spec.group_size}: use a positive group, 0 (per channel) or -1 (per tensor)")
    if method == "nf4":
        if spec.group_size <= 0:
            raise LlmlabError("--method nf4 quantizes in blocks: --group-size must be positive (default 64)")
        spec.options.setdefault("block_size", spec.group_size)
        spec.options.setdefault("double_quant", True)
    if spec.act != "none" and method not in ("absmax", "smoothquant", "zeroquant"):
        raise LlmlabError(f"--act {spec.act} is for absmax (naive W8A8), smoothquant and zeroquant, not {method}")
    if spec.act == "token" and spec.bits != 8 and method == "absmax":
        raise LlmlabError("--act token (W8A8) needs --bits 8")
    if method in ("llm-int8",):
        spec.act = "llm-int8"
    elif method in ("smoothquant", "zeroquant"):
        spec.act = "token"
    assert spec.bits in METHOD_BITS[method]
    return spec


def quantize_model_(model: nn.Module, spec: QuantSpec, windows: torch.Tensor | None = None,
                    progress: bool = True) -> dict[str, dict]:
    """Quantize ``model`` in place with ``spec`` (``windows``: calibration token windows, (n, T)); the per-layer
    report of the method."""
    if spec.method in CALIBRATED[:3] and windows is None:
        raise LlmlabError(f"--method {spec.method} needs calibration data (--calib builtin or a text file)")
    for name, layer in target_linears(model):
        if spec.method != "nf4":  # NF4 blocks run over the flattened weight
            check_group(name, layer, spec.group_size)
    with torch.no_grad() if spec.method != "zeroquant" else torch.enable_grad():
        return method_fn(spec.method)(model, spec, windows, progress)


def quantize(source: str, out: Path, spec: QuantSpec, *, calib: str = "builtin", calib_samples: int = 32,
             calib_len: int = 512, seed: int = 0, float_dtype: str = "float16", force: bool = False,
             progress: bool = True) -> dict:
    """Load ``source`` in float32, quantize it with ``spec`` and write the quantized folder ``out`` atomically
    (``quantize_report.json`` and ``summary.md`` beside the weights). Returns the report."""
    from llmlab.formats.convert import write_loaded
    from llmlab.formats.load import load_model

    if out.exists() and not force:
        raise LlmlabError(f"{out} already exists: pass --force to overwrite it")
    if float_dtype not in ("float32", "float16", "bfloat16"):
        raise LlmlabError(f"--float-dtype {float_dtype}: choose float32, float16 or bfloat16")
    loaded = load_model(source)
    if loaded.tokenizer is None and spec.method in CALIBRATED:
        raise LlmlabError(f"{source}: has no tokenizer to read the calibration text with")
    windows = None
    if spec.method in CALIBRATED:
        windows = token_windows(loaded.tokenizer, calibration_text(calib), calib_samples, calib_len, seed)
    t0 = time.perf_counter()
    layers = quantize_model_(loaded.model, spec, windows, progress)
    seconds = time.perf_counter() - t0
    report = {"source": loaded.source, "spec": spec.to_json(), "seconds": round(seconds, 2),
              "calibration": None if windows is None else {"source": calib, "samples": calib_samples,
                                                            "tokens": calib_len, "seed": seed},
              "layers": layers}
    write_loaded(loaded, out, quant_spec=spec.to_json(), dtype=float_dtype,
                 extra_files={"quantize_report.json": json.dumps(report, indent=2) + "\n",
                              "summary.md": summary_markdown(report)})
    return report


def summary_markdown(report: dict) -> str:
    spec = report["spec"]
    group = {0: "per channel", -1: "per tensor"}.get(spec["group_size"], f"groups of {spec['group_size']}")
    lines = [f"# llmlab quantize: {spec['method']}", "",
             f"- source: {report['source']}", f"- {spec['bits']} bits, {group}, "
             f"{'symmetric' if spec['symmetric'] else 'asymmetric'}, activations: {spec['act']}",
             f"- {len(spec['modules'])} layers in {report['seconds']} s", ""]
    layers = report["layers"]
    if layers:
        keys = list(next(iter(layers.values())))
        lines += ["| layer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, stats in layers.items():
            cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in stats.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
