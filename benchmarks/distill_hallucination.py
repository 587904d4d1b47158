"""The MiniLLM claim measured: hallucinated continuations of reverse-KL vs forward-KL distilled students.

Do students distilled with reverse KL write fewer hallucinated continuations than students distilled with forward
KL? (``eval/hallucination.py`` defines the two measures.) ``minillm`` is MiniLLM's full objective, ``reverse-kl``
its single-step term alone.

Trains one student per ``--losses`` entry with ``llmlab distill`` (the same student preset, initialisation, data
order and budget; a run folder that already holds ``model/`` is reused), then each student -- and the teacher
itself, as the floor -- continues the same ``--prompts`` held-out windows of the shards (``--prompt-tokens``
tokens each) for ``--gen-tokens`` tokens, sampled at temperature 1 with every ``--seeds`` seed and greedily.
Printed per model and mode: U, the share of continuation tokens the teacher gives probability < ``--epsilon``;
the mean teacher surprisal (nats/token); the share of written names (identifiers, numbers) found neither in the
prompt, the true continuation nor Python's keywords and builtins; and the held-out perplexity. Medians over the
seeds, each seed's value in the JSON. Last lines: U of reverse-kl (and minillm) / U of kd (sampled). Single
thread.

    python benchmarks/distill_hallucination.py --steps 40 --out runs/hallucination

``--student FOLDER`` starts every loss from one trained student instead (MiniLLM's setting: the paper starts from
a fine-tuned student), e.g. the kd run's, for the same extra steps; ``--seed`` then picks windows and samples its
first run did not see:

    python benchmarks/distill_hallucination.py --student runs/hallucination/kd/model --losses kd,reverse-kl,minillm \
        --steps 120 --seed 2 --out runs/hallucination-continued

``--whiten`` trains minillm with its long-term rewards whitened over the batch, as the authors' code does:

    python benchmarks/distill_hallucination.py --student runs/hallucination/kd/model --losses minillm --whiten \
        --steps 120 --seed 2 --out runs/hallucination-whitened

On a GPU, ``--device cuda`` (TF32 matrix products) trains and measures there; ``--max-minutes`` caps each
student's training, and ``--train-only`` trains without measuring, so one process per loss can share the GPU and
a last run with the same ``--out`` measures them all (the README's "At a budget where the students write code").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

LOSSES = "kd,reverse-kl,minillm,gkd,ce"


@dataclass
class Options:
    teacher: str = field(default="smollm2-135m-instruct", metadata={"help": "teacher"})
    student: str = field(default="smollm2-tiny", metadata={"help": "student preset or folder"})
    data: str = field(default="data/stdlib-smollm2", metadata={
        "help": "token shards in the teacher's tokenizer (prepared from the stdlib if missing)"})
    losses: str = field(default=LOSSES, metadata={"help": "comma-separated distill losses"})
    steps: int = field(default=40, metadata={"help": "training steps of every student"})
    batch_size: int = field(default=4, metadata={"help": "windows per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training window"})
    out: str = field(default="runs/hallucination", metadata={"help": "folder of the run folders and the JSON"})
    prompts: int = field(default=24, metadata={"help": "held-out windows to continue"})
    prompt_tokens: int = field(default=96, metadata={"help": "tokens of each prompt"})
    gen_tokens: int = field(default=32, metadata={
        "help": "tokens of each continuation, measured and (reverse-kl, minillm, gkd) trained on"})
    seeds: str = field(default="1,2,3", metadata={"help": "sampling seeds, comma-separated"})
    epsilon: float = field(default=1e-3, metadata={"help": "teacher-probability threshold of U"})
    seed: int = field(default=1337, metadata={
        "help": "seed of the students' initialisation, training windows and on-policy samples (continuing a trained "
                "--student, a new seed trains on windows its first run did not see)"})
    whiten: bool = field(default=False, metadata={
        "help": "minillm: whiten its long-term rewards over the batch, as the authors' code does (llmlab distill "
                "--whiten)"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    device: str = field(default="cpu", metadata={
        "help": "cpu, cuda or auto: where the students train and the measurement runs (on CUDA, float32 matrix "
                "products use TF32)"})
    max_minutes: float = field(default=0.0, metadata={
        "help": "stop each student's training after this many minutes (its summary says so); 0 = no limit"})
    train_only: bool = field(default=False, metadata={
        "help": "train the students and stop; a later run with the same --out measures them (so several "
                "--losses can train in parallel processes, e.g. on one GPU)"})
    examples: int = field(default=4, metadata={
        "help": "continuations kept as text in the JSON per model and decoding mode (the first prompts, first "
                "seed)"})


def parse_args(argv=None) -> argparse.Namespace:
    from llmlab.dataclass_io import add_flags

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(ap, Options)
    return ap.parse_args(argv)


def train_students(args, losses: list[str]) -> dict[str, dict]:
    from llmlab.train.distill import DistillConfig, DistillTrainConfig, run_distill

    summaries = {}
    for loss in losses:
        run = Path(args.out) / loss
        if (run / "model" / "config.json").exists() and (run / "summary.json").exists():
            summaries[loss] = json.loads((run / "summary.json").read_text())
            continue
        cfg = DistillConfig(teacher=args.teacher, student=args.student, loss=loss, data=args.data, out=str(run),
                            gen_tokens=args.gen_tokens, whiten=args.whiten and loss == "minillm")
        tcfg = DistillTrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                  seed=args.seed, progress=False, device=args.device,
                                  max_minutes=args.max_minutes)
        summaries[loss] = run_distill(cfg, tcfg)
    return summaries


def main(argv=None) -> int:
    from llmlab.common import LlmlabError

    try:
        run(parse_args(argv))
    except LlmlabError as e:
        print(f"distill_hallucination: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from llmlab.common import LlmlabError, write_text_atomic
    from llmlab.data.shards import TokenShards
    from llmlab.eval.hallucination import measure
    from llmlab.formats.load import load_model
    from llmlab.models.registry import PRESETS
    from llmlab.nn.cpu_kernels import cpu_description
    from llmlab.train.distill import LOSSES as KNOWN

    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    if not losses or any(x not in KNOWN for x in losses):
        raise LlmlabError(f"--losses {args.losses!r}: give comma-separated losses among {', '.join(KNOWN)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise LlmlabError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 1,2,3") from None
    if not 0 < args.epsilon < 1:
        raise LlmlabError(f"--epsilon {args.epsilon}: give a probability in (0, 1), e.g. 1e-3")
    for flag in ("prompts", "prompt_tokens", "gen_tokens", "steps"):
        if getattr(args, flag) < 1:
            raise LlmlabError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.whiten and "minillm" not in losses:
        raise LlmlabError(f"--whiten acts on minillm only, and --losses {args.losses!r} lacks it: add minillm or "
                          "drop --whiten")
    if args.max_minutes < 0 or args.examples < 0:
        raise LlmlabError(f"--max-minutes and --examples must be >= 0, got {args.max_minutes} and {args.examples}")
    if args.device not in ("cpu", "cuda", "auto"):
        raise LlmlabError(f"--device {args.device!r}: give cpu, cuda or auto")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmlabError("--device cuda: PyTorch sees no CUDA device here; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.seed < 0:
        raise LlmlabError(f"--seed must be >= 0, got {args.seed}")
    if args.student not in PRESETS and not Path(args.student).exists():
        raise LlmlabError(f"--student {args.student}: no such folder or preset; a trained student to continue is "
                          "e.g. runs/hallucination/kd/model (from --losses kd --out runs/hallucination)")
    t0 = time.perf_counter()
    summaries = train_students(args, losses)
    train_s = time.perf_counter() - t0
    if args.train_only:
        print(f"trained {', '.join(losses)} in {train_s / 60:.1f} min under {args.out}; measure them with the same "
              "--out and without --train-only")
        return
    teacher = load_model(args.teacher)
    teacher.model.to(device).eval()
    shards = TokenShards(args.data)
    n = args.prompt_tokens + args.gen_tokens
    if n > teacher.config.max_seq_len:
        raise LlmlabError(f"--prompt-tokens + --gen-tokens = {n} exceeds the teacher's {teacher.config.max_seq_len}")
    x, _ = shards.batch(0, args.prompts, n, seed=4242, split="val")  # (B, P + G), never a training window
    prompts, refs = x[:, :args.prompt_tokens], x[:, args.prompt_tokens:]
    models = {loss: (load_model(str(Path(args.out) / loss / "model")).model.to(device).eval(), summaries[loss])
              for loss in losses}
    models["teacher (itself)"] = (teacher.model, None)
    rows, t1 = [], time.perf_counter()
    for name, (model, summary) in models.items():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        for m in measure(model, teacher.model, teacher.tokenizer, prompts, refs, seeds, args.epsilon,
                         examples=args.examples):
            rows.append({"model": name, "mode": m.mode, "unsupported": m.unsupported, "surprisal": m.surprisal,
                         "ungrounded": m.ungrounded, "per_seed": m.per_seed, "tokens": m.tokens, "names": m.names,
                         "val_ppl": summary["val_ppl"] if summary else None,
                         "steps": summary["steps"] if summary else None,
                         "stopped": summary["stopped"] if summary else None, "examples": m.examples})
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"{where}; load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s); training "
          f"{train_s / 60:.1f} min, measuring {(time.perf_counter() - t1) / 60:.1f} min")
    stopped = {r["model"]: f"{r['steps']} ({r['stopped']})" for r in rows
               if r["stopped"] not in (None, "done") and r["mode"] == "greedy"}
    if stopped:
        print("stopped early (steps): " + ", ".join(f"{k} {v}" for k, v in stopped.items()))
    print(f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens per student from {args.student}, seed "
          f"{args.seed}; {args.prompts} prompts x "
          f"{args.prompt_tokens} tokens, {args.gen_tokens} generated; sampled: T 1, seeds {args.seeds} (median); "
          f"epsilon {args.epsilon:g}")
    print("| student | decoding | teacher p < eps (U) | teacher surprisal (nats) | ungrounded names | held-out ppl |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ppl = f"{r['val_ppl']:.1f}" if r["val_ppl"] is not None else "-"
        names = f"{100 * r['ungrounded']:.1f}%" if r["names"] else "-"
        print(f"| {r['model']} | {r['mode']} | {100 * r['unsupported']:.1f}% | {r['surprisal']:.2f} | "
              f"{names} ({r['names']} names) | {ppl} |")
    out = Path(args.out) / "hallucination.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    u = {r["model"]: r["unsupported"] for r in rows if r["mode"] == "sampled"}
    for loss in ("minillm", "reverse-kl"):
        if "kd" in u and loss in u:
            ratio = u[loss] / u["kd"] if u["kd"] else float("nan")
            print(f"ratio U({loss}) / U(kd), sampled: {ratio:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
