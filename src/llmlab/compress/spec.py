"""What a quantized model records about itself (``config.json``'s ``quantization_config``) and which layers a
method touches.

The layers: every ``nn.Linear`` inside the transformer blocks (attention and MLP projections). Embeddings,
norms and the LM head stay in float, as GPTQ, SmoothQuant and LLM.int8() leave them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from llmlab.common import LlmlabError

METHODS = ("absmax", "zeropoint", "rtn", "gptq", "nf4", "llm-int8", "smoothquant", "zeroquant")
# bits each method accepts (NF4 is 4-bit by definition; LLM.int8() and SmoothQuant's W8A8 are 8-bit)
METHOD_BITS = {"absmax": (2, 3, 4, 5, 6, 7, 8), "zeropoint": (2, 3, 4, 5, 6, 7, 8), "rtn": (2, 3, 4, 5, 6, 7, 8),
               "gptq": (2, 3, 4, 8), "nf4": (4,), "llm-int8": (8,), "smoothquant": (8,), "zeroquant": (4, 8)}


@dataclass
class QuantSpec:
    method: str
    bits: int = 8
    group_size: int = 0  # 0 = per output channel, -1 = per tensor, else columns per group
    symmetric: bool = True
    act: str = "none"  # "none" | "token" (W8A8 per-token dynamic) | "llm-int8"
    act_bits: int = 8
    threshold: float = 6.0  # LLM.int8() outlier threshold
    alpha: float = 0.5  # SmoothQuant migration strength
    options: dict = field(default_factory=dict)  # method-specific, recorded as given (e.g. GPTQ damp, act order)
    modules: list[str] = field(default_factory=list)  # the quantized layers, filled in by the method

    def to_json(self) -> dict:
        return {"quant_method": "llmlab", **asdict(self)}


def check_bits(method: str, bits: int) -> None:
    if method not in METHODS:
        raise LlmlabError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if bits not in METHOD_BITS[method]:
        raise LlmlabError(f"--method {method} does not support --bits {bits}: choose one of "
                          f"{', '.join(map(str, METHOD_BITS[method]))}")


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every nn.Linear inside ``model.layers`` (the blocks), in forward order; an error when
    there are none (a model without the target layers, or one quantized already)."""
    blocks = getattr(model, "layers", None)
    modules = [] if blocks is None else blocks.named_modules()
    found = [(f"layers.{n}", m) for n, m in modules if isinstance(m, nn.Linear)]
    if not found:
        raise LlmlabError("the model has no linear layers inside transformer blocks to quantize "
                          "(is it quantized already, or not a decoder/encoder with .layers?)")
    return found


def check_group(name: str, layer: nn.Linear, group_size: int) -> None:
    if group_size > 0 and layer.in_features % group_size:
        raise LlmlabError(f"--group-size {group_size} does not divide {name}'s {layer.in_features} input features: "
                          "use a divisor of every layer's width (e.g. 32 or 64), 0 (per channel) or -1 (per tensor)")


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
