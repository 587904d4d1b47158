"""Prompt compression speed and answer accuracy: llmlab's LLMLingua / LongLLMLingua (infer/lingua.py) against the
``llmlingua`` package (Microsoft's reference, ``PromptCompressor``) on the same compressor, SmolLM2-135M-Instruct
exported with ``llmlab convert`` to a Hugging Face folder, the same prompts (the built-in needle set of
eval/needle.py: instruction + help-topic documents + question) and the same ratio.

For each method and each prompt: the compression's wall time (median over prompts, after one warm-up), the ratio
reached, and whether SmolLM2 (llmlab fp32, greedy, 32 tokens) answers the needle from the compressed prompt; the
overlap of the two compressed prompts (tokens in common / tokens of the longer). llmlab's compressor computes in
``--compute`` (auto: int8 on the GGUF's Q8_0 blocks where the kernel builds, ``infer/lingua.fast_compute``); unless
it is fp32, the fp32 path compresses too (untimed), for its accuracy and its overlap with the fast path.
Ratios (package seconds / llmlab seconds) print last.

The package calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")`` when it starts, which downloads the encoding; to
run offline its token counter is replaced by the compressor's own tokenizer (it only counts the tokens it reports
as origin_tokens / compressed_tokens; the budget and the selection use the model's tokenizer either way).

    python benchmarks/lingua.py [--items 8] [--docs 3] [--chars 300] [--ratio 0.5] [--threads 1] [--compute auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmlab.api import load
from llmlab.eval.needle import INSTRUCTION, needle_set
from llmlab.formats.convert import convert
from llmlab.infer.lingua import COMPUTES, compress, fast_compute, load_options
from llmlab.nn.cpu_kernels import cpu_description

PACKAGE_ARGS = {  # the package's settings for each method (its README's LongLLMLingua recipe; ours mirror them)
    "llmlingua": dict(iterative_size=200, context_budget="+100"),
    "longllmlingua": dict(iterative_size=200, context_budget="+100", rank_method="longllmlingua",
                          condition_in_question="after_condition", condition_compare=True, reorder_context="sort",
                          dynamic_context_compression_ratio=0.3),
}


class TokenCounter:
    """Stands in for the tiktoken encoding: ``encode`` gives the compressor tokenizer's ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def package_compressor(folder: Path):
    import llmlingua.prompt_compressor as pc
    from transformers import AutoTokenizer

    counter = TokenCounter(AutoTokenizer.from_pretrained(str(folder)))
    pc.tiktoken.encoding_for_model = lambda name: counter  # offline: no encoding download
    return pc.PromptCompressor(model_name=str(folder), device_map="cpu")


def overlap(tok, a: str, b: str) -> float:
    """Multiset token overlap of two compressed prompts / the longer one's tokens."""
    from collections import Counter

    x, y = Counter(tok.encode(a, add_bos=False)), Counter(tok.encode(b, add_bos=False))
    return sum((x & y).values()) / max(1, max(sum(x.values()), sum(y.values())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, default, text in [("--items", int, 8, "needle prompts"), ("--docs", int, 3, "documents per prompt"),
                                      ("--chars", int, 300, "characters per document"),
                                      ("--ratio", float, 0.5, "target ratio"),
                                      ("--methods", str, "llmlingua,longllmlingua", "methods compared"),
                                      ("--threads", int, 1, "torch threads for both")]:
        ap.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")
    ap.add_argument("--compute", default="auto", choices=COMPUTES,
                    help="llmlab compressor's arithmetic; auto: int8 where the kernel builds (default: auto)")
    args = ap.parse_args()
    compute = fast_compute() if args.compute == "auto" else args.compute
    try:
        import llmlingua
    except ImportError:
        llmlingua = None
        print("llmlingua package: skipped (not installed: pip install llmlingua); llmlab alone")

    torch.set_num_threads(args.threads)

    print(f"# {cpu_description()}; torch {torch.__version__}, {args.threads} thread(s); llmlingua "
          f"{getattr(llmlingua, '__version__', '?') if llmlingua else 'missing'}; {args.items} prompts x "
          f"{args.docs} documents, ratio {args.ratio}; llmlab compressor {compute}")
    llm = load("smollm2-135m-instruct")  # fp32: answers every compressed prompt, and the fp32 compressor
    fast = llm if compute == "fp32" else load("smollm2-135m-instruct", **load_options(compute))
    items = needle_set(args.items + 1, docs=args.docs, chars=args.chars)  # the first is the warm-up
    with tempfile.TemporaryDirectory() as tmp:
        peer = None
        if llmlingua is not None:
            folder = Path(tmp) / "smollm2-hf"
            convert("smollm2-135m-instruct", folder)
            peer = package_compressor(folder)
        speedups = {}
        for method in args.methods.split(","):
            timed = ("llmlingua", "llmlab") if peer else ("llmlab",)
            who_all = timed + (() if fast is llm else ("llmlab-fp32",))
            times = {who: [] for who in timed}
            cpu = {who: [] for who in timed}  # CPU seconds of this process: less moved by other jobs
            right = dict.fromkeys(who_all, 0)
            reached = {w: [] for w in who_all}
            agree, same = [], []
            for n, item in enumerate(items):
                t, c = time.perf_counter(), time.process_time()
                ours = compress(fast.model, fast.tokenizer, item.documents, args.ratio, question=item.question,
                                instruction=INSTRUCTION, method=method)
                t_ours, c_ours = time.perf_counter() - t, time.process_time() - c
                if peer is not None:
                    t, c = time.perf_counter(), time.process_time()
                    theirs = peer.compress_prompt(item.documents, instruction=INSTRUCTION, question=item.question,
                                                  rate=args.ratio, **PACKAGE_ARGS[method])
                    t_theirs, c_theirs = time.perf_counter() - t, time.process_time() - c
                if n == 0:
                    continue
                times["llmlab"].append(t_ours)
                cpu["llmlab"].append(c_ours)
                texts = {"llmlab": ours.text}
                reached["llmlab"].append(ours.ratio)
                if peer is not None:
                    times["llmlingua"].append(t_theirs)
                    cpu["llmlingua"].append(c_theirs)
                    texts["llmlingua"] = theirs["compressed_prompt"]
                    reached["llmlingua"].append(theirs["compressed_tokens"] / max(1, theirs["origin_tokens"]))
                    agree.append(overlap(llm.tokenizer, ours.text, theirs["compressed_prompt"]))
                if fast is not llm:
                    ref = compress(llm.model, llm.tokenizer, item.documents, args.ratio, question=item.question,
                                   instruction=INSTRUCTION, method=method)
                    texts["llmlab-fp32"] = ref.text
                    reached["llmlab-fp32"].append(ref.ratio)
                    same.append(overlap(llm.tokenizer, ours.text, ref.text))
                for who, text in texts.items():
                    reply = llm.chat([{"role": "user", "content": text}], max_new_tokens=32)
                    right[who] += item.answer in reply
            for who in who_all:
                timing = (f"median {statistics.median(times[who]):7.3f} s/prompt ({statistics.median(cpu[who]):.3f} "
                          f"CPU s)" if who in times else " " * 39)
                print(f"{method:14s} {who:11s} {timing}  ratio reached {statistics.mean(reached[who]):.2f}  "
                      f"accuracy {right[who]}/{len(items) - 1}")
            if agree:
                print(f"{method:14s} token overlap of the two compressed prompts: {statistics.mean(agree):.2f}")
            if same:
                print(f"{method:14s} token overlap of llmlab {compute} and llmlab fp32: {statistics.mean(same):.2f}")
            if peer is not None:
                speedups[method] = (statistics.median(times["llmlingua"]) / statistics.median(times["llmlab"]),
                                    statistics.median(cpu["llmlingua"]) / statistics.median(cpu["llmlab"]))
    for method, (s, c) in speedups.items():
        print(f"speedup {method}: {s:.2f}x (llmlingua package fp32 / llmlab {compute}, median seconds per prompt; "
              f"CPU seconds: {c:.2f}x)")


if __name__ == "__main__":
    main()
