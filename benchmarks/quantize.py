"""GPTQ calibration time on CPU (GPTQ, Frantar et al. 2022, arXiv:2210.17323): llmlab's ``quantize_gptq_`` on the
embedded SmolLM2-135M-Instruct (float32, packed=False) over windows of the builtin calibration text, with a
breakdown per layer type (running the block up to the layer, accumulating the Hessian, the GPTQ solve), then
the peer on the same model and windows when it can be imported, and the time ratio last.

The peer: AutoGPTQ's ``GPTQ`` class (``auto_gptq.quantization``, loaded without the package's ``__init__``,
whose Hugging Face model wrappers need an older transformers), driven as the reference's ``llama.py
--true-sequential`` drives it: one ``GPTQ`` per layer, its ``add_batch`` in forward hooks on whole block
forwards, ``fasterquant`` per layer, the block re-run for the next block's inputs. GPTQModel is not run: it needs
torch >= 2.14.1. Both use float32 on the CPU with the same grid, damp, block size and group size. llmlab solves
each layer on one thread (``gptq.single_thread``: MKL's multi-threaded ``cholesky_inverse`` can take seconds
where the cores are shared); the peer's ``fasterquant`` gets the same by default, so the ratio compares the
implementations, not MKL's thread scheduling (``--peer-own-threads``: the peer solves on ``--threads``).

    .venv/bin/python benchmarks/quantize.py                            # 128 x 512 tokens, 4-bit, group 32
    .venv/bin/python benchmarks/quantize.py --samples 4 --seq-len 64   # a quick check (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from llmlab.compress.calibrate import calibration_text, token_windows
from llmlab.compress.gptq import quantize_gptq_, single_thread
from llmlab.compress.sequential import BlockInputs
from llmlab.compress.spec import QuantSpec
from llmlab.nn.cpu_kernels import speed_flags
from table_harness import add_model_flag, load_checked, model_name

# the reference llama.py's true-sequential order, for the peer (llmlab finds the same stages from the forward)
LLAMA_STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def stage_name(names: list[str]) -> str:
    return "+".join(n.rsplit(".", 1)[-1].removesuffix("_proj") for n in names)  # e.g. "q+k+v"


def print_table(title: str, rows: dict[str, dict], total: float) -> None:
    """rows: stage -> {"layers", "forward", "hessian", "solve"} seconds summed over the blocks."""
    print(f"\n{title}: {total:.1f} s")
    print(f"  {'stage':<10}{'layers':>7}{'forward s':>11}{'hessian s':>11}{'solve s':>10}")
    for name, r in rows.items():
        print(f"  {name:<10}{r['layers']:>7}{r['forward']:>11.1f}{r['hessian']:>11.1f}{r['solve']:>10.1f}")
    inside = sum(r["forward"] + r["hessian"] + r["solve"] for r in rows.values())
    print(f"  {'other':<10}{'':>7}{total - inside:>11.1f}  (embeddings, finding the stages, block outputs)")


def run_ours(model, windows: torch.Tensor, args) -> float:
    spec = QuantSpec("gptq", bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                     options={"act_order": args.act_order})
    t0 = time.perf_counter()
    stats = quantize_gptq_(model, spec, windows, progress=not args.no_progress)
    total = time.perf_counter() - t0
    rows: dict[str, dict] = defaultdict(lambda: {"layers": 0, "forward": 0.0, "hessian": 0.0, "solve": 0.0})
    for name, s in stats.items():
        r = rows[stage_name(s["stage"])]
        r["layers"] += 1
        r["solve"] += s["seconds"]
        if name == s["stage"][0]:  # one pass (forward + Hessian) per stage, shared by its layers
            r["forward"] += s["forward_seconds"]
            r["hessian"] += s["hessian_seconds"]
    print_table("llmlab quantize_gptq_", dict(rows), total)
    print(f"  summed error (the reference's Losses): {sum(s['error'] for s in stats.values()):.4g}")
    return total


def peer_module():
    """auto_gptq.quantization, or None with the reason printed."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None:
        print("\npeer: missing (auto_gptq is not installed; `pip install --no-deps --target .peers auto-gptq` and "
              "PYTHONPATH=.peers bring its CPU-capable GPTQ class — a separate folder because its 0.7.1 wheel also "
              "installs a top-level `tests` package that hides llmlab's tests.conftest; gptqmodel needs "
              "torch>=2.14.1): llmlab's time alone")
        return None
    folder = Path(spec.submodule_search_locations[0]) / "quantization"
    sub = importlib.util.spec_from_file_location("_auto_gptq_quantization", folder / "__init__.py",
                                                 submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(sub)
    sys.modules[sub.name] = module
    try:
        sub.loader.exec_module(module)
    except ImportError as e:
        print(f"\npeer: missing (auto_gptq.quantization does not import: {e}): llmlab's time alone")
        return None
    return module


def timed_add_batch(gptq, clock: list[float]):
    """A forward hook feeding the peer's add_batch, its time added to clock[0]."""
    def hook(_module, inp, out):
        t = time.perf_counter()
        gptq.add_batch(inp[0].data, out.data)
        clock[0] += time.perf_counter() - t
    return hook


@torch.no_grad()
def run_peer(model, windows: torch.Tensor, args, agq) -> float:
    torch.cuda.synchronize = lambda *a: None  # its fasterquant synchronizes a GPU unconditionally
    rows = {stage_name(s): {"layers": 0, "forward": 0.0, "hessian": 0.0, "solve": 0.0} for s in LLAMA_STAGES}
    t0 = time.perf_counter()
    inputs = BlockInputs(model, windows)
    for _ in range(inputs.n_blocks):
        block = inputs.block()
        for stage in LLAMA_STAGES:
            r = rows[stage_name(stage)]
            gptq = {name: agq.GPTQ(block.get_submodule(name)) for name in stage}
            hessian = [0.0]
            handles = [block.get_submodule(name).register_forward_hook(timed_add_batch(gptq[name], hessian))
                       for name in stage]
            t = time.perf_counter()
            for x in inputs:
                inputs.run(x=x)
            for h in handles:
                h.remove()
            r["forward"] += time.perf_counter() - t - hessian[0]
            r["hessian"] += hessian[0]
            for g in gptq.values():
                g.quantizer.configure(args.bits, perchannel=args.group_size != -1, sym=args.symmetric)
                t = time.perf_counter()
                with contextlib.nullcontext() if args.peer_own_threads else single_thread():
                    g.fasterquant(blocksize=128, percdamp=0.01,
                                  group_size=args.group_size if args.group_size > 0 else -1,
                                  actorder=args.act_order, static_groups=args.act_order)
                r["solve"] += time.perf_counter() - t
                r["layers"] += 1
                g.free()
        inputs.advance()
    total = time.perf_counter() - t0
    print_table("peer: AutoGPTQ GPTQ (add_batch + fasterquant), reference llama.py loop", rows, total)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (default: 128, as the paper)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="weight bits (default: 4)")
    ap.add_argument("--group-size", type=int, default=32,
                    help="input columns per scale: 32 = one GGML block (default), 0 = per output channel, -1 = per "
                         "tensor; must divide 576 and 1536")
    ap.add_argument("--symmetric", action="store_true", help="symmetric grid (Q4_0-like); default asymmetric (Q4_1)")
    ap.add_argument("--act-order", action="store_true", help="visit columns by descending Hessian diagonal "
                                                             "(static groups)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2, the target machine)")
    ap.add_argument("--calib", default="builtin", help="calibration text: 'builtin' (default) or a UTF-8 file")
    ap.add_argument("--no-peer", action="store_true", help="skip the peer even when it is importable")
    ap.add_argument("--peer-own-threads", action="store_true",
                    help="the peer's fasterquant on --threads threads (default: one, as llmlab's solve)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_flag(ap)
    args = ap.parse_args()

    sys.stdout.reconfigure(line_buffering=True)  # each table as it is done, also into a log file
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: {speed_flags()}")
    loaded = load_checked(ap, args.model, packed=False)  # SmolLM2-135M-Instruct by default, dequantized to float32
    windows = token_windows(loaded.tokenizer, calibration_text(args.calib), args.samples, args.seq_len)
    print(f"{model_name(args.model)}, {args.samples} x {args.seq_len} tokens of {args.calib} text, {args.bits}-bit, "
          f"group {args.group_size}, {'symmetric' if args.symmetric else 'asymmetric'}"
          f"{', act order' if args.act_order else ''}")
    agq = None if args.no_peer else peer_module()
    fresh = copy.deepcopy(loaded.model) if agq is not None else None
    ours = run_ours(loaded.model, windows, args)
    if agq is None:
        return 0
    del loaded
    with contextlib.suppress(AttributeError):
        torch.cuda.empty_cache = lambda: None  # its free() empties a GPU cache
    peer = run_peer(fresh, windows, args, agq)
    print(f"\npeer / llmlab time: {peer:.1f} s / {ours:.1f} s = {peer / ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
