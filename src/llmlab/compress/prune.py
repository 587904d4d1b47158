"""``llmlab prune``: unstructured and N:M pruning of a model's linear layers into an ordinary float folder.

Three methods, from the simplest to the one that updates weights:

- ``magnitude``: zero the smallest |W| (per layer, as the baseline of the Wanda and SparseGPT papers, or per
  output row); no calibration data;
- ``wanda``: zero the lowest |W_ij| * ||X_j|| per output row (Sun et al. 2023, arXiv:2306.11695; ``wanda.py``);
- ``sparsegpt``: OBS pruning with the calibration Hessian, adaptive masks per 128-column block and updates of the
  kept weights (Frantar & Alistarh 2023, arXiv:2301.00774; ``sparsegpt.py``).

Each for a target sparsity S (unstructured) or an N:M pattern (keep N of every M consecutive input weights:
2:4, 4:8; ``sparsity.py``). The layers are every ``nn.Linear`` inside the transformer blocks (``spec.
target_linears``); embeddings, norms and the head stay dense, as in both papers.

The calibrated methods run block by block as their reference code does (``sequential.BlockInputs``): block i
is calibrated on the outputs of blocks 0 .. i-1 *as already pruned*; inside a block every layer's statistics
come from one pass over the dense block (a statistic per group of layers sharing an input: q/k/v, gate/up),
then the block is pruned and its outputs recomputed for the next block.

The pruned model is written as a plain Hugging Face folder (zeros stored densely: ``llmlab.load`` and every
command run it unchanged) with ``prune_report.json`` (the resolved config, per-layer and total sparsity
achieved) and ``summary.md``.

Shapes: W (N, K); windows (n, T) token ids.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import calibration_text, token_windows
from llmlab.compress.hessian import HessianAccumulator, collect_stages, input_stages
from llmlab.compress.sequential import BlockInputs
from llmlab.compress.sparsegpt import check_options, sparsegpt_prune_weight
from llmlab.compress.sparsity import (
    Pattern,
    check_sparsity,
    check_width,
    mask_lowest,
    mask_n_m,
    parse_pattern,
    zero_fraction,
)
from llmlab.compress.spec import target_linears
from llmlab.compress.wanda import InputNorms, wanda_mask

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")
COMPARE = {"magnitude": "layer", "wanda": "row"}  # each method's default comparison group (unstructured)


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float | None = None  # None: 0.5 unstructured, 1 - N/M for an N:M pattern
    pattern: str = "unstructured"  # "unstructured" or "N:M"
    compare: str | None = None  # magnitude / wanda, unstructured: "row" or "layer" (None: the method's own)
    damp: float = 0.01  # SparseGPT: a fraction of the mean Hessian diagonal
    block_size: int = 128  # SparseGPT: columns per adaptive mask block

    def resolved(self) -> PruneConfig:
        """The config with its defaults filled in and checked (an error names the flag and the fix)."""
        if self.method not in METHODS:
            raise LlmlabError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        pattern = parse_pattern(self.pattern)
        sparsity = self.sparsity
        if sparsity is not None:
            check_sparsity(sparsity)
        if pattern.structured:
            if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
                raise LlmlabError(f"--sparsity {sparsity} conflicts with --pattern {pattern}, which zeroes "
                                  f"{pattern.sparsity:g} of the weights: leave --sparsity out")
            sparsity = pattern.sparsity
        compare = self.compare
        if compare is not None and compare not in ("row", "layer"):
            raise LlmlabError(f"--compare {compare!r}: choose row or layer")
        if self.method == "sparsegpt" or pattern.structured:
            if compare is not None:
                raise LlmlabError(f"--compare is for unstructured magnitude and wanda, not --method {self.method} "
                                  f"--pattern {pattern} (which compares {_groups(self.method, pattern)}): "
                                  "leave --compare out")
        else:
            compare = compare or COMPARE[self.method]
        if self.method == "sparsegpt":
            check_options(pattern, self.damp, self.block_size)
        return replace(self, sparsity=0.5 if sparsity is None else float(sparsity), pattern=str(pattern),
                       compare=compare)

    def groups(self) -> str:
        """Where the scores are compared, in words."""
        return _groups(self.method, parse_pattern(self.pattern), self.compare, self.block_size)

    def label(self) -> str:
        what = self.pattern if self.pattern != "unstructured" else f"{self.sparsity:.0%} unstructured"
        return f"{self.method} {what}"


def _groups(method: str, pattern: Pattern, compare: str | None = None, block_size: int = 128) -> str:
    if pattern.structured:
        return f"per group of {pattern.m} input weights"
    if method == "sparsegpt":
        return f"per block of {block_size} input columns"
    return "per output row" if (compare or COMPARE[method]) == "row" else "per layer"


def _stats(w_before: torch.Tensor, w_after: torch.Tensor, pattern: Pattern) -> dict:
    st = {"sparsity": zero_fraction(w_after), "zeros_before": zero_fraction(w_before)}
    if pattern.structured:  # groups that keep more than N nonzeros (0 when the pattern holds)
        groups = (w_after != 0).reshape(w_after.shape[0], -1, pattern.m).sum(dim=2)  # (N, K / M)
        st["n_m_violations"] = int((groups > pattern.n).sum())
    return st


def check_model(model: nn.Module, config: PruneConfig) -> list[tuple[str, nn.Linear]]:
    """The layers ``config`` prunes, after checking that an N:M pattern fits every one of them."""
    pattern = parse_pattern(config.pattern)
    targets = target_linears(model)
    for name, layer in targets:
        check_width(name, layer.in_features, pattern)
    return targets


@torch.no_grad()
def prune_model_(model: nn.Module, config: PruneConfig, windows: torch.Tensor | None = None,
                 progress: bool = True) -> dict[str, dict]:
    """Prune every linear layer of ``model``'s blocks in place (the weights' zeros are the pruned entries).
    ``windows`` (n, T): calibration token ids for wanda / sparsegpt. Returns {layer name: {"sparsity" (zeros
    after), "zeros_before", "seconds", ...; sparsegpt: "error", "damp"; calibrated: "samples"}}."""
    from tqdm import tqdm

    cfg = config.resolved()
    pattern = parse_pattern(cfg.pattern)
    targets = check_model(model, cfg)
    if cfg.method in CALIBRATED and (windows is None or windows.dim() != 2 or windows.numel() == 0):
        raise LlmlabError(f"--method {cfg.method} needs calibration windows (n, T) with n, T >= 1: "
                          "give calibration text (--calib builtin or a file)")

    def prune_layer(name: str, layer: nn.Linear, acc=None) -> None:
        t0 = time.perf_counter()
        w = layer.weight.detach()
        st: dict = {}
        if cfg.method == "sparsegpt":
            new, _mask, st = sparsegpt_prune_weight(w, acc.H, cfg.sparsity, pattern, cfg.block_size, cfg.damp)
        else:
            if cfg.method == "wanda":
                mask = wanda_mask(w, acc, cfg.sparsity, pattern, per_row=cfg.compare == "row")
            elif pattern.structured:
                mask = mask_n_m(w.abs().float(), pattern.n, pattern.m)
            else:
                mask = mask_lowest(w.abs().float(), cfg.sparsity, dim=1 if cfg.compare == "row" else None)
            new = w.masked_fill(mask, 0)
        before = w.clone()
        layer.weight.copy_(new.to(layer.weight.dtype))
        report[name] = {**_stats(before, layer.weight, pattern), **st, "seconds": time.perf_counter() - t0}
        if acc is not None:
            report[name]["samples"] = acc.n
        bar.set_postfix_str(f"{name} {report[name]['sparsity']:.3f}", refresh=False)
        bar.update(1)

    report: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(targets), desc=cfg.method, unit="layer", disable=not progress, dynamic_ncols=True)
    try:
        if cfg.method not in CALIBRATED:
            for name, layer in targets:
                prune_layer(name, layer)
        else:
            inputs = BlockInputs(model, windows)
            for b in range(inputs.n_blocks):
                prefix = f"layers.{b}."
                block = inputs.block()
                names = [n[len(prefix):] for n, _ in targets if n.startswith(prefix)]
                stages = input_stages(inputs, names)
                if cfg.method == "wanda":
                    accs = collect_stages(inputs, stages, lambda m: InputNorms(m.in_features, m.weight.device))
                else:
                    accs = collect_stages(inputs, stages, lambda m: HessianAccumulator(m.in_features, m.weight.device))
                for stage in stages:
                    for local in stage:
                        prune_layer(prefix + local, block.get_submodule(local), accs[stage[0]])
                del accs
                inputs.advance()
    finally:
        bar.close()
        model.train(was_training)
    return report


def sparsity_totals(model: nn.Module, layers: dict[str, dict]) -> dict:
    """Zeros over the pruned layers and over every parameter of the model (tied tensors counted once)."""
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in layers)
    count = sum(modules[n].weight.numel() for n in layers)
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    all_count = sum(p.numel() for p in model.parameters())
    return {"layers": zeros / count if count else 0.0, "layer_parameters": count,
            "model": all_zeros / all_count, "model_parameters": all_count}


def prune(source: str | None, out: Path, config: PruneConfig, *, calib: str = "builtin", calib_samples: int = 32,
          calib_len: int = 512, seed: int = 0, dtype: str = "float32", force: bool = False,
          progress: bool = True) -> dict:
    """Load ``source`` in float32, prune it with ``config`` and write the float folder ``out`` atomically
    (``prune_report.json`` and ``summary.md`` beside the weights). Returns the report."""
    from llmlab.formats.convert import write_loaded
    from llmlab.formats.load import load_model

    cfg = config.resolved()  # flag errors before any loading
    if out.exists() and not force:
        raise LlmlabError(f"{out} already exists: pass --force to overwrite it")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise LlmlabError(f"--dtype {dtype}: choose float32, float16 or bfloat16")
    text = calibration_text(calib) if cfg.method in CALIBRATED else None  # a missing or empty file fails early
    loaded = load_model(source)
    check_model(loaded.model, cfg)  # before the calibration text is tokenized
    windows = None
    if text is not None:
        if loaded.tokenizer is None:
            raise LlmlabError(f"{source}: has no tokenizer to read the calibration text with")
        windows = token_windows(loaded.tokenizer, text, calib_samples, calib_len, seed)
    t0 = time.perf_counter()
    layers = prune_model_(loaded.model, cfg, windows, progress)
    report = {"source": loaded.source, "config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 2),
              "calibration": None if windows is None else {"source": calib, "samples": calib_samples,
                                                            "tokens": calib_len, "seed": seed},
              "sparsity": sparsity_totals(loaded.model, layers), "layers": layers}
    write_loaded(loaded, out, dtype=dtype,
                 extra_files={"prune_report.json": json.dumps(report, indent=2) + "\n",
                              "summary.md": summary_markdown(report)})
    return report


def summary_markdown(report: dict) -> str:
    cfg, total = report["config"], report["sparsity"]
    target = cfg["pattern"] if cfg["pattern"] != "unstructured" else f"{cfg['sparsity']:.1%} unstructured"
    calib = report["calibration"]
    calib = "none" if calib is None else f"{calib['samples']} x {calib['tokens']} tokens of {calib['source']}"
    lines = [f"# llmlab prune: {cfg['method']}, {target}", "",
             f"- source: {report['source']}",
             f"- scores compared {PruneConfig(**cfg).groups()}",
             f"- calibration: {calib}",
             f"- sparsity achieved: {total['layers']:.4%} of the {total['layer_parameters']:,} weights in "
             f"{len(report['layers'])} pruned layers; {total['model']:.4%} of all {total['model_parameters']:,} "
             "parameters",
             f"- {report['seconds']} s", "", "| layer | sparsity | zeros before | seconds |", "|---|---|---|---|"]
    for name, st in report["layers"].items():
        lines.append(f"| {name} | {st['sparsity']:.4f} | {st['zeros_before']:.4f} | {st['seconds']:.2f} |")
    return "\n".join(lines) + "\n"
