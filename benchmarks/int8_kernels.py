"""The packed kernels per CPU variant, without the real model (so it runs anywhere): each int8 build this CPU
runs (avx512vnni / avxvnni / avx2 / portable), the float-activation GEMV and dequantize + F.linear, on
SmolLM2-135M's layer shapes with random Q4_1 / Q8_0 weights, for 1 / 8 / 64 / 512 rows; then one decode step
of a SmolLM2-135M-shaped model (random weights, Q4_1 blocks, head Q8_0) through the native C step per variant.
Also checks that every variant gives bit-identical outputs. Medians of --runs.

With ``--shares``, the cost of ``int8r``'s residual blocks: the gate/up and head shapes at the --rows counts, with
activations whose 32-value blocks are flagged (max|x| > RESIDUAL_T mean|x|) in each given share, per variant, in µs
per call and G multiply-adds per second.

    python benchmarks/int8_kernels.py [--runs 20] [--threads 0] [--rows 1,8,64,512] [--shares 0,0.375,1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llmlab.models import native_step
from llmlab.models.registry import build_model, get_preset
from llmlab.nn import packed_linear
from llmlab.nn.cpu_kernels import physical_cores, runnable_variants, speed_flags
from llmlab.nn.ggml_quants import quantize_q4_1, quantize_q8_0
from llmlab.nn.packed_linear import PackedLinear


def median_us(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def use_variant(variant: str | None) -> None:
    """Cap the kernels at ``variant`` (None: the best) and forget the builds made so far."""
    if variant is None:
        os.environ.pop("LLMLAB_CPU_VARIANT", None)
    else:
        os.environ["LLMLAB_CPU_VARIANT"] = variant
    packed_linear.kernel_build.cache_clear()
    native_step.kernel_build.cache_clear()


def flagged_activations(rows: int, n_in: int, share: float, seed: int = 0) -> torch.Tensor:
    """(rows, n_in) activations of which ``share`` of the 32-value blocks int8r flags: uniform values in [-1, 1]
    (max|x| <= 2 mean|x|, never flagged at RESIDUAL_T = 4) and, in a random ``share`` of the blocks, one value of
    10 (max|x| about 12 mean|x|)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n_in, generator=gen) * 2 - 1
    blocks = rows * (n_in // 32)
    spikes = torch.randperm(blocks, generator=gen)[:round(share * blocks)]
    x.view(blocks, 32)[spikes, torch.randint(0, 32, (len(spikes),), generator=gen)] = 10.0
    return x


def residual_cost(variants: list[str], row_counts: list[int], shares: list[float], runs: int) -> None:
    """The table of --shares: int8 (no residual) and int8r at each share of flagged blocks, per variant."""
    print(f"\nint8r's residual blocks: µs per call (G multiply-adds/s) by share of flagged activation blocks "
          f"(RESIDUAL_T = {packed_linear.RESIDUAL_T:g})")
    cols = ["int8"] + [f"int8r {100 * s:g}%" for s in shares]
    print(f"{'layer':<26}{'variant':>12}{'rows':>6}" + "".join(f"{c:>20}" for c in cols))
    for name, (kind, n_out, n_in) in {"gate/up 576->1536 Q4_1": ("Q4_1", 1536, 576),
                                      "head 576->49152 Q8_0": ("Q8_0", 49152, 576)}.items():
        lin = layer(kind, n_out, n_in)
        for v in variants:
            use_variant(v)
            for rows in [r for r in row_counts if r <= packed_linear.INT8_MAX_ROWS]:
                n = max(3, runs * 8 // (rows + 7)) if kind == "Q8_0" else runs
                cells = []
                for impl, share in [("int8", 0.0)] + [("int8r", s) for s in shares]:
                    lin.impl, x = impl, flagged_activations(rows, n_in, share)
                    us = median_us(lambda lin=lin, x=x: lin(x), n)
                    cells.append(f"{us:.1f} ({rows * n_in * n_out / us / 1e3:.1f})")
                print(f"{name:<26}{v:>12}{rows:>6}" + "".join(f"{c:>20}" for c in cells))
    use_variant(None)


def layer(kind: str, n_out: int, n_in: int) -> PackedLinear:
    w = torch.randn(n_out, n_in) * 0.05
    packed, tid = (quantize_q4_1(w), 3) if kind == "Q4_1" else (quantize_q8_0(w), 8)
    return PackedLinear(packed, tid, n_in, n_out)


def q4_1_model():
    """SmolLM2-135M's shapes with random weights: blocks Q4_1, the tied head Q8_0 (as the embedded GGUF)."""
    torch.manual_seed(0)
    model = build_model(get_preset("smollm2-135m")).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                w = child.weight.detach()
                kind = "Q8_0" if name == "lm_head" else "Q4_1"
                packed, tid = (quantize_q4_1(w), 3) if kind == "Q4_1" else (quantize_q8_0(w), 8)
                setattr(module, name, PackedLinear(packed, tid, child.in_features, child.out_features))
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per measurement (default: 20)")
    ap.add_argument("--threads", type=int, default=0, help="threads; 0 = physical cores (default: 0)")
    ap.add_argument("--rows", default="1,8,64,512", help="activation rows per call, comma-separated "
                                                          "(default: 1,8,64,512)")
    ap.add_argument("--shares", default="", help="shares of flagged activation blocks for the int8r residual "
                                                 "table, comma-separated in [0, 1], e.g. 0,0.375,1 (default: none, "
                                                 "no table)")
    args = ap.parse_args()
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        row_counts = []
    if not row_counts or min(row_counts) < 1 or args.runs < 1 or args.threads < 0:
        ap.error(f"--rows must be positive integers (got {args.rows!r}), --runs >= 1, --threads >= 0")
    try:
        shares = [float(s) for s in args.shares.split(",")] if args.shares else []
    except ValueError:
        shares = [-1.0]
    if any(not 0 <= s <= 1 for s in shares):
        ap.error(f"--shares must be numbers in [0, 1], comma-separated (got {args.shares!r}), e.g. 0,0.375,1")
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    variants = runnable_variants()
    print(f"threads {threads}; CPU flags: {speed_flags()}; "
          f"int8 variants: {', '.join(variants)}")
    shapes = {"gate/up 576->1536 Q4_1": ("Q4_1", 1536, 576), "down 1536->576 Q4_1": ("Q4_1", 576, 1536),
              "head 576->49152 Q8_0": ("Q8_0", 49152, 576)}
    print(f"\n{'layer':<26}{'rows':>6}" + "".join(f"{'int8 ' + v:>18}" for v in variants)
          + f"{'float GEMV':>14}{'dequant+F.linear':>18}   (µs per call)")
    identical = True
    for name, (kind, n_out, n_in) in shapes.items():
        lin = layer(kind, n_out, n_in)
        for rows in row_counts:
            x = torch.randn(rows, n_in)
            runs = max(3, args.runs * 8 // (rows + 7)) if kind == "Q8_0" else args.runs
            cells, outs = [], []
            for v in variants:
                use_variant(v)
                lin.impl = "int8"
                outs.append(lin(x))
                fits = rows <= packed_linear.INT8_MAX_ROWS
                cells.append(median_us(lambda lin=lin, x=x: lin(x), runs) if fits else float("nan"))
            identical &= all(torch.equal(outs[0], o) for o in outs[1:])
            use_variant(None)
            lin.impl = "float"
            f = median_us(lambda lin=lin, x=x: lin(x), runs) if rows <= packed_linear.GEMV_MAX_ROWS else float("nan")
            lin.impl = "reference"
            r = median_us(lambda lin=lin, x=x: lin(x), runs)
            print(f"{name:<26}{rows:>6}" + "".join(f"{c:>18.1f}" for c in cells) + f"{f:>14.1f}{r:>18.1f}")
    print(f"every int8 variant bit-identical: {identical}")

    model = q4_1_model()
    print("\nSmolLM2-135M-shaped model, random weights, one decode step at position 128 (ms per token):")
    logits = []
    for v in variants:
        use_variant(v)
        status = native_step.enable_native_step_(model)
        cache = model.new_cache(1, 256)
        with torch.inference_mode():
            model(torch.arange(128)[None], cache=cache)
            tok = torch.tensor([[7]])

            def step(cache=cache, tok=tok):
                cache.length = 128
                return model(tok, cache=cache)

            logits.append(step())
            ms = median_us(step, max(5, args.runs // 2)) / 1e3
        print(f"  {v:<12} {ms:8.2f} ms  ({status.split(' (')[0]})")
    print(f"decode logits bit-identical across variants: {all(torch.equal(logits[0], x) for x in logits[1:])}")
    use_variant(None)
    if shares:
        residual_cost(variants, row_counts, shares, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
