"""Structured pruning: remove whole attention heads and feed-forward channels, into a smaller dense model.

LLM-Pruner (Ma, Fang, Wang, "LLM-Pruner: On the Structural Pruning of Large Language Models", 2023,
arXiv:2305.11627). Unstructured zeros (``prune.py``) keep every matrix its size; structured pruning removes
*dependency groups*, sets of weights that only make sense together, so what is left is an ordinary smaller model.
In a Llama block the groups are

- a feed-forward channel j: row j of ``gate_proj`` and of ``up_proj`` and column j of ``down_proj``;
- a query head h: rows h*d .. (h+1)*d - 1 of ``q_proj`` and the same columns of ``o_proj`` (d = head_dim);
- a KV group g (grouped-query attention): rows of ``k_proj`` and ``v_proj`` for g, and every query head that
  reads g (their ``q_proj`` rows and ``o_proj`` columns).

With GQA the query heads of every KV group must stay equal in number (head h reads group h // (H / KV)), so
``heads="query"`` removes the same count of query heads from every KV group and keeps k/v, ``heads="kv"``
removes whole KV groups, ``heads="none"`` keeps attention whole. Each group gets LLM-Pruner's first-order
(Taylor) importance from calibration text (the paper's Eq. 4 with the element-wise estimate of Eq. 5, summed
over the group as its "sum" aggregation, Eq. 7):

    I(group) = sum over the group's weights w of |w * dL/dw|          (L: next-token loss on calibration windows)

The ``round(S x count)`` least important heads (per KV group) / KV groups and FFN channels are removed from
*every* block, the paper's block-wise local ranking. Removing the same count everywhere keeps the model config
standard (one ``n_heads``, ``n_kv_heads``, ``ffn_dim``): the Hugging Face and GGUF writers, ``llmlab.load``,
transformers and llama.cpp read the pruned model with no per-layer widths. (Per-layer widths would let a global
ranking prune unevenly, but every reader would need them; the paper's LLaMA results use per-block ratios too.)
The pruned model is then optionally recovered with LoRA on the calibration text (``train/recover.py``, the
paper's Section 3.3), the LoRA merged back, and written as a plain float folder.

LoRAPrune (``loraprune.py``, ``train/loraprune.py``) shares the groups, the masks and the shrinking; only its
importance and its schedule differ.

Removing a group is exact: a head's attention output reaches the block only through its ``o_proj`` columns and
an FFN channel only through its ``down_proj`` column, so zeroing those inputs (``UnitMasks``) computes what the
smaller model computes (tested to float error).

Shapes: W (N, K) = (out, in); per-weight scores (N, K); windows (n, T) token ids; H query heads, KV groups,
F FFN channels, d = head_dim.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import calibration_text, token_windows
from llmlab.compress.sparsity import check_sparsity
from llmlab.models.config import ModelConfig

METHODS = ("llm-pruner", "loraprune")
HEAD_MODES = ("query", "kv", "none")
ATTN, FFN = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


@dataclass
class StructuredConfig:
    method: str = "llm-pruner"
    sparsity: float = 0.2  # the share of each block's query heads (per KV group) / KV groups and FFN channels removed
    heads: str = "query"  # query | kv | none: what attention loses

    def resolved(self) -> StructuredConfig:
        if self.method not in METHODS:
            raise LlmlabError(f"unknown structured method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_sparsity(self.sparsity)
        if self.heads not in HEAD_MODES:
            raise LlmlabError(f"--heads {self.heads!r}: choose query (query heads, the same count per KV group), "
                              "kv (whole KV groups) or none")
        return replace(self, sparsity=float(self.sparsity))

    def label(self) -> str:
        return f"{self.method} {self.sparsity:.0%} structured (heads: {self.heads})"


def removed_count(total: int, sparsity: float) -> int:
    """round(S x total), halves rounded up (robust to 0.3 * 10 = 2.9999...)."""
    return math.floor(sparsity * total + 0.5 + 1e-9)


@dataclass(frozen=True)
class Plan:
    """How many units every block removes, and the config of the smaller model."""

    heads_per_group: int  # query heads removed from each KV group (heads="query")
    kv_groups: int  # KV groups removed (heads="kv")
    ffn: int  # FFN channels removed
    config: ModelConfig  # the pruned model's


def plan(cfg: ModelConfig, config: StructuredConfig) -> Plan:
    """The counts ``config`` removes from every block of a model ``cfg``; an error when it would remove every
    head or channel, or when the model is not a dense Llama-family decoder."""
    if cfg.arch != "llama" or cfg.n_experts:
        raise LlmlabError(f"structured pruning needs a dense Llama-family decoder (SwiGLU, GQA), not {cfg.arch}"
                          f"{' with experts' if cfg.n_experts else ''}: use --method magnitude|wanda|sparsegpt")
    hpg = cfg.n_heads // cfg.n_kv_heads
    per_group = removed_count(hpg, config.sparsity) if config.heads == "query" else 0
    kv = removed_count(cfg.n_kv_heads, config.sparsity) if config.heads == "kv" else 0
    ffn = removed_count(cfg.ffn_dim, config.sparsity)
    for what, gone, total in (("query heads of each KV group", per_group, hpg), ("KV groups", kv, cfg.n_kv_heads),
                              ("FFN channels", ffn, cfg.ffn_dim)):
        if gone >= total:
            most = (total - 0.5) / total  # the largest S with round(S x total) < total
            raise LlmlabError(f"--sparsity {config.sparsity:g} would remove all {total} {what} of every block: "
                              f"use --sparsity below {most:.3f}" + (" or --heads none" if "FFN" not in what else ""))
    n_kv = cfg.n_kv_heads - kv
    n_heads = n_kv * (hpg - per_group)
    new = replace(cfg, n_heads=n_heads, n_kv_heads=n_kv, head_dim=cfg.head_dim, ffn_dim=cfg.ffn_dim - ffn,
                  extra=dict(cfg.extra))
    return Plan(per_group, kv, ffn, new)


# ---- group importance ----------------------------------------------------------------------------------------------
def unit_scores(scores: dict[str, torch.Tensor], cfg: ModelConfig, normalize: bool = False) -> dict[str, torch.Tensor]:
    """Per-weight scores of one block's seven projections {leaf name: (N, K)} summed over each dependency group:
    {"heads": (H,) query heads (q_proj rows + o_proj columns), "kv": (KV,) KV groups (their query heads + k_proj
    and v_proj rows), "ffn": (F,) channels (gate_proj and up_proj rows + down_proj columns)}. ``normalize``: each
    projection's group sums are divided by their L2 norm before they are added (LoRAPrune's reference code)."""
    H, KV = cfg.n_heads, cfg.n_kv_heads

    def part(name: str, by_rows: bool, groups: int) -> torch.Tensor:
        s = scores[name].float()
        s = s if by_rows else s.t()  # (units x width, other side)
        s = s.reshape(groups, -1).sum(dim=1)  # (groups,)
        return s / (torch.linalg.vector_norm(s) + 1e-8) if normalize else s

    heads = part("q_proj", True, H) + part("o_proj", False, H)  # (H,)
    kv = heads.reshape(KV, H // KV).sum(dim=1) + part("k_proj", True, KV) + part("v_proj", True, KV)  # (KV,)
    ffn = part("gate_proj", True, cfg.ffn_dim) + part("up_proj", True, cfg.ffn_dim) + part("down_proj", False,
                                                                                            cfg.ffn_dim)  # (F,)
    return {"heads": heads, "kv": kv, "ffn": ffn}


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (n,): True at the k lowest scores (of equal scores the lower index first)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[torch.sort(scores.float().cpu(), stable=True).indices[:k]] = True
    return out


def select_units(units: dict[str, torch.Tensor], cfg: ModelConfig, p: Plan) -> dict[str, torch.Tensor]:
    """Which units one block keeps, from its group scores (``unit_scores``): {"heads": (H,) bool, "kv": (KV,)
    bool, "ffn": (F,) bool}, True = kept. heads="query": the lowest ``p.heads_per_group`` query heads of each KV
    group; heads="kv": the lowest ``p.kv_groups`` KV groups (with all their query heads)."""
    H, KV = cfg.n_heads, cfg.n_kv_heads
    kv_keep = ~lowest(units["kv"], p.kv_groups)  # (KV,)
    per_group = units["heads"].reshape(KV, H // KV)
    heads_keep = torch.stack([~lowest(row, p.heads_per_group) for row in per_group])  # (KV, H / KV)
    heads_keep &= kv_keep[:, None]
    return {"heads": heads_keep.reshape(H), "kv": kv_keep, "ffn": ~lowest(units["ffn"], p.ffn)}


def taylor_scores(model: nn.Module, windows: torch.Tensor, batch: int = 4, progress: bool = True
                  ) -> dict[str, torch.Tensor]:
    """LLM-Pruner's element-wise first-order importance |W * dL/dW|, (N, K), for every attention and FFN
    projection inside the blocks {"layers.i.self_attn.q_proj": ...}; L is the mean next-token cross-entropy over
    every calibration window (the gradient accumulated over micro-batches of ``batch`` windows)."""
    from tqdm import tqdm

    layers = {f"layers.{i}.{kind}.{leaf}": blk.get_submodule(f"{kind}.{leaf}").weight
              for i, blk in enumerate(model.layers) for kind, leaves in (("self_attn", ATTN), ("mlp", FFN))
              for leaf in leaves}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for w in layers.values():
        w.requires_grad_(True)
        w.grad = None
    was = model.training
    model.eval()
    n = windows.shape[0]
    try:
        for s in tqdm(range(0, n, batch), desc="taylor", unit="batch", disable=not progress):
            x = windows[s:s + batch]  # (b, T)
            logits = model(x)  # (b, T, V)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            (loss * (x.shape[0] / n)).backward()
        return {name: (w.detach() * w.grad).abs() for name, w in layers.items()}
    finally:
        for w in layers.values():
            w.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was)


def llm_pruner_keep(model: nn.Module, cfg: ModelConfig, config: StructuredConfig, windows: torch.Tensor,
                    progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """The units every block keeps by LLM-Pruner's Taylor importance (one entry per block, ``select_units``)."""
    p = plan(cfg, config)
    scores = taylor_scores(model, windows, progress=progress)
    keep = []
    for i in range(cfg.n_layers):
        block = {leaf: scores[f"layers.{i}.{kind}.{leaf}"] for kind, leaves in (("self_attn", ATTN), ("mlp", FFN))
                 for leaf in leaves}
        keep.append(select_units(unit_scores(block, cfg), cfg, p))
    return keep


# ---- masks and shrinking -------------------------------------------------------------------------------------------
class UnitMasks:
    """Zero the removed units of every block in the forward pass, leaving the weights as they are: a removed
    query head's slice of ``o_proj``'s input and a removed channel of ``down_proj``'s input become 0. Exactly the
    smaller model's computation; LoRAPrune trains through these masks. ``set(keep)`` replaces the masks."""

    def __init__(self, model: nn.Module, cfg: ModelConfig):
        self.cfg = cfg
        self.masks: list[dict[str, torch.Tensor] | None] = [None] * len(model.layers)
        self.handles = []
        for i, blk in enumerate(model.layers):
            self.handles.append(blk.self_attn.o_proj.register_forward_pre_hook(self._hook(i, "heads")))
            self.handles.append(blk.mlp.down_proj.register_forward_pre_hook(self._hook(i, "ffn")))

    def _hook(self, i: int, what: str):
        def apply(_module, inputs):
            m = self.masks[i]
            if m is None:
                return None
            keep = m[what]
            if what == "heads":  # (H,) -> (H * d,)
                keep = keep.repeat_interleave(self.cfg.head_dim)
            return (inputs[0] * keep.to(inputs[0].dtype),)
        return apply

    def set(self, keep: list[dict[str, torch.Tensor]]) -> None:
        self.masks = list(keep)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def shrink(model: nn.Module, cfg: ModelConfig, keep: list[dict[str, torch.Tensor]]) -> tuple[nn.Module, ModelConfig]:
    """A new, smaller dense model holding ``model``'s weights without the removed units (``keep``: one
    ``select_units`` dict per block, the same counts in every block), and its config."""
    from llmlab.models.registry import build_model, skip_init

    counts = {(int(k["heads"].sum()), int(k["kv"].sum()), int(k["ffn"].sum())) for k in keep}
    if len(counts) != 1:
        raise LlmlabError(f"structured pruning keeps the same counts in every block, got {sorted(counts)}")
    n_heads, n_kv, ffn = counts.pop()
    new_cfg = replace(cfg, n_heads=n_heads, n_kv_heads=n_kv, head_dim=cfg.head_dim, ffn_dim=ffn,
                      extra=dict(cfg.extra))
    d = cfg.head_dim
    sd = dict(model.state_dict())
    for i, k in enumerate(keep):
        rows = {"heads": k["heads"].repeat_interleave(d), "kv": k["kv"].repeat_interleave(d), "ffn": k["ffn"]}
        for leaf, unit, dim in (("self_attn.q_proj", "heads", 0), ("self_attn.k_proj", "kv", 0),
                                ("self_attn.v_proj", "kv", 0), ("self_attn.o_proj", "heads", 1),
                                ("mlp.gate_proj", "ffn", 0), ("mlp.up_proj", "ffn", 0), ("mlp.down_proj", "ffn", 1)):
            idx = rows[unit].nonzero().squeeze(1)
            w = f"layers.{i}.{leaf}.weight"
            sd[w] = sd[w].index_select(dim, idx.to(sd[w].device)).contiguous()
            b = f"layers.{i}.{leaf}.bias"
            if b in sd and dim == 0:
                sd[b] = sd[b].index_select(0, idx.to(sd[b].device)).contiguous()
    with skip_init():
        new = build_model(new_cfg)
    new.load_state_dict(sd)
    return new.to(next(model.parameters()).dtype).eval(), new_cfg


# ---- the command ---------------------------------------------------------------------------------------------------
def prune_structured(source: str | None, out: Path, config: StructuredConfig, *, calib: str = "builtin",
                     calib_samples: int = 16, calib_len: int = 256, seed: int = 0, dtype: str = "float32",
                     force: bool = False, progress: bool = True, select: Callable | None = None,
                     recover: Callable | None = None) -> dict:
    """Load ``source`` in float32, choose the units to remove (``select(model, loaded, windows)`` -> (keep,
    info); default LLM-Pruner's Taylor importance), shrink the model, optionally ``recover(model, loaded,
    windows)`` it (LoRA recovery), and write the smaller float folder ``out`` atomically with
    ``prune_report.json`` and ``summary.md``. Returns the report."""
    from llmlab.formats.convert import write_loaded
    from llmlab.formats.load import load_model

    cfg = config.resolved()
    if out.exists() and not force:
        raise LlmlabError(f"{out} already exists: pass --force to overwrite it")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise LlmlabError(f"--dtype {dtype}: choose float32, float16 or bfloat16")
    loaded = load_model(source)
    p = plan(loaded.config, cfg)  # errors before the calibration text is read
    text = calibration_text(calib)
    if loaded.tokenizer is None:
        raise LlmlabError(f"{source}: has no tokenizer to read the calibration text with")
    windows = token_windows(loaded.tokenizer, text, calib_samples, calib_len, seed)
    params_before = sum(p.numel() for p in loaded.model.parameters())  # tied once
    t0 = time.perf_counter()
    info: dict = {}
    if select is None:
        keep = llm_pruner_keep(loaded.model, loaded.config, cfg, windows, progress)
    else:
        keep, info = select(loaded.model, loaded, windows)
    loaded.model, loaded.config = shrink(loaded.model, loaded.config, keep)
    seconds = time.perf_counter() - t0
    recovery = recover(loaded.model, loaded, windows) if recover is not None else None
    c = loaded.config
    report = {"source": loaded.source, "config": asdict(cfg), "seconds": round(seconds, 2),
              "calibration": {"source": calib, "samples": calib_samples, "tokens": calib_len, "seed": seed},
              "removed_per_block": {"query_heads_per_kv_group": p.heads_per_group, "kv_groups": p.kv_groups,
                                    "ffn_channels": p.ffn},
              "shape": {"n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim,
                        "ffn_dim": c.ffn_dim},
              "parameters": {"before": params_before, "after": sum(p.numel() for p in loaded.model.parameters())},
              "kept": [{k: v.nonzero().squeeze(1).tolist() for k, v in blk.items()} for blk in keep],
              **info, "recovery": recovery}
    report["parameters"]["share_removed"] = 1 - report["parameters"]["after"] / params_before
    write_loaded(loaded, out, dtype=dtype,
                 extra_files={"prune_report.json": json.dumps(report, indent=2) + "\n",
                              "summary.md": summary_markdown(report)})
    return report


def summary_markdown(report: dict) -> str:
    cfg, p, s, r = report["config"], report["parameters"], report["shape"], report["removed_per_block"]
    c = report["calibration"]
    lines = [f"# llmlab prune: {StructuredConfig(**cfg).label()}", "",
             f"- source: {report['source']}",
             f"- calibration: {c['samples']} x {c['tokens']} tokens of {c['source']}",
             f"- removed from every block: {r['query_heads_per_kv_group']} query heads per KV group, "
             f"{r['kv_groups']} KV groups, {r['ffn_channels']} FFN channels",
             f"- the pruned model: {s['n_heads']} query heads, {s['n_kv_heads']} KV heads of {s['head_dim']}, "
             f"FFN {s['ffn_dim']}",
             f"- parameters: {p['before']:,} -> {p['after']:,} ({p['share_removed']:.2%} removed)",
             f"- {report['seconds']} s"]
    rec = report.get("recovery")
    if rec:
        lines.append(f"- recovery: {rec['steps']} steps; held-out perplexity {rec['perplexity_before']:.3f} -> "
                     f"{rec['perplexity_after']:.3f}")
    return "\n".join(lines) + "\n"
