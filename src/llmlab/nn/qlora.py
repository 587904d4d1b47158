"""QLoRA bases: a model's linear layers as frozen quantized layers under LoRA, and back to float for merging.

Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs", 2023,
arXiv:2305.14314: the frozen base is stored in 4 bits and dequantized on the fly; gradients flow through it
to LoRA adapters (Hu et al. 2021, arXiv:2106.09685) kept in the compute dtype. Two bases here:

- ``"nf4"``: the paper's NormalFloat-4 with double quantization (``llmlab.nn.nf4.NF4Linear``);
- ``"packed"``: GGML blocks (``llmlab.nn.packed_linear.PackedLinear``). A model loaded with
  ``packed=True`` from a GGUF keeps the file's own Q4_1 / Q4_0 / Q8_0 blocks as the base (no requantization,
  so the adapter trains against exactly the weights llama.cpp runs); any other linear layer is quantized to
  Q8_0. Packed layers always multiply in float32 (``impl="float"``, not the int8 decode kernel).

Both layers give dL/dx and no weight gradient, re-dequantizing in backward instead of saving a float copy.
The output head ``lm_head`` (often tied to the embedding) is left as it is, as in the paper.

``merge_lora_`` folds an adapter into an ``nn.Linear`` weight, so ``dequantize_linears_`` first turns every
quantized layer (also those inside ``LoRALinear.base_layer``) into an ``nn.Linear`` holding its dequantized
weight: merged = dequantized base + scaling * B A, equal to the unmerged QLoRA model up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.nn.ggml_quants import quantize_q8_0
from llmlab.nn.lora import OUTPUT_HEAD, LoRALinear
from llmlab.nn.nf4 import BLOCK_SIZE, NF4Linear, quantize_linears_nf4_
from llmlab.nn.packed_linear import PackedLinear

QUANTIZED_TYPES = (NF4Linear, PackedLinear)
BASES = ("nf4", "packed")
Q8_0 = 8  # ggml type id


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once (tied weights once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def _is_head(name: str) -> bool:
    return name.rpartition(".")[2] == OUTPUT_HEAD or name.endswith(f"{OUTPUT_HEAD}.base_layer")


def dequantize_linears_(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ``NF4Linear`` / ``PackedLinear`` of ``model`` (also a ``LoRALinear``'s ``base_layer``) by a
    frozen ``nn.Linear`` holding the dequantized weight (out, in) in ``dtype``; return the replaced paths.

    A dequantized tied head equal to the embedding (a packed GGUF's ``lm_head`` is packed from
    ``token_embd``, and the float embedding was dequantized from the same blocks) shares its tensor again."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]
    emb = getattr(getattr(model, "embed_tokens", None), "weight", None)
    for name, m in targets:
        w = m.dequantize(dtype) if isinstance(m, NF4Linear) else m.dequantized().to(dtype)  # (out, in)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=dtype)
        if _is_head(name) and emb is not None and emb.shape == w.shape and emb.dtype == dtype and torch.equal(emb, w):
            lin.weight = emb  # tied again: no second copy of the embedding
        else:
            lin.weight = nn.Parameter(w, requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(dtype).clone(), requires_grad=False)
        _set(model, name, lin)
    return [name for name, _ in targets]


def _pack_q8_0(linear: nn.Linear) -> PackedLinear:
    packed = quantize_q8_0(linear.weight.detach().float().cpu())  # (out * in / 32 * 34,) uint8
    return PackedLinear(packed, Q8_0, linear.in_features, linear.out_features, linear.bias, impl="float")


def prepare_qlora_(model: nn.Module, base: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                   double_quant: bool = True, block_size: int = BLOCK_SIZE) -> dict:
    """Turn the linear layers of a loaded model (all but ``lm_head``) into the frozen quantized QLoRA base,
    in place, before ``apply_lora_``. Returns what it did::

        {"base", "quantized": [paths quantized now], "kept": [paths already packed, kept as they are],
         "left_float": [linear paths left in float], "bytes_before", "bytes_after"}

    ``base="nf4"``: ``quantize_linears_nf4_`` (block 64, double quantization by default, ``compute_dtype``
    fp32 or bf16). ``base="packed"``: the model's PackedLinear layers (``load_model(packed=True)`` of a GGUF)
    are kept; the other linear layers with in_features % 32 == 0 are quantized to Q8_0 (float32 compute).
    Parameters outside the linear layers (embedding, norms) are not frozen here: ``mark_only_lora_trainable_``.
    """
    if base not in BASES:
        raise LlmlabError(f"unknown QLoRA base {base!r}: use one of {', '.join(BASES)}")
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LlmlabError(f"QLoRA compute dtype must be float32, bfloat16 or float16, not {compute_dtype}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LlmlabError("the model already has LoRA layers: prepare the QLoRA base before apply_lora_")
    packed_now = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    before = model_bytes(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    heads = [n for n in linears if _is_head(n)]
    kept: list[str] = []
    if base == "nf4":
        if packed_now:
            raise LlmlabError("the model holds packed GGML layers (loaded with packed=True): use base='packed', "
                              "or load it without packed for an NF4 base")
        quantized = quantize_linears_nf4_(model, compute_dtype, skip=tuple(heads), block_size=block_size,
                                          double_quant=double_quant)
    else:
        if compute_dtype != torch.float32:
            raise LlmlabError(f"the packed QLoRA base multiplies in float32, not {compute_dtype}: use "
                              "compute_dtype=torch.float32, or base='nf4' for bf16 compute")
        kept = [n for n in packed_now if not _is_head(n)]
        for name in packed_now:  # training multiplies float activations, as backward does (not the int8 kernel)
            model.get_submodule(name).impl = "float"
        quantized = []
        for name in linears:
            m = model.get_submodule(name)
            if name not in heads and m.in_features % 32 == 0:
                _set(model, name, _pack_q8_0(m))
                quantized.append(name)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"base": base, "quantized": quantized, "kept": kept, "left_float": left,
            "bytes_before": before, "bytes_after": model_bytes(model)}
