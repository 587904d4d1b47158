"""A reward model for RLHF: a scalar head on a language model, trained on preference pairs with the Bradley-Terry
loss, as a ``Task`` for the one training loop (docs/architecture.md, "One training loop").

Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT,
arXiv:2203.02155), section 3.5: the reward model is the language model with its output head replaced by a
linear layer to one number, read at the last token of prompt + reply; for a pair (prompt x, chosen y_w,
rejected y_l) the Bradley-Terry model (Bradley & Terry 1952) says P(y_w > y_l) = sigmoid(r(x, y_w) - r(x, y_l)),
so the loss is

    loss = -log sigmoid(r_chosen - r_rejected)        (mean over the pairs)

and the metric is the accuracy: the fraction of pairs with r_chosen > r_rejected. This is what TRL's
``RewardTrainer.compute_loss`` computes on a ``*ForSequenceClassification`` model (parity:
``tests/test_reward_ppo.py``, where transformers' ``LlamaForSequenceClassification`` pools the last non-pad
token of the same weights).

Shapes: a batch stacks the B chosen and then the B rejected sequences, right-padded, (2B, T); the head reads
the hidden state (after the final norm) of each row's last real token, the reply's end-of-turn token: (2B, D)
-> (2B,). The model is ``RewardLM``: the language model (``lm``, LoRA on a frozen base by default; its output
head is unused) plus ``score``, a ``Linear(dim, 1, bias=False)`` (transformers' name), which always trains.

``llmlab reward`` with no flags: LoRA on SmolLM2-135M-Instruct, pairs from the built-in ``addition`` task
(chosen = the exact answer, rejected = a near miss, ``data/preferences.py``), or the TRL-style
prompt / chosen / rejected JSONL files given. The run folder has an sft run's layout (``sft_config.json``,
``adapter/``, ``checkpoints/``, ``metrics.jsonl``, ``summary.md``) plus ``reward_head.safetensors`` (the head);
``llmlab ppo --reward-model RUN`` scores rollouts with it (``load_reward_model``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError, human_count, pick_device, seed_everything, write_text_atomic
from llmlab.data.preferences import TokenizedPair, pad_id_of
from llmlab.data.sft import epoch_order
from llmlab.dataclass_io import to_dict
from llmlab.formats import safetensors
from llmlab.formats.load import Loaded, load_model
from llmlab.formats.peft import base_fingerprint
from llmlab.train.dpo import load_model_and_pairs
from llmlab.train.loop import TrainResult, train
from llmlab.train.report import write_summary
from llmlab.train.sft import SFTConfig, SFTTask, SFTTrainConfig, apply_method, save_result, weight_count

METHODS = ("lora", "qlora")
HEAD_FILE = "reward_head.safetensors"


@dataclass
class RewardConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "base model: an embedded name, a GGUF file or a Hugging Face folder"})
    method: str = field(default="lora", metadata={
        "help": "lora (low-rank updates) or qlora (LoRA on a 4-bit base); the scalar head always trains",
        "choices": METHODS})
    task: str = field(default="addition", metadata={
        "help": "with no files: pairs from this built-in task (chosen = the exact answer, rejected = a near miss)"})
    pairs: int = field(default=256, metadata={"help": "pairs drawn from --task (with no files)"})
    val_pairs: int = field(default=32, metadata={
        "help": "validation pairs (the task's held-out split, or the last of the file's pairs)"})
    out: str = field(default="runs/reward", metadata={"help": "run folder (resumes when it has checkpoints)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_targets: str = field(default="all-linear", metadata={
        "help": "modules LoRA wraps: all-linear, comma-separated names (q_proj,v_proj) or a regex"})
    qlora_base: str = field(default="nf4", metadata={
        "help": "qlora: the frozen base as NF4 or the GGUF's own packed blocks", "choices": ("nf4", "packed")})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> RewardConfig:
        if self.method not in METHODS:
            raise LlmlabError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.pairs < 1 or self.val_pairs < 0:
            raise LlmlabError("--pairs must be >= 1 and --val-pairs >= 0")
        if self.lora_r <= 0:
            raise LlmlabError(f"--lora-r must be a positive integer, got {self.lora_r}")
        return self

    def sft_config(self) -> SFTConfig:
        return SFTConfig(model=self.model, method=self.method, out=self.out, lora_r=self.lora_r,
                         lora_alpha=self.lora_alpha, lora_targets=self.lora_targets, qlora_base=self.qlora_base)


@dataclass
class RewardTrainConfig(SFTTrainConfig):
    """The training loop's flags with reward-model defaults (LoRA and the head train)."""

    steps: int = field(default=30, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "global batch: preference pairs per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence (prompt + reply), at most"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (LoRA and the head)"})
    warmup: int = field(default=3, metadata={"help": "linear warmup steps"})


class RewardLM(nn.Module):
    """A language model and a scalar head on its last real token (module docstring)."""

    def __init__(self, lm: nn.Module, dim: int):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)  # transformers' initializer_range

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (N, T) right-padded, lengths (N,) real tokens per row -> rewards (N,) float32 (float64 for a float64
        model)."""
        keep = int(lengths.max())
        hidden = self.lm(input_ids[:, :keep], return_hidden=True)  # (N, keep, D), causal: padding seen by no one
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (N, D)
        r = self.score(last).squeeze(-1)  # (N,)
        return r if r.dtype == torch.float64 else r.float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses -log sigmoid(r_w - r_l) and correctness (r_w > r_l), both (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected), (r_chosen > r_rejected).float()


def sequences_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (N, T) right-padded and lengths (N,)."""
    length = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (length - len(s)) for s in seqs])
    return ids, torch.tensor([len(s) for s in seqs])


class RewardTask(SFTTask):
    """Preference pairs -> ``bradley_terry_loss``. Checkpoints hold only the trainable tensors (LoRA + head)."""

    name = "reward"

    def __init__(self, model: RewardLM, loaded: Loaded, pairs: dict[str, list[TokenizedPair]], seed: int,
                 pad_id: int, method: str):
        super().__init__(model, loaded, None, seed, method, None)
        self.pairs, self.pad_id = pairs, pad_id
        self._sums: dict[str, float] = {}
        self._step = -1

    def pair_loss(self, model: nn.Module, idx: list[int], split: str) -> tuple[torch.Tensor, ...]:
        ps = [self.pairs[split][i] for i in idx]
        ids, lengths = sequences_batch([p.chosen.ids for p in ps] + [p.rejected.ids for p in ps], self.pad_id)
        device = next(model.parameters()).device
        r_w, r_l = model(ids.to(device), lengths.to(device)).chunk(2)  # (B,), (B,)
        losses, correct = bradley_terry_loss(r_w, r_l)
        return losses, correct, r_w.detach(), r_l.detach()

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        idx = epoch_order(len(self.pairs[split]), step, rows, seed=self.seed, val=split == "val", first_row=first_row,
                          total_rows=total_rows)
        losses, correct, r_w, r_l = self.pair_loss(model, idx, split)
        if split == "train":
            if step != self._step:
                self._sums, self._step = {}, step
            for key, v in (("accuracy", correct), ("margin", r_w - r_l), ("reward_mean", (r_w + r_l) / 2)):
                self._sums[key] = self._sums.get(key, 0.0) + float(v.sum())
            self._sums["pairs"] = self._sums.get("pairs", 0.0) + len(idx)
        pairs = self.pairs[split]
        return losses.mean(), sum(len(pairs[i].chosen.ids) + len(pairs[i].rejected.ids) for i in idx)

    def aux_stats(self) -> dict:
        n = self._sums.get("pairs", 0.0)
        return {k: v / n for k, v in self._sums.items() if k != "pairs"} if n else {}

    @torch.no_grad()
    def evaluate_pairs(self, split: str = "val", batch_size: int = 8) -> dict:
        """Mean loss, accuracy and margin over every pair of ``split`` (eval mode)."""
        was = self.model.training
        self.model.eval()
        sums, n = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, len(self.pairs[split])
        for i in range(0, n, batch_size):
            losses, correct, r_w, r_l = self.pair_loss(self.model, list(range(i, min(n, i + batch_size))), split)
            for key, v in (("loss", losses), ("accuracy", correct), ("margin", r_w - r_l)):
                sums[key] += float(v.sum())
        self.model.train(was)
        return {k: v / n for k, v in sums.items()} if n else {}


# ---- use in PPO -----------------------------------------------------------------------------------------


class RewardModel:
    """A trained reward run, scoring token sequences: ``__call__(seqs) -> (N,)`` rewards."""

    def __init__(self, net: RewardLM, tokenizer, pad_id: int, where: str):
        self.net, self.tokenizer, self.pad_id, self.where = net.eval(), tokenizer, pad_id, where

    @torch.no_grad()
    def __call__(self, seqs: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        device = next(self.net.parameters()).device
        out = []
        for i in range(0, len(seqs), batch_size):
            ids, lengths = sequences_batch(seqs[i:i + batch_size], self.pad_id)
            out.append(self.net(ids.to(device), lengths.to(device)).cpu())
        return torch.cat(out)


def load_reward_model(path: str | Path, policy_tokenizer=None) -> RewardModel:
    """An ``llmlab reward`` run folder -> ``RewardModel``. With ``policy_tokenizer``, the two vocabularies must be
    the same (rollouts are scored as token ids, never re-tokenized)."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise LlmlabError(f"--reward-model {path}: not an llmlab reward run (no {HEAD_FILE}): train one with "
                          "llmlab reward --out DIR, or leave --reward-model out to score with the task's verifier")
    loaded = load_model(path)
    tok = loaded.tokenizer
    if policy_tokenizer is not None and getattr(tok, "id_to_token", None) != getattr(policy_tokenizer, "id_to_token",
                                                                                     None):
        raise LlmlabError(f"--reward-model {path} uses another tokenizer than the policy ({len(tok.id_to_token)} vs "
                          f"{len(policy_tokenizer.id_to_token)} tokens, or different ids): train the reward model on "
                          "the policy's base (llmlab reward --model SAME_BASE)")
    head = safetensors.load(path / HEAD_FILE)
    net = RewardLM(loaded.model, loaded.config.dim)
    if set(head) != {"score.weight"} or tuple(head["score.weight"].shape) != (1, loaded.config.dim):
        raise LlmlabError(f"{path / HEAD_FILE}: expected score.weight of shape (1, {loaded.config.dim})")
    net.score.weight.data.copy_(head["score.weight"])
    return RewardModel(net, tok, pad_id_of(tok), str(path))


# ---- the command ----------------------------------------------------------------------------------------


def run_reward(cfg: RewardConfig, tcfg: RewardTrainConfig, paths: list[str] | None = None) -> dict:
    """Load, build and check the pairs, add LoRA and the head, train, save, evaluate; returns the summary."""
    cfg.validate()
    tcfg.validate()
    paths = list(paths or [])
    run_dir = Path(cfg.out)
    seed_everything(tcfg.seed)
    t0 = time.perf_counter()
    loaded, pairs, val_pairs, pad_id, where = load_model_and_pairs(cfg, tcfg, paths, "a reward model")
    tok, train_pairs = loaded.tokenizer, pairs["train"]
    n_base = weight_count(loaded.model, tied_head=loaded.config.tie_embeddings)
    fingerprint = base_fingerprint(loaded.model, loaded.config, tok)
    sft_cfg = cfg.sft_config()
    torch.manual_seed(tcfg.seed)
    model = RewardLM(apply_method(loaded.model, sft_cfg, tok), loaded.config.dim).to(pick_device(tcfg.device))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "sft_config.json", json.dumps(
        {**to_dict(sft_cfg), "reward": to_dict(cfg), "train": to_dict(tcfg), "data": paths}, indent=2) + "\n")
    task = RewardTask(model, loaded, pairs, tcfg.seed, pad_id, cfg.method)
    before = task.evaluate_pairs("val") if val_pairs else {}
    print(f"llmlab: reward model ({cfg.method}): {human_count(n_train)} of {human_count(n_base + n_train)} "
          f"parameters train -> {run_dir}", flush=True)
    result: TrainResult = train(task, tcfg, run_dir, resume=cfg.resume)
    done = result.stopped != "interrupted"
    saved = None
    if done:
        saved = save_result(model.lm, sft_cfg, loaded, run_dir, fingerprint)
        safetensors.save({"score.weight": model.score.weight.detach().cpu().contiguous()}, run_dir / HEAD_FILE)
    after = task.evaluate_pairs("val") if done and val_pairs else {}
    import resource

    summary = {"method": cfg.method, "model": cfg.model, "data": where, "steps": result.step,
               "stopped": result.stopped, "pairs": len(train_pairs), "trainable_params": n_train,
               "val_before": before, "val_after": after, "train_loss": result.train_loss,
               "train_seconds": result.seconds, "total_seconds": time.perf_counter() - t0,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "saved": str(saved) if saved else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def row(name, v):
        return f"| {name} | {v['loss']:.4f} | {100 * v['accuracy']:.1f}% | {v['margin']:.3f} |" if v else ""

    write_summary(run_dir / "summary.md", [
        f"# Reward model (Bradley-Terry): {cfg.method} on {cfg.model}", "",
        f"- data: {where} ({len(train_pairs)} training pairs, {len(val_pairs)} validation pairs)",
        f"- steps: {result.step} ({result.stopped}), {tcfg.batch_size} pairs per step, lr {tcfg.lr:g}, "
        f"{result.seconds / 60:.1f} min training; peak RSS {summary['peak_rss_mb']:.0f} MB",
        f"- saved: {saved} + {run_dir / HEAD_FILE}", "",
        "| validation pairs | loss | accuracy | margin |", "|---|---|---|---|",
        row("before", before), row("after", after), "", "![loss](loss.png)"])
    return summary
