"""Decode benchmark on SmolLM2-135M-Instruct (the embedded Q4_1 GGUF): greedy, a 128-token prompt, 128 new
tokens (EOS ignored), median of N runs. llmlab and the peers run in the same process, same threads; the ratios
are printed last, with the CPU flags that matter.

- batch-1 tok/s (prompt included, as llama.cpp's generate) and decode-only tok/s (the marginal rate between
  1 and 129 new tokens): the packed path (native C step, the default int8r kernels), its eager blocks, the
  float-activation kernel, the int8 kernels without residual blocks (``--packed-kernel int8``) and with one for
  every block (``int8x2``), both also at batch 8 and prefill, the fp32
  reference, transformers (fp32 eager), llama-cpp-python (same GGUF, if installed);
- batch-8 total tok/s (one prompt 8 times, as transformers runs it: llmlab prefills it once; and 8 different
  prompts, ``b8 distinct``, 8 prefills) and 32 concurrent sequences total tok/s;
- the default path again on a float16 KV cache (``kv16``: ``--kv-dtype float16``, llama.cpp's default cache type):
  batch 1, 8 distinct prompts, 32 sequences;
- 512-token prefill tok/s (logits of the last position, as llama.cpp's eval);
- n-gram speculative decoding vs plain greedy on the packed path, on an input-grounded prompt (same output);
- where the time of one packed decode step goes: the C blocks, the head, the rest (Python, sampling).

- with ``--pairs R`` (or ``--goals-only``: nothing else), R rounds of the four speed goals, each llmlab figure
  timed right beside its peer's and the ratio taken within the pair (``paired_goals``).

    python benchmarks/decode.py [--runs 3] [--threads 0] [--new-tokens 128] [--pairs 0] [--goals-only]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch

from llmlab.api import load
from llmlab.infer.generate import generate
from llmlab.infer.speculative import NgramDrafter, speculative_generate
from llmlab.nn.cpu_kernels import best_variant, physical_cores, speed_flags
from llmlab.nn.packed_linear import set_impl_


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompt_ids(tok, n: int) -> list[int]:
    return tok.encode(inspect.getsource(json))[:n]


@torch.inference_mode()
def prefill_last(model, ids: list[int]) -> torch.Tensor:
    """The prompt through the model, logits of the last position only (llama.cpp's eval computes no more)."""
    cache = model.new_cache(1, len(ids) + 1)
    hidden = model(torch.tensor([ids]), cache=cache, return_hidden=True)  # (1, T, dim), after the final norm
    return model.lm_head(hidden[:, -1])


def rates(rows: dict, name: str, fn_gen, N: int, runs: int) -> None:
    """rows[name + ' b1'] (prompt included) and rows[name + ' decode'] (marginal, new tokens only)."""
    t_full = median_time(lambda: fn_gen(N), runs)
    t_one = median_time(lambda: fn_gen(1), runs)
    rows[f"{name} b1"] = N / t_full
    rows[f"{name} decode"] = (N - 1) / max(t_full - t_one, 1e-9)


def b32_rates(rows: dict, name: str, model, prompts: list[list[int]], N: int, runs: int) -> None:
    """rows[name + ' b32']: 32 streams' new tokens per second, their prompts' prefill included; rows[name + ' b32
    decode']: the same with the prefill left out (the marginal time of N - 1 more tokens each), like for like
    with llama.cpp's single-stream decode rate."""
    t_full = median_time(lambda: generate(model, prompts, N), runs)
    t_one = median_time(lambda: generate(model, prompts, 1), runs)
    rows[f"{name} b32"] = len(prompts) * N / t_full
    rows[f"{name} b32 decode"] = len(prompts) * (N - 1) / max(t_full - t_one, 1e-9)


def step_breakdown(model, ids: list[int], runs: int = 50) -> dict[str, float]:
    """ms per decode step: the whole generate step, the C blocks and the head each timed alone, and the two in a
    row. Timed alone, the head's 30 MB of blocks stay in the cache and look half as costly as in a step, where the
    blocks' weights evict them; so the rest, Python and sampling, is the step minus blocks and head in a row."""
    native = model.native_step
    cache = model.new_cache(1, len(ids) + 2)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache)
        tok = torch.tensor([[ids[-1]]])
        pos = torch.tensor([[len(ids)]])
        x = model.embed_tokens(tok)
        rope = model.rotary(pos, x.dtype)

        def blocks():
            return native.blocks(x, rope, cache, len(ids), None)

        h = blocks()

        def head():
            return native.logits(model, h)

        def both():
            return native.logits(model, native.blocks(x, rope, cache, len(ids), None))

        def step():
            cache.length = len(ids)
            logits = model(tok, cache=cache, position_ids=pos)[:, -1]
            return logits.argmax(-1).tolist()

        out = {}
        for name, fn in (("step", step), ("blocks", blocks), ("head", head), ("blocks+head", both)):
            fn()
            t0 = time.perf_counter()
            for _ in range(runs):
                fn()
            out[name] = (time.perf_counter() - t0) / runs * 1e3
    out["rest"] = out["step"] - out["blocks+head"]
    return out


def load_peers(ref, threads: int):
    """(transformers' fp32 model, llama-cpp-python's Llama) on the same GGUF, each None (said so) when missing."""
    hf = lc = None
    try:
        import transformers
    except ImportError:
        print("transformers: skipped (not installed: pip install -e '.[test]')")
    else:
        from pathlib import Path

        src = Path(ref.loaded.source)
        transformers.logging.set_verbosity_error()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                               dtype=torch.float32).eval()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python: skipped (not installed; it compiles llama.cpp: "
              "CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
    else:
        lc = llama_cpp.Llama(model_path=ref.loaded.source, n_ctx=1024, n_threads=threads,
                             n_threads_batch=threads, verbose=False, n_batch=512)
    return hf, lc


@torch.inference_mode()
def hf_generate(hf, prompt: list[int], batch: int, n: int) -> None:
    """transformers' greedy generate of n tokens (EOS ignored) for the prompt ``batch`` times."""
    import transformers

    ids = torch.tensor([prompt] * batch)
    cfg = transformers.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
    hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)


@torch.inference_mode()
def hf_prefill_last(hf, ids: list[int]) -> None:
    hf(torch.tensor([ids]), logits_to_keep=1)


def lc_generate(lc, prompt: list[int], n: int) -> None:
    """llama.cpp's greedy generate of n tokens after the prompt, from an empty cache."""
    lc.reset()
    for i, _ in enumerate(lc.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
        if i >= n:
            break


def lc_prefill(lc, ids: list[int]) -> None:
    lc.reset()
    lc.eval(ids)


def decode_only(model, prompts: list[list[int]], n: int) -> float:
    """tok/s of all rows' tokens 2..n of one generate call, timed from the first token (the prompts' prefill
    done) to the last: the decode-only rate in one call, not as the difference of two timed calls."""
    stamps = []
    generate(model, prompts, n, on_token=lambda row, _tok: stamps.append(time.perf_counter()) if row == 0 else None)
    return len(prompts) * (n - 1) / (stamps[-1] - stamps[0])


def lc_decode_only(lc, prompt: list[int], n: int) -> float:
    """The same for llama.cpp: tokens 2..n of one generate, from the first token yielded to the n-th."""
    lc.reset()
    stamps = []
    for _ in lc.generate(prompt, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) >= n:
            break
    return (n - 1) / (stamps[-1] - stamps[0])


def once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired_goals(model, hf, lc, prompts: dict, N: int, rounds: int) -> None:
    """Issue 11's four speed goals measured in pairs: in each round, each goal's llmlab figure is timed right before
    and right after its peer's, and the ratio is taken within the round (llmlab's mean over the peer). This
    machine's speed drifts by 20-30% over seconds to minutes (with nothing else running in it), and the main
    table times llmlab and the peers minutes apart, so its ratios carry that drift; a round shares it. Decode-only
    rates are timed inside one call (``decode_only``). Prints each round's figures, then per goal the median ratio,
    its range and how many rounds met the goal."""
    p128, p512, p8, p32 = prompts["p128"], prompts["p512"], prompts["p8"], prompts["p32"]

    goals = [  # (name, goal, the peer, llmlab's tok/s, the peer's tok/s); a goal whose peer is missing is left out
        ("batch 1 decode only / llama.cpp decode", 1.0, lc,
         lambda: decode_only(model, [p128], N), lambda: lc_decode_only(lc, p128, N)),
        ("prefill 512 / llama.cpp prefill 512", 1.0, lc,
         lambda: 512 / once(lambda: prefill_last(model, p512)), lambda: 512 / once(lambda: lc_prefill(lc, p512))),
        ("batch 8, 8 different prompts / transformers batch 8", 4.0, hf,
         lambda: 8 * N / once(lambda: generate(model, p8, N)),
         lambda: 8 * N / once(lambda: hf_generate(hf, p128, 8, N))),
        ("32 sequences decode only / llama.cpp decode", 5.0, lc,
         lambda: decode_only(model, p32, N), lambda: lc_decode_only(lc, p128, N)),
    ]
    goals = [g for g in goals if g[2] is not None]
    if not goals:
        print("paired goals: skipped (neither peer is installed)")
        return
    for _, _, _, ours, peer in goals:  # warm-up
        ours(), peer()
    ratios: dict[str, list[float]] = {g[0]: [] for g in goals}
    print(f"\npaired goals, {rounds} rounds (llmlab tok/s, peer tok/s, ratio):")
    for r in range(rounds):
        cells = []
        for name, _, _, ours, peer in goals:
            a1, b, a2 = ours(), peer(), ours()  # llmlab on both sides of the peer: a drift cancels to first order
            a = (a1 + a2) / 2
            ratios[name].append(a / b)
            cells.append(f"{a:.1f} / {b:.1f} = {a / b:.2f}x")
        print(f"  round {r + 1}: " + "; ".join(cells), flush=True)
    for name, goal, *_ in goals:
        v = ratios[name]
        print(f"  {name}: median {statistics.median(v):.2f}x (range {min(v):.2f}-{max(v):.2f}x), "
              f"goal >= {goal:g}x met in {sum(x >= goal for x in v)} of {len(v)} rounds")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (default: 3)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch / C kernel / llama.cpp threads; 0 = physical cores (default: 0)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="then rounds of the four goals, llmlab and the peer timed back to back, ratios per pair "
                         "(paired_goals; default: 0, none)")
    ap.add_argument("--goals-only", action="store_true",
                    help="only the paired goals (--pairs, 5 rounds when not given), not the full table (default: off)")
    args = ap.parse_args()
    for flag, value, least in (("--runs", args.runs, 1), ("--new-tokens", args.new_tokens, 2),
                               ("--pairs", args.pairs, 0), ("--threads", args.threads, 0)):
        if value < least:
            ap.error(f"{flag} must be >= {least}, got {value}" + (" (0: the physical cores)" if flag == "--threads"
                                                                 else ""))
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    print(f"threads {threads}; CPU flags: {speed_flags()}; "
          f"int8 kernel variant: {best_variant()}")
    ref = load()
    tok, N, R = ref.tokenizer, args.new_tokens, args.runs
    p128, p512 = prompt_ids(tok, 128), prompt_ids(tok, 512)
    p8 = [prompt_ids(tok, 135)[i:i + 128] for i in range(8)]  # 8 different prompts: 8 prefills
    p32 = [prompt_ids(tok, 128)[i:i + 96] for i in range(32)]  # 32 different prompts of 96 tokens
    rows: dict[str, float] = {}

    packed = load(packed=True)
    model = packed.model
    print(packed.loaded.native_step)
    if args.goals_only:
        hf, lc = load_peers(ref, threads)
        paired_goals(model, hf, lc, {"p128": p128, "p512": p512, "p8": p8, "p32": p32}, N, args.pairs or 5)
        return 0
    rates(rows, "llmlab packed", lambda n: generate(model, [p128], n), N, R)
    rows["llmlab packed b8"] = 8 * N / median_time(lambda: generate(model, [p128] * 8, N), R)  # prefilled once
    rows["llmlab packed b8 distinct"] = 8 * N / median_time(lambda: generate(model, p8, N), R)
    b32_rates(rows, "llmlab packed", model, p32, N, max(1, R // 2))
    rows["llmlab packed prefill512"] = 512 / median_time(lambda: prefill_last(model, p512), R)
    model.kv_cache_dtype = torch.float16  # --kv-dtype float16: a half cache, as llama.cpp's default
    rates(rows, "llmlab packed kv16", lambda n: generate(model, [p128], n), N, R)
    rows["llmlab packed kv16 b8 distinct"] = 8 * N / median_time(lambda: generate(model, p8, N), R)
    b32_rates(rows, "llmlab packed kv16", model, p32, N, max(1, R // 2))
    model.kv_cache_dtype = None  # back to the default float32 cache
    breakdown = step_breakdown(model, p128)
    same_as_eager = generate(model, [p128], 32)[0].ids
    native, model.native_step = model.native_step, None
    rates(rows, "llmlab packed eager-blocks", lambda n: generate(model, [p128], n), N, R)
    rows["llmlab packed eager-blocks prefill512"] = 512 / median_time(lambda: prefill_last(model, p512), R)
    same_as_eager = same_as_eager == generate(model, [p128], 32)[0].ids
    set_impl_(model, "float")
    rates(rows, "llmlab packed float-kernel", lambda n: generate(model, [p128], n), N, R)
    set_impl_(model, "int8r")  # the default, as loaded
    model.native_step = native
    i8 = load(packed=True, packed_kernel="int8").model  # no residual blocks: llama.cpp's arithmetic, the fastest
    rates(rows, "llmlab packed int8", lambda n: generate(i8, [p128], n), N, R)
    rows["llmlab packed int8 b8"] = 8 * N / median_time(lambda: generate(i8, [p128] * 8, N), R)
    b32_rates(rows, "llmlab packed int8", i8, p32, N, max(1, R // 2))
    rows["llmlab packed int8 prefill512"] = 512 / median_time(lambda: prefill_last(i8, p512), R)
    x2 = load(packed=True, packed_kernel="int8x2").model  # a residual Q8 block for every block
    rates(rows, "llmlab packed int8x2", lambda n: generate(x2, [p128], n), N, R)
    rows["llmlab packed int8x2 b8"] = 8 * N / median_time(lambda: generate(x2, [p128] * 8, N), R)
    rows["llmlab packed int8x2 prefill512"] = 512 / median_time(lambda: prefill_last(x2, p512), R)

    rates(rows, "llmlab fp32", lambda n: generate(ref.model, [p128], n), N, R)
    rows["llmlab fp32 b8"] = 8 * N / median_time(lambda: generate(ref.model, [p128] * 8, N), R)
    rows["llmlab fp32 prefill512"] = 512 / median_time(lambda: prefill_last(ref.model, p512), R)

    # Speculative decoding on an input-grounded prompt: repeat a given code text (prompt lookup pays there).
    text = inspect.getsource(inspect.getmodule(generate))[:1500]
    spec_prompt = tok.encode(ref.render_chat("Repeat the following code exactly, with no comment:\n\n" + text))
    plain_out = generate(model, [spec_prompt], N)[0].ids
    spec_out, stats = speculative_generate(model, spec_prompt, N, NgramDrafter(), gamma=8)
    t_plain = median_time(lambda: generate(model, [spec_prompt], N), R)
    t_spec = median_time(lambda: speculative_generate(model, spec_prompt, N, NgramDrafter(), gamma=8), R)

    hf, lc = load_peers(ref, threads)
    if hf is not None:
        rates(rows, "transformers", lambda n: hf_generate(hf, p128, 1, n), N, R)
        rows["transformers b8"] = 8 * N / median_time(lambda: hf_generate(hf, p128, 8, N), R)
        rows["transformers prefill512"] = 512 / median_time(lambda: hf_prefill_last(hf, p512), R)
    if lc is not None:
        rates(rows, "llama.cpp", lambda n: lc_generate(lc, p128, n), N, R)
        rows["llama.cpp prefill512"] = 512 / median_time(lambda: lc_prefill(lc, p512), R)

    print(f"\n{'measurement':<42}{'tok/s':>10}")
    for k, v in rows.items():
        print(f"{k:<42}{v:>10.1f}")
    print(f"packed decode step, ms: {breakdown['step']:.2f} = C blocks and head in a row "
          f"{breakdown['blocks+head']:.2f} (alone: blocks {breakdown['blocks']:.2f}, head {breakdown['head']:.2f} "
          f"with its weights in cache) + rest (Python, sampling) {breakdown['rest']:.2f}")
    print(f"native step greedy (32 tokens) identical to the eager int8 blocks: {same_as_eager}")
    print(f"speculative n-gram on the packed path: plain {t_plain:.2f}s, speculative {t_spec:.2f}s, acceptance "
          f"{stats.acceptance_rate:.0%}, identical output: {spec_out == plain_out}")
    print("ratios:")
    for ours, peer in (("llmlab packed b1", "llama.cpp b1"), ("llmlab packed decode", "llama.cpp decode"),
                       ("llmlab packed prefill512", "llama.cpp prefill512"),
                       ("llmlab packed b1", "transformers b1"), ("llmlab packed decode", "transformers decode"),
                       ("llmlab packed b8", "transformers b8"), ("llmlab packed b8 distinct", "transformers b8"),
                       ("llmlab packed b32", "llama.cpp decode"),
                       ("llmlab packed b32 decode", "llama.cpp decode"),
                       ("llmlab packed int8 b32 decode", "llama.cpp decode"),
                       ("llmlab packed kv16 decode", "llama.cpp decode"),
                       ("llmlab packed kv16 b8 distinct", "transformers b8"),
                       ("llmlab packed kv16 b32 decode", "llama.cpp decode"),
                       ("llmlab packed prefill512", "transformers prefill512"),
                       ("llmlab fp32 prefill512", "llama.cpp prefill512"),
                       ("llmlab packed int8x2 b1", "llama.cpp b1"), ("llmlab packed int8x2 decode", "llama.cpp decode"),
                       ("llmlab packed int8x2 prefill512", "llama.cpp prefill512"),
                       ("llmlab packed decode", "llmlab packed int8 decode"),
                       ("llmlab packed b8", "llmlab packed int8 b8"),
                       ("llmlab packed prefill512", "llmlab packed int8 prefill512"),
                       ("llmlab packed int8x2 decode", "llmlab packed decode"),
                       ("llmlab packed int8x2 b8", "llmlab packed b8"),
                       ("llmlab packed decode", "llmlab packed eager-blocks decode")):
        if peer in rows and ours in rows:
            print(f"  {ours} / {peer}: {rows[ours] / rows[peer]:.2f}x")
    print(f"  speculative / plain greedy (packed path): {t_plain / t_spec:.2f}x")
    if args.pairs:
        paired_goals(model, hf, lc, {"p128": p128, "p512": p512, "p8": p8, "p32": p32}, N, args.pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
