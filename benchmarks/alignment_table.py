"""The alignment results table: SFT, then DPO, PPO and GRPO from the SFT model, on one built-in verifiable task.

The stages, each its own ``llmlab`` process (so its peak RSS is its own), on one thread by default:

1. ``llmlab sft`` (LoRA) on the task; ``llmlab merge`` folds the adapter in: the merged SFT model is the start
   and the reference of the three methods after it;
2. ``llmlab data preferences`` samples ``--k`` replies per training prompt from the SFT model (temperature 1)
   and keeps best vs worst by the verifier (on-policy pairs); ``llmlab dpo`` trains on them (``--pairs task``:
   the task's built-in pairs instead, the exact answer vs a near miss);
3. ``llmlab ppo`` and ``llmlab ppo --algo grpo`` with the verifier's reward (1 exact, else 0).

Every row is then scored here by one function (``train/ppo.heldout_metrics``) on the same held-out prompts:
greedy exact match and reward, and the KL of sampled replies to the SFT reference (k1 and k3, nats per reply,
the ppo summary's estimates; 0 for SFT itself). Time and peak RSS are those of the row's commands (DPO: the
sampling of its pairs plus its training). With the verifier the greedy reward is the exact match; the
sampled column is the mean reward of temperature-1 replies, the quantity PPO and GRPO maximise. Writes
``results.json``, ``results.md`` and the PPO / GRPO rollout curves (``curves.png``) in ``--docs``; the runs
go to ``--out``.

    python benchmarks/alignment_table.py                     # the README table (about an hour on one thread)
    python benchmarks/alignment_table.py --reuse             # go on after an interruption: finished stages stay
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmlab.common import write_text_atomic
from llmlab.formats.load import load_model
from llmlab.nn.cpu_kernels import speed_flags
from llmlab.train.ppo import heldout_metrics, plot_rl_curves

STAGE_FILE = "stage.json"  # wall seconds and peak RSS of a finished stage, in its folder


def run_stage(name: str, argv: list[str], out: Path, in_process: bool, reuse: bool, threads: int) -> dict:
    """``llmlab ARGV`` as its own process (``in_process``: by ``llmlab.cli.main`` here, for the tests); its wall
    time and peak RSS (the child's own, from ``wait4``) in ``out/NAME/stage.json``; ``reuse``: a finished stage
    is not run again."""
    folder = out / name
    record = folder / STAGE_FILE
    if reuse and record.is_file():
        print(f"{name}: reused ({record})", flush=True)
        return json.loads(record.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    print("$ llmlab", " ".join(argv), flush=True)
    t0 = time.perf_counter()
    if in_process:
        from llmlab.cli import main

        code = main(argv)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(folder / "log.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "llmlab", *argv], stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        code, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024
    wall = time.perf_counter() - t0
    if code != 0:
        log = "" if in_process else (folder / "log.txt").read_text()[-2000:]
        sys.exit(f"{name}: llmlab {' '.join(argv)} exited {code}\n{log}")
    stage = {"argv": argv, "seconds": wall, "peak_rss_mb": peak}
    write_text_atomic(record, json.dumps(stage, indent=2) + "\n")
    print(f"  {name}: {wall / 60:.1f} min, peak RSS {peak:.0f} MB", flush=True)
    return stage


def markdown(rows: list[dict]) -> str:
    lines = ["| method | held-out exact match (greedy) | reward, sampled (T=1) | KL to SFT k1 / k3 (nats/reply) | "
             "time | peak RSS |", "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["heldout"]
        lines.append(f"| {r['label']} | {100 * m['accuracy']:.0f}% | {m['sampled_reward']:.2f} | "
                     f"{m['kl']:.2f} / {m['kl_k3']:.2f} | {r['seconds'] / 60:.1f} min | "
                     f"{r['peak_rss_mb'] / 1024:.2f} GB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (default: smollm2-135m-instruct)")
    p.add_argument("--task", default="addition", help="built-in verifiable task (default: addition)")
    p.add_argument("--sft-steps", type=int, default=55, help="llmlab sft steps of 8 packed rows (default: 55)")
    p.add_argument("--pairs", choices=("on-policy", "task"), default="on-policy",
                   help="DPO pairs: sampled from the SFT model and ranked by the verifier, or the task's built-in "
                        "exact-vs-near-miss pairs (default: on-policy)")
    p.add_argument("--pair-prompts", type=int, default=96,
                   help="training prompts sampled for DPO pairs (or built-in pairs drawn) (default: 96)")
    p.add_argument("--k", type=int, default=4, help="replies sampled per prompt for a DPO pair (default: 4)")
    p.add_argument("--dpo-steps", type=int, default=20, help="llmlab dpo steps of 8 pairs (default: 20)")
    p.add_argument("--rl-steps", type=int, default=32,
                   help="llmlab ppo / grpo minibatch steps of 8 replies (default: 32)")
    p.add_argument("--rollout-batch", type=int, default=16, help="replies per PPO / GRPO rollout (default: 16)")
    p.add_argument("--group-size", type=int, default=4, help="GRPO replies per prompt (default: 4)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="PPO / GRPO KL coefficient (default: 0.05)")
    p.add_argument("--rl-lr", type=float, default=3e-4, help="PPO / GRPO learning rate (default: 3e-4)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply tokens, everywhere (default: 16)")
    p.add_argument("--eval-examples", type=int, default=50, help="held-out prompts each row is scored on "
                                                                 "(default: 50, llmlab sft's)")
    p.add_argument("--extra", default="", help="flags added to every training command, e.g. '--batch-size 2' "
                                               "(default: none)")
    p.add_argument("--threads", type=int, default=1, help="threads of every command and of the scoring (default: 1)")
    p.add_argument("--out", default="runs/alignment", help="the runs' parent folder (default: runs/alignment)")
    p.add_argument("--docs", default="docs/alignment", help="where results.json, results.md and curves.png go "
                                                            "(default: docs/alignment)")
    p.add_argument("--reuse", action="store_true", help="keep the stages a previous run finished (default: off)")
    p.add_argument("--in-process", action="store_true",
                   help="run the commands in this process (the tests; peak RSS is then cumulative) (default: off)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = args.extra.split()
    common = ["--task", args.task, "--no-progress", *extra]
    tokens = ["--max-new-tokens", str(args.max_new_tokens)]
    flags, load_start = speed_flags(), os.getloadavg()
    print(f"{args.model} on {args.task}; Python {platform.python_version()}; torch {torch.__version__}; "
          f"{args.threads} thread(s); CPU flags: {flags}; load average {load_start[0]:.1f}", flush=True)

    def stage(name, argv):
        return run_stage(name, argv, out, args.in_process, args.reuse, args.threads)

    sft = out / "sft"
    merged = out / "sft-merged"
    timing = {"sft": stage("sft", ["sft", "--model", args.model, "--out", str(sft), "--steps", str(args.sft_steps),
                                   "--eval-tokens", str(args.max_new_tokens), "--eval-examples", "0", "--no-resume",
                                   *common])}
    timing["merge"] = stage("merge", ["merge", str(sft), "--out", str(merged), "--force"])
    dpo_data: list[str] = []
    if args.pairs == "on-policy":
        prefs = out / "preferences" / "pairs.jsonl"
        timing["preferences"] = stage("preferences", [
            "data", "preferences", "--model", str(merged), "--task", args.task, "--prompts", str(args.pair_prompts),
            "--k", str(args.k), *tokens, "--out", str(prefs), "--force", "--threads", str(args.threads)])
        dpo_data = [str(prefs)]
    timing["dpo"] = stage("dpo", ["dpo", *dpo_data, "--model", str(merged), "--out", str(out / "dpo"), "--steps",
                                  str(args.dpo_steps), "--pairs", str(args.pair_prompts), "--eval-examples", "0",
                                  "--no-resume", *common])
    rl = ["--model", str(merged), "--steps", str(args.rl_steps), "--rollout-batch", str(args.rollout_batch),
          "--kl-coef", str(args.kl_coef), "--lr", str(args.rl_lr), *tokens, "--eval-examples", "0", "--no-resume",
          *common]
    timing["ppo"] = stage("ppo", ["ppo", "--out", str(out / "ppo"), *rl])
    timing["grpo"] = stage("grpo", ["ppo", "--algo", "grpo", "--group-size", str(args.group_size), "--out",
                                    str(out / "grpo"), *rl])

    # every row scored by one function, on the same held-out prompts, against the merged SFT model
    rows = []
    for label, folder, stages in [("SFT (LoRA)", merged, ["sft", "merge"]),
                                  (f"SFT → DPO ({args.pairs} pairs)", out / "dpo",
                                   ["preferences", "dpo"] if args.pairs == "on-policy" else ["dpo"]),
                                  ("SFT → PPO", out / "ppo", ["ppo"]), ("SFT → GRPO", out / "grpo", ["grpo"])]:
        t0 = time.perf_counter()
        loaded = load_model(str(folder))
        m = heldout_metrics(loaded, args.task, args.eval_examples, seed=1337, max_new_tokens=args.max_new_tokens)
        del loaded
        rows.append({"label": label, "run": str(folder), "heldout": m,
                     "seconds": sum(timing[s]["seconds"] for s in stages),
                     "peak_rss_mb": max(timing[s]["peak_rss_mb"] for s in stages)})
        print(f"  {label}: exact match {100 * m['accuracy']:.0f}%, sampled reward {m['sampled_reward']:.2f}, "
              f"KL {m['kl']:.3f} / {m['kl_k3']:.3f} (scored in {time.perf_counter() - t0:.0f} s)", flush=True)
    records = {name: [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
               for name in ("ppo", "grpo")}
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    png = docs / "curves.png"
    plot_rl_curves({"PPO": records["ppo"], "GRPO": records["grpo"]}, png,
                   f"SFT → PPO / GRPO on {args.task} ({args.model}), rollouts of {args.rollout_batch}")
    meta = {"model": args.model, "task": args.task, "cpu_flags": flags, "threads": args.threads,
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__,
            "argv": sys.argv[1:], "timing": timing}
    write_text_atomic(docs / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    write_text_atomic(docs / "results.md", table)
    print(f"\nCPU flags: {flags}; load average at the end {os.getloadavg()[0]:.1f}\n\n{table}")
    print(f"wrote {docs}/results.json, results.md, curves.png", file=sys.stderr)


if __name__ == "__main__":
    main()
