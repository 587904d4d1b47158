"""``llmlab merge RUN_OR_ADAPTER``: fold a LoRA adapter into its base and write a plain model.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685) adds
``scaling * B A`` to each wrapped weight, so the sum is an ordinary linear layer: ``W' = W + scaling * B A``,
with the same outputs and no adapter at inference time.

A QLoRA base (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, arXiv:2305.14314)
is NF4 or packed GGML blocks: the adapter was trained against the *rounded* weights, so the merge folds it
into the dequantized base, ``W' = dequant(Q(W)) + scaling * B A`` (the base's rounding is kept, which is what
makes the merged model compute what the adapter model computed). Written as an HF folder (fp32 by default,
``dtype``) that is exact up to float rounding, or as GGUF with ``qtype`` F32 / F16 / BF16 / Q8_0 / Q4_1: a
second, independent rounding of the merged weights (Q8_0 / Q4_1 re-quantize them; the 4-bit blocks the base
may have come in are not reused, since the merged weights are no longer on their grid).

Prompt tuning, prefix tuning and bottleneck adapters add virtual tokens or modules rather than a weight
update: they cannot be merged, and saying so is an error. A full fine-tuning run is written as it is.
Outputs are atomic (a temporary folder or file renamed into place).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from llmlab.common import LlmlabError
from llmlab.formats.convert import write_loaded
from llmlab.formats.gguf_model import WRITE_TYPES
from llmlab.formats.load import Loaded, load_model, resolve_fine_tuned
from llmlab.nn.lora import remove_lora_
from llmlab.nn.qlora import dequantize_linears_

GGUF_QTYPES = WRITE_TYPES
DTYPES = ("float32", "float16", "bfloat16")


def fold_lora_(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight and remove the LoRA wrappers; every quantized layer (NF4,
    packed) becomes the float nn.Linear of its dequantized weight first (``llmlab.nn.qlora``). A plain model
    that computes what the adapter model computed. In place; returns the model."""
    dequantize_linears_(model)
    return remove_lora_(model, merge=True)


def default_output(source: Path) -> Path:
    """RUN/merged for a run folder; ``<adapter>-merged`` beside an adapter folder."""
    if (source / "sft_config.json").is_file():
        return source / "merged"
    return source.with_name(source.name + "-merged")


def merged_model(source: str | Path) -> Loaded:
    """Load a run or adapter folder and fold its LoRA adapter into the (dequantized) base."""
    ft = resolve_fine_tuned(Path(source))
    if ft.model is None and ft.peft_type != "LORA":
        raise LlmlabError(f"{ft.adapter}: a {ft.peft_type} adapter adds virtual tokens or modules, not a weight "
                          "update, so it cannot be merged into the weights; load it as is (--model / "
                          "llmlab.load) instead")
    loaded = load_model(source)
    fold_lora_(loaded.model)
    loaded.source = f"merged {loaded.source}"
    return loaded


def merge(source: str | Path, out: str | Path | None = None, *, dtype: str = "float32", qtype: str = "F16",
          force: bool = False) -> Path:
    """Write the merged model of a run or adapter folder: an HF folder, or a GGUF file when ``out`` ends in
    .gguf. ``out`` defaults to ``default_output(source)``; an existing output needs ``force``."""
    source = Path(source)
    if dtype not in DTYPES:
        raise LlmlabError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if qtype not in GGUF_QTYPES:
        raise LlmlabError(f"GGUF qtype must be one of {', '.join(GGUF_QTYPES)}, got {qtype!r}")
    output = Path(out) if out is not None else default_output(source)
    if output.exists() and not force:
        raise LlmlabError(f"{output} already exists: pass --force to overwrite it, or --out elsewhere")
    loaded = merged_model(source)
    write_loaded(loaded, output, dtype=dtype, qtype=qtype, name=f"{source.name} (merged)")
    return output
