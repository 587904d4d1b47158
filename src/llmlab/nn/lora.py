"""LoRA: a trainable low-rank update beside a frozen linear layer, applied to a built model as a module swap.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of Large Language Models",
2021, arXiv:2106.09685. rsLoRA scaling: Kalajdzievski, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA", 2023, arXiv:2312.03732.

    y = base(x) + (alpha / r) * B (A dropout(x))          (rsLoRA: alpha / sqrt(r))

``A`` (r, in) starts Kaiming-uniform like ``nn.Linear`` (as peft does), ``B`` (out, r) starts at zero, so a
freshly wrapped model computes exactly what it did before. Only ``A`` and ``B`` train.

``LoRALinear`` holds the original layer as ``base_layer`` (the same object: nothing is copied) and adds
``lora_A`` / ``lora_B``; parameter names follow peft (``<path>.lora_A.weight``), which makes the PEFT
adapter files (``llmlab.formats.peft``) a renaming. The base may be an ``nn.Linear`` or a quantized frozen
layer with ``in_features`` / ``out_features`` (``llmlab.nn.nf4.NF4Linear``, or the GGUF's own packed blocks
``llmlab.nn.packed_linear.PackedLinear``: QLoRA, see ``llmlab.nn.qlora``).

``merge()`` adds the update into an ``nn.Linear`` base weight in place and ``unmerge()`` subtracts it
again (equal up to float rounding); a quantized base is first turned into an ``nn.Linear`` holding its
dequantized weight (``llmlab.nn.qlora.dequantize_linears_``). Both are idempotent: merging a merged layer
(or unmerging an unmerged one) does nothing. While merged, ``forward`` is the base layer alone, so no
gradient reaches A and B: merge for inference or export, unmerge before training on.

Target modules (``LoRAConfig.target_modules``, the rules of peft's ``target_modules``):

- a list of names: a module matches when its full path equals a name or ends with ``"." + name``
  (``["q_proj", "v_proj"]``, or full paths such as ``"layers.0.mlp.up_proj"``);
- ``"all-linear"``: every linear layer except the output head ``lm_head``;
- any other string: a regular expression that must match the full module path (``re.fullmatch``).

Shapes: x (..., in) -> (..., out); A (r, in); B (out, r).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.nn.nf4 import NF4Linear
from llmlab.nn.packed_linear import PackedLinear

LINEAR_TYPES = (nn.Linear, NF4Linear, PackedLinear)  # what LoRA can wrap ("all-linear" means these)
OUTPUT_HEAD = "lm_head"  # left out by "all-linear", as in peft


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r

    def validate(self) -> LoRAConfig:
        if not isinstance(self.r, int) or self.r <= 0:
            raise LlmlabError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LlmlabError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise LlmlabError("LoRA target_modules is empty: give names (q_proj, v_proj), 'all-linear' or a regex")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise LlmlabError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        w = getattr(base_layer, "weight", None)
        device = (w if w is not None else next(base_layer.buffers())).device
        dtype = w.dtype if w is not None and w.is_floating_point() else torch.float32
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.enabled = True  # False: the base layer alone (e.g. a DPO reference model without a copy)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as peft
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = self.base_layer(x2)  # (N, out), a fresh tensor that no backward needs
        b = self.lora_B.weight  # (out, r)
        h = self.lora_A(self.lora_dropout(x2.to(b.dtype)))  # (N, r)
        if y.dtype == b.dtype and y.is_contiguous():
            # y += scaling * h B^T inside the GEMM (beta = 1): no (N, out) temporaries for the product, the
            # scaled product and the sum, and the backward hands the gradient to y unchanged.
            y.addmm_(h, b.t(), alpha=self.scaling)
        else:  # a base computing in another dtype (e.g. bf16 NF4 under fp32 adapters)
            y = (y + F.linear(h, b) * self.scaling).to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), in the LoRA weights' dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _check_mergeable(self) -> nn.Linear:
        if not isinstance(self.base_layer, nn.Linear):
            raise LlmlabError(f"cannot merge LoRA into a {type(self.base_layer).__name__} in place: "
                              "dequantize the base to an nn.Linear first (llmlab.nn.qlora.dequantize_linears_)")
        return self.base_layer

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B A in place (no copy of W). A no-op when already merged."""
        base = self._check_mergeable()
        if not self.merged:
            base.weight += self.delta_weight().to(base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling * B A in place. A no-op when not merged."""
        base = self._check_mergeable()
        if self.merged:
            base.weight -= self.delta_weight().to(base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ---- model transforms --------------------------------------------------------------------------------


def matches_target(name: str, targets: list[str] | str, module: nn.Module | None = None) -> bool:
    """Whether the module at path ``name`` is selected by ``targets`` (rules in the module docstring)."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return isinstance(module, LINEAR_TYPES) and name.rpartition(".")[2] != OUTPUT_HEAD
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def apply_lora_(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap each targeted linear layer of ``model`` in a ``LoRALinear`` in place; return the wrapped paths.

    Freezes nothing else: call ``mark_only_lora_trainable_`` for LoRA training. A target list that selects
    no linear layer, or a model that already has LoRA layers, is an ``LlmlabError``.
    """
    config.validate()
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LlmlabError("the model already has LoRA layers: merge or remove them (remove_lora_) first")
    shared = _shared_weights(model)
    chosen = [(n, m) for n, m in model.named_modules()
              if n and isinstance(m, LINEAR_TYPES) and matches_target(n, config.target_modules, m)]
    if not chosen:
        names = sorted({n.rpartition(".")[2] for n in _linear_names(model)})
        raise LlmlabError(f"LoRA target_modules {config.target_modules!r} match no linear layer; "
                          f"linear layer names: {', '.join(names) or '(none)'} (or 'all-linear', or a regex "
                          "over full paths like 'layers.0.self_attn.q_proj')")
    for name, m in chosen:
        if id(getattr(m, "weight", None)) in shared:
            raise LlmlabError(f"{name} shares its weight with another module (tied embeddings): "
                              "leave it out of target_modules")
    for name, m in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(m, config.r, config.alpha, config.dropout, config.use_rslora))
    return [name for name, _ in chosen]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: ``<path>.lora_A.weight`` (r, in) and ``<path>.lora_B.weight`` (out, r)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def copy_adapter_tensors_(ours: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], where: str, kind: str,
                          size_word: str) -> None:
    """Copy ``sd`` into the model's adapter tensors ``ours`` (same keys, every shape equal), checking all of
    it before copying anything, so a failed load changes nothing. ``kind`` / ``size_word`` name the adapter
    and its size setting in the error ("LoRA", "rank")."""
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LlmlabError(f"{where}: {kind} tensors do not match the model's {kind} layers ({detail}); "
                          "was the adapter made for another model?")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise LlmlabError(f"{where}: {k} has shape {tuple(v.shape)}, the model needs {tuple(ours[k].shape)} "
                              f"(an adapter for another base model or {size_word})")
    with torch.no_grad():
        for k, v in sd.items():
            ours[k].copy_(v)


def load_lora_state_dict_(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy adapter weights into the model's LoRA layers; every layer must get both matrices, shapes equal."""
    copy_adapter_tensors_(lora_state_dict(model), sd, where, "LoRA", "rank")


def mark_only_lora_trainable_(model: nn.Module) -> int:
    """requires_grad = True for LoRA A/B only, False for everything else; returns the trainable count."""
    model.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora_(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora_(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def remove_lora_(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put each base layer back in place of its LoRALinear (merged into it first when ``merge``)."""
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, m.base_layer)
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model as its base alone inside the block (for example a DPO reference without a second copy)."""
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise LlmlabError("cannot disable merged LoRA layers: unmerge them first (unmerge_lora_)")
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def lora_reference_forward(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's formula with the merged weight, for tests: x (W + s B A)^T + bias."""
    return F.linear(x, weight + scaling * (b @ a), bias)
