"""Peak RSS of LoRA on an fp32 base vs QLoRA (NF4 base, and the GGUF's own packed Q4_1 blocks).

Issue 9's goal: QLoRA peak memory <= 0.6x LoRA on an fp32 base (SmolLM2-135M, LoRA r=16 on all linear
layers, sequence 256, batch 4, AdamW). Each configuration runs in its own fresh subprocess:
load -> prepare the base -> LoRA -> 2 training steps (forward, backward, AdamW on the LoRA parameters),
recording ``ru_maxrss`` (the process's peak RSS so far) after each phase. The table and the ratios
against the fp32 base are printed last.

    .venv/bin/python benchmarks/qlora_memory.py                 # all configurations
    .venv/bin/python benchmarks/qlora_memory.py --ckpt          # with activation checkpointing too
    .venv/bin/python benchmarks/qlora_memory.py --configs fp32,nf4 --steps 2
    .venv/bin/python benchmarks/qlora_memory.py --ckpt-only --chunked-loss   # the low-activation setup

``--chunked-loss``: the output head and cross-entropy run on 256 positions at a time under activation
checkpointing, so the (B, T, 49152) logits (201 MB in float32, and as many again for log-softmax and its
gradient) never exist at once. "saved MiB" is what autograd saved for backward in the first forward
(distinct storages, from ``torch.autograd.graph.saved_tensors_hooks``): deterministic, unlike RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {  # name -> (how the model is loaded, QLoRA base or None)
    "fp32": ("fp32", None),  # LoRA on the float32 base
    "nf4": ("fp32", "nf4"),  # load float32, then quantize to NF4 (double quantization)
    "nf4-savedw": ("fp32", "nf4"),  # as nf4, with the plain F.linear forward that saves W for backward
    "nf4-lowpeak": ("nf4", "nf4"),  # load_model(quantize="nf4"): NF4 built tensor by tensor from the GGUF
    "packed-q4_1": ("packed", "packed"),  # load_model(packed=True): the GGUF's own Q4_1 blocks
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB


def chunked_lm_loss(model, ids, chunk: int = 256):
    """Mean next-token cross-entropy with the head + loss recomputed per chunk of positions in backward."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    hidden = model(ids[:, :-1], return_hidden=True)  # (B, T, D)
    h, y = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)  # (N, D), (N,)

    def part(hc, yc):
        return F.cross_entropy(model.lm_head(hc).float(), yc, reduction="sum")

    total = sum(checkpoint(part, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / y.numel()


def _saved_mb(fn):
    """(fn(), MiB of distinct storages autograd saved for backward while fn ran)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()) / 2**20


def child(name: str, steps: int, batch: int, seq: int, rank: int, ckpt: bool, threads: int,
          chunked: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    from llmlab.formats.load import load_model
    from llmlab.nn.lora import LoRAConfig, apply_lora_, mark_only_lora_trainable_
    from llmlab.nn.qlora import model_bytes, prepare_qlora_

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    how, base = CONFIGS[name]
    if name == "nf4-savedw":  # before NF4Matmul: autograd saves each layer's dequantized W until backward
        from llmlab.nn.nf4 import NF4Linear

        def saving_forward(self, x):
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            return F.linear(x.to(self.compute_dtype), self.dequantize(), bias).to(x.dtype)

        NF4Linear.forward = saving_forward
    out: dict = {"config": name, "rss_start": _rss_mb()}
    if how == "nf4":
        model = load_model(quantize="nf4").model
    else:
        model = load_model(packed=how == "packed").model
    out["rss_load"] = _rss_mb()
    if base is not None:
        info = prepare_qlora_(model, base)
        out["quantized"], out["kept"] = len(info["quantized"]), len(info["kept"])
    out["model_mb"] = model_bytes(model) / 2**20
    out["rss_prepare"] = _rss_mb()
    apply_lora_(model, LoRAConfig(r=rank, alpha=2.0 * rank, target_modules="all-linear"))
    out["trainable"] = mark_only_lora_trainable_(model)
    if ckpt:
        from llmlab.train.loop import enable_activation_checkpointing_

        enable_activation_checkpointing_(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq + 1))  # (B, T + 1)
    losses, times = [], []
    def forward():
        if chunked:
            return chunked_lm_loss(model, ids)
        logits = model(ids[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    for step in range(steps):
        t0 = time.perf_counter()
        if step == 0:
            loss, out["saved_mb"] = _saved_mb(forward)
        else:
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    out.update(rss_peak=_rss_mb(), step_s=times[-1], losses=losses)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated frozen bases (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per config (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4, help="rows per step (default: %(default)s)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (default: %(default)s)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank, all linear layers (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--ckpt", action="store_true", help="also run every config with activation checkpointing")
    ap.add_argument("--ckpt-only", action="store_true", help="only with activation checkpointing")
    ap.add_argument("--chunked-loss", action="store_true", help="head + loss per 256 positions, recomputed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.batch, a.seq, a.rank, a.child_ckpt, a.threads,
                               a.chunked_loss)))
        return
    rows = []
    for ckpt in (True,) if a.ckpt_only else (False, True) if a.ckpt else (False,):
        for name in a.configs.split(","):
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(a.steps), "--batch", str(a.batch),
                   "--seq", str(a.seq), "--rank", str(a.rank), "--threads", str(a.threads)]
            cmd += ["--chunked-loss"] if a.chunked_loss else []
            done = subprocess.run(cmd + (["--child-ckpt"] if ckpt else []), capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            r["ckpt"] = ckpt
            rows.append(r)
            print(f"done {name}{' +ckpt' if ckpt else ''}: peak {r['rss_peak']:.0f} MiB", file=sys.stderr)
    print(f"\nSmolLM2-135M-Instruct, LoRA r={a.rank} all-linear, batch {a.batch} x seq {a.seq}, AdamW, "
          f"{a.steps} steps, {a.threads} threads{', chunked loss' if a.chunked_loss else ''}; "
          "peak RSS (ru_maxrss) in MiB after each phase\n")
    head = (f"{'config':<14}{'ckpt':>5}{'weights':>9}{'load':>8}{'prepare':>9}{'peak':>8}{'saved':>8}{'step s':>8}"
            "  losses")
    print(head)
    print("-" * len(head))
    for r in rows:
        losses = " ".join(f"{x:.3f}" for x in r["losses"])
        print(f"{r['config']:<14}{'yes' if r['ckpt'] else 'no':>5}{r['model_mb']:>9.0f}{r['rss_load']:>8.0f}"
              f"{r['rss_prepare']:>9.0f}{r['rss_peak']:>8.0f}{r.get('saved_mb', 0):>8.0f}{r['step_s']:>8.2f}  {losses}")
    print("\npeak RSS ratio vs LoRA on the fp32 base (goal <= 0.60):")
    for ckpt in sorted({r["ckpt"] for r in rows}):
        ref = next((r for r in rows if r["config"] == "fp32" and r["ckpt"] == ckpt), None)
        for r in rows:
            if ref is not None and r["ckpt"] == ckpt and r is not ref:
                print(f"  {r['config']:<14}{' +ckpt' if ckpt else '':<7}{r['rss_peak'] / ref['rss_peak']:.2f}x")


if __name__ == "__main__":
    main()
