"""``llmlab lowrank``: truncated-SVD factorisation of a model's linear layers into a low-rank model folder.

A layer W (N, K) is replaced by two thin ones, ``nn.Linear(K, r)`` then ``nn.Linear(r, N)`` (``nn/lowrank.py``,
W ~= B A with A (r, K), B (N, r)), which store r (K + N) weights instead of N K. Two ways to choose the factors:

- ``svd``: the truncated SVD of W, W = U S V^T -> B = U_r S_r^1/2, A = S_r^1/2 V_r^T. By Eckart & Young (1936)
  it is the best rank-r matrix in Frobenius norm, with error ||W - B A||_F^2 = sum of the dropped sigma_i^2;
- ``svd-llm``: SVD-LLM's truncation-aware data whitening (Wang, Zheng, Wan, Zhang, "SVD-LLM: Truncation-aware
  Singular Value Decomposition for Large Language Model Compression", 2024, arXiv:2403.07378, Section 3.1).
  What matters is the layer's *output* error on real inputs X, ||W X - B A X||_F, not the weight error. With
  the Cholesky factor L of the calibration Hessian (L L^T = H = 2/n sum x x^T, ``hessian.py``), the SVD of the
  whitened W L = U S V^T gives B = U_r S_r^1/2, A = S_r^1/2 V_r^T L^-1, and then the output error is exactly
  the dropped singular values of W L: ||(W - B A) X||_F^2 = n/2 sum_{i>r} sigma_i(W L)^2 (the paper's
  Theorem 3.2), the least any rank-r matrix achieves on those inputs. Dampening (``damp`` x mean diag H on
  the diagonal) keeps L invertible when some inputs are (nearly) dead. The layers are calibrated block by
  block as ``prune.py`` does: block i on the outputs of blocks 0 .. i-1 as already factored.

The rank of each layer: ``--rank R`` (the same R everywhere), or ``--energy E``: the smallest r whose
sigma_1^2 + ... + sigma_r^2 keeps a share E of the total (of W's singular values for ``svd``, of W L's for
``svd-llm``). A layer whose rank would not save weights (r >= N K / (N + K)) stays dense and is reported.

Quantized factors (``factor_bits`` 8 or 4): both factors are quantized with round-to-nearest per output channel
(``quantize.quantize_rtn_layer``, asymmetric; 4 bits need an even rank for the two-codes-per-byte storage, so
``--energy`` rounds a 4-bit rank up to even). Low-rank factors quantize well: ZeroQuant-V2 stores its low-rank
compensation factors in 8 bits (Yao, Wu, Li, Youn, He, "ZeroQuant-V2: Exploring Post-training Quantization in
LLMs from Comprehensive Study to Low Rank Compensation", 2023, arXiv:2303.08302, Section 5); here the factors
*are* the layer. An optional recovery fine-tune (``train/recover.py``) trains the float factors on calibration
text before they are quantized.

The model is written as a low-rank folder (``formats/lowrank.py``: the two factors per layer; ``llmlab.load``
runs it) with ``lowrank_report.json`` (the resolved config, per-layer ranks, energy kept, parameters) and
``summary.md``.

Shapes: W (N, K) out x in features; H, L (K, K); A (r, K); B (N, r); windows (n, T) token ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import calibration_text, token_windows
from llmlab.compress.hessian import (
    HessianAccumulator,
    collect_stages,
    dampened_cholesky,
    input_stages,
    single_thread,
)
from llmlab.compress.quantize import quantize_rtn_layer
from llmlab.compress.sequential import BlockInputs
from llmlab.compress.spec import replace_module_, target_linears
from llmlab.nn.lowrank import LowRankLinear

METHODS = ("svd", "svd-llm")
CALIBRATED = ("svd-llm",)
GROUPS = {"all": None, "mlp": ("gate_proj", "up_proj", "down_proj"), "attn": ("q_proj", "k_proj", "v_proj", "o_proj")}


@dataclass
class LowRankConfig:
    method: str = "svd"
    rank: int | None = None  # the same rank for every layer ...
    energy: float | None = None  # ... or the share of sum sigma^2 each layer keeps (exactly one of the two)
    layers: str = "all"  # all | mlp | attn | comma-separated layer names (q_proj, layers.3.mlp.up_proj, ...)
    damp: float = 0.01  # svd-llm: a fraction of the mean Hessian diagonal added before the Cholesky factorisation
    factor_bits: int = 0  # 0: float factors; 8 or 4: round-to-nearest codes per output channel

    def resolved(self) -> LowRankConfig:
        """The config checked (an error names the flag and the fix)."""
        if self.method not in METHODS:
            raise LlmlabError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if (self.rank is None) == (self.energy is None):
            raise LlmlabError("give exactly one of --rank R (the rank of every layer) or --energy E (the share of "
                              "the squared singular values each layer keeps, e.g. 0.9)")
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise LlmlabError(f"--rank {self.rank}: use a positive whole number, at most the smaller side of every "
                              "chosen layer")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1):
            raise LlmlabError(f"--energy {self.energy}: use a share of the squared singular values in (0, 1], "
                              "e.g. 0.9")
        if not 0 <= self.damp < 1:
            raise LlmlabError(f"--damp {self.damp}: use a fraction of the mean Hessian diagonal in [0, 1), e.g. 0.01")
        if self.factor_bits not in (0, 4, 8):
            raise LlmlabError(f"--factor-bits {self.factor_bits}: choose 0 (float factors), 8 or 4")
        if self.factor_bits == 4 and self.rank is not None and self.rank % 2:
            raise LlmlabError(f"--factor-bits 4 stores two codes per byte: use an even --rank, not {self.rank}")
        if not self.layers.strip():
            raise LlmlabError("--layers is empty: give all, mlp, attn or layer names such as q_proj,up_proj")
        return replace(self, energy=None if self.energy is None else float(self.energy))

    def label(self) -> str:
        what = f"rank {self.rank}" if self.rank is not None else f"energy {self.energy:g}"
        bits = f", {self.factor_bits}-bit factors" if self.factor_bits else ""
        return f"{self.method} {what} ({self.layers}){bits}"


def select_layers(model: nn.Module, layers: str) -> list[tuple[str, nn.Linear]]:
    """The linear layers inside the blocks that ``layers`` names: ``all``, ``mlp``, ``attn``, or comma-separated
    names, where a layer matches a name when its path equals it or ends with ``"." + name`` (LoRA's
    ``target_modules`` rule). A name that matches nothing is an error listing the names there are."""
    targets = target_linears(model)
    names = [n.strip() for n in layers.split(",") if n.strip()]
    wanted: list[str] = []
    for n in names:
        if n in GROUPS:
            wanted += [n] if GROUPS[n] is None else list(GROUPS[n])
        else:
            wanted.append(n)
    if "all" in wanted:
        return targets
    chosen = []
    for n in wanted:
        if not any(path == n or path.endswith("." + n) for path, _ in targets):
            leaves = sorted({path.rpartition(".")[2] for path, _ in targets})
            raise LlmlabError(f"--layers: no linear layer inside the blocks is named {n!r}: use all, mlp, attn, "
                              f"{', '.join(leaves)} or full paths such as {targets[0][0]}")
    for path, layer in targets:
        if any(path == n or path.endswith("." + n) for n in wanted):
            chosen.append((path, layer))
    return chosen


def check_model(model: nn.Module, config: LowRankConfig) -> list[tuple[str, nn.Linear]]:
    """The layers ``config`` factors, after checking that a fixed rank fits every one of them."""
    chosen = select_layers(model, config.layers)
    for name, layer in chosen:
        if config.rank is not None and config.rank > min(layer.in_features, layer.out_features):
            most = min(layer.in_features, layer.out_features)
            raise LlmlabError(f"--rank {config.rank} is larger than {name}'s {layer.out_features} x "
                              f"{layer.in_features} matrix allows (at most {most}): use a smaller --rank, --energy, "
                              "or --layers without it")
    return chosen


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank``, or the smallest r whose s_1^2 + ... + s_r^2 is at least a share ``energy`` of sum s^2 (s: the
    singular values, descending)."""
    if rank is not None:
        return rank
    sq = s.double() ** 2
    share = torch.cumsum(sq, 0) / sq.sum()  # (min(N, K),)
    return min(int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype))) + 1, s.numel())


@torch.no_grad()
@single_thread()
def factorize(W: torch.Tensor, rank: int | None = None, energy: float | None = None,
              L: torch.Tensor | None = None, even: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """W (N, K) -> (A (r, K), B (N, r), stats) with B A the truncated SVD of W (``L`` None) or SVD-LLM's
    whitened truncation (``L`` (K, K) lower, L L^T = H). ``even``: round an energy-chosen rank up to even.
    stats: "rank", "energy" (the share of sum sigma^2 kept), "dropped" (sum of the dropped sigma^2: the squared
    weight error for svd, the squared whitened error ||(W - B A) L||_F^2 for svd-llm). The SVD runs in float32
    on one thread (``hessian.single_thread``: a 1536 x 576 SVD takes 1 s there, 4-16 s on two busy threads or in
    float64), the whitening product and the triangular solve in float64."""
    M = W.float() if L is None else (W.double() @ L.double()).float()  # (N, K)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (N, m), (m,), (m, K); m = min(N, K)
    U, S, Vh = U.double(), S.double(), Vh.double()
    r = choose_rank(S, rank, energy)
    if even and r % 2:
        r = min(r + 1, S.numel())
    root = S[:r].sqrt()
    B = U[:, :r] * root  # (N, r)
    A = root[:, None] * Vh[:r]  # (r, K)
    if L is not None:  # A L^-1: solve X L = A
        A = torch.linalg.solve_triangular(L.double(), A, upper=False, left=False)
    sq = S ** 2
    stats = {"rank": r, "energy": float(sq[:r].sum() / sq.sum()) if sq.sum() > 0 else 1.0,
             "dropped": float(sq[r:].sum())}
    return A.float(), B.float(), stats


def quantize_factors_(layer: LowRankLinear, bits: int) -> dict:
    """Both factors of ``layer`` as round-to-nearest ``QuantLinear`` codes per output channel (asymmetric);
    returns the relative Frobenius error of the product B A this adds."""
    before = layer.up.weight.detach() @ layer.down.weight.detach()  # (N, K)
    layer.down = quantize_rtn_layer(layer.down.weight.detach(), bits, 0, False)
    layer.up = quantize_rtn_layer(layer.up.weight.detach(), bits, 0, False, layer.up.bias)
    after = layer.up.dequantized() @ layer.down.dequantized()
    return {"factor_quant_error": float((after - before).norm() / before.norm().clamp_min(1e-30))}


@torch.no_grad()
def lowrank_model_(model: nn.Module, config: LowRankConfig, windows: torch.Tensor | None = None,
                   progress: bool = True) -> dict[str, dict]:
    """Replace the chosen linear layers of ``model`` by ``LowRankLinear`` factors in place (float factors;
    ``quantize_model_factors_`` quantizes them). ``windows`` (n, T): calibration token ids for svd-llm.
    Returns {layer name: {"rank", "energy", "dropped", "in", "out", "dense" (True: left dense, no saving),
    "params" (before), "params_after", "seconds"; svd-llm: "damp", "samples"}}."""
    from tqdm import tqdm

    cfg = config.resolved()
    targets = check_model(model, cfg)
    if cfg.method in CALIBRATED and (windows is None or windows.dim() != 2 or windows.numel() == 0):
        raise LlmlabError(f"--method {cfg.method} needs calibration windows (n, T) with n, T >= 1: "
                          "give calibration text (--calib builtin or a file)")

    def factor_layer(name: str, parent: nn.Module, local: str, acc=None) -> None:
        t0 = time.perf_counter()
        layer = parent.get_submodule(local)
        w = layer.weight.detach()
        n, k = w.shape
        st: dict = {}
        L = None
        if acc is not None:
            L, damp = dampened_cholesky(acc.H.double(), cfg.damp, "SVD-LLM")
            st = {"damp": damp, "samples": acc.n}
        A, B, fs = factorize(w, cfg.rank, cfg.energy, L, even=cfg.factor_bits == 4)
        dense = not LowRankLinear.saves(fs["rank"], k, n)
        if not dense:
            replace_module_(parent, local, LowRankLinear.from_factors(A, B, layer.bias))
        report[name] = {**fs, "in": k, "out": n, "dense": dense, "params": n * k,
                        "params_after": n * k if dense else fs["rank"] * (n + k), **st,
                        "seconds": time.perf_counter() - t0}
        bar.set_postfix_str(f"{name} r={fs['rank']}{' (dense)' if dense else ''}", refresh=False)
        bar.update(1)

    report: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(targets), desc=cfg.method, unit="layer", disable=not progress, dynamic_ncols=True)
    try:
        if cfg.method not in CALIBRATED:
            for name, _layer in targets:
                factor_layer(name, model, name)
        else:
            inputs = BlockInputs(model, windows)
            for b in range(inputs.n_blocks):
                prefix = f"layers.{b}."
                block = inputs.block()
                names = [n[len(prefix):] for n, _ in targets if n.startswith(prefix)]
                if not names:
                    inputs.advance()
                    continue
                stages = input_stages(inputs, names)
                accs = collect_stages(inputs, stages, lambda m: HessianAccumulator(m.in_features, m.weight.device))
                for stage in stages:
                    for local in stage:
                        factor_layer(prefix + local, block, local, accs[stage[0]])
                del accs
                inputs.advance()
    finally:
        bar.close()
        model.train(was_training)
    return report


def quantize_model_factors_(model: nn.Module, layers: dict[str, dict], bits: int) -> None:
    """Quantize the factors of every factored layer in ``layers`` (the report of ``lowrank_model_``), adding
    each layer's "factor_quant_error" to its entry."""
    for name, st in layers.items():
        if not st["dense"]:
            st.update(quantize_factors_(model.get_submodule(name), bits))


def parameter_totals(model: nn.Module, layers: dict[str, dict], factor_bits: int = 0) -> dict:
    """Weights of the chosen layers before / after and of the whole model (tied tensors once); "factor_bytes":
    the factored layers' stored weight bytes (float32, or bits / 8 per code + a float16 scale and a zero-point
    per output channel)."""
    before = sum(st["params"] for st in layers.values())
    after = sum(st["params_after"] for st in layers.values())
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    total += sum(st["params_after"] for st in layers.values() if factor_bits and not st["dense"])  # codes: buffers
    factored = [st for st in layers.values() if not st["dense"]]
    if factor_bits:
        nbytes = sum(st["params_after"] * factor_bits / 8 + 3 * (st["rank"] + st["out"]) for st in factored)
    else:
        nbytes = sum(st["params_after"] * 4 for st in factored)
    return {"layer_parameters": before, "layer_parameters_after": after,
            "share_kept": after / before if before else 1.0, "model_parameters": total,
            "factored_layers": len(factored),
            "dense_layers": [n for n, st in layers.items() if st["dense"]], "factor_bytes": int(nbytes)}


def lowrank(source: str | None, out: Path, config: LowRankConfig, *, calib: str = "builtin", calib_samples: int = 32,
            calib_len: int = 512, seed: int = 0, dtype: str = "float32", force: bool = False, progress: bool = True,
            recover: Callable[[nn.Module, object, torch.Tensor], dict] | None = None) -> dict:
    """Load ``source`` in float32, factor it with ``config``, optionally ``recover(model, loaded, windows)`` (the
    recovery fine-tune, ``train/recover.py``; its dict goes into the report), quantize the factors, and write
    the low-rank folder ``out`` atomically (``lowrank_report.json`` and ``summary.md`` beside the weights)."""
    from llmlab.formats.convert import write_loaded
    from llmlab.formats.load import load_model

    cfg = config.resolved()  # flag errors before any loading
    if out.exists() and not force:
        raise LlmlabError(f"{out} already exists: pass --force to overwrite it")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise LlmlabError(f"--dtype {dtype}: choose float32, float16 or bfloat16")
    needs_text = cfg.method in CALIBRATED or recover is not None
    text = calibration_text(calib) if needs_text else None  # a missing or empty file fails early
    loaded = load_model(source)
    check_model(loaded.model, cfg)  # before the calibration text is tokenized
    windows = None
    if text is not None:
        if loaded.tokenizer is None:
            raise LlmlabError(f"{source}: has no tokenizer to read the calibration text with")
        windows = token_windows(loaded.tokenizer, text, calib_samples, calib_len, seed)
    t0 = time.perf_counter()
    layers = lowrank_model_(loaded.model, cfg, windows, progress)
    seconds = time.perf_counter() - t0
    factored = {n: st["rank"] for n, st in layers.items() if not st["dense"]}
    if not factored:
        raise LlmlabError(f"{cfg.label()}: no layer would save parameters at the ranks chosen (every one needs "
                          "r < in x out / (in + out)): use a smaller --rank or --energy")
    recovery = recover(loaded.model, loaded, windows) if recover is not None else None
    if cfg.factor_bits:
        quantize_model_factors_(loaded.model, layers, cfg.factor_bits)
    report = {"source": loaded.source, "config": asdict(cfg), "seconds": round(seconds, 2),
              "calibration": None if windows is None else {"source": calib, "samples": calib_samples,
                                                            "tokens": calib_len, "seed": seed},
              "parameters": parameter_totals(loaded.model, layers, cfg.factor_bits), "recovery": recovery,
              "layers": layers}
    spec = {"method": cfg.method, "modules": factored, "factor_bits": cfg.factor_bits}
    write_loaded(loaded, out, dtype=dtype, lowrank_spec=spec,
                 extra_files={"lowrank_report.json": json.dumps(report, indent=2) + "\n",
                              "summary.md": summary_markdown(report)})
    return report


def summary_markdown(report: dict) -> str:
    cfg, p = report["config"], report["parameters"]
    calib = report["calibration"]
    calib = "none" if calib is None else f"{calib['samples']} x {calib['tokens']} tokens of {calib['source']}"
    dense = p["dense_layers"]
    lines = [f"# llmlab lowrank: {LowRankConfig(**cfg).label()}", "",
             f"- source: {report['source']}",
             f"- calibration: {calib}",
             f"- {p['factored_layers']} layers factored: {p['layer_parameters']:,} weights -> "
             f"{p['layer_parameters_after']:,} ({p['share_kept']:.2%}); the model: {p['model_parameters']:,} "
             "parameters",
             f"- left dense (no saving at their rank): {', '.join(dense) if dense else 'none'}",
             f"- {report['seconds']} s"]
    rec = report.get("recovery")
    if rec:
        lines.append(f"- recovery: {rec['steps']} steps; held-out perplexity {rec['perplexity_before']:.3f} -> "
                     f"{rec['perplexity_after']:.3f}")
    lines += ["", "| layer | shape | rank | energy kept | dense | seconds |", "|---|---|---|---|---|---|"]
    for name, st in report["layers"].items():
        lines.append(f"| {name} | {st['out']} x {st['in']} | {st['rank']} | {st['energy']:.4f} | "
                     f"{'yes' if st['dense'] else 'no'} | {st['seconds']:.2f} |")
    return "\n".join(lines) + "\n"
