"""Quality of each decode path against the plain fp32 reference: perplexity on a fixed text and the
largest logit difference, SmolLM2-135M-Instruct (the embedded GGUF).

The text is teacher-forced through the KV cache in chunks of --chunk tokens, so the packed path's
packed-block kernel (used for up to 64 rows per call) is what is measured, as in decoding.

    python benchmarks/quality.py [--tokens 512] [--chunk 32]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math

import torch
import torch.nn.functional as F

from llmlab import load


def fixed_text() -> str:
    # A fixed, version-independent text: this project's JSON encoder docs and code would drift, so use
    # the json module's own docstring plus a few lines of prose, as shipped with the interpreter.
    return inspect.getdoc(json) + "\n\n" + (inspect.getdoc(json.JSONEncoder) or "")


@torch.inference_mode()
def logits_of(llm, ids: list[int], chunk: int) -> torch.Tensor:
    model = llm.model
    cache = model.new_cache(1, len(ids))
    x = torch.tensor([ids])
    outs = []
    for s in range(0, len(ids), chunk):
        outs.append(model(x[:, s:s + chunk], cache=cache).float())
    return torch.cat(outs, 1)[0]  # (T, V)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens of the fixed text (default: 512)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward pass (default: 32)")
    args = p.parse_args()
    ref = load()
    ids = ref.tokenizer.encode(fixed_text())[:args.tokens]
    targets = torch.tensor(ids[1:])
    base = logits_of(ref, ids, args.chunk)
    paths = {"fp32 reference": ref, "packed (GGUF blocks)": load(packed=True),
             "bfloat16": load(dtype="bfloat16"), "float16": load(dtype="float16")}
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens of a fixed text, chunks of {args.chunk}")
    print(f"{'path':<28}{'perplexity':>12}{'max |Δ logit|':>16}{'mean |Δ logit|':>16}")
    for name, llm in paths.items():
        logits = base if llm is ref else logits_of(llm, ids, args.chunk)
        ppl = math.exp(F.cross_entropy(logits[:-1], targets).item())
        diff = (logits - base).abs()
        print(f"{name:<28}{ppl:>12.4f}{diff.max().item():>16.4f}{diff.mean().item():>16.5f}")


if __name__ == "__main__":
    main()
