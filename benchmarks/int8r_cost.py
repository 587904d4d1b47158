"""What the selective residual costs (``--packed-kernel int8r``): CPU time of the native C step on
SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, real activations: the share of blocks with an outlier depends on
them) for ``int8``, ``int8r`` at each outlier threshold T of --thresholds, and ``int8x2``: one decode step at batch 1,
8 and 32 (position 128), and a 512-token prefill. CPU time (process time) at --threads threads, so a loaded machine
moves the numbers less than wall time would; the paths alternate within each run, medians and fastest of --runs,
ratios to int8 printed last.

    python benchmarks/int8r_cost.py [--runs 15] [--threads 1] [--thresholds 3,4,6,8]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch

from llmlab.api import load
from llmlab.nn import packed_linear
from llmlab.nn.cpu_kernels import best_variant, speed_flags
from table_harness import add_model_flag, load_checked, model_name


def cpu_time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="timed runs per measurement (default: 15)")
    ap.add_argument("--threads", type=int, default=1, help="torch and C kernel threads (default: 1)")
    ap.add_argument("--thresholds", default="3,4,6,8", help="int8r thresholds T, comma-separated (default: 3,4,6,8)")
    add_model_flag(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = load_checked(ap, args.model, loader=load, packed=True)
    paths: dict[str, torch.nn.Module] = {}
    for t in [float(v) for v in args.thresholds.split(",")]:
        packed_linear.ACT_RESIDUAL["int8r"] = t  # read when the native step is built
        paths[f"int8r T={t:g}"] = load(args.model, packed=True, packed_kernel="int8r").model
    packed_linear.ACT_RESIDUAL["int8r"] = packed_linear.RESIDUAL_T
    paths = {"int8": load(args.model, packed=True, packed_kernel="int8").model, **paths,
             "int8x2": load(args.model, packed=True, packed_kernel="int8x2").model}
    ids = llm.tokenizer.encode(inspect.getsource(json))
    work = {}
    for name, model in paths.items():
        assert model.native_step is not None, name
        for batch in (1, 8, 32):
            cache = model.new_cache(batch, 160)
            prompts = torch.tensor([ids[i:i + 128] for i in range(batch)])  # different prompts
            model(prompts, cache=cache)
            tok = prompts[:, -1:]

            def step(model=model, cache=cache, tok=tok):
                cache.length = 128
                model(tok, cache=cache)

            work[name, f"decode b{batch}"] = step
        p512 = torch.tensor([ids[:512]])

        def prefill(model=model, p512=p512):
            model(p512, cache=model.new_cache(1, 512))

        work[name, "prefill 512"] = prefill
    times: dict[tuple[str, str], list[float]] = {k: [] for k in work}
    for fn in work.values():
        fn()  # warm-up
    for _ in range(args.runs):
        for key, fn in work.items():
            times[key].append(cpu_time(fn))
    blocks = "/".join(t for t in llm.loaded.tensor_types if t.startswith("Q")) or "Q8_0 (packed at load)"
    print(f"{model_name(args.model)} {blocks}, native C step ({best_variant()}), {args.threads} thread(s), CPU ms "
          f"(median of {args.runs}); CPU flags: {speed_flags()}")
    cols = ["decode b1", "decode b8", "decode b32", "prefill 512"]
    print(f"{'path':<14}" + "".join(f"{c:>13}" for c in cols))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name in paths:
        print(f"{name:<14}" + "".join(f"{med[name, c]:>13.2f}" for c in cols))
    low = {k: min(v) * 1e3 for k, v in times.items()}  # the least disturbed run: less noise on a shared machine
    print("fastest run:")
    for name in paths:
        print(f"{name:<14}" + "".join(f"{low[name, c]:>13.2f}" for c in cols))
    print("ratios to int8 (CPU time; median, then fastest run):")
    for name in list(paths)[1:]:
        print(f"  {name:<12}" + "".join(f"{med[name, c] / med['int8', c]:>13.3f}" for c in cols))
        print(f"  {'':<12}" + "".join(f"{low[name, c] / low['int8', c]:>13.3f}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
