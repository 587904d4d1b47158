"""LoRA fine-tuning step: llmlab vs transformers + peft on SmolLM2-135M-Instruct (issue 9, "Benchmarks").

LoRA (Hu et al. 2021, arXiv:2106.09685) r=16, alpha=32, dropout 0 on every linear layer except the output
head; QLoRA (Dettmers et al. 2023, arXiv:2305.14314) puts the same adapter on an NF4 base. One step =
forward, SFT loss, backward, AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0.01, LoRA parameters only),
zero_grad. Both sides get the same weights (llmlab's dequantized Q4_1 GGUF, written once as an HF folder for
transformers), the same 4 x 256 token rows (the built-in ``addition`` SFT task, packed), the same target
tokens (HF shifts ``labels`` itself, so it is given ``labels`` moved one position right), fp32, and the
same thread count. The first step's loss of each variant is printed: equal losses mean equal work.

Variants (each in its own subprocess, so peak RSS is its own):

- ``peft causal``: transformers + peft, plain causal attention over the rows, logits for every position;
- ``llmlab causal``: the same rows, plain causal attention (``is_causal``), ``train.sft.sft_loss``;
- ``llmlab packed``: the real SFT path: block-diagonal mask per packed example, position ids restarting;
- ``llmlab <base> packed`` for each other ``--bases`` entry, QLoRA as ``llmlab sft --method qlora`` builds it
  (``nn.qlora.prepare_qlora_``): ``nf4`` = NF4 with double quantization, ``packed`` = the GGUF's own Q4_1
  blocks (``load_model(packed=True)``);
- ``llmlab packed 8-bit AdamW``: ``build_adamw(..., eight_bit=True)``.

Step time is the median over ``--steps`` steps after ``--warmup``; tok/s counts all row tokens (B x T).
Peak RSS: the subprocess's own ``VmHWM`` (load + training; ``ru_maxrss`` would include the driver's), and the
training-only peak (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` once the model is loaded,
where the kernel allows it).

    nice python benchmarks/finetune.py [--steps 5] [--warmup 2] [--threads 2] [--bases fp32,nf4,packed]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlab.common import LlmlabError
from llmlab.nn.cpu_kernels import cpu_description
from table_harness import add_model_flag

LR, BETAS, WD = 1e-4, (0.9, 0.95), 0.01
R, ALPHA = 16, 32.0
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- setup (parent process) ---------------------------------------------------------------------------


def save_source(workdir: Path, model: str | None) -> None:
    """Tell the workers which model to load (``--model``; None: the embedded SmolLM2-135M-Instruct)."""
    (workdir / "model.json").write_text(json.dumps(model))


def saved_source(workdir: Path) -> str | None:
    return json.loads((workdir / "model.json").read_text())


def prepare(workdir: Path, rows: int, seq: int, model: str | None = None) -> None:
    """The HF folder of llmlab's weights and the token rows, written once for every variant."""
    from llmlab.data.sft import SFTDataConfig, build_sft_data
    from llmlab.formats.hf import write_folder
    from llmlab.formats.load import load_model
    from llmlab.tokenizer.chat import ChatTemplate

    save_source(workdir, model)
    loaded = load_model(model)
    tok = loaded.tokenizer
    specials = {"bos_token": tok.id_to_token[tok.bos_id], "eos_token": tok.id_to_token[tok.eos_id]}
    data = build_sft_data(SFTDataConfig(task="addition", seq_len=seq, task_examples=400), tok,
                          ChatTemplate(loaded.chat_template, specials))
    b = data.batch(0, rows, seed=0)
    torch.save({"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids,
                "doc_ids": b.doc_ids}, workdir / "batch.pt")
    write_folder(workdir / "hf", loaded.config, loaded.model.state_dict())
    print(f"rows: {rows} x {seq} tokens, {int(b.doc_ids.max(1).values.add(1).sum())} examples packed, "
          f"{b.trained_tokens} target tokens, {int((b.doc_ids >= 0).sum())} real tokens", flush=True)


# ---- one variant (child process) ----------------------------------------------------------------------


def rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the training peak can be read apart from loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def time_steps(step, warmup: int, steps: int) -> tuple[list[float], float]:
    first = float(step())
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times, first


def setup_peft(workdir: Path, batch: dict, causal: bool):
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32,
                                                              attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS,
                                             bias="none", task_type="CAUSAL_LM")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS,
                            weight_decay=WD)
    ids, labels = batch["input_ids"], batch["labels"]
    # ours: labels[t] is the target of position t; HF's: labels[t] is the token at t, shifted inside the loss
    hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)  # (B, T)
    assert bool((labels[:, -1] == -100).all())  # so the shift drops no target

    def step():
        loss = model(input_ids=ids, labels=hf_labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def setup_llmlab(workdir: Path, batch: dict, causal: bool, base: str, eight_bit: bool):
    from llmlab.data.sft import SFTBatch
    from llmlab.formats.load import load_model
    from llmlab.nn.lora import LINEAR_TYPES, LoRAConfig, LoRALinear, apply_lora_, mark_only_lora_trainable_
    from llmlab.train.optim import build_adamw
    from llmlab.train.sft import sft_loss

    model = load_model(saved_source(workdir), packed=base == "packed").model
    if base != "fp32":
        try:  # the QLoRA base as the trainer builds it
            from llmlab.nn.qlora import prepare_qlora_
        except ImportError:
            prepare_qlora_ = None
        if prepare_qlora_ is not None:
            prepare_qlora_(model, base=base)
        elif base == "nf4":
            from llmlab.nn.nf4 import quantize_linears_nf4_

            quantize_linears_nf4_(model)
    if any(isinstance(m, LINEAR_TYPES) for n, m in model.named_modules() if n.endswith("q_proj")):
        apply_lora_(model, LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    else:  # an older LoRA that cannot wrap this base type: wrap the same targets by hand
        for name, m in list(model.named_modules()):
            if name.rpartition(".")[2] in HF_TARGETS:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, LoRALinear(m, R, ALPHA))
    mark_only_lora_trainable_(model)
    model.train()
    opt = build_adamw(model, LR, WD, betas=BETAS, eight_bit=eight_bit)
    b = SFTBatch(batch["input_ids"], batch["labels"], batch["position_ids"], batch["doc_ids"])
    if causal:  # one causal sequence per row: positions 0..T-1, no mask
        B, T = b.input_ids.shape
        b = SFTBatch(b.input_ids, b.labels, torch.arange(T).expand(B, T).contiguous(), torch.zeros_like(b.doc_ids))

    def step():
        loss, _ = sft_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    batch = torch.load(workdir / "batch.pt")
    v = json.loads(args.worker)
    if v["side"] == "peft":
        step = setup_peft(workdir, batch, v["causal"])
    else:
        step = setup_llmlab(workdir, batch, v["causal"], v["base"], v["eight_bit"])
    measure_and_report(step, args)


def measure_and_report(step, args, **extra) -> None:
    """Worker side: time ``step`` and print one RESULT line (times, first loss, peak RSS, training peak).

    The peak RSS is this process's own VmHWM (loading, then training), not ``ru_maxrss``: Linux carries
    ``ru_maxrss`` over ``execve``, so a worker's would be at least the driver's peak at the time it started the
    worker (measured: a driver holding 1.5 GB gives a fresh ``python -c`` child ru_maxrss 1.5 GB, VmHWM 11 MB)."""
    load_peak = vm_hwm_mb()
    reset = rss_reset()
    times, first = time_steps(step, args.warmup, args.steps)
    out = {"times": times, "loss": first, "maxrss_mb": max(load_peak, vm_hwm_mb()),
           "train_peak_mb": vm_hwm_mb() if reset else None, **extra}
    print("RESULT " + json.dumps(out), flush=True)


# ---- driver -------------------------------------------------------------------------------------------


def run_worker(script: str, name: str, variant: dict, args, workdir: Path) -> dict | None:
    """Driver side: run ``script --worker`` in a fresh process; its RESULT (with the median step) or None."""
    cmd = [sys.executable, script, "--worker", json.dumps(variant), "--workdir", str(workdir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"{name:<28} failed: {tail}", flush=True)
        return None
    r = json.loads(line[len("RESULT "):])
    r["step"] = statistics.median(r["times"])
    return r


def run_variant(name: str, variant: dict, args, workdir: Path) -> dict | None:
    r = run_worker(__file__, name, variant, args, workdir)
    if r is None:
        return None
    train = f"{r['train_peak_mb']:>6.0f}" if r["train_peak_mb"] is not None else "     ?"
    print(f"{name:<28} {r['step']:>7.3f} s {args.rows * args.seq / r['step']:>7.0f} tok/s "
          f"{r['maxrss_mb']:>7.0f} MB {train} MB   loss {r['loss']:.5f}   "
          f"(steps: {', '.join(f'{t:.2f}' for t in r['times'])})", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, >= 1 (default: 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default: 2)")
    p.add_argument("--rows", type=int, default=4, help="rows per step (default: 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default: 256)")
    p.add_argument("--bases", default="fp32,nf4", help="llmlab base weights, comma-separated: fp32 (always "
                   "run), nf4 (QLoRA), packed (LoRA over the GGUF's Q4_1 blocks) (default: fp32,nf4)")
    p.add_argument("--no-8bit", action="store_true", help="skip the 8-bit AdamW variant (default: run it)")
    p.add_argument("--skip-peer", action="store_true", help="do not run transformers + peft (default: off)")
    add_model_flag(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    bad = sorted(set(bases) - {"fp32", "nf4", "packed"})
    if bad:
        p.error(f"--bases {','.join(bad)}: use fp32, nf4 or packed")
    args.warmup = max(1, args.warmup)
    print(f"CPU: {cpu_description()}")
    print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; torch "
          f"{torch.__version__}, {args.threads} threads")
    print(f"LoRA r={R} alpha={ALPHA:g} dropout 0, all linear layers but lm_head; fp32; AdamW lr {LR} (LoRA only); "
          f"median of {args.steps} steps after {args.warmup}")
    variants: dict[str, dict] = {}
    if not args.skip_peer:
        try:
            import peft
            import transformers
        except ImportError as e:
            print(f"transformers + peft: skipped ({e.name} not installed: pip install transformers peft)")
        else:
            print(f"peer: transformers {transformers.__version__}, peft {peft.__version__}")
            variants["peft causal"] = dict(side="peft", causal=True)
    variants["llmlab causal"] = dict(side="llmlab", causal=True, base="fp32", eight_bit=False)
    variants["llmlab packed"] = dict(side="llmlab", causal=False, base="fp32", eight_bit=False)
    for base in bases:
        if base != "fp32":
            variants[f"llmlab {base} packed"] = dict(side="llmlab", causal=False, base=base, eight_bit=False)
    if not args.no_8bit:
        variants["llmlab packed 8-bit AdamW"] = dict(side="llmlab", causal=False, base="fp32", eight_bit=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            prepare(workdir, args.rows, args.seq, args.model)
        except LlmlabError as e:  # e.g. --seq too short for any example: a usage error, one line
            p.error(str(e))
        print(f"{'variant':<28} {'step':>9} {'tok/s':>13} {'peak RSS':>10} {'train pk':>9}")
        for name, variant in variants.items():
            r = run_variant(name, variant, args, workdir)
            if r is not None:
                results[name] = r
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("ratios (step-time speedup, peak RSS ratio):")
    if "peft causal" in results:
        peer = results["peft causal"]
        for name, r in results.items():
            if name != "peft causal":
                print(f"  {name} vs peft causal: {peer['step'] / r['step']:.2f}x faster, "
                      f"{r['maxrss_mb'] / peer['maxrss_mb']:.2f}x peak RSS")
    base = results.get("llmlab packed")
    if base is not None:
        for name, r in results.items():
            if name.startswith("llmlab") and name != "llmlab packed" and "causal" not in name:
                print(f"  {name} vs llmlab packed (fp32 LoRA): {r['maxrss_mb'] / base['maxrss_mb']:.2f}x peak RSS"
                      + (f", {r['train_peak_mb'] / base['train_peak_mb']:.2f}x training peak"
                         if r["train_peak_mb"] and base["train_peak_mb"] else ""))


if __name__ == "__main__":
    main()
