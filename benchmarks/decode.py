"""Decode benchmark on SmolLM2-135M-Instruct: greedy, a 128-token prompt, 128 new tokens (EOS ignored),
2 threads, median of N runs. llmlab and the peers measured in the same run; ratios printed last.

- batch-1 decode tok/s: llmlab vs transformers (eager, fp32) vs llama-cpp-python (same GGUF, if installed)
- batch-8 total tok/s: llmlab vs transformers
- prefill tok/s on a 512-token prompt: llmlab vs transformers vs llama-cpp-python
- speculative (n-gram prompt lookup) vs plain greedy on a repetition-heavy prompt: speedup, same output

    python benchmarks/decode.py [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

from llmlab.api import load
from llmlab.infer.generate import generate
from llmlab.infer.speculative import NgramDrafter, speculative_generate


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompt_ids(tok, n: int) -> list[int]:
    import json

    text = inspect.getsource(json)
    return tok.encode(text)[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (default: 2)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = load()
    tok, model, N = llm.tokenizer, llm.model, args.new_tokens
    p128, p512 = prompt_ids(tok, 128), prompt_ids(tok, 512)
    rows: dict[str, float] = {}

    rows["llmlab b1"] = N / median_time(lambda: generate(model, [p128], N), args.runs)
    rows["llmlab b8"] = 8 * N / median_time(lambda: generate(model, [p128] * 8, N), args.runs)
    with torch.inference_mode():
        rows["llmlab prefill512"] = 512 / median_time(lambda: model(torch.tensor([p512])), args.runs)
    packed = load(packed=True).model  # linear layers on the GGUF's packed Q4_1/Q8_0 blocks
    rows["llmlab packed b1"] = N / median_time(lambda: generate(packed, [p128], N), args.runs)
    rows["llmlab packed b8"] = 8 * N / median_time(lambda: generate(packed, [p128] * 8, N), args.runs)
    with torch.inference_mode():
        rows["llmlab packed prefill512"] = 512 / median_time(lambda: packed(torch.tensor([p512])), args.runs)
    same = generate(packed, [p128], 32)[0].ids == generate(model, [p128], 32)[0].ids

    # Speculative decoding on a prompt whose answer repeats the prompt (editing a given text).
    text = inspect.getsource(inspect.getmodule(generate))[:1500]
    spec_prompt = tok.encode(llm.render_chat("Repeat the following code exactly, with no comment:\n\n" + text))
    plain_out = generate(model, [spec_prompt], N)[0].ids
    spec_out, stats = speculative_generate(model, spec_prompt, N, NgramDrafter(), gamma=8)
    t_plain = median_time(lambda: generate(model, [spec_prompt], N), args.runs)
    t_spec = median_time(lambda: speculative_generate(model, spec_prompt, N, NgramDrafter(), gamma=8), args.runs)
    t_packed_plain = median_time(lambda: generate(packed, [spec_prompt], N), args.runs)
    t_packed_spec = median_time(lambda: speculative_generate(packed, spec_prompt, N, NgramDrafter(), gamma=8),
                                args.runs)

    try:
        import transformers
    except ImportError:
        transformers = None
        print("transformers: skipped (not installed: pip install -e '.[test]')")
    if transformers is not None:
        from pathlib import Path

        src = Path(llm.loaded.source)
        transformers.logging.set_verbosity_error()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                               dtype=torch.float32).eval()
        cfg = transformers.GenerationConfig(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=2)

        def hf_gen(batch):
            ids = torch.tensor([p128] * batch)
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)

        rows["transformers b1"] = N / median_time(lambda: hf_gen(1), args.runs)
        rows["transformers b8"] = 8 * N / median_time(lambda: hf_gen(8), args.runs)
        with torch.inference_mode():
            rows["transformers prefill512"] = 512 / median_time(lambda: hf(torch.tensor([p512])), args.runs)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python: skipped (not installed; it compiles llama.cpp: pip install llama-cpp-python)")
    if llama_cpp is not None:
        lc = llama_cpp.Llama(model_path=llm.loaded.source, n_ctx=1024, n_threads=args.threads, verbose=False,
                             n_batch=512)

        def lc_gen():
            lc.reset()
            for n, _ in enumerate(lc.generate(p128, temp=0.0, top_k=1, reset=True), 1):
                if n >= N:
                    break

        rows["llama.cpp b1"] = N / median_time(lc_gen, args.runs)

        def lc_prefill():
            lc.reset()
            lc.eval(p512)

        rows["llama.cpp prefill512"] = 512 / median_time(lc_prefill, args.runs)

    print(f"\n{'measurement':<28}{'tok/s':>10}")
    for k, v in rows.items():
        print(f"{k:<28}{v:>10.1f}")
    print(f"speculative n-gram: plain {t_plain:.2f}s, speculative {t_spec:.2f}s, acceptance "
          f"{stats.acceptance_rate:.0%}, identical output: {spec_out == plain_out}; on the packed path: plain "
          f"{t_packed_plain:.2f}s, speculative {t_packed_spec:.2f}s")
    print(f"packed path greedy (32 tokens) identical to the reference path: {same}")
    print("ratios:")
    for ours, peer in (("llmlab b1", "transformers b1"), ("llmlab packed b1", "transformers b1"),
                       ("llmlab packed b1", "llama.cpp b1"), ("llmlab b8", "transformers b8"),
                       ("llmlab packed b8", "transformers b8"), ("llmlab prefill512", "transformers prefill512"),
                       ("llmlab prefill512", "llama.cpp prefill512"),
                       ("llmlab packed prefill512", "llama.cpp prefill512")):
        if peer in rows:
            print(f"  {ours} / {peer}: {rows[ours] / rows[peer]:.2f}x")
    print(f"  speculative / plain greedy: {t_plain / t_spec:.2f}x (packed path: {t_packed_plain / t_packed_spec:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
