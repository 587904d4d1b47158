"""Decode speed of ``llmlab quantize`` outputs next to llama.cpp on the very same weights.

For each GGML block type a quantized folder can pack into (``QuantLinear.packed_type``), SmolLM2-135M-Instruct is
quantized by round-to-nearest with that layout (GPTQ writes the same layout: its speed is the same), the folder
is loaded on llmlab's packed path (``load(..., packed=True)``: the integer kernels and the C decode step), and
``llmlab convert`` turns the folder into a GGUF that keeps each layer's own blocks, which llama-cpp-python runs.
Both therefore multiply by identical blocks (embeddings and head: float16 in the GGUF, float32 in llmlab).
Batch-1 greedy decode from a 128-token prompt; "decode" is the marginal rate of the new tokens (time for N
tokens minus time for 1, as ``benchmarks/decode.py`` measures), medians of ``--runs``.

    .venv/bin/python benchmarks/quant_decode.py                 # five layouts, 128 new tokens, 3 runs
    .venv/bin/python benchmarks/quant_decode.py --only Q4_1 --runs 1 --new-tokens 16   # a quick check
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from decode import prompt_ids, rates
from llmlab.compress.quantize import make_spec, quantize_model_
from llmlab.formats.convert import write_loaded
from llmlab.formats.load import load_model
from llmlab.infer.generate import generate
from llmlab.infer.sample import SamplingParams
from llmlab.nn.cpu_kernels import speed_flags
from llmlab.nn.packed_linear import PackedLinear
from table_harness import add_model_flag, load_checked, model_name

# GGML type -> (how llmlab quantize makes it, make_spec keyword arguments)
LAYOUTS = {
    "Q8_0": ("absmax int8 / channel", {"method": "absmax", "bits": 8}),
    "Q5_0": ("rtn 5-bit g32 symmetric", {"method": "rtn", "bits": 5, "group_size": 32, "symmetric": True}),
    "Q5_1": ("rtn 5-bit g32", {"method": "rtn", "bits": 5, "group_size": 32}),
    "Q4_0": ("rtn 4-bit g32 symmetric", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}),
    "Q4_1": ("rtn 4-bit g32 (the default)", {"method": "rtn", "bits": 4, "group_size": 32}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement, median (default: 3)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both (default: 2, the target machine)")
    ap.add_argument("--only", default="", help="comma-separated GGML types to run (default: all five)")
    add_model_flag(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python: skipped (not installed; it compiles llama.cpp: pip install llama-cpp-python)")
    flags = speed_flags()
    print(f"{model_name(args.model)}; prompt 128 tokens, {args.new_tokens} new; {args.threads} threads; Python "
          f"{platform.python_version()}; torch {torch.__version__}; CPU flags: {flags}")
    base = load_checked(ap, args.model)
    prompt = prompt_ids(base.tokenizer, 128)
    N, R = args.new_tokens, args.runs
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for gtype, (label, kw) in LAYOUTS.items():
            if args.only and gtype not in args.only.split(","):
                continue
            loaded = load_model(args.model)
            spec = make_spec(**kw)
            quantize_model_(loaded.model, spec, progress=False)
            folder, gguf = Path(tmp) / gtype, Path(tmp) / f"{gtype}.gguf"
            write_loaded(loaded, folder, quant_spec=spec.to_json(), dtype="float16")
            del loaded
            fast = load_model(str(folder), packed=True)
            packed = [m for m in fast.model.layers.modules() if isinstance(m, PackedLinear)]
            print(f"{gtype}: native decode step: {fast.native_step}", flush=True)
            write_loaded(load_model(str(folder)), gguf)
            rows: dict[str, float] = {}

            @torch.inference_mode()
            def ours(n, fast=fast):
                generate(fast.model, [prompt], n, SamplingParams(), stop_ids=[])  # native C step: fast.native_step

            rates(rows, "llmlab", ours, N, R)
            if llama_cpp is not None:
                lc = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=args.threads,
                                     n_threads_batch=args.threads, verbose=False, n_batch=512)

                def theirs(n, lc=lc):
                    lc.reset()
                    for i, _ in enumerate(lc.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
                        if i >= n:
                            break

                rates(rows, "llama.cpp", theirs, N, R)
                del lc
            ratio = rows["llmlab decode"] / rows["llama.cpp decode"] if "llama.cpp decode" in rows else None
            table.append((gtype, label, len(packed), gguf.stat().st_size / 1e6, rows, ratio))
            print(f"{gtype}: {label}: {len(packed)} packed layers; llmlab decode {rows['llmlab decode']:.1f} tok/s"
                  + (f", llama.cpp {rows['llama.cpp decode']:.1f} tok/s, ratio {ratio:.2f}x" if ratio else ""),
                  flush=True)
            del fast
    print("\n| GGML type | made by | GGUF MB | llmlab decode tok/s | llama.cpp decode tok/s | llmlab / llama.cpp |")
    print("|---|---|---|---|---|---|")
    for gtype, label, _n, mb, rows, ratio in table:
        lc = f"{rows['llama.cpp decode']:.1f}" if ratio else "—"
        print(f"| {gtype} | {label} | {mb:.0f} | {rows['llmlab decode']:.1f} | {lc} | "
              f"{f'{ratio:.2f}x' if ratio else '—'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
