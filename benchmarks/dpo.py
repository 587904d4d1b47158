"""DPO training step: llmlab vs TRL's DPOTrainer on SmolLM2-135M-Instruct (issue 15, "Benchmarks").

DPO (Rafailov et al. 2023, arXiv:2305.18290), sigmoid loss, beta 0.1. One step = the policy's forward over
the chosen and rejected sequences of ``--pairs`` pairs, the reference's log-probabilities, the DPO loss,
backward, AdamW (lr 5e-5 full / 5e-4 LoRA, trainable parameters only), zero_grad. Both sides get the same
weights (llmlab's dequantized GGUF, written once as a Hugging Face folder for transformers), the same pairs
(the built-in ``addition`` task, chosen = the answer, rejected = a near miss, tokenized once through the chat
template: input ids, attention and completion masks handed to TRL as its collator would), float32, the same
thread count. The first step's loss of each variant is printed: equal losses mean equal work.

Variants (each in its own subprocess, so peak RSS is its own), as each side runs by default:

- ``trl lora``: ``DPOTrainer`` with a peft ``LoraConfig`` (r 16, alpha 32, every linear layer but the head), no
  ``ref_model``: the reference is the model with the adapter disabled, one extra forward per step;
- ``llmlab lora``: ``llmlab dpo``'s default: the same LoRA, reference log-probabilities precomputed once before
  training (``train/dpo.py``); its one-time cost is printed apart (seconds per pair);
- ``trl full``: ``DPOTrainer`` full fine-tuning, no ``ref_model``: TRL loads a second copy of the model as the
  reference and runs it every step;
- ``llmlab full``: full fine-tuning, reference precomputed: one model in memory;
- ``llmlab full-inbwd``: the same with ``--optimizer-in-backward`` (``train/optim_in_backward.py``): each
  weight's AdamW update runs during backward and its gradient is freed, so the gradients never all exist at
  once. Compared with ``trl full`` (run once for both full rows).

Neither side clips the gradient norm: TRL's ``max_grad_norm`` (1.0 by default) is applied by the Trainer's loop,
which this step leaves out, so the fused row is like for like.

TRL's gradient checkpointing (on by default) is turned off, as llmlab's is off by default: both store
activations. The step is ``trainer.compute_loss`` + backward + AdamW, TRL's own loss with the batch TRL's
collator would build (the Trainer's loop around it is left out on purpose, so the loss path is compared).
Step time: median over ``--steps`` steps after ``--warmup``. Peak RSS: the subprocess's own ``VmHWM``
(load + training; not ``ru_maxrss``, which Linux carries over from the driver through ``execve``) and the
training-only peak (``VmHWM`` reset once the models are loaded and the reference stored).

    nice python benchmarks/dpo.py [--steps 5] [--warmup 1] [--pairs 4] [--threads 2] [--variants lora,full,full-inbwd]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from finetune import measure_and_report, run_worker, save_source, saved_source
from llmlab.common import LlmlabError
from llmlab.nn.cpu_kernels import cpu_description
from table_harness import add_model_flag

BETA = 0.1
LR = {"lora": 5e-4, "full": 5e-5}
VARIANTS = ("lora", "full", "full-inbwd")  # full-inbwd: full fine-tuning, llmlab's optimizer step in backward
R, ALPHA = 16, 32.0
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare(workdir: Path, n_pairs: int, seq: int, model: str | None = None) -> None:
    """The HF folder of llmlab's weights (with the tokenizer) and the tokenized pairs, written once."""
    from llmlab.data.preferences import task_pairs, tokenize_pair
    from llmlab.formats.hf import write_folder
    from llmlab.formats.load import chat_template_of, load_model

    save_source(workdir, model)
    loaded = load_model(model)
    tok = loaded.tokenizer
    template = chat_template_of(loaded)
    raw = task_pairs("addition", "train", n_pairs, 0)
    pairs = [tokenize_pair(p, tok, template, seq)[0] for p in raw]
    torch.save({"pairs": [(p.chosen.ids, p.chosen.mask, p.rejected.ids, p.rejected.mask, p.prompt_len)
                          for p in pairs], "pad_id": tok.eos_id,
                "text": [(p.prompt[0]["content"], p.chosen[0]["content"], p.rejected[0]["content"]) for p in raw]},
               workdir / "pairs.pt")
    write_folder(workdir / "hf", loaded.config, loaded.model.state_dict(), tokenizer_json=tok.to_hf_json(),
                 tokenizer_config={"chat_template": loaded.chat_template,
                                   "eos_token": tok.id_to_token[tok.eos_id], "pad_token": tok.id_to_token[tok.eos_id]})
    lengths = [len(p.chosen.ids) + len(p.rejected.ids) for p in pairs]
    print(f"pairs: {n_pairs} ({sum(lengths)} tokens in all, longest pair {max(lengths)} tokens: chosen + rejected)",
          flush=True)


def _pairs(data):
    from llmlab.data.preferences import TokenizedPair
    from llmlab.data.sft import TokenizedExample

    return [TokenizedPair(TokenizedExample(ci, cm, "bench"), TokenizedExample(ri, rm, "bench"), n, "bench")
            for ci, cm, ri, rm, n in data["pairs"]]


def setup_trl(workdir: Path, data: dict, method: str):
    import transformers
    import trl
    from datasets import Dataset

    from llmlab.train.dpo import pair_batch

    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(workdir / "hf")
    peft_config = None
    if method == "lora":
        import peft

        peft_config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS,
                                      task_type="CAUSAL_LM")
    ds = Dataset.from_dict({k: [t[i] for t in data["text"]] for i, k in enumerate(("prompt", "chosen", "rejected"))})
    args = trl.DPOConfig(output_dir=str(workdir / "trl"), beta=BETA, use_cpu=True, bf16=False, fp16=False,
                         report_to="none", gradient_checkpointing=False, max_length=None,
                         precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    policy = trainer.model
    policy.train()
    pairs = _pairs(data)
    batch = pair_batch(pairs, data["pad_id"])
    exs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = batch.input_ids.shape[1]
    inputs = {"input_ids": batch.input_ids,
              "attention_mask": torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in exs]),
              "completion_mask": torch.tensor([[int(m) for m in e.mask] + [0] * (T - len(e.ids)) for e in exs])}
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR[method], betas=(0.9, 0.95),
                            weight_decay=0.0)

    def step():
        loss = trainer.compute_loss(policy, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, None


def setup_llmlab(workdir: Path, data: dict, method: str, in_backward: bool):
    import time

    from llmlab.formats.load import load_model
    from llmlab.train.dpo import DPOConfig, DPOTask, reference_logps
    from llmlab.train.optim import build_adamw
    from llmlab.train.sft import apply_method

    loaded = load_model(saved_source(workdir))
    cfg = DPOConfig(method=method, beta=BETA)
    model = apply_method(loaded.model, cfg.sft_config(), loaded.tokenizer)
    pairs = _pairs(data)
    t = time.perf_counter()
    ref = {"train": reference_logps(model, pairs, data["pad_id"], "float32")}
    per_pair = (time.perf_counter() - t) / len(pairs)
    task = DPOTask(model, loaded, {"train": pairs}, ref, cfg, 0, data["pad_id"])
    model.train()
    # in backward: the hooks step each weight inside loss.backward(); opt.step() and zero_grad() find nothing left
    opt = build_adamw(model, LR[method], 0.0, (0.9, 0.95), in_backward=in_backward)
    n = len(pairs)
    state = {"step": 0}

    def step():
        loss, _ = task.loss(model, state["step"], 0, n, n)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        return loss.detach()

    return step, per_pair


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    data = torch.load(workdir / "pairs.pt")
    v = json.loads(args.worker)
    step, per_pair = (setup_trl(workdir, data, v["method"]) if v["side"] == "trl"
                      else setup_llmlab(workdir, data, v["method"], v.get("in_backward", False)))
    measure_and_report(step, args, ref_s_per_pair=per_pair)


def run_variant(name: str, variant: dict, args, workdir: Path) -> dict | None:
    r = run_worker(__file__, name, variant, args, workdir)
    if r is None:
        return None
    train = f"{r['train_peak_mb']:>6.0f}" if r["train_peak_mb"] is not None else "     ?"
    ref = f"   reference stored: {r['ref_s_per_pair']:.3f} s/pair once" if r["ref_s_per_pair"] is not None else ""
    print(f"{name:<18} {r['step']:>7.3f} s {r['maxrss_mb']:>7.0f} MB {train} MB   loss {r['loss']:.6f}   "
          f"(steps: {', '.join(f'{t:.2f}' for t in r['times'])}){ref}", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, >= 1 (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default: 2)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (default: 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence at most (default: 128)")
    p.add_argument("--variants", default="lora,full", help="comma-separated: lora, full, full-inbwd (llmlab's "
                   "optimizer step fused into backward, against TRL's full run) (default: lora,full)")
    add_model_flag(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    methods = [m.strip() for m in args.variants.split(",") if m.strip()]
    if not methods or set(methods) - set(VARIANTS):
        p.error(f"--variants {args.variants}: use a comma-separated list of {', '.join(VARIANTS)}")
    args.warmup = max(1, args.warmup)
    print(f"CPU: {cpu_description()}")
    print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; torch "
          f"{torch.__version__}, {args.threads} threads")
    print(f"DPO sigmoid, beta {BETA}; {args.pairs} pairs per step; float32; median of {args.steps} steps after "
          f"{args.warmup}")
    have_trl = True
    try:
        import datasets  # noqa: F401
        import peft
        import trl
    except ImportError as e:
        have_trl = False
        print(f"TRL: skipped ({e.name} not installed: pip install trl datasets peft)")
    else:
        print(f"peer: trl {trl.__version__}, peft {peft.__version__}")
    variants = {}
    for m in methods:
        base = m.split("-")[0]  # full-inbwd is measured against TRL's full run
        if have_trl:
            variants[f"trl {base}"] = dict(side="trl", method=base)
        variants[f"llmlab {m}"] = dict(side="llmlab", method=base, in_backward=m.endswith("-inbwd"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            prepare(workdir, args.pairs, args.seq, args.model)
        except LlmlabError as e:  # e.g. --seq too short for any example: a usage error, one line
            p.error(str(e))
        print(f"{'variant':<18} {'step':>9} {'peak RSS':>10} {'train pk':>9}")
        for name, variant in variants.items():
            r = run_variant(name, variant, args, workdir)
            if r is not None:
                results[name] = r
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("ratios (llmlab vs TRL: step-time speedup, peak RSS ratio, training-peak ratio):")
    for m in methods:
        ours, peer = results.get(f"llmlab {m}"), results.get(f"trl {m.split('-')[0]}")
        if ours is None or peer is None:
            print(f"  {m}: no ratio ({'TRL' if peer is None else 'llmlab'} did not run)")
            continue
        train = (f", {ours['train_peak_mb'] / peer['train_peak_mb']:.2f}x training peak"
                 if ours["train_peak_mb"] and peer["train_peak_mb"] else "")
        print(f"  {m}: {peer['step'] / ours['step']:.2f}x faster, {ours['maxrss_mb'] / peer['maxrss_mb']:.2f}x peak "
              f"RSS{train}")


if __name__ == "__main__":
    main()
