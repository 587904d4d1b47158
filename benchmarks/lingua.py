"""Prompt compression speed and answer accuracy: llmlab's LLMLingua / LongLLMLingua (infer/lingua.py) against the
``llmlingua`` package (Microsoft's reference, ``PromptCompressor``) on the same compressor, SmolLM2-135M-Instruct
exported with ``llmlab convert`` to a Hugging Face folder, the same prompts (the built-in needle set of
eval/needle.py: instruction + help-topic documents + question) and the same ratio.

For each method and each prompt: the compression's wall time (median over prompts, after one warm-up), the ratio
reached, and whether SmolLM2 (llmlab, greedy) answers the needle from the compressed prompt; the overlap of the two
compressed prompts (tokens in common / tokens of the longer). Ratios (package seconds / llmlab seconds) print last.

The package calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")`` when it starts, which downloads the encoding; to
run offline its token counter is replaced by the compressor's own tokenizer (it only counts the tokens it reports
as origin_tokens / compressed_tokens; the budget and the selection use the model's tokenizer either way).

    python benchmarks/lingua.py [--items 8] [--docs 3] [--chars 300] [--ratio 0.5] [--threads 1]
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
from llmlab.infer.lingua import compress
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
    args = ap.parse_args()
    import llmlingua

    torch.set_num_threads(args.threads)

    print(f"# {cpu_description()}; torch {torch.__version__}, {args.threads} thread(s); llmlingua "
          f"{getattr(llmlingua, '__version__', '?')}; {args.items} prompts x {args.docs} documents, ratio {args.ratio}")
    llm = load("smollm2-135m-instruct")
    items = needle_set(args.items + 1, docs=args.docs, chars=args.chars)  # the first is the warm-up
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2-hf"
        convert("smollm2-135m-instruct", folder)
        peer = package_compressor(folder)
        speedups = {}
        for method in args.methods.split(","):
            times = {"llmlab": [], "llmlingua": []}
            right = {"llmlab": 0, "llmlingua": 0}
            reached = {"llmlab": [], "llmlingua": []}
            agree = []
            for n, item in enumerate(items):
                t = time.perf_counter()
                ours = compress(llm.model, llm.tokenizer, item.documents, args.ratio, question=item.question,
                                instruction=INSTRUCTION, method=method)
                t_ours = time.perf_counter() - t
                t = time.perf_counter()
                theirs = peer.compress_prompt(item.documents, instruction=INSTRUCTION, question=item.question,
                                              rate=args.ratio, **PACKAGE_ARGS[method])
                t_theirs = time.perf_counter() - t
                if n == 0:
                    continue
                times["llmlab"].append(t_ours)
                times["llmlingua"].append(t_theirs)
                reached["llmlab"].append(ours.ratio)
                reached["llmlingua"].append(theirs["compressed_tokens"] / max(1, theirs["origin_tokens"]))
                agree.append(overlap(llm.tokenizer, ours.text, theirs["compressed_prompt"]))
                for who, text in (("llmlab", ours.text), ("llmlingua", theirs["compressed_prompt"])):
                    reply = llm.chat([{"role": "user", "content": text}], max_new_tokens=32)
                    right[who] += item.answer in reply
            for who in ("llmlingua", "llmlab"):
                print(f"{method:14s} {who:10s} median {statistics.median(times[who]):7.3f} s/prompt  ratio reached "
                      f"{statistics.mean(reached[who]):.2f}  accuracy {right[who]}/{len(items) - 1}")
            print(f"{method:14s} token overlap of the two compressed prompts: {statistics.mean(agree):.2f}")
            speedups[method] = statistics.median(times["llmlingua"]) / statistics.median(times["llmlab"])
    for method, s in speedups.items():
        print(f"speedup {method}: {s:.2f}x (llmlingua package / llmlab, median seconds per prompt)")


if __name__ == "__main__":
    main()
