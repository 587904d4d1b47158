"""Training throughput: llmlab's GPT-2 vs transformers' GPT2LMHeadModel, same configuration, same run.

Config (issue 4): 6 layers, 6 heads, dim 384, context 256, vocab 50304, batch 8, bf16 autocast, AdamW,
gradient clipping at 1.0. One optimizer step = forward, cross-entropy, backward, clip, AdamW. Median
of --runs timed windows of --steps steps after --warmup steps. ``llmlab DecoderLM fused head`` computes the
LM head and the cross-entropy as one chunked operation (``nn/linear_ce.py``, as the training loop does).
Also prints model FLOPs utilisation (``train/mfu.py``: 6 N + 12 L T d per token) against the measured matmul
peak of the units the run uses: bf16 where the CPU has bf16 units, fp32 where llmlab emulates bf16 on fp32
units; the header says which, with the CPU flags.

    python benchmarks/train.py                 # CPU, bf16 autocast
    python benchmarks/train.py --device cuda --preset gpt2-124m --batch 32 --seq 1024 --compile
    python benchmarks/train.py --profile --compile --skip-peer   # where the time of a step goes, per variant

``--profile`` runs two more steps of each variant under ``torch.profiler`` and prints the time per step of each
phase (forward + loss, backward, clip + AdamW + zero_grad) and the self time of each kind of operator: matrix
products (``mm``/``addmm``/``bmm``/oneDNN), attention, the loss (log-softmax, NLL, the chunked head's own ops),
the optimizer (AdamW and gradient clipping), dtype casts, the other ATen ops (norms, GELU, adds, embedding, and
the AdamW loop's own arithmetic), and the code of compiled graphs outside those ATen calls (Inductor's kernels).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from llmlab.models.config import ModelConfig
from llmlab.models.decoder import DecoderLM
from llmlab.nn.autocast import autocast
from llmlab.nn.cpu_kernels import cpu_description
from llmlab.nn.linear_ce import linear_cross_entropy
from llmlab.train.mfu import flops_per_token, matmul_path, measure_peak, mfu
from llmlab.train.optim import build_adamw

SHAPES = {
    "issue": dict(dim=384, n_layers=6, n_heads=6, seq=256, vocab=50304),
    "gpt2-124m": dict(dim=768, n_layers=12, n_heads=12, seq=1024, vocab=50304),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(model, opt, x, y, dtype, device, hf: bool, fused: bool = False, loss_fn=None):
    # transformers: torch.autocast as its Trainer uses it; llmlab: its training loop's autocast (emulated on
    # CPUs without bf16 units, see llmlab.nn.autocast).
    # The phases are named for --profile (record_function costs nothing when no profiler runs).
    ctx = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32) if hf else autocast(device, dtype)
    with ctx, record_function("phase: forward + loss"):
        if loss_fn is not None:  # forward and cross-entropy as one compiled graph
            loss = loss_fn(x, y)
        elif fused:
            h = model(x, return_hidden=True)  # (B, T, D)
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, y.view(-1))
        else:
            logits = model(x).logits if hf else model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    with record_function("phase: backward"):
        loss.backward()
    with record_function("phase: clip + AdamW + zero_grad"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


# operator name -> kind, first match wins (self CPU time, so nothing is counted twice)
OP_KINDS = [
    ("matmul", re.compile(r"aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$|mkldnn|onednn|linear_backward")),
    ("attention", re.compile(r"scaled_dot_product|flash_attention|_efficient_attention")),
    ("loss", re.compile(r"log_softmax|nll_loss|cross_entropy|LinearCrossEntropy")),
    ("optimizer", re.compile(r"_foreach_|adamw|Optimizer|clip_grad|linalg_vector_norm")),
    ("casts", re.compile(r"aten::(copy_|_to_copy|to|clone)$")),
    ("compiled graph (Inductor kernels)", re.compile(r"Torch-Compiled Region|CompiledFunction|CompiledFxGraph|"
                                                     r"inductor|cpp_fused|graph_\d")),
    ("other ATen ops", re.compile(r"^aten::")),
]


def profile_breakdown(name, step, steps: int = 2) -> None:
    """Run ``steps`` more steps under the profiler; print the self time per step of each kind of operator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t) / steps
    per_kind, per_op = defaultdict(float), defaultdict(dict)
    events = prof.key_averages()
    phases = {ev.key[len("phase: "):]: ev.cpu_time_total / 1e3 / steps for ev in events if ev.key.startswith("phase: ")}
    for ev in events:
        if ev.key.startswith("phase: "):
            continue
        kind = next((k for k, rx in OP_KINDS if rx.search(ev.key)), "Python and the rest")
        per_kind[kind] += ev.self_cpu_time_total / 1e3 / steps  # ms per step
        per_op[kind][ev.key] = ev.self_cpu_time_total / 1e3 / steps
    per_kind["Python and the rest"] += max(0.0, wall * 1e3 - sum(per_kind.values()))
    print(f"  profile of {name}: {wall * 1e3:.0f} ms per step (profiled, so slower than timed); by phase: "
          + ", ".join(f"{ph} {ms:.0f} ms" for ph, ms in phases.items()))
    for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        top = sorted(per_op[kind].items(), key=lambda kv: -kv[1])[:3]
        print(f"    {kind:<36} {ms:>8.1f} ms  {100 * ms / (wall * 1e3):5.1f}%   "
              + ", ".join(f"{op} {t:.0f}" for op, t in top))


def measure(name, model, opt, args, device, dtype, hf=False, runs=None, steps=None, warmup=None, fused=False,
            loss_fn=None):
    V = args.vocab
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (args.batch, args.seq), generator=g).to(device)
    y = torch.randint(0, V, (args.batch, args.seq), generator=g).to(device)
    runs, steps, warmup = runs or args.runs, steps or args.steps, args.warmup if warmup is None else warmup
    for _ in range(warmup):
        step_fn(model, opt, x, y, dtype, device, hf, fused, loss_fn)
    sync(device)
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(steps):
            step_fn(model, opt, x, y, dtype, device, hf, fused, loss_fn)
        sync(device)
        rates.append(steps * args.batch * args.seq / (time.perf_counter() - t))
    rate = statistics.median(rates)
    print(f"{name:<28} {rate:>10.0f} tok/s   (runs: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    if args.profile and device.type == "cpu":
        profile_breakdown(name, lambda: step_fn(model, opt, x, y, dtype, device, hf, fused, loss_fn))
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="issue", choices=sorted(SHAPES), help="model shape (default: issue)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq", type=int, default=0, help="context length; 0 = the preset's (default: 0)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype (default: bfloat16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed run (default: 5)")
    p.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (default: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--peer-runs", type=int, default=0,
                   help="timed runs for the peer; 0 = --runs (bf16 autocast on CPUs without bf16 units is ~30x "
                        "slower, so fewer runs keep the benchmark short) (default: 0)")
    p.add_argument("--compile", action="store_true", help="also measure llmlab with torch.compile (default: off)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"],
                   help="torch.compile mode of the whole-step variant (default: default)")
    p.add_argument("--skip-peer", action="store_true", help="do not run transformers (default: off)")
    p.add_argument("--profile", action="store_true",
                   help="after each CPU variant, profile two more steps and print where the time goes by kind of "
                        "operator (default: off)")
    args = p.parse_args()
    shape = SHAPES[args.preset]
    args.seq = args.seq or shape["seq"]
    args.vocab = shape["vocab"]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig(arch="gpt2", vocab_size=args.vocab, dim=shape["dim"], n_layers=shape["n_layers"],
                      n_heads=shape["n_heads"], ffn_dim=4 * shape["dim"], max_seq_len=args.seq, attn_bias=True,
                      mlp_bias=True, tie_embeddings=True)
    flops_token = flops_per_token(cfg, args.seq)
    path = matmul_path(device, dtype)
    peak = measure_peak(device, path.dtype)
    print(f"CPU: {cpu_description()}" if device.type == "cpu" else f"device: {torch.cuda.get_device_name()}")
    print(f"GPT-2 {args.preset}: {cfg.num_params() / 1e6:.1f}M parameters, batch {args.batch} x {args.seq}, "
          f"{args.dtype} autocast, {device}, {torch.get_num_threads()} threads; measured matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s of {path.label}", flush=True)
    results = {}
    if not args.skip_peer:
        try:
            import transformers
        except ImportError:
            print("transformers: skipped (not installed: pip install -e '.[test]')")
        else:
            hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=cfg.dim,
                                             n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0)
            hf_model = transformers.GPT2LMHeadModel(hf_cfg).to(device).train()
            # transformers' Trainer defaults to the fused AdamW kernel (``adamw_torch_fused``) with torch >= 2.8
            hf_opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
            few = args.peer_runs > 0
            results["transformers"] = measure("transformers GPT2LMHeadModel", hf_model, hf_opt, args, device, dtype,
                                              hf=True, runs=args.peer_runs or None, steps=1 if few else None,
                                              warmup=1 if few else None)
            del hf_model, hf_opt
    model = DecoderLM(cfg).to(device).train()
    opt = build_adamw(model, 1e-4, 0.1)
    results["llmlab"] = measure("llmlab DecoderLM", model, opt, args, device, dtype)
    results["llmlab fused head"] = measure("llmlab DecoderLM fused head", model, opt, args, device, dtype, fused=True)
    if args.compile:
        cmodel = torch.compile(model)
        results["llmlab compiled"] = measure("llmlab DecoderLM compiled", cmodel, opt, args, device, dtype)

        def forward_loss(x, y):  # the model and its cross-entropy in one graph: the float32 logits are fused away
            logits = model(x)
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))

        closs = torch.compile(forward_loss, mode=args.compile_mode)
        name = f"llmlab compiled with loss ({args.compile_mode})"
        results[name] = measure(name, model, opt, args, device, dtype, loss_fn=closs)
    print(f"model FLOPs utilisation (6N + 12LTd = {flops_token / 1e6:.0f} MFLOP per token, vs the peak of "
          f"{path.label}):")
    for name, rate in results.items():
        print(f"  {name}: {100 * mfu(rate, flops_token, peak):.1f}%")
    if "transformers" in results:
        print("ratios:")
        for name, rate in results.items():
            if name != "transformers":
                print(f"  {name} / transformers: {rate / results['transformers']:.2f}x")


if __name__ == "__main__":
    main()
