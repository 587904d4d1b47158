"""Fine-tuning step time of a BERT task head: llmlab's step (``train/heads.head_loss``, backward, AdamW) against a
plain transformers loop on the same model (``BertFor*`` with the same weights), batch, length and optimizer.

Both train every weight of all-MiniLM-L6-v2 with the task's head (``--method full``), or only 20 prompt-tuning
virtual tokens and the head (``--method prompt``: transformers wrapped by peft's ``get_peft_model(...,
PromptTuningConfig)``, the same virtual-token tensor; the loss of peft's P + T output rows is taken on the last T, as
llmlab's heads do); the steps are interleaved one by one, so load from other processes falls on both alike; medians
of ``--runs`` steps. The ratio (transformers / llmlab: above 1 means llmlab is faster) is printed last.

    python benchmarks/bert_tasks.py --task ner --batch 16 --tokens 64 --runs 10 --threads 2
    python benchmarks/bert_tasks.py --task ner --method prompt --runs 10 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="ner", choices=["classify", "ner", "qa"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="full", choices=["full", "prompt"])
    ap.add_argument("--virtual-tokens", type=int, default=20, help="--method prompt: P")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from llmlab.formats.bert_heads import load_head, save_head
    from llmlab.models.bert_heads import HF_ARCHITECTURES
    from llmlab.nn.cpu_kernels import cpu_description
    from llmlab.train.heads import IGNORE, HeadConfig, Row, apply_method_, head_loss

    labels = ["O", "B-X", "I-X"] if args.task != "qa" else []
    loaded, ours, labels = load_head("all-minilm-l6-v2", args.task, labels or None)
    with tempfile.TemporaryDirectory() as tmp:
        save_head(Path(tmp) / "m", ours, loaded, labels)
        ref = getattr(transformers, HF_ARCHITECTURES[args.task]).from_pretrained(Path(tmp) / "m")
    ref.config.hidden_dropout_prob = ref.config.attention_probs_dropout_prob = 0.0
    P = 0
    if args.method == "prompt":
        import peft

        P = args.virtual_tokens
        apply_method_(ours, HeadConfig(task=args.task, method="prompt", num_virtual_tokens=P))
        task_type = {"classify": "SEQ_CLS", "ner": "TOKEN_CLS", "qa": "QUESTION_ANS"}[args.task]
        ref = peft.get_peft_model(ref, peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=P))
        with torch.no_grad():
            ref.prompt_encoder["default"].embedding.weight.copy_(ours.virtual.embedding)
    ref.train()
    ours.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.tokens), generator=g)
    ids[:, 0], ids[:, -1] = loaded.tokenizer.cls_id, loaded.tokenizer.sep_id
    if args.task == "classify":
        target = torch.randint(0, len(labels), (args.batch,), generator=g)
        rows = [Row(r.tolist(), [0] * args.tokens, int(t)) for r, t in zip(ids, target)]
        hf_kw = {"labels": target}
    elif args.task == "ner":
        target = torch.randint(0, len(labels), (args.batch, args.tokens), generator=g)
        target[:, 0] = target[:, -1] = IGNORE
        rows = [Row(r.tolist(), [0] * args.tokens, t.tolist()) for r, t in zip(ids, target)]
        hf_kw = {"labels": target}
    else:
        pos = torch.randint(1, args.tokens - 1, (args.batch, 2), generator=g).sort(dim=1).values
        rows = [Row(r.tolist(), [0] * args.tokens, tuple(p.tolist())) for r, p in zip(ids, pos)]
        hf_kw = {"start_positions": pos[:, 0], "end_positions": pos[:, 1]}
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-5)
    mask = torch.ones_like(ids)

    def ref_loss():
        if not P:
            return ref(input_ids=ids, attention_mask=mask, **hf_kw).loss
        out = ref(input_ids=ids, attention_mask=mask)  # prompt tuning: P + T rows for the token-level heads
        ce = torch.nn.functional.cross_entropy
        if args.task == "classify":
            return ce(out.logits, hf_kw["labels"])
        if args.task == "ner":
            return ce(out.logits[:, P:].flatten(0, 1), hf_kw["labels"].flatten(), ignore_index=IGNORE)
        return (ce(out.start_logits[:, P:], hf_kw["start_positions"]) +
                ce(out.end_logits[:, P:], hf_kw["end_positions"])) / 2

    def step_ours():
        head_loss(ours, args.task, rows, loaded.tokenizer.pad_id).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_ref():
        ref_loss().backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    for fn in (step_ours, step_ref):
        fn()  # warm-up
    times: dict[str, list[float]] = {"llmlab": [], "transformers": []}
    for _ in range(args.runs):
        for name, fn in (("llmlab", step_ours), ("transformers", step_ref)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{cpu_description()}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads")
    what = "full fine-tuning" if not P else f"prompt tuning ({P} virtual tokens, peft for transformers)"
    print(f"{args.task}: all-MiniLM-L6-v2, {what}, batch {args.batch} x {args.tokens} tokens, AdamW; "
          f"median of {args.runs} steps")
    for k, v in med.items():
        print(f"  {k:13s} {1000 * v:8.1f} ms/step")
    print(f"ratio (transformers / llmlab step time): {med['transformers'] / med['llmlab']:.2f}")


if __name__ == "__main__":
    main()
