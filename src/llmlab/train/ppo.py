"""RLHF with PPO, and GRPO with verifiable rewards, as a ``Task`` for the one training loop
(docs/architecture.md, "One training loop").

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347) as InstructGPT
applies it to a language model (Ouyang et al. 2022, arXiv:2203.02155; Ziegler et al. 2019, arXiv:1909.08593):

1. rollout: sample a reply to each of ``--rollout-batch`` prompts from the policy (temperature 1, so the
   samples follow the policy's own distribution), score it: the task's verifier (1 for an exact answer, else 0)
   or a reward model (``--reward-model``, ``train/reward.py``);
2. per-token reward: r_t = -kl_coef (log pi(y_t) - log ref(y_t)) (the k1 estimate of KL to the reference),
   plus the score on the reply's last token;
3. GAE (Schulman et al. 2016, arXiv:1506.02438): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t +
   gamma lam A_{t+1} (V and A are 0 after the last token), returns R_t = A_t + V_t; the advantages whitened
   over the rollout's tokens (mean 0, variance 1; unbiased variance, as TRL's ``masked_whiten``);
4. ``--ppo-epochs`` passes over the rollout in minibatches of ``--batch-size`` sequences, one optimizer step
   each: ratio = pi / pi_old per token,
       policy loss = mean_t max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip))
       value loss  = 0.5 mean_t max((V - R)^2, (V_old + clip(V - V_old, -clip_v, clip_v) - R)^2)
       loss        = policy loss + vf_coef value loss    (means over the minibatch's reply tokens)

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, section 4.1), ``--algo grpo``: ``--group-size`` k
replies per prompt, no value model; each reply's advantage is its score normalised within its group,
A_i = (s_i - mean(s)) / (std(s) + 1e-4) (unbiased std, TRL's), the same for all its tokens; the KL to the
reference is a loss term, the k3 estimator per token (Schulman 2020, "Approximating KL divergence"):
k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for KL(pi || ref) under samples of pi; per token
-min(ratio A, clip(ratio) A) + kl_coef k3, averaged over each reply's tokens, then over the replies (the
paper's eq. 3; TRL's ``loss_type="grpo"``).

The models. The policy is LoRA (or QLoRA) on the frozen base; the reference is the same model with LoRA
switched off (``nn/lora.py``'s ``lora_disabled``: no second copy); the PPO value head is a ``Linear(dim, 1)``
(zero at the start) on the policy's last hidden states, so policy and value share the frozen base *and* the
LoRA layers (the value loss, weighted ``--vf-coef``, also trains LoRA). A model that is an ``llmlab sft``
run has its LoRA merged first: the SFT model is then both the start and the reference.

The loop. One loop step is one minibatch update; a rollout is made at the first step of each iteration of
``ppo_epochs * rollout_batch / batch_size`` steps, by a no-grad pass seeded by (seed, iteration) in its own
RNG stream. The rollout is saved inside each checkpoint (``rollout.safetensors``), so a resumed run continues
the iteration it stopped in with the same samples. Validation ("val_loss" in ``metrics.jsonl``) is minus the
mean reward of greedy replies to held-out prompts. Each train line logs the rollout's ``reward`` (mean score),
``accuracy`` (fraction exactly right), ``kl`` (mean over replies of sum_t log pi - log ref), ``reply_tokens``
and the step's ``policy_loss``, ``value_loss``, ``clipfrac``, ``approx_kl`` (0.5 mean (log ratio)^2).

Shapes: a rollout of N sequences is stored on the (N, T) grid of prompt + reply, right-padded; per-token
tensors (log-probs, values, rewards, advantages) sit at the positions whose next-token target is a reply
token (``labels != IGNORE``), zero elsewhere.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmlab.common import (
    LlmlabError,
    human_count,
    pick_device,
    save_png,
    seed_everything,
    write_text_atomic,
)
from llmlab.data.preferences import pad_id_of
from llmlab.data.sft import IGNORE, TokenizedExample, epoch_order, make_row
from llmlab.data.tasks import get_task
from llmlab.dataclass_io import to_dict
from llmlab.formats.load import chat_template_of, load_model
from llmlab.formats.peft import base_fingerprint
from llmlab.infer.generate import chat_stop_ids, generate
from llmlab.infer.sample import SamplingParams
from llmlab.nn.lora import lora_disabled, lora_modules, remove_lora_
from llmlab.train.dpo import target_logps
from llmlab.train.loop import TrainResult, train
from llmlab.train.report import write_summary
from llmlab.train.reward import load_reward_model
from llmlab.train.sft import ADAPTER_WEIGHTS, SFTConfig, SFTTask, SFTTrainConfig, apply_method, save_result

ALGOS = ("ppo", "grpo")
METHODS = ("lora", "qlora")
ROLLOUT_FILE = "rollout.safetensors"
ROLLOUT_KEYS = ("input_ids", "labels", "old_logps", "ref_logps", "values", "advantages", "returns", "scores",
                "correct", "iteration")


@dataclass
class PPOConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "policy start and reference: an embedded name, a GGUF file, a Hugging Face folder or an sft run "
                "(its LoRA merged first)"})
    algo: str = field(default="ppo", metadata={
        "help": "ppo: value head, GAE, clipped policy and value losses; grpo: group-relative advantages, no value",
        "choices": ALGOS})
    task: str = field(default="addition", metadata={"help": "built-in task: the prompts, the verifier, the score"})
    reward_model: str = field(default="", metadata={
        "help": "an llmlab reward run that scores the replies; empty = the task's verifier (1 exact, else 0)"})
    prompts: int = field(default=256, metadata={"help": "training prompts drawn from --task"})
    rollout_batch: int = field(default=16, metadata={
        "help": "replies sampled per rollout (grpo: --group-size per prompt); a multiple of --batch-size"})
    group_size: int = field(default=4, metadata={"help": "grpo: replies per prompt (>= 2)"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout"})
    max_new_tokens: int = field(default=16, metadata={"help": "reply tokens sampled per prompt, at most"})
    kl_coef: float = field(default=0.05, metadata={
        "help": "weight of the KL to the reference (ppo: in the reward; grpo: in the loss), >= 0"})
    clip: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon, > 0"})
    clip_value: float = field(default=0.2, metadata={"help": "ppo: value clip around the rollout's values, > 0"})
    vf_coef: float = field(default=0.1, metadata={"help": "ppo: weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"help": "ppo: discount"})
    lam: float = field(default=0.95, metadata={"help": "ppo: GAE lambda"})
    whiten: bool = field(default=True, metadata={"help": "ppo: whiten the advantages over each rollout"})
    out: str = field(default="runs/ppo", metadata={"help": "run folder (resumes when it has checkpoints)"})
    eval_examples: int = field(default=50, metadata={
        "help": "held-out --task prompts scored (greedy exact match, reward; KL of sampled replies) before and "
                "after; 0 = skip"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_targets: str = field(default="all-linear", metadata={
        "help": "modules LoRA wraps: all-linear, comma-separated names (q_proj,v_proj) or a regex"})
    method: str = field(default="lora", metadata={"help": "lora or qlora (LoRA on a 4-bit base)", "choices": METHODS})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> PPOConfig:
        def positive(name):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise LlmlabError(f"--{name.replace('_', '-')} must be a positive number, got {v}")

        if self.algo not in ALGOS or self.method not in METHODS:
            raise LlmlabError(f"--algo must be one of {', '.join(ALGOS)} and --method one of {', '.join(METHODS)}")
        positive("clip")
        positive("clip_value")
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise LlmlabError(f"--kl-coef must be >= 0, got {self.kl_coef}")
        if not (self.vf_coef >= 0 and math.isfinite(self.vf_coef)):
            raise LlmlabError(f"--vf-coef must be >= 0, got {self.vf_coef}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise LlmlabError(f"--gamma and --lam must be in [0, 1], got {self.gamma} and {self.lam}")
        if self.algo == "grpo" and self.group_size < 2:
            raise LlmlabError(f"--group-size must be >= 2 for grpo (advantages are relative to the group), got "
                              f"{self.group_size}")
        if self.algo == "grpo" and self.rollout_batch % self.group_size:
            raise LlmlabError(f"--rollout-batch {self.rollout_batch} must be a multiple of --group-size "
                              f"{self.group_size}")
        for name in ("prompts", "rollout_batch", "ppo_epochs", "max_new_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_examples < 0:
            raise LlmlabError(f"--eval-examples must be >= 0, got {self.eval_examples}")
        return self

    def sft_config(self) -> SFTConfig:
        return SFTConfig(model=self.model, method=self.method, out=self.out, lora_r=self.lora_r,
                         lora_alpha=self.lora_alpha, lora_targets=self.lora_targets)


@dataclass
class PPOTrainConfig(SFTTrainConfig):
    """The loop's flags with PPO defaults: one step = one minibatch update."""

    steps: int = field(default=40, metadata={"help": "optimizer steps (minibatch updates)"})
    batch_size: int = field(default=8, metadata={"help": "minibatch: sequences per optimizer step"})
    seq_len: int = field(default=256, metadata={
        "help": "not used by ppo: a sequence is its prompt plus at most --max-new-tokens"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (LoRA and the value head)"})
    warmup: int = field(default=2, metadata={"help": "linear warmup steps"})
    eval_every: int = field(default=0, metadata={"help": "held-out greedy reward every N steps; 0 = at the end"})
    log_every: int = field(default=4, metadata={"help": "progress-bar refresh / metrics line every N steps"})


# ---- the pieces (each tested against hand-computed values) ----------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, unbiased variance; 0 off the mask."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * (n / (n - 1) if n > 1 else 1.0)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || ref) from log-probabilities of tokens sampled from pi: k1 = log pi/ref
    (unbiased, can be negative), k2 = (log pi/ref)^2 / 2, k3 = ref/pi - 1 - log ref/pi (unbiased, >= 0)."""
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d ** 2
    if kind == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {kind!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's masked (contiguous) positions: (advantages, returns),
    each (N, T), zero off the mask."""
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])  # A_{t+1}
    for t in reversed(range(values.shape[1])):
        m_next = m[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        v_next = values[:, t + 1] * m_next if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * v_next - values[:, t]
        last = (delta + gamma * lam * m_next * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (a mean over the masked tokens) and its clip fraction and approx KL."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((losses > -adv * ratio).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * log_ratio ** 2, mask))}
    return masked_mean(losses, mask), stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_value: float) -> torch.Tensor:
    """0.5 mean over the masked tokens of max((V - R)^2, (V_clipped - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (s - group mean) / (group std + eps), groups of ``group_size`` consecutive scores; (N,)."""
    g = scores.view(-1, group_size)  # (N / k, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip: float, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """GRPO's objective (module docstring): token terms averaged per reply, then over the replies. adv (N,)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]  # (N, 1): one advantage per reply
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a) + kl_coef * kl_estimate(logp, ref_logp,
                                                                                                  "k3")
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean(((ratio - 1).abs() > clip).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * (logp - old_logp) ** 2, mask))}
    return loss, stats


# ---- the model: policy + value head ---------------------------------------------------------------------


class PolicyValue(nn.Module):
    """The policy (a LoRA'd language model) and PPO's value head on its last hidden states."""

    def __init__(self, lm: nn.Module, dim: int, value_head: bool = True):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(dim, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log pi and values on the (N, keep) grid (keep: up to the last target), zero off the mask."""
        token_logps, sel, h = target_logps(self.lm, input_ids, labels)  # (n,), (N, keep), (n, D)
        logps = torch.zeros(sel.shape, dtype=token_logps.dtype, device=sel.device).masked_scatter(sel, token_logps)
        if self.value_head is None:
            return logps, None
        v = self.value_head(h).squeeze(-1).to(token_logps.dtype)  # (n,)
        return logps, torch.zeros_like(logps).masked_scatter(sel, v)


def rollout_stats(r: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean score, exact-match fraction, KL to the reference (k1, summed over each reply) and reply length."""
    mask = r["labels"] != IGNORE
    kl = (kl_estimate(r["old_logps"], r["ref_logps"], "k1") * mask).sum(1)
    return {"reward": float(r["scores"].mean()), "accuracy": float(r["correct"].mean()), "kl": float(kl.mean()),
            "reply_tokens": float(mask.sum(1).float().mean())}


RewardFn = Callable[[str, list[int], list[list[int]]], tuple[torch.Tensor, torch.Tensor]]  # -> scores, correct


class PPOTask(SFTTask):
    """Rollouts -> PPO or GRPO minibatch losses (module docstring). Checkpoints: LoRA + value head + rollout."""

    def __init__(self, model: PolicyValue, loaded, prompts: dict[str, list[list[int]]], reward_fn: RewardFn,
                 cfg: PPOConfig, seed: int, pad_id: int, stop_ids: set[int], batch_size: int):
        super().__init__(model, loaded, None, seed, cfg.method, None)
        if cfg.rollout_batch % batch_size:
            raise LlmlabError(f"--rollout-batch {cfg.rollout_batch} must be a multiple of --batch-size {batch_size}")
        self.name = cfg.algo
        self.prompts, self.reward_fn, self.cfg, self.pad_id, self.stop_ids = prompts, reward_fn, cfg, pad_id, stop_ids
        self.minibatches = cfg.rollout_batch // batch_size
        self.steps_per_iteration = cfg.ppo_epochs * self.minibatches
        self.rollout: dict[str, torch.Tensor] | None = None
        self.rollout_stats: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        self._step = -1

    # -- rollouts

    def _replies(self, split: str, idx: list[int], greedy: bool, seed: int) -> list[list[int]]:
        lm = self.model.lm
        device = next(lm.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the samples do not move
            # the run's RNG streams
            torch.manual_seed(seed)
            done = generate(lm, [self.prompts[split][i] for i in idx], self.cfg.max_new_tokens,
                            SamplingParams(temperature=0.0 if greedy else 1.0), stop_ids=self.stop_ids)
        return [c.ids for c in done]

    def _grid(self, split: str, idx: list[int], replies: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt + reply -> ids, labels (N, T) right-padded; targets on the reply tokens only."""
        exs = [TokenizedExample(self.prompts[split][i] + r, [False] * len(self.prompts[split][i]) + [True] * len(r),
                                f"{split} #{i}") for i, r in zip(idx, replies)]
        length = max(len(e.ids) for e in exs)
        rows = [make_row([e], length, self.pad_id) for e in exs]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    @torch.no_grad()
    def score_replies(self, split: str, idx: list[int], replies: list[list[int]]) -> dict[str, torch.Tensor]:
        """Log pi, log ref, values and scores of the replies to prompts ``idx`` of ``split`` (no grad)."""
        was = self.model.training
        self.model.eval()
        ids, labels = self._grid(split, idx, replies)
        device = next(self.model.parameters()).device
        ids, labels = ids.to(device), labels.to(device)  # the rollout lives where the model does
        logps, values = self.model(ids, labels)
        with lora_disabled(self.model):
            ref_logps, _ = self.model(ids, labels)
        scores, correct = self.reward_fn(split, idx, replies)
        self.model.train(was)
        keep = logps.shape[1]
        out = {"input_ids": ids[:, :keep], "labels": labels[:, :keep], "old_logps": logps, "ref_logps": ref_logps,
               "scores": scores.to(logps), "correct": correct.float()}
        out["values"] = values if values is not None else torch.zeros_like(logps)
        return out

    def make_rollout(self, iteration: int) -> None:
        cfg = self.cfg
        k = cfg.group_size if cfg.algo == "grpo" else 1
        prompt_idx = epoch_order(len(self.prompts["train"]), iteration, cfg.rollout_batch // k, seed=self.seed)
        idx = [i for i in prompt_idx for _ in range(k)]  # (N,): each prompt k times, groups consecutive
        replies = self._replies("train", idx, greedy=False, seed=self.seed * 1_000_003 + iteration)
        r = self.score_replies("train", idx, replies)
        mask = r["labels"] != IGNORE  # (N, T)
        kl = kl_estimate(r["old_logps"], r["ref_logps"], "k1") * mask  # (N, T)
        if cfg.algo == "ppo":
            rewards = -cfg.kl_coef * kl
            last = mask.cumsum(1).argmax(1)  # (N,) the last reply position of each row
            rewards[torch.arange(len(idx)), last] += r["scores"]
            adv, returns = gae(rewards, r["values"], mask, cfg.gamma, cfg.lam)
            r["advantages"] = masked_whiten(adv, mask) if cfg.whiten else adv
            r["returns"] = returns
        else:
            r["advantages"] = group_advantages(r["scores"], k)[:, None] * mask  # stored per token, read per reply
            r["returns"] = torch.zeros_like(r["values"])
        r["iteration"] = torch.tensor([iteration])
        self.rollout, self.rollout_stats = r, rollout_stats(r)

    # -- the loop's interface

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        if split == "val":  # minus the mean reward of greedy replies to held-out prompts
            if not self.prompts["val"]:
                return torch.zeros(()), 0
            idx = epoch_order(len(self.prompts["val"]), step, rows, seed=self.seed, val=True, first_row=first_row,
                              total_rows=total_rows)
            scores, _ = self.reward_fn("val", idx, self._replies("val", idx, greedy=True, seed=0))
            return -scores.float().mean(), 0
        iteration, r = divmod(step, self.steps_per_iteration)
        if self.rollout is None or int(self.rollout["iteration"]) != iteration:
            self.make_rollout(iteration)
        epoch, mb = divmod(r, self.minibatches)
        g = torch.Generator().manual_seed(self.seed * 7919 + iteration * 131 + epoch)
        order = torch.randperm(self.cfg.rollout_batch, generator=g)
        rows_idx = order[mb * total_rows + first_row: mb * total_rows + first_row + rows]
        b = {k: v[rows_idx] for k, v in self.rollout.items() if k != "iteration"}
        mask = b["labels"] != IGNORE
        keep = int(mask.any(0).nonzero().max()) + 1
        b = {k: (v[:, :keep] if v.ndim == 2 else v) for k, v in b.items()}  # (n, keep)
        mask = mask[:, :keep]
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in b.items()}
        mask = mask.to(device)
        logps, values = model(b["input_ids"], b["labels"])
        if self.cfg.algo == "ppo":
            pg, stats = ppo_policy_loss(logps, b["old_logps"], b["advantages"], mask, self.cfg.clip)
            vf = ppo_value_loss(values, b["values"], b["returns"], mask, self.cfg.clip_value)
            loss = pg + self.cfg.vf_coef * vf
            stats = {**stats, "policy_loss": float(pg.detach()), "value_loss": float(vf.detach())}
        else:
            adv = masked_mean(b["advantages"], mask, dim=1)  # (n,): the reply's one advantage
            loss, stats = grpo_loss(logps, b["old_logps"], b["ref_logps"], adv, mask, self.cfg.clip, self.cfg.kl_coef)
            stats = {**stats, "policy_loss": float(loss.detach())}
        if step != self._step:
            self._sums, self._step = {}, step
        for key, v in stats.items():
            self._sums[key] = self._sums.get(key, 0.0) + v * len(rows_idx)
        self._sums["rows"] = self._sums.get("rows", 0.0) + len(rows_idx)
        return loss, int(mask.sum())

    def aux_stats(self) -> dict:
        n = self._sums.get("rows", 0.0)
        return {**self.rollout_stats, **({k: v / n for k, v in self._sums.items() if k != "rows"} if n else {})}

    def split_state(self, sd):
        core, extras = super().split_state(sd)
        return core, {**extras, ROLLOUT_FILE: {k: v.contiguous() for k, v in (self.rollout or {}).items()}}

    def join_state(self, core, extras):
        saved = extras.get(ROLLOUT_FILE) or {}
        if set(saved) == set(ROLLOUT_KEYS):
            self.rollout = dict(saved)
            self.rollout_stats = rollout_stats(self.rollout)
        return super().join_state(core, {ADAPTER_WEIGHTS: extras[ADAPTER_WEIGHTS]})

    def extra_files(self):
        return [ADAPTER_WEIGHTS, ROLLOUT_FILE]

    # -- held-out metrics

    @torch.no_grad()
    def evaluate(self, seed: int, per_prompt: bool = False) -> dict:
        """Held-out: greedy replies -> mean reward and accuracy; sampled replies -> KL to the reference (k1 and
        k3 per-reply sums, means over the prompts). ``per_prompt``: also "correct", each prompt's greedy exact
        match (0 or 1, in prompt order: paired comparisons of two models on the same prompts)."""
        idx = list(range(len(self.prompts["val"])))
        if not idx:
            return {}
        greedy = self._replies("val", idx, greedy=True, seed=0)
        scores, correct = self.reward_fn("val", idx, greedy)
        sampled = self._replies("val", idx, greedy=False, seed=seed)
        r = self.score_replies("val", idx, sampled)
        mask = r["labels"] != IGNORE
        return {"reward": float(scores.float().mean()), "accuracy": float(correct.float().mean()),
                "kl": float((kl_estimate(r["old_logps"], r["ref_logps"], "k1") * mask).sum(1).mean()),
                "kl_k3": float((kl_estimate(r["old_logps"], r["ref_logps"], "k3") * mask).sum(1).mean()),
                "sampled_reward": float(r["scores"].mean()),
                **({"correct": [int(c) for c in correct.tolist()]} if per_prompt else {})}


@torch.no_grad()
def heldout_metrics(loaded, task: str, n: int, seed: int, max_new_tokens: int = 16, examples: list | None = None
                    ) -> dict:
    """``PPOTask.evaluate`` outside a run: greedy exact match and reward on ``n`` held-out ``task`` prompts, and
    the k1 / k3 KL of sampled replies to the same model with LoRA switched off (0 for a model without LoRA).
    A run loaded with ``load_model`` is its base plus its adapter, so the reference is the base it trained on.
    ``examples``: these ``task`` examples scored instead (a dev split for tuning), ``n`` ignored. The result also
    has "correct": each prompt's greedy exact match (0 or 1), in the order of the prompts."""
    task_def = get_task(task)
    examples = {"train": [], "val": task_def.examples("heldout", n, seed) if examples is None else list(examples)}
    prompts, stops, reward_fn = task_prompts_and_reward(loaded, task_def, examples)
    cfg = PPOConfig(task=task, eval_examples=n, max_new_tokens=max_new_tokens, rollout_batch=1)
    model = PolicyValue(loaded.model, loaded.config.dim, value_head=False).eval()
    scorer = PPOTask(model, loaded, prompts, reward_fn, cfg, seed, pad_id_of(loaded.tokenizer), stops, 1)
    return scorer.evaluate(seed, per_prompt=True)


# ---- the command ----------------------------------------------------------------------------------------


def plot_rl_curves(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Rollout reward, KL to the reference and accuracy against step (PNG), one line per run (label ->
    its ``metrics.jsonl`` records)."""
    runs = {label: [r for r in records if r.get("kind") == "train" and "reward" in r]
            for label, records in runs.items()}
    runs = {label: rows for label, rows in runs.items() if rows}
    if not runs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ("reward", "kl", "accuracy"),
                              ("rollout reward (mean score)", "KL to the reference (nats / reply)",
                               "rollout exact match")):
        for name, rows in runs.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=name)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def task_prompts_and_reward(loaded, task_def, examples: dict[str, list], rm=None
                            ) -> tuple[dict[str, list[list[int]]], set[int], RewardFn]:
    """The chat-rendered prompt ids of each split's examples, the stop ids, and the reward function: the task's
    verifier (1 exact, else 0) or the reward model ``rm`` on prompt + reply; both give (scores, correct)."""
    tok, template = loaded.tokenizer, chat_template_of(loaded)
    prompts = {s: [tok.encode(template.render([{"role": "user", "content": e.prompt}], add_generation_prompt=True))
                   for e in exs] for s, exs in examples.items()}
    stops = chat_stop_ids(loaded.config, tok)

    def reward_fn(split, idx, replies):
        texts = [tok.decode([t for t in r if t not in stops], skip_special=True) for r in replies]
        correct = torch.tensor([float(task_def.score(t, examples[split][i].answer)) for i, t in zip(idx, texts)])
        if rm is None:
            return correct, correct
        return rm([prompts[split][i] + r for i, r in zip(idx, replies)]), correct

    return prompts, stops, reward_fn


def run_ppo(cfg: PPOConfig, tcfg: PPOTrainConfig) -> dict:
    """Load, build the prompts and the reward, add LoRA (+ value head), score, train, save, score again."""
    cfg.validate()
    tcfg.validate()
    if cfg.rollout_batch % tcfg.batch_size:
        raise LlmlabError(f"--rollout-batch {cfg.rollout_batch} must be a multiple of --batch-size {tcfg.batch_size}")
    task_def = get_task(cfg.task)
    run_dir = Path(cfg.out)
    seed_everything(tcfg.seed)
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, packed=False)
    if not loaded.config.is_causal or loaded.tokenizer is None:
        raise LlmlabError(f"{cfg.model}: PPO needs a causal language model with a tokenizer")
    tok = loaded.tokenizer
    rm = load_reward_model(cfg.reward_model, tok) if cfg.reward_model else None
    if lora_modules(loaded.model):  # an sft run: its LoRA folded in, the SFT model is start and reference
        remove_lora_(loaded.model, merge=True)
    examples = {"train": task_def.examples("train", cfg.prompts, tcfg.seed),
                "val": task_def.examples("heldout", cfg.eval_examples, tcfg.seed) if cfg.eval_examples else []}
    prompts, stops, reward_fn = task_prompts_and_reward(loaded, task_def, examples, rm)
    longest = max(len(p) for ps in prompts.values() for p in ps)
    if longest + cfg.max_new_tokens > loaded.config.max_seq_len:
        raise LlmlabError(f"a prompt of {longest} tokens + --max-new-tokens {cfg.max_new_tokens} exceeds the "
                          f"model's {loaded.config.max_seq_len}-token context: lower --max-new-tokens")

    fingerprint = base_fingerprint(loaded.model, loaded.config, tok)
    sft_cfg = cfg.sft_config()
    torch.manual_seed(tcfg.seed)
    model = PolicyValue(apply_method(loaded.model, sft_cfg, tok), loaded.config.dim, value_head=cfg.algo == "ppo")
    model = model.to(pick_device(tcfg.device))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "sft_config.json", json.dumps(
        {**to_dict(sft_cfg), "ppo": to_dict(cfg), "train": to_dict(tcfg)}, indent=2) + "\n")
    task = PPOTask(model, loaded, prompts, reward_fn, cfg, tcfg.seed, pad_id_of(tok), stops, tcfg.batch_size)
    before = task.evaluate(tcfg.seed) if cfg.eval_examples else {}
    if before:
        print(f"llmlab: held-out before: exact match {100 * before['accuracy']:.1f}%, reward {before['reward']:.3f} "
              f"({cfg.eval_examples} {cfg.task} prompts)", flush=True)
    print(f"llmlab: {cfg.algo} ({'reward model ' + cfg.reward_model if rm else cfg.task + ' verifier'}, "
          f"{cfg.method}): {human_count(n_train)} parameters train, {cfg.rollout_batch} replies per rollout, "
          f"{task.steps_per_iteration} steps per rollout -> {run_dir}", flush=True)
    result: TrainResult = train(task, tcfg, run_dir, resume=cfg.resume)
    done = result.stopped != "interrupted"
    saved = save_result(model.lm, sft_cfg, loaded, run_dir, fingerprint) if done else None
    after = task.evaluate(tcfg.seed) if done and cfg.eval_examples else {}
    if after:
        print(f"llmlab: held-out after: exact match {100 * after['accuracy']:.1f}%, reward {after['reward']:.3f}, "
              f"KL to the reference {after['kl']:.3f} nats per reply", flush=True)
    import resource

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plot_rl_curves({cfg.algo: records}, run_dir / "rl_curves.png", f"{cfg.algo} on {cfg.task}: {cfg.model}")
    summary = {"algo": cfg.algo, "model": cfg.model, "task": cfg.task, "reward_model": cfg.reward_model or None,
               "steps": result.step, "stopped": result.stopped, "rollouts": math.ceil(result.step /
                                                                                      task.steps_per_iteration),
               "trainable_params": n_train, "before": before, "after": after, "train_seconds": result.seconds,
               "total_seconds": time.perf_counter() - t0,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "saved": str(saved) if saved else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def row(name, v):
        return (f"| {name} | {100 * v['accuracy']:.1f}% | {v['reward']:.3f} | {v['kl']:.3f} | {v['kl_k3']:.3f} |"
                if v else "")

    write_summary(run_dir / "summary.md", [
        f"# {cfg.algo.upper()}: {cfg.method} on {cfg.model}, task {cfg.task}", "",
        f"- reward: {'reward model ' + cfg.reward_model if rm else 'the verifier (1 exact, else 0)'}; kl_coef "
        f"{cfg.kl_coef:g}, clip {cfg.clip:g}" + (f", group size {cfg.group_size}" if cfg.algo == "grpo" else
                                                 f", vf_coef {cfg.vf_coef:g}, gamma {cfg.gamma:g}, lam {cfg.lam:g}"),
        f"- steps: {result.step} ({result.stopped}), {summary['rollouts']} rollouts of {cfg.rollout_batch} replies, "
        f"minibatch {tcfg.batch_size}, {cfg.ppo_epochs} epochs, lr {tcfg.lr:g}; {result.seconds / 60:.1f} min "
        f"training, {summary['total_seconds'] / 60:.1f} min in all; peak RSS {summary['peak_rss_mb']:.0f} MB",
        f"- saved: {saved}", "",
        f"| held-out ({cfg.eval_examples} prompts) | exact match (greedy) | reward (greedy) | KL k1 (sampled) | "
        "KL k3 |", "|---|---|---|---|---|", row("before", before), row("after", after), "",
        "![curves](rl_curves.png)", "", "![loss](loss.png)"])
    return summary
