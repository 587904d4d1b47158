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
the ppo summary's estimates; 0 for SFT itself). The exact match comes with its binomial standard error,
sqrt(p (1 - p) / n), and each method's gain over SFT with the *paired* standard error of the per-question
differences (the same questions for every row: sd(d) / sqrt(n), the normal approximation behind McNemar's test).
A row's scores are kept in its folder (``scores.json``, keyed by the prompts and the model files' sizes and
times), so ``--reuse`` does not score a finished row twice. Time and peak RSS are those of the row's commands
(DPO: the sampling of its pairs plus its training). With the verifier the greedy reward is the exact match; the
sampled column is the mean reward of temperature-1 replies, the quantity PPO and GRPO maximise. Writes
``results.json``, ``results.md`` and the PPO / GRPO rollout curves (``curves.png``) in ``--docs``; the runs
go to ``--out``.

The dev split. The hyper-parameters (the defaults below) were chosen on ``--dev-examples`` prompts of the
task's *training* side (``data/tasks.py``'s hash split; drawn with seed ``DEV_SEED``, less every prompt the
stages train on: ``dev_examples``), never on the held-out questions the table reports. ``--tune`` runs the
candidates of ``GRID`` (DPO, PPO and GRPO from the same SFT model, one pairs file for every DPO candidate)
and scores each on the dev split only: ``tuning.json`` / ``tuning.md`` in ``--docs``. Each run's folder is
named by its hyper-parameters, so the table run with ``--reuse`` takes the search's finished run of the
candidate the defaults are (and its dev score). The search ran PPO and GRPO at 24 steps (12 rollouts); the
table's defaults run them 3 times longer at the learning rates it chose (``--rl-steps 72``).

    python benchmarks/alignment_table.py                     # the README table (about an hour on one thread)
    python benchmarks/alignment_table.py --reuse             # go on after an interruption: finished stages stay
    python benchmarks/alignment_table.py --tune --reuse      # the dev-split search that chose the defaults
    python benchmarks/alignment_table.py --reuse --only ppo  # one row's stages and its score (PPO and GRPO can
                                                             # then run as two processes at once, after SFT)
    python benchmarks/alignment_table.py --reuse --rows ppo,grpo  # a table of SFT, PPO and GRPO only

With ``--reuse`` an interrupted DPO / PPO / GRPO stage resumes from its newest checkpoint (its folder is named by
its hyper-parameters, steps included, so it is the same run; a PPO checkpoint holds its rollout); the stage's
time is then its last piece's, marked "resumed" in ``stage.json`` and the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmlab.common import LlmlabError, write_text_atomic
from llmlab.data.sft import SFTDataConfig
from llmlab.data.tasks import get_task
from llmlab.formats.load import load_model
from llmlab.nn.cpu_kernels import speed_flags
from llmlab.train.loop import TrainConfig
from llmlab.train.ppo import PPOConfig, heldout_metrics, plot_rl_curves

STAGE_FILE = "stage.json"  # wall seconds and peak RSS of a finished stage, in its folder
SCORES_FILE = "scores.json"  # a scored model folder's heldout_metrics, by prompts and model-file fingerprint
ROWS = ("sft", "dpo", "ppo", "grpo")
DEV_SEED = 2  # the dev prompts' draw from the training split (sft and preferences draw with 0, ppo with 1337)
HELDOUT_SEED = 1337  # the held-out prompts' draw (llmlab sft / dpo / ppo's own held-out scoring)
VAL_PAIRS = 16  # llmlab dpo's default: the last pairs of a file are its validation pairs
# the dev-split search (--tune): each candidate overrides these defaults of main()'s flags
# (run in rounds: the first candidate of every method, then the second, ...; tuning.json is rewritten after each)
GRID = {
    "dpo": [{"pair_prompts": 192, "dpo_lr": 1e-4, "dpo_epochs": 1},
            {"pair_prompts": 384, "dpo_lr": 5e-5, "dpo_epochs": 2}],
    "ppo": [{"rl_lr": 1e-4, "rl_steps": 24}, {"rl_lr": 3e-5, "rl_steps": 24}],
    "grpo": [{"grpo_lr": 1e-4, "rl_steps": 24}, {"grpo_lr": 3e-5, "rl_steps": 24}],
}


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
    resumed = "--no-resume" not in argv and any(folder.glob("checkpoints/*"))  # an earlier piece's checkpoints
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
    stage = {"argv": argv, "seconds": wall, "peak_rss_mb": peak, **({"resumed": True} if resumed else {})}
    write_text_atomic(record, json.dumps(stage, indent=2) + "\n")
    print(f"  {name}: {wall / 60:.1f} min, peak RSS {peak:.0f} MB", flush=True)
    return stage


def binomial_se(p: float, n: int) -> float:
    """The standard error of an accuracy ``p`` measured on ``n`` independent questions: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n)


def paired_gain(base: list[int], other: list[int]) -> tuple[float, float]:
    """``other``'s exact match minus ``base``'s on the same questions (0/1 each, in one order), and its paired
    standard error: d_i = other_i - base_i, sd(d) / sqrt(n) (unbiased sd; the normal approximation behind
    McNemar's test: only the questions the two answer differently move it)."""
    n = len(base)
    if n != len(other) or n < 2:
        raise LlmlabError(f"a paired comparison needs the same questions, at least 2: got {n} and {len(other)}")
    d = [b - a for a, b in zip(base, other)]
    mean = sum(d) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def rollout_trend(records: list[dict], steps_per_rollout: int) -> dict | None:
    """Did the rollout reward rise? Each rollout's mean score (``metrics.jsonl``'s train lines: one per step, the
    rollout's numbers on each of its steps), the mean over the first and the last third of the rollouts, their
    difference and its standard error (the rollouts' spread within each third: sqrt(s1^2 / n1 + s3^2 / n3));
    None for fewer than 6 rollouts."""
    per = {}
    for r in records:
        if r.get("kind") == "train" and "reward" in r:
            per.setdefault((r["step"] - 1) // steps_per_rollout, r["reward"])
    rewards = [per[k] for k in sorted(per)]
    third = len(rewards) // 3
    if third < 2:
        return None
    first, last = rewards[:third], rewards[-third:]

    def mean_var(x):
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)

    (m1, v1), (m3, v3) = mean_var(first), mean_var(last)
    return {"rollouts": len(rewards), "per_third": third, "first_third": m1, "last_third": m3, "gain": m3 - m1,
            "gain_se": math.sqrt(v1 / third + v3 / third)}


def markdown(rows: list[dict]) -> str:
    """The table; the first row (SFT) is the base of the paired gains."""
    n = len(rows[0]["heldout"]["correct"])
    lines = [f"| method | held-out exact match (greedy, {n}) ± SE | gain over SFT ± paired SE (points) | "
             "reward, sampled (T=1) | KL to SFT k1 / k3 (nats/reply) | dev exact match | time | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["heldout"]
        dev = f"{100 * r['dev']['accuracy']:.0f}%"
        gain = "-" if r is rows[0] else "{:+.1f} ± {:.1f}".format(
            *(100 * x for x in paired_gain(rows[0]["heldout"]["correct"], m["correct"])))
        lines.append(f"| {r['label']} | {100 * m['accuracy']:.1f}% ± {100 * binomial_se(m['accuracy'], n):.1f} | "
                     f"{gain} | {m['sampled_reward']:.2f} | {m['kl']:.2f} / {m['kl_k3']:.2f} | {dev} | "
                     f"{r['seconds'] / 60:.1f} min{' (resumed)' if r.get('resumed') else ''} | "
                     f"{r['peak_rss_mb'] / 1024:.2f} GB |")
    return "\n".join(lines) + "\n"


def tuning_markdown(rows: list[dict], n_dev: int) -> str:
    lines = [f"| method | hyper-parameters | dev exact match (greedy, {n_dev} prompts) | dev reward, sampled (T=1) | "
             "dev KL to SFT k1 / k3 | time |", "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["dev"]
        lines.append(f"| {r['method']} | {r['tag']} | {100 * m['accuracy']:.0f}% | {m['sampled_reward']:.2f} | "
                     f"{m['kl']:.2f} / {m['kl_k3']:.2f} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (default: smollm2-135m-instruct)")
    p.add_argument("--task", default="addition", help="built-in verifiable task (default: addition)")
    p.add_argument("--sft-steps", type=int, default=50, help="llmlab sft steps of 8 packed rows (default: 50)")
    p.add_argument("--pairs", choices=("on-policy", "task"), default="on-policy",
                   help="DPO pairs: sampled from the SFT model and ranked by the verifier, or the task's built-in "
                        "exact-vs-near-miss pairs (default: on-policy)")
    p.add_argument("--pair-prompts", type=int, default=384,
                   help="training prompts sampled for DPO pairs (or built-in pairs drawn) (default: 384)")
    p.add_argument("--k", type=int, default=4, help="replies sampled per prompt for a DPO pair (default: 4)")
    p.add_argument("--dpo-epochs", type=float, default=2.0,
                   help="passes over the DPO training pairs (steps of 8 pairs = epochs x pairs / 8, rounded up) "
                        "(default: 2)")
    p.add_argument("--dpo-lr", type=float, default=5e-5, help="DPO learning rate (default: 5e-05)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default: 0.1)")
    p.add_argument("--dpo-nll", type=float, default=0.0,
                   help="llmlab dpo --nll-weight: RPO's NLL term on the chosen replies (default: 0, plain DPO)")
    p.add_argument("--rl-steps", type=int, default=72,
                   help="llmlab ppo / grpo minibatch steps of 8 replies: 2 per rollout of 16 at 1 epoch "
                        "(default: 72, 36 rollouts)")
    p.add_argument("--rollout-batch", type=int, default=16, help="replies per PPO / GRPO rollout (default: 16)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="PPO / GRPO passes over each rollout (default: 1)")
    p.add_argument("--group-size", type=int, default=4, help="GRPO replies per prompt (default: 4)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="PPO / GRPO KL coefficient (default: 0.05)")
    p.add_argument("--rl-lr", type=float, default=1e-4, help="PPO learning rate (default: 0.0001)")
    p.add_argument("--grpo-lr", type=float, default=3e-5, help="GRPO learning rate (default: 3e-05)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply tokens, everywhere (default: 16)")
    p.add_argument("--eval-examples", type=int, default=200,
                   help="held-out prompts each row is scored on (seed HELDOUT_SEED; the first 50 are llmlab sft's "
                        "50) (default: 200)")
    p.add_argument("--dev-examples", type=int, default=50,
                   help="dev prompts (training side of the task, seed DEV_SEED) for --tune and the table's dev "
                        "column (default: 50)")
    p.add_argument("--only", choices=ROWS, default=None,
                   help="run one row's stages (SFT's first, reused with --reuse) and score it on the held-out "
                        "prompts, no table: rows can run as separate processes (default: every row, the table)")
    p.add_argument("--rows", type=lambda x: [r for r in x.split(",") if r], default=list(ROWS[1:]),
                   help="the table's rows after SFT (its first row, the base of the gains), comma-separated of "
                        "dpo, ppo, grpo (default: dpo,ppo,grpo)")
    p.add_argument("--tune", action="store_true",
                   help="run the GRID candidates and score them on the dev split only (default: off)")
    p.add_argument("--extra", default="", help="flags added to every training command, e.g. '--batch-size 2' "
                                               "(default: none)")
    p.add_argument("--threads", type=int, default=1, help="threads of every command and of the scoring (default: 1)")
    p.add_argument("--out", default="runs/alignment", help="the runs' parent folder (default: runs/alignment)")
    p.add_argument("--docs", default="docs/alignment", help="where results.json, results.md and curves.png go "
                                                            "(default: docs/alignment)")
    p.add_argument("--reuse", action="store_true", help="keep the stages a previous run finished (default: off)")
    p.add_argument("--in-process", action="store_true",
                   help="run the commands in this process (the tests; peak RSS is then cumulative) (default: off)")
    args = p.parse_args(argv)
    if not args.rows or not set(args.rows) <= set(ROWS[1:]) or len(set(args.rows)) < len(args.rows):
        p.error(f"--rows takes distinct names of dpo, ppo, grpo, got {','.join(args.rows) or 'none'}")
    if args.dev_examples < 1 or args.eval_examples < 1:
        p.error(f"--dev-examples and --eval-examples must be >= 1, got {args.dev_examples} and {args.eval_examples}")
    return args


def trained_prompts(task: str, pair_prompts: int) -> set[str]:
    """Every training-side prompt a default stage draws: llmlab sft's task examples and the preference prompts
    (one seeded draw, the smaller a prefix of the larger), llmlab ppo's prompts."""
    t, data, rl = get_task(task), SFTDataConfig(), PPOConfig()
    return ({e.prompt for e in t.examples("train", max(data.task_examples, pair_prompts), data.seed)}
            | {e.prompt for e in t.examples("train", rl.prompts, TrainConfig().seed)})


def dev_examples(task: str, n: int, pair_prompts: int) -> list:
    """The dev split: ``n`` training-side examples drawn with ``DEV_SEED``, minus any a stage trains on (two-digit
    sums repeat across draws)."""
    seen = trained_prompts(task, pair_prompts)
    dev = [e for e in get_task(task).examples("train", 3 * n, DEV_SEED) if e.prompt not in seen][:n]
    if len(dev) < n:
        raise LlmlabError(f"only {len(dev)} dev prompts of {task} left apart from the training prompts: lower "
                          "--dev-examples")
    return dev


def dpo_tag(a: argparse.Namespace) -> str:
    pairs = f"p{a.pair_prompts}x{a.k}" if a.pairs == "on-policy" else f"task{a.pair_prompts}"
    nll = f"-nll{a.dpo_nll:g}" if a.dpo_nll else ""
    return f"dpo-{pairs}-lr{a.dpo_lr:g}-beta{a.beta:g}-ep{a.dpo_epochs:g}{nll}"


def rl_lr(algo: str, a: argparse.Namespace) -> float:
    return a.grpo_lr if algo == "grpo" else a.rl_lr


def rl_tag(algo: str, a: argparse.Namespace) -> str:
    group = f"g{a.group_size}" if algo == "grpo" else ""
    return f"{algo}-lr{rl_lr(algo, a):g}-kl{a.kl_coef:g}-ep{a.ppo_epochs}-s{a.rl_steps}x{a.rollout_batch}{group}"


def model_fingerprint(folder: Path) -> list:
    """(path, size, mtime_ns) of every weights file under a model or run folder: changes when it is trained again."""
    return [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(folder.rglob("*")) if f.suffix in (".safetensors", ".gguf", ".bin") and f.is_file()]


class Stages:
    """The commands of one table (or search), each a ``run_stage`` in a folder named by its hyper-parameters."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out, self.timing = args, Path(args.out).resolve(), {}
        self.common = ["--task", args.task, "--no-progress", *args.extra.split()]
        self.tokens = ["--max-new-tokens", str(args.max_new_tokens)]
        self.merged = self.out / "sft-merged"
        # --reuse: an interrupted DPO / PPO / GRPO run goes on from its checkpoints (its folder names its settings)
        self.resume = [] if args.reuse else ["--no-resume"]

    def stage(self, name: str, argv: list[str]) -> dict:
        a = self.args
        self.timing[name] = run_stage(name, argv, self.out, a.in_process, a.reuse, a.threads)
        return self.timing[name]

    def sft(self) -> list[str]:
        a, sft = self.args, self.out / "sft"
        self.stage("sft", ["sft", "--model", a.model, "--out", str(sft), "--steps", str(a.sft_steps), "--eval-tokens",
                           str(a.max_new_tokens), "--eval-examples", "0", "--no-resume", *self.common])
        self.stage("merge", ["merge", str(sft), "--out", str(self.merged), "--force"])
        return ["sft", "merge"]

    def dpo(self, a: argparse.Namespace) -> tuple[str, list[str]]:
        """The pairs (sampled once per --pair-prompts / --k) and one DPO run; (run folder name, its stages)."""
        data, stages, n_train = [], [], a.pair_prompts
        if a.pairs == "on-policy":
            name = f"preferences-{a.pair_prompts}x{a.k}"
            prefs = self.out / name / "pairs.jsonl"
            self.stage(name, ["data", "preferences", "--model", str(self.merged), "--task", a.task, "--prompts",
                              str(a.pair_prompts), "--k", str(a.k), *self.tokens, "--out", str(prefs), "--force",
                              "--threads", str(a.threads)])
            data, stages = [str(prefs)], [name]
            n_train = max(1, sum(1 for x in prefs.read_text().splitlines() if x.strip()) - VAL_PAIRS)
        steps = max(1, math.ceil(a.dpo_epochs * n_train / 8))
        tag = dpo_tag(a)
        self.stage(tag, ["dpo", *data, "--model", str(self.merged), "--out", str(self.out / tag), "--steps",
                         str(steps), "--pairs", str(a.pair_prompts), "--lr", str(a.dpo_lr), "--beta", str(a.beta),
                         "--nll-weight", str(a.dpo_nll), "--eval-examples", "0", *self.resume, *self.common])
        return tag, [*stages, tag]

    def rl(self, algo: str, a: argparse.Namespace) -> str:
        tag = rl_tag(algo, a)
        grpo = ["--algo", "grpo", "--group-size", str(a.group_size)] if algo == "grpo" else []
        self.stage(tag, ["ppo", *grpo, "--out", str(self.out / tag), "--model", str(self.merged), "--steps",
                         str(a.rl_steps), "--rollout-batch", str(a.rollout_batch), "--ppo-epochs", str(a.ppo_epochs),
                         "--kl-coef", str(a.kl_coef), "--lr", str(rl_lr(algo, a)), *self.tokens, "--eval-examples", "0",
                         *self.resume, *self.common])
        return tag

    def score(self, folder: Path, split: str) -> dict:
        """One function for every row: ``heldout_metrics`` on the held-out prompts or on the dev prompts; kept in
        ``folder/scores.json`` under the prompts' key and the model files' fingerprint (``--reuse``: read back)."""
        a = self.args
        key = (f"{a.task}/heldout/{a.eval_examples}/seed{HELDOUT_SEED}" if split == "heldout" else
               f"{a.task}/dev/{a.dev_examples}/seed{DEV_SEED}/minus{a.pair_prompts}") + f"/tokens{a.max_new_tokens}"
        file, fingerprint = folder / SCORES_FILE, model_fingerprint(folder)
        kept = json.loads(file.read_text()) if file.is_file() else {}
        if a.reuse and kept.get(key, {}).get("fingerprint") == fingerprint:
            print(f"  {folder.name}: {split} score reused ({file})", flush=True)
            return kept[key]["metrics"]
        dev = dev_examples(a.task, a.dev_examples, a.pair_prompts) if split == "dev" else None
        loaded = load_model(str(folder))
        m = heldout_metrics(loaded, a.task, a.eval_examples, seed=HELDOUT_SEED, max_new_tokens=a.max_new_tokens,
                            examples=dev)
        del loaded
        kept = json.loads(file.read_text()) if file.is_file() else {}  # another process may have added a key
        write_text_atomic(file, json.dumps({**kept, key: {"fingerprint": fingerprint, "metrics": m}}) + "\n")
        return m


def tune(st: Stages, docs: Path, meta: dict) -> None:
    """Every GRID candidate from the one SFT model, scored on the dev split; the best per method by dev exact
    match (ties: the sampled dev reward)."""
    a = st.args
    seconds = sum(st.timing[s]["seconds"] for s in st.sft())

    def dev_score(folder: Path, tag: str) -> dict:  # --reuse: a run scored before keeps its score (scores.json)
        return st.score(folder, "dev")

    rows = [{"method": "sft", "tag": "sft (the start)", "run": str(st.merged),
             "dev": dev_score(st.merged, "sft (the start)"), "seconds": seconds}]
    print(f"  sft: dev exact match {100 * rows[0]['dev']['accuracy']:.0f}%", flush=True)
    best: dict[str, str] = {}
    for round_ in range(max(len(c) for c in GRID.values())):
        for method, candidates in GRID.items():
            if round_ >= len(candidates):
                continue
            overrides = candidates[round_]
            c = argparse.Namespace(**{**vars(a), **overrides})
            if method == "dpo":
                tag, stages = st.dpo(c)
            else:
                tag = st.rl(method, c)
                stages = [tag]
            m = dev_score(st.out / tag, tag)
            rows.append({"method": method, "tag": tag, "overrides": overrides, "run": str(st.out / tag), "dev": m,
                         "seconds": sum(st.timing[s]["seconds"] for s in stages)})
            print(f"  {tag}: dev exact match {100 * m['accuracy']:.0f}%, sampled reward {m['sampled_reward']:.2f}, "
                  f"KL {m['kl']:.2f} / {m['kl_k3']:.2f}", flush=True)
            best = {method: max((r for r in rows if r["method"] == method),
                                key=lambda r: (r["dev"]["accuracy"], r["dev"]["sampled_reward"]))["tag"]
                    for method in GRID if any(r["method"] == method for r in rows)}
            write_text_atomic(docs / "tuning.json", json.dumps({"meta": {**meta, "load_average_end": os.getloadavg()},
                                                               "rows": rows, "best": best}, indent=2) + "\n")
            write_text_atomic(docs / "tuning.md", tuning_markdown(rows, a.dev_examples))
    print(f"\n{tuning_markdown(rows, a.dev_examples)}\nbest on the dev split: {best}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    st = Stages(args)
    st.out.mkdir(parents=True, exist_ok=True)
    flags, load_start = speed_flags(), os.getloadavg()
    print(f"{args.model} on {args.task}; Python {platform.python_version()}; torch {torch.__version__}; "
          f"{args.threads} thread(s); CPU flags: {flags}; load average {load_start[0]:.1f}", flush=True)
    meta = {"model": args.model, "task": args.task, "cpu_flags": flags, "threads": args.threads,
            "load_average_start": load_start, "python": platform.python_version(), "torch": torch.__version__,
            "argv": sys.argv[1:] if argv is None else argv, "dev_seed": DEV_SEED, "heldout_seed": HELDOUT_SEED}
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    if args.tune:
        return tune(st, docs, meta)

    sft_stages = st.sft()

    def run_row(method: str) -> tuple[str, Path, list[str]]:
        """A row's stages (SFT's already run): its label, the model folder scored, its stages' names."""
        if method == "sft":
            return "SFT (LoRA)", st.merged, sft_stages
        if method == "dpo":
            tag, stages = st.dpo(args)
            nll = f", + NLL x {args.dpo_nll:g}" if args.dpo_nll else ""
            return f"SFT → DPO ({args.pairs} pairs{nll})", st.out / tag, stages
        tag = st.rl(method, args)
        return f"SFT → {method.upper()}", st.out / tag, [tag]

    planned = [run_row(m) for m in ([args.only] if args.only else ["sft", *args.rows])]
    # every row scored by one function, on the same held-out and dev prompts, against the merged SFT model (a run
    # the search scored on the dev prompts keeps that score: scores.json)
    rows = []
    for label, folder, stages in planned:
        t0 = time.perf_counter()
        m, dev = st.score(folder, "heldout"), st.score(folder, "dev")
        rows.append({"label": label, "run": str(folder), "heldout": m, "dev": dev,
                     "seconds": sum(st.timing[s]["seconds"] for s in stages),
                     "peak_rss_mb": max(st.timing[s]["peak_rss_mb"] for s in stages),
                     "resumed": any(st.timing[s].get("resumed", False) for s in stages)})
        se = binomial_se(m["accuracy"], len(m["correct"]))
        print(f"  {label}: exact match {100 * m['accuracy']:.1f}% ± {100 * se:.1f}, sampled reward "
              f"{m['sampled_reward']:.2f}, KL {m['kl']:.3f} / {m['kl_k3']:.3f} (scored in "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    if args.only:
        return
    records = {algo: [json.loads(x) for x in (st.out / rl_tag(algo, args) / "metrics.jsonl").read_text().splitlines()
                      if x.strip()] for algo in ("ppo", "grpo") if algo in args.rows}
    png = docs / "curves.png"
    plot_rl_curves({algo.upper(): rec for algo, rec in records.items()}, png,
                   f"SFT → PPO / GRPO on {args.task} ({args.model}), {args.rl_steps} steps, rollouts of "
                   f"{args.rollout_batch}, lr {args.rl_lr:g} / {args.grpo_lr:g}")
    trends = {}
    for algo, rec in records.items():
        cfg = json.loads((st.out / rl_tag(algo, args) / "sft_config.json").read_text())
        trends[algo] = rollout_trend(rec, cfg["ppo"]["ppo_epochs"] * cfg["ppo"]["rollout_batch"] //
                                     cfg["train"]["batch_size"])
    notes = "".join(f"- {algo.upper()} rollout reward, first vs last third of its {t['rollouts']} rollouts: "
                    f"{t['first_third']:.3f} -> {t['last_third']:.3f} ({t['gain']:+.3f} ± {t['gain_se']:.3f})\n"
                    for algo, t in trends.items() if t)
    meta = {**meta, "load_average_end": os.getloadavg(), "timing": st.timing}
    write_text_atomic(docs / "results.json", json.dumps({"meta": meta, "rows": rows, "rollout_trends": trends},
                                                       indent=2) + "\n")
    table = markdown(rows) + (f"\n{notes}" if notes else "")
    write_text_atomic(docs / "results.md", table)
    print(f"\nCPU flags: {flags}; load average at the end {os.getloadavg()[0]:.1f}\n\n{table}")
    print(f"wrote {docs}/results.json, results.md, curves.png", file=sys.stderr)


if __name__ == "__main__":
    main()
