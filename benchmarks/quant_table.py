"""The quantization results table: every method of ``llmlab quantize`` on SmolLM2-135M-Instruct.

For each row: bits per weight of the quantized layers (codes + scales + zero-points), the written folder's size,
perplexity on a fixed held-out text (``compress/calibrate.heldout_text``: standard-library docstrings disjoint
from the calibration text), greedy exact match on two built-in tasks (answered on llmlab's fast path,
``load(..., packed=True)``), and what the fast path runs the layers as: GGML blocks through the integer
kernels, or a float32 weight dequantized once where no GGML type holds the codes. Decode speed is a property of
that layout, not of the method: ``benchmarks/quant_decode.py`` measures it next to llama.cpp. The baseline is
the GGUF dequantized to float32. Every figure but the quantization time is deterministic (the same on any
machine and load). Writes
a JSON of the rows, a Markdown table and a PNG (perplexity vs bits per weight, one line per method).

    python benchmarks/quant_table.py                       # the README table (about 30 minutes on 2 cores)
    python benchmarks/quant_table.py --quick               # a few rows, small budgets (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from llmlab.common import save_png, write_text_atomic
from llmlab.compress.quantize import CALIBRATED, make_spec, quantize_model_
from llmlab.data.tasks import get_task
from llmlab.eval.perplexity import perplexity
from llmlab.formats.convert import write_loaded
from llmlab.formats.load import chat_template_of, load_model
from llmlab.infer.generate import chat_stop_ids, generate
from llmlab.infer.sample import SamplingParams
from llmlab.nn.ggml_quants import TYPE_IDS
from llmlab.nn.nf4 import NF4Linear
from llmlab.nn.packed_linear import PackedLinear
from llmlab.nn.quant_linear import QuantLinear
from table_harness import add_model_flag, model_name, table_harness

# (label, method, make_spec keyword arguments)
ROWS = [
    ("absmax int8 / channel", "absmax", {"bits": 8}),
    ("zero-point int8 / channel", "zeropoint", {"bits": 8}),
    ("absmax int8 / tensor", "absmax", {"bits": 8, "group_size": -1}),
    ("LLM.int8()", "llm-int8", {}),
    ("naive W8A8", "absmax", {"bits": 8, "act": "token"}),
    ("SmoothQuant W8A8", "smoothquant", {}),
    ("ZeroQuant W8A8 g64", "zeroquant", {"bits": 8, "group_size": 64}),
    ("ZeroQuant W4A8 g64", "zeroquant", {"bits": 4, "group_size": 64}),
    ("RTN 8-bit g32", "rtn", {"bits": 8, "group_size": 32, "symmetric": True}),
    ("GPTQ 8-bit g32", "gptq", {"bits": 8, "group_size": 32, "symmetric": True}),
    ("RTN 4-bit g32", "rtn", {"bits": 4, "group_size": 32}),
    ("GPTQ 4-bit g32", "gptq", {"bits": 4, "group_size": 32}),
    ("RTN 4-bit / channel", "rtn", {"bits": 4, "group_size": 0}),
    ("GPTQ 4-bit / channel", "gptq", {"bits": 4, "group_size": 0}),
    ("absmax 4-bit g32", "absmax", {"bits": 4, "group_size": 32}),
    ("NF4 b64", "nf4", {}),
    ("RTN 3-bit g32", "rtn", {"bits": 3, "group_size": 32}),
    ("GPTQ 3-bit g32", "gptq", {"bits": 3, "group_size": 32}),
    ("RTN 2-bit g32", "rtn", {"bits": 2, "group_size": 32}),
    ("GPTQ 2-bit g32", "gptq", {"bits": 2, "group_size": 32}),
]
TYPE_NAMES = {tid: name for name, tid in TYPE_IDS.items()}
QUICK = {"absmax int8 / channel", "RTN 4-bit g32", "GPTQ 4-bit g32", "NF4 b64"}
TASKS = ("addition", "letter_count")
SHOTS = 3  # zero-shot, the instruct model answers "95 + 52 = 147" (right, but not in the asked form): 0%


@torch.inference_mode()
def exact_match(loaded, task_name: str, n: int, shots: int = SHOTS, max_new_tokens: int = 16) -> float:
    """Greedy answers to ``n`` held-out questions of a built-in task after ``shots`` solved training examples
    as earlier chat turns (few-shot prompting, Brown et al. 2020), scored by the task's exact-match rule."""
    task, tok = get_task(task_name), loaded.tokenizer
    template, stops = chat_template_of(loaded), chat_stop_ids(loaded.config, loaded.tokenizer)
    turns = []
    for e in task.examples("train", shots, seed=1):
        turns += [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]
    examples = task.examples("heldout", n, seed=0)
    prompts = [tok.encode(template.render(turns + [{"role": "user", "content": e.prompt}],
                                          add_generation_prompt=True)) for e in examples]
    done = generate(loaded.model, prompts, max_new_tokens, SamplingParams(), stop_ids=stops)
    replies = [tok.decode([t for t in c.ids if t not in stops], skip_special=True) for c in done]
    return sum(task.score(r, e.answer) for r, e in zip(replies, examples)) / n


def bits_per_weight(model) -> float:
    bits = params = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bits += sum(t.numel() * t.element_size() * 8 for t in (m.qweight, m.scales, m.zeros) if t is not None)
            bits -= m.qweight.numel() * (8 - m.bits)  # codes are stored packed to their width (2-4 bits: nibbles)
            params += m.qweight.numel()
        elif isinstance(m, NF4Linear):
            bits += m.nf4_weight().storage_bits()
            params += m.in_features * m.out_features
    return bits / params if params else 32.0


@torch.inference_mode()
def runs_as(model) -> str:
    """What the fast path runs the blocks' linear layers as: GGML block types, or dense float32."""
    kinds = Counter(TYPE_NAMES[m.ggml_type] if isinstance(m, PackedLinear) else
                    "NF4 (dequantized in each call)" if isinstance(m, NF4Linear) else "float32 (dequantized once)"
                    for m in model.layers.modules() if isinstance(m, (PackedLinear, QuantLinear, NF4Linear)))
    return ", ".join(kinds) if kinds else "float32"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="four rows, small budgets (default: off)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored (default: 4096)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--questions", type=int, default=40, help="held-out questions per task (default: 40)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--calib-len", type=int, default=512, help="calibration window length (default: 512)")
    p.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
    add_model_flag(p)
    p.add_argument("--out", default="docs/quantization", help="where the JSON, Markdown and PNG go "
                                                               "(default: docs/quantization)")
    args = p.parse_args()
    if args.quick:
        args.ppl_tokens, args.questions, args.calib_samples, args.calib_len = 1024, 8, 8, 256
    rows = [r for r in ROWS if (not args.quick or r[0] in QUICK) and (not args.only or r[0] in args.only.split(","))]
    h = table_harness(args.ppl_tokens, args.window, args.calib_samples, args.calib_len, args.model, p)
    base, ids, n_bytes, windows = h.base, h.ids, h.n_bytes, h.windows
    results = []

    def measure(label: str, method: str, loaded, bpw: float, size: int | None, seconds: float, fast) -> None:
        ppl = perplexity(loaded.model, ids, args.window, n_bytes)
        acc = {t: exact_match(fast, t, args.questions) for t in TASKS}
        row = {"label": label, "method": method, "bits_per_weight": round(bpw, 3),
               "file_mb": None if size is None else round(size / 1e6, 1), "perplexity": round(ppl.perplexity, 3),
               "bits_per_byte": round(ppl.bits_per_byte, 4), **{t: acc[t] for t in TASKS},
               "runs_as": runs_as(fast.model), "quantize_s": round(seconds, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)

    measure("float32 (GGUF dequantized)", "baseline", base, 32.0, None, 0.0, base)
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, kw in rows:
            loaded = copy.copy(base)
            loaded.model = copy.deepcopy(base.model)
            spec = make_spec(method, **kw)
            t0 = time.perf_counter()
            quantize_model_(loaded.model, spec, windows if method in CALIBRATED else None, progress=False)
            seconds = time.perf_counter() - t0
            folder = Path(tmp) / method
            write_loaded(loaded, folder, quant_spec=spec.to_json(), dtype="float16")
            fast = load_model(str(folder), packed=True)
            measure(label, method, loaded, bits_per_weight(loaded.model), folder_bytes(folder), seconds, fast)
            del loaded, fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(results))
    plot(results, out / "perplexity_vs_bits.png", model_name(args.model))
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md, perplexity_vs_bits.png", file=sys.stderr)


def markdown(results: list[dict]) -> str:
    head = ("| method | bits/weight | file (MB) | perplexity | " + " | ".join(f"{t} EM ({SHOTS}-shot)" for t in TASKS)
            + " | fast path runs the layers as | quantize (s) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        size = "—" if r["file_mb"] is None else f"{r['file_mb']}"
        em = " | ".join(f"{100 * r[t]:.0f}%" for t in TASKS)
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.2f} | {size} | {r['perplexity']:.2f} | {em} | "
                     f"{r['runs_as']} | {r['quantize_s']} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str = "SmolLM2-135M-Instruct") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((r for r in results if r["method"] == "baseline"), None)
    by_method: dict[str, list[dict]] = {}
    for r in results:
        if r["method"] != "baseline" and "W8A8" not in r["label"] and "W4A8" not in r["label"]:
            by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rs], [r["perplexity"] for r in rs], marker="o", label=method)
    if base:
        ax.axhline(base["perplexity"], color="gray", linestyle="--", label="float32")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers: codes + scales + zero-points)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{title}: weight-only quantization")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


if __name__ == "__main__":
    main()
