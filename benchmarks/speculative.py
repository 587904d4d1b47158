"""Speculative decoding vs plain greedy on the packed fast path (native C step, int8 kernels), SmolLM2-135M-Instruct,
on input-grounded prompts where copying from the prompt is the right answer (quote a paragraph, fix a typo, repeat
code) and one where it is not (rename a function: the model rewrites freely). Greedy, stop at the end of the turn;
every speculative output is asserted token-identical to plain greedy.

First, where one verification's time goes: a call of k rows (the last token and k - 1 drafts) at the workload's
position against a one-row decode step, blocks and head apart. Then per prompt, plain and speculative runs
interleaved (load drift hits both), medians of ``--runs``: prompt lookup with the adaptive draft length, the same
with a fixed length (``--gamma`` drafts every step), and layer-skip self-speculation (every second layer as the
draft). The ratio (plain time / speculative time, geometric mean over the prompts) is printed last.

    python benchmarks/speculative.py [--runs 3] [--threads 0] [--new-tokens 160] [--gamma 8]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from llmlab.api import load
from llmlab.infer.generate import chat_stop_ids, generate
from llmlab.infer.speculative import ModelDrafter, NgramDrafter, layer_skip_draft, speculative_generate
from llmlab.nn.cpu_kernels import best_variant, physical_cores, speed_flags

CODE = '''def moving_average(values, window):
    """Return the moving averages of values over a window."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
PARAGRAPH = ("The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its keeper "
             "climbed the narrow stairs, trimmed the wick and wound the clockwork that turned the great lens. Ships "
             "passing the rocks in the fog counted the flashes and knew where they were. When the last keeper "
             "retired, the light was automated, and the little house beside the tower became a museum for visitors.")
TYPO = ("Teh committee will meet on Thursday at ten o'clock in the main hall to discuss the budget for next year, "
        "the new parking rules and the schedule of the summer festival. Please bring your notes and arrive on time.")
PROMPTS = {
    "quote a paragraph": "Quote the following paragraph exactly, in quotation marks:\n\n" + PARAGRAPH,
    "fix a typo": "Fix the spelling mistake in this text and write the corrected text:\n\n" + TYPO,
    "repeat code": "Repeat this code exactly:\n\n" + CODE,
    "rename a function": "Rename the function moving_average to rolling_mean in this code. Reply with the whole "
                         "code only.\n\n" + CODE,
}


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(*args, **kwargs)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - t0, time.process_time() - c0


def medians(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


@torch.inference_mode()
def verification_cost(model, n_ctx: int, rows=(1, 2, 3, 5, 9), reps: int = 15) -> dict[int, tuple[float, float]]:
    """CPU ms (less noisy than wall time on a shared machine) of one call of k rows at position n_ctx, median of
    reps: (whole call, of it the head)."""
    native = model.native_step
    cache = model.new_cache(1, n_ctx + max(rows))
    ids = torch.randint(100, 20000, (1, n_ctx + max(rows)), generator=torch.Generator().manual_seed(0))
    model(ids[:, :n_ctx], cache=cache)
    out = {}
    for k in rows:
        x = ids[:, n_ctx:n_ctx + k]
        call, head = [], []
        for _ in range(reps):
            t0 = time.process_time()
            rope = model.rotary(torch.arange(n_ctx, n_ctx + k)[None], torch.float32)
            hidden = native.blocks(model.embed_tokens(x), rope, cache, n_ctx, None)
            t1 = time.process_time()
            native.logits(model, hidden)
            t2 = time.process_time()
            call.append(t2 - t0)
            head.append(t2 - t1)
        out[k] = (statistics.median(call) * 1e3, statistics.median(head) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement, after one warm-up (default: 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch / C kernel threads; 0 = physical cores (default: 0)")
    ap.add_argument("--new-tokens", type=int, default=160, help="most tokens to generate per prompt (default: 160)")
    ap.add_argument("--gamma", type=int, default=16, help="most draft tokens per step (default: 16)")
    ap.add_argument("--prompts", default=",".join(PROMPTS),
                    help=f"comma-separated subset of: {', '.join(PROMPTS)} (default: all)")
    ap.add_argument("--no-layer-skip", action="store_true", help="skip the layer-skip draft (default: measured)")
    ap.add_argument("--cost-reps", type=int, default=15,
                    help="calls per row count in the verification-cost table (default: 15)")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    print(f"threads {threads}; CPU flags: {speed_flags()}; int8 kernel variant: {best_variant()}")
    llm = load(packed=True)
    model, tok = llm.model, llm.tokenizer
    print(llm.loaded.native_step)
    stops = chat_stop_ids(model.config, tok)
    N, R, G = args.new_tokens, args.runs, args.gamma
    names = [p.strip() for p in args.prompts.split(",") if p.strip()]
    unknown = [n for n in names if n not in PROMPTS]
    if unknown:
        ap.error(f"unknown prompt(s) {unknown}; choose from {list(PROMPTS)}")

    cost = verification_cost(model, 200, reps=args.cost_reps)
    one = cost[1][0]
    print("\none target call of k rows at position 200 (blocks + head, CPU ms; in one-row steps):")
    for k, (ms, head) in cost.items():
        print(f"  k={k}: {ms:6.2f} ms (head {head:.2f}) = {ms / one:.2f} steps")

    skip = layer_skip_draft(model, 2)
    methods = {"ngram adaptive": lambda ids: speculative_generate(model, ids, N, NgramDrafter(), gamma=G,
                                                                  stop_ids=stops),
               f"ngram fixed {G}": lambda ids: speculative_generate(model, ids, N, NgramDrafter(), gamma=G,
                                                                    stop_ids=stops, adaptive=False)}
    if not args.no_layer_skip:
        methods["layer-skip adaptive"] = lambda ids: speculative_generate(
            model, ids, N, ModelDrafter(skip, len(ids) + N + G + 1), gamma=G, stop_ids=stops)
        methods["layer-skip fixed 2"] = lambda ids: speculative_generate(
            model, ids, N, ModelDrafter(skip, len(ids) + N + G + 1), gamma=2, stop_ids=stops, adaptive=False)

    ratios: dict[str, list[float]] = {m: [] for m in methods}
    cpu_ratios: dict[str, list[float]] = {m: [] for m in methods}
    print(f"\n{'prompt':<20}{'method':<22}{'tokens':>7}{'accepted':>10}{'calls':>7}{'rows':>6}"
          f"{'plain s':>9}{'spec s':>8}{'ratio':>7}{'CPU':>7}  same")
    for name in names:
        ids = tok.encode(llm.render_chat(PROMPTS[name]))
        plain = generate(model, [ids], N, stop_ids=stops)[0].ids  # also the warm-up
        for method, run in methods.items():
            out, stats = run(ids)  # warm-up, output check
            same = out == plain
            t_plain, t_spec = [], []
            for _ in range(R):  # interleaved; (wall, CPU) seconds
                t_plain.append(timed(generate, model, [ids], N, stop_ids=stops))
                t_spec.append(timed(run, ids))
            (tp, cp), (ts, cs) = (medians(t) for t in (t_plain, t_spec))
            ratios[method].append(tp / ts)
            cpu_ratios[method].append(cp / cs)
            print(f"{name:<20}{method:<22}{len(out):>7}{f'{stats.accepted}/{stats.drafted}':>10}"
                  f"{stats.target_calls:>7}{stats.rows:>6}{tp:>9.2f}{ts:>8.2f}{tp / ts:>6.2f}x{cp / cs:>6.2f}x  {same}")
            if not same:
                raise SystemExit(f"speculative output differs from greedy on {name!r} ({method})")
    print("\nspeculative / plain greedy (packed path), wall time (CPU time), geometric mean over the prompts; "
          "per prompt:")
    for method, r in ratios.items():
        print(f"  {method}: {geomean(r):.2f}x ({geomean(cpu_ratios[method]):.2f}x)  "
              f"({', '.join(f'{x:.2f}' for x in r)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
