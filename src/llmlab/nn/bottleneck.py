"""Houlsby bottleneck adapters: a small trainable MLP after each sublayer's output, applied as a module swap.

Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly, "Parameter-Efficient
Transfer Learning for NLP", 2019, arXiv:1902.00751.

    adapter(h) = h + W_up f(W_down h + b_down) + b_up        (the internal skip connection)

The paper puts one adapter after the attention block's output projection and one after the feed-forward
block, both before the residual add (its Figure 2). In a ``DecoderLM`` those outputs are
``layers.N.self_attn.o_proj`` and ``layers.N.mlp.down_proj``, so wrapping those two linear layers places the
adapters exactly there and no decoder code changes: ``x + adapter(o_proj(attn))``.

``W_down`` (dim, d) projects to the bottleneck width ``dim`` (64 by default), ``W_up`` (d, dim) back. The paper
starts near the identity with small random weights; here ``W_up`` and both biases start at zero, so a freshly
adapted model computes exactly what it did before (as LoRA's B = 0), while ``W_down`` starts like
``nn.Linear`` so the first gradient on ``W_up`` is non-zero. Only the adapters train, plus (an option, on by
default, as in the paper) every layer norm's parameters.

``BottleneckLinear`` holds the original layer as ``base_layer`` (the same object, not copied) and adds
``adapter_down`` / ``adapter_up``; parameter names are ``<path>.adapter_down.weight`` etc. Hugging Face
``peft`` has no Houlsby adapter; ``llmlab.formats.peft_prompt`` writes an llmlab-only adapter folder for it.

Shapes: x (..., in) -> base (..., out) -> adapter (..., out); W_down (d, out), W_up (out, d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.nn.lora import copy_adapter_tensors_
from llmlab.nn.norm import RMSNorm

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
SUBLAYERS = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}  # the output layer of each sublayer
NORM_TYPES = (RMSNorm, nn.LayerNorm)


@dataclass
class BottleneckConfig:
    dim: int = 64  # bottleneck width d (the paper sweeps 8..256)
    activation: str = "gelu"
    sublayers: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # after which sublayer outputs

    def validate(self) -> BottleneckConfig:
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise LlmlabError(f"bottleneck dim must be a positive integer, got {self.dim!r}")
        if self.activation not in ACTIVATIONS:
            raise LlmlabError(f"bottleneck activation {self.activation!r} is unknown: use one of "
                              f"{', '.join(ACTIVATIONS)}")
        bad = [s for s in self.sublayers if s not in SUBLAYERS]
        if bad or not self.sublayers:
            raise LlmlabError(f"bottleneck sublayers {self.sublayers!r}: give a non-empty subset of "
                              f"{', '.join(SUBLAYERS)}")
        return self


class BottleneckLinear(nn.Module):
    """A frozen linear layer followed by a Houlsby adapter with its own skip connection."""

    def __init__(self, base_layer: nn.Module, dim: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise LlmlabError(f"bottleneck activation {activation!r} is unknown: use one of {', '.join(ACTIVATIONS)}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.dim, self.activation = dim, activation
        w = getattr(base_layer, "weight", None)
        device = (w if w is not None else next(base_layer.buffers())).device
        dtype = w.dtype if w is not None and w.is_floating_point() else torch.float32
        self.adapter_down = nn.Linear(self.out_features, dim, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(dim, self.out_features, device=device, dtype=dtype)
        self.enabled = True
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))  # nn.Linear's default
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # W_up = 0, b_up = 0: the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (..., out)
        if not self.enabled:
            return h
        z = ACTIVATIONS[self.activation](self.adapter_down(h.to(self.adapter_down.weight.dtype)))  # (..., d)
        return (h + self.adapter_up(z)).to(h.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, activation={self.activation}"


def bottleneck_reference(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                         b_up: torch.Tensor, activation: str = "gelu") -> torch.Tensor:
    """The paper's formula written out, for tests: h + f(h W_down^T + b_down) W_up^T + b_up.
    h (..., n); w_down (d, n); w_up (n, d)."""
    f = ACTIVATIONS[activation]
    return h + f(h @ w_down.T + b_down) @ w_up.T + b_up


# ---- model transforms --------------------------------------------------------------------------------


def bottleneck_modules(model: nn.Module) -> dict[str, BottleneckLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLinear)}


def apply_bottleneck_(model: nn.Module, cfg: BottleneckConfig) -> list[str]:
    """Wrap each chosen sublayer output (``layers.N.self_attn.o_proj``, ``layers.N.mlp.down_proj``) in a
    ``BottleneckLinear`` in place; return the wrapped paths. Freezes nothing: call
    ``mark_only_bottleneck_trainable_`` for adapter training."""
    cfg.validate()
    if bottleneck_modules(model):
        raise LlmlabError("the model already has bottleneck adapters: load or train those instead")
    suffixes = tuple("." + SUBLAYERS[s] for s in cfg.sublayers)
    chosen = [(n, m) for n, m in model.named_modules() if n.endswith(suffixes) and hasattr(m, "out_features")]
    if not chosen:
        raise LlmlabError(f"no {' / '.join(SUBLAYERS[s] for s in cfg.sublayers)} layer in this model: bottleneck "
                          "adapters need a decoder with those sublayer outputs (a mixture-of-experts feed-forward "
                          "has no mlp.down_proj: use sublayers=['attn'])")
    for name, m in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, BottleneckLinear(m, cfg.dim, cfg.activation))
    return [name for name, _ in chosen]


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``<path>.adapter_down.{weight,bias}`` (d, out) / (d,), ``<path>.adapter_up...``
    (out, d) / (out,)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in bottleneck_modules(model).items():
        for part in ("adapter_down", "adapter_up"):
            lin = getattr(m, part)
            out[f"{name}.{part}.weight"] = lin.weight.detach()
            out[f"{name}.{part}.bias"] = lin.bias.detach()
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without the adapters, under the names it has unadapted (``<path>.base_layer.weight``
    -> ``<path>.weight``): what a plain folder of the base model holds."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if ".adapter_down." not in k and ".adapter_up." not in k}


def load_bottleneck_state_dict_(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy adapter tensors into the model's bottleneck adapters: the same keys, every shape equal."""
    copy_adapter_tensors_(bottleneck_state_dict(model), sd, where, "bottleneck", "bottleneck dim")


def mark_only_bottleneck_trainable_(model: nn.Module, train_norms: bool = True) -> int:
    """requires_grad = True for the adapters (and, with ``train_norms``, every RMSNorm / LayerNorm, as
    Houlsby et al. do), False for everything else; returns the trainable count."""
    model.requires_grad_(False)
    for m in bottleneck_modules(model).values():
        m.adapter_down.requires_grad_(True)
        m.adapter_up.requires_grad_(True)
    if train_norms:
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                m.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
