"""Quality of each decode path against the plain fp32 reference, SmolLM2-135M-Instruct (the embedded GGUF):
perplexity on a fixed text, max / mean |Δ logit|, and teacher-forced top-1 agreement (the share of
positions whose argmax equals the reference's). Goal for every packed kernel: perplexity within 0.5% of
the reference, top-1 agreement >= 99%.

The text is teacher-forced through the KV cache in chunks of --chunk tokens, so the kernels used while
decoding are what is measured: the native C step (up to 64 rows a call), the eager blocks on the int8
kernel, both again with residual Q8 blocks for every block (``--packed-kernel int8x2``) and only for the blocks
with an outlier (``int8r``, max|x| > T mean|x|, swept over --thresholds, with the share of blocks flagged per layer
type on the eager blocks' inputs; the default one also on a float16 KV cache, ``--kv-dtype float16``), the
float-activation kernel (up to 64 rows), each CPU variant of the int8 kernel this machine runs.

    python benchmarks/quality.py [--tokens 512] [--chunk 32] [--thresholds 3,4,6,8]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os

import torch
import torch.nn.functional as F

from llmlab import load
from llmlab.nn import packed_linear
from llmlab.nn.cpu_kernels import best_variant, runnable_variants, speed_flags
from llmlab.nn.packed_linear import RESIDUAL_T, PackedLinear, kernel_build, set_impl_


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


def flagged(x: torch.Tensor, t: float) -> tuple[int, int]:
    """(flagged, all) blocks of 32 in x (.., K) under quantize_rows' rule: t * sum|q| < 127 * 32, q the Q8 codes."""
    blocks = x.float().reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    codes = torch.where(amax == 0, torch.zeros_like(blocks), (blocks * 127 / amax).round())
    return int((t * codes.abs().sum(1) < 127 * 32).sum()), blocks.shape[0]


@torch.inference_mode()
def flagged_shares(llm, ids: list[int], chunk: int, thresholds: list[float]) -> dict[str, list[float]]:
    """{layer type: [share of activation blocks flagged at each threshold]} over the eager blocks' packed inputs."""
    counts: dict[str, list[list[int]]] = {}

    def hook(name):
        def fn(_module, inputs):
            c = counts.setdefault(name, [[0, 0] for _ in thresholds])
            for i, t in enumerate(thresholds):
                f, n = flagged(inputs[0], t)
                c[i][0] += f
                c[i][1] += n
        return fn

    handles = [m.register_forward_pre_hook(hook(name.split(".")[-1])) for name, m in llm.model.named_modules()
               if isinstance(m, PackedLinear) and not name.endswith(("k_proj", "v_proj", "up_proj"))]  # shared inputs
    native, llm.model.native_step = llm.model.native_step, None
    try:
        logits_of(llm, ids, chunk)
    finally:
        llm.model.native_step = native
        for h in handles:
            h.remove()
    return {name: [f / n for f, n in c] for name, c in counts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens of the fixed text (default: 512)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward pass (default: 32)")
    p.add_argument("--thresholds", default="3,4,6,8",
                   help=f"int8r outlier thresholds T to sweep, comma-separated (default: 3,4,6,8; the library's: "
                        f"{RESIDUAL_T:g})")
    args = p.parse_args()
    ref = load()
    ids = ref.tokenizer.encode(fixed_text())[:args.tokens]
    targets = torch.tensor(ids[1:])
    base = logits_of(ref, ids, args.chunk)
    ref_ppl = math.exp(F.cross_entropy(base[:-1], targets).item())
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens of a fixed text, chunks of {args.chunk}; "
          f"CPU flags: {speed_flags()}")
    print(f"{'path':<44}{'perplexity':>11}{'Δ ppl':>9}{'max |Δ logit|':>15}{'mean |Δ logit|':>16}{'top-1 agree':>13}")

    def row(name: str, logits: torch.Tensor) -> None:
        ppl = math.exp(F.cross_entropy(logits[:-1], targets).item())
        diff = (logits - base).abs()
        agree = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
        print(f"{name:<44}{ppl:>11.4f}{(ppl / ref_ppl - 1):>+9.3%}{diff.max().item():>15.4f}"
              f"{diff.mean().item():>16.5f}{agree:>13.2%}")

    row("fp32 reference (GGUF blocks dequantized)", base)
    packed = load(packed=True, packed_kernel="int8")  # llama.cpp's arithmetic (the default is int8r)
    row(f"packed int8, native C step ({best_variant()})", logits_of(packed, ids, args.chunk))
    packed.model.native_step = None
    row(f"packed int8, eager blocks ({best_variant()})", logits_of(packed, ids, args.chunk))
    x2 = load(packed=True, packed_kernel="int8x2")
    row(f"packed int8x2, native C step ({best_variant()})", logits_of(x2, ids, args.chunk))
    x2.model.native_step = None
    row(f"packed int8x2, eager blocks ({best_variant()})", logits_of(x2, ids, args.chunk))
    thresholds = [float(t) for t in args.thresholds.split(",")]
    for t in thresholds:
        packed_linear.ACT_RESIDUAL["int8r"] = t  # read by the layers and by the native step when it is built
        r = load(packed=True, packed_kernel="int8r")
        row(f"packed int8r T={t:g}, native C step ({best_variant()})", logits_of(r, ids, args.chunk))
        if t == RESIDUAL_T:
            r.model.kv_cache_dtype = torch.float16  # --kv-dtype float16
            row(f"packed int8r T={t:g}, native, float16 KV cache", logits_of(r, ids, args.chunk))
            r.model.kv_cache_dtype = None
            r.model.native_step = None
            row(f"packed int8r T={t:g}, eager blocks ({best_variant()})", logits_of(r, ids, args.chunk))
    packed_linear.ACT_RESIDUAL["int8r"] = RESIDUAL_T
    for variant in runnable_variants()[1:]:  # the other builds this CPU runs, e.g. avx2 and portable
        os.environ["LLMLAB_CPU_VARIANT"] = variant
        kernel_build.cache_clear()
        row(f"packed int8, eager blocks ({variant})", logits_of(packed, ids, args.chunk))
    os.environ.pop("LLMLAB_CPU_VARIANT", None)
    kernel_build.cache_clear()
    set_impl_(packed.model, "float")
    row("packed float-activation kernel", logits_of(packed, ids, args.chunk))
    for dtype in ("bfloat16", "float16"):
        row(f"--dtype {dtype}", logits_of(load(dtype=dtype), ids, args.chunk))
    print("\nint8r: share of activation blocks with a residual (max|x| > T mean|x|), per layer input")
    print(f"{'input of':<14}" + "".join(f"{'T=' + format(t, 'g'):>9}" for t in thresholds))
    for name, shares in flagged_shares(packed, ids, args.chunk, thresholds).items():
        print(f"{name:<14}" + "".join(f"{v:>9.1%}" for v in shares))


if __name__ == "__main__":
    main()
