"""SmoothQuant: migrate activation outliers into the weights, then quantize both to int8 (W8A8).

Xiao, Lin, Seznec, Wu, Demouth & Han 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", arXiv:2211.10438.

A few input channels of a transformer's linear layers carry activations 10-100x larger than the rest, in
every token, so per-token int8 activation scales waste their range on them. For the layers that read a norm's
output, Y = (X diag(s)^-1) (diag(s) W^T) is the same product for any s > 0; SmoothQuant picks, per input
channel j,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (alpha = ``spec.alpha``, default 0.5)

with max|X_j| over the calibration tokens (``calibrate.input_absmax``) and max|W_j| over the output rows of
every layer sharing that input, and folds 1/s into the norm's weight (and bias, for LayerNorm) and s into the
layers' weight columns. As the reference repository (mit-han-lab/smoothquant, ``smooth_ln_fcs`` /
``smooth_ln_fcs_llama_like``): max|W_j| is clamped to >= 1e-5 and s to >= 1e-5; the pairs are
input_layernorm -> q/k/v and post_attention_layernorm -> gate/up (SwiGLU), up (GPT-2's MLP) or the router and
every expert's w1/w3 (Mixtral). o_proj and down_proj have no norm in front of them and are not smoothed.

Then W8A8 for every target linear: per-output-channel absmax int8 weights (``quantize.quantize_absmax_layer``,
as the reference's ``quantize_weight_per_channel_absmax``; ``spec.group_size`` -1 is its per-tensor variant)
and per-token dynamic int8 activations (``QuantLinear(act="token")``, the reference's
``quantize_activation_per_token_absmax`` with its 1e-5 clamp on the scale). ``spec.options["smooth"]`` False
skips the smoothing: naive W8A8, the baseline the paper improves on.

Shapes: X (tokens, K), W (N, K), s (K,); windows (n, T) int64.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import input_absmax
from llmlab.compress.quantize import quantize_absmax_layer
from llmlab.compress.spec import QuantSpec, check_bits, check_group, replace_module_, target_linears
from llmlab.models.decoder import DecoderBlock
from llmlab.nn.mlp import SwiGLU

OPTIONS = {"smooth": True}  # spec.options and their defaults


def smoothing_pairs(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm, [the linears that read the norm's output]) for each decoder block, by module name."""
    pairs = []
    for i, block in enumerate(getattr(model, "layers", [])):
        if not isinstance(block, DecoderBlock):
            raise LlmlabError(f"SmoothQuant folds its factors into the norms of decoder blocks (Llama, GPT-2, "
                              f"Mixtral), not {type(block).__name__}: use smooth=False for naive W8A8")
        p = f"layers.{i}"
        pairs.append((f"{p}.input_layernorm", [f"{p}.self_attn.{x}_proj" for x in "qkv"]))
        if block.config_moe:  # the router reads the same input as the experts
            moe = f"{p}.block_sparse_moe"
            experts = range(len(block.block_sparse_moe.experts))
            fcs = [f"{moe}.gate"] + [f"{moe}.experts.{e}.{w}" for e in experts for w in ("w1", "w3")]
        elif isinstance(block.mlp, SwiGLU):
            fcs = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        else:
            fcs = [f"{p}.mlp.up_proj"]
        pairs.append((f"{p}.post_attention_layernorm", fcs))
    return pairs


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (K,) from max|X_j| (K,) and the weights (N_i, K) sharing that input (module docstring)."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights])  # (layers, K)
    w_absmax = w_absmax.amax(dim=0).clamp(min=1e-5)  # (K,)
    return (act_absmax.float().pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_(model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Fold the smoothing factors into ``model`` (the float function is unchanged); ``act_absmax`` holds
    ``input_absmax`` for at least the first linear of each pair. Returns {norm name: s (K,)}."""
    factors = {}
    for norm_name, fcs in smoothing_pairs(model):
        norm, layers = model.get_submodule(norm_name), [model.get_submodule(n) for n in fcs]
        s = smoothing_factors(act_absmax[fcs[0]], [layer.weight for layer in layers], alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        for layer in layers:
            layer.weight.mul_(s.to(layer.weight.dtype))  # (N, K) * (K,): column j times s_j
        factors[norm_name] = s
    return factors


def _spread(absmax: torch.Tensor) -> float:
    """How far the largest channel sticks out: max / median of the per-channel absmax."""
    return float(absmax.max() / absmax.median().clamp(min=1e-12))


@torch.no_grad()
def quantize_smoothquant_(model: nn.Module, spec: QuantSpec, windows: torch.Tensor | None = None,
                          progress: bool = True) -> dict[str, dict]:
    """Smooth ``model`` with ``spec.alpha`` on the calibration ``windows`` (unless ``spec.options["smooth"]`` is
    False), then replace every target linear by its W8A8 layer; fill ``spec`` (``act`` = "token", ``options``,
    ``modules``). Returns per-layer stats: the (smoothed) weight's RMS error and RMS and, given ``windows``, the
    activation absmax, its spread (max / median over channels) before and after smoothing, and the range of s
    (1 for the layers not smoothed)."""
    if spec.method != "smoothquant":
        raise LlmlabError(f"quantize_smoothquant_ got a spec for {spec.method!r}: use QuantSpec(method='smoothquant')")
    check_bits("smoothquant", spec.bits)
    if spec.act not in ("none", "token"):
        raise LlmlabError(f"--method smoothquant quantizes activations per token: --act {spec.act} is not supported")
    if not 0.0 <= spec.alpha <= 1.0:
        raise LlmlabError(f"--alpha {spec.alpha}: SmoothQuant's migration strength must be in [0, 1] (default 0.5)")
    spec.options = {**OPTIONS, **spec.options}
    smooth = bool(spec.options["smooth"])
    if smooth and windows is None:
        raise LlmlabError("SmoothQuant needs calibration windows for the activation absmax (or smooth=False)")
    layers = target_linears(model)
    for name, layer in layers:
        check_group(name, layer, spec.group_size)
    names = [name for name, _ in layers]
    pairs = smoothing_pairs(model) if smooth else []
    act = {} if windows is None else input_absmax(model, windows, names)
    factors = smooth_(model, act, spec.alpha) if smooth else {}
    scale_of = {fc: factors[norm] for norm, fcs in pairs for fc in fcs}  # layer name -> its s (K,)
    spec.act, spec.modules = "token", []
    report: dict[str, dict] = {}
    for name, layer in tqdm(layers, desc="smoothquant", unit="layer", disable=not progress, leave=False):
        w = layer.weight.detach().float()
        q = quantize_absmax_layer(w, spec.bits, spec.group_size, layer.bias, act="token", act_bits=spec.act_bits)
        report[name] = {"weight_rmse": float((q.dequantized() - w).pow(2).mean().sqrt()),
                        "weight_rms": float(w.pow(2).mean().sqrt())}
        if act:
            s = scale_of.get(name, torch.ones_like(act[name]))
            report[name].update({"act_absmax": float(act[name].max()), "act_spread_before": _spread(act[name]),
                                 "act_spread_after": _spread(act[name] / s), "smooth_min": float(s.min()),
                                 "smooth_max": float(s.max())})
        replace_module_(model, name, q)
        spec.modules.append(name)
    return report
