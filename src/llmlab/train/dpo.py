"""Direct preference optimization (DPO) and its IPO and conservative variants, as a ``Task`` for the one
training loop (docs/architecture.md, "One training loop").

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
arXiv:2305.18290) fits a policy to preference pairs (prompt x, chosen y_w, rejected y_l) without a reward
model or sampling. With the sequence log-probabilities of the policy and of a frozen reference,

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    sigmoid (DPO, eq. 7):     loss = -log sigmoid(beta h)
    conservative DPO:         loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                              (Mitchell 2023, "A note on DPO with noisy preferences": the label is flipped
                              with probability eps; ``--label-smoothing``)
    ipo (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, eq. 17, tau = beta):
                              loss = (h' - 1 / (2 beta))^2, h' = h with each log-ratio divided by its
                              reply's token count (TRL's normalisation, confirmed by the IPO authors)
    + NLL (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733, eq. 3;
    ``--nll-weight`` alpha):  loss += alpha * (-sum of log pi over the chosen replies' tokens / their count),
                              the batch's token mean, as TRL's ``loss_type=["sigmoid", "sft"]`` with
                              ``loss_weights=[1, alpha]``: DPO alone can lower log pi(y_w|x) as long as
                              log pi(y_l|x) falls faster, which on reasoning tasks costs accuracy (the paper)

The implicit rewards are r_w = beta (log pi(y_w|x) - log ref(y_w|x)) and r_l likewise; the metrics logged
each step (``metrics.jsonl``, through the loop's ``aux_stats``) are the loss, ``rewards_chosen``,
``rewards_rejected``, ``margin`` (r_w - r_l) and ``accuracy`` (the fraction with r_w > r_l), means over the
step's pairs on this process.

The reference. ``--reference precompute`` (the default): before training, one no-grad pass of the initial
policy over every pair stores log ref(y_w|x) and log ref(y_l|x) (an (N, 2) tensor, also written to the run
folder as ``reference_logps.safetensors`` and reused on resume), so no second copy of the model sits in
memory and each step runs one forward pass, not two. ``--reference adapter-off`` (LoRA / QLoRA only) runs
the reference as the same model with its LoRA layers switched off (``nn/lora.py``'s ``lora_disabled``),
under no grad, every step: no storage, one extra forward per step. Both give the same numbers at the start
(LoRA's B starts at zero), as TRL does with ``precompute_ref_log_probs`` or a PEFT model without ``ref_model``.

One forward per micro-batch, the prompt once per pair: chosen and rejected share their prompt (and any common
start of the replies), and under causal attention its hidden states are the same in both sequences, so each pair
is one row ``common part + rest of chosen + rest of rejected`` (``SharedPrompt``): each rest attends to the
common part and to itself, with position ids restarting after the common part, so every target's hidden state is
the one of its own sequence (the same numbers up to float rounding, tested against the plain rows). With short
replies after a long prompt (chat data) this nearly halves the tokens the blocks see, and the activations kept
for the backward pass (most of a LoRA step's memory) with them. Tokens after a sequence's last target are dropped
(nothing reads them). The output head runs only on the reply positions (``sft_loss``'s trick) and through
``nn/linear_ce.py``'s chunked head, so no (N, vocab) logits are held. log pi(y|x) is the sum of the reply tokens'
log-probabilities, the end-of-turn token included.

``llmlab dpo`` with no flags: LoRA on SmolLM2-135M-Instruct, pairs from the built-in ``addition`` task (chosen
= the exact answer, rejected = a near miss, ``data/preferences.py``), held-out exact match before and after
(``train/sft.py``'s ``exact_match``). The run folder has an sft run's layout (``sft_config.json``, ``adapter/``
or ``model/``, ``checkpoints/``, ``metrics.jsonl``, ``summary.md``), so ``llmlab.load(RUN)``, ``llmlab chat
--model RUN`` and ``llmlab merge RUN`` take it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError, human_count, pick_device, seed_everything, write_text_atomic
from llmlab.data.preferences import TokenizedPair, pad_id_of, tokenize_pair, train_val_pairs
from llmlab.data.sft import IGNORE, epoch_order, make_row
from llmlab.dataclass_io import to_dict
from llmlab.formats import safetensors
from llmlab.formats.load import Loaded, chat_template_of, load_model
from llmlab.formats.peft import base_fingerprint
from llmlab.nn.autocast import autocast
from llmlab.nn.linear_ce import linear_cross_entropy
from llmlab.train.loop import TrainResult, train
from llmlab.train.report import write_summary
from llmlab.train.sft import (
    SFTConfig,
    SFTTask,
    SFTTrainConfig,
    apply_method,
    exact_match,
    output_head,
    plot_accuracy,
    save_result,
    weight_count,
)

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("precompute", "adapter-off")
METHODS = ("lora", "qlora", "full")
DEFAULT_LR = {"lora": 5e-4, "qlora": 5e-4, "full": 5e-6}
REF_FILE = "reference_logps.safetensors"


@dataclass
class DPOConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "policy (and reference) model: an embedded name, a GGUF file, a Hugging Face folder or an sft run"})
    method: str = field(default="lora", metadata={
        "help": "what trains: lora (low-rank updates), qlora (LoRA on a 4-bit base) or full (every weight)",
        "choices": METHODS})
    loss: str = field(default="sigmoid", metadata={
        "help": "sigmoid: DPO (with --label-smoothing: conservative DPO); ipo: IPO's squared loss",
        "choices": LOSSES})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta (IPO's tau): strength of the pull to the reference"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "conservative DPO: probability that a pair's label is flipped, in [0, 0.5); sigmoid loss only"})
    nll_weight: float = field(default=0.0, metadata={
        "help": "RPO: add this weight times the chosen replies' mean token negative log-likelihood to the loss "
                "(Pang et al. 2024 use 1); 0 = plain DPO / IPO"})
    reference: str = field(default="precompute", metadata={
        "help": "precompute: reference log-probabilities computed once before training and stored; adapter-off: "
                "the base with LoRA switched off, each step (lora / qlora)", "choices": REFERENCES})
    task: str = field(default="addition", metadata={
        "help": "with no files: build pairs from this built-in task (chosen = the exact answer, rejected = a near "
                "miss); also the task scored before and after"})
    pairs: int = field(default=256, metadata={"help": "pairs drawn from --task (with no files)"})
    val_pairs: int = field(default=16, metadata={
        "help": "validation pairs (the task's held-out split, or the last of the file's pairs)"})
    out: str = field(default="runs/dpo", metadata={"help": "run folder (resumes when it has checkpoints)"})
    eval_examples: int = field(default=50, metadata={
        "help": "held-out --task questions scored (exact match) before and after training; 0 = skip"})
    eval_tokens: int = field(default=16, metadata={"help": "new tokens generated per scored answer"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_targets: str = field(default="all-linear", metadata={
        "help": "modules LoRA wraps: all-linear, comma-separated names (q_proj,v_proj) or a regex"})
    qlora_base: str = field(default="nf4", metadata={
        "help": "qlora: the frozen base as NF4 or the GGUF's own packed blocks", "choices": ("nf4", "packed")})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> DPOConfig:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise LlmlabError(f"--beta must be a positive number, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise LlmlabError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not (self.nll_weight >= 0 and math.isfinite(self.nll_weight)):
            raise LlmlabError(f"--nll-weight must be a number >= 0, got {self.nll_weight}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise LlmlabError("--label-smoothing applies to --loss sigmoid (conservative DPO), not to ipo")
        for name, choices in (("method", METHODS), ("loss", LOSSES), ("reference", REFERENCES)):
            if getattr(self, name) not in choices:
                raise LlmlabError(f"--{name} {getattr(self, name)!r}: use one of {', '.join(choices)}")
        if self.reference == "adapter-off" and self.method == "full":
            raise LlmlabError("--reference adapter-off needs LoRA (--method lora or qlora): a full fine-tune has no "
                              "adapter to switch off; use --reference precompute")
        if self.pairs < 1 or self.val_pairs < 0:
            raise LlmlabError("--pairs must be >= 1 and --val-pairs >= 0")
        if self.eval_examples < 0 or self.eval_tokens < 1:
            raise LlmlabError("--eval-examples must be >= 0 and --eval-tokens >= 1")
        if self.lora_r <= 0:
            raise LlmlabError(f"--lora-r must be a positive integer, got {self.lora_r}")
        return self

    def sft_config(self) -> SFTConfig:
        """The same model transform and result folder as ``llmlab sft`` (its ``apply_method`` / ``save_result``)."""
        return SFTConfig(model=self.model, method=self.method, out=self.out, lora_r=self.lora_r,
                         lora_alpha=self.lora_alpha, lora_targets=self.lora_targets, qlora_base=self.qlora_base)


@dataclass
class DPOTrainConfig(SFTTrainConfig):
    """The training loop's flags with DPO defaults (about 4 minutes on 2 CPU cores with LoRA); the evaluation,
    checkpoint and logging defaults are fine-tuning's."""

    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "global batch: preference pairs per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence (prompt + reply), at most"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate; 0 = the method's default "
                                                     f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})"})
    warmup: int = field(default=4, metadata={"help": "linear warmup steps"})


# ---- the loss -------------------------------------------------------------------------------------------


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             nll_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of chosen and rejected (B,), detached (module docstring).
    All inputs (B,): sequence log-probabilities; ``*_tokens`` the reply token counts (ipo and nll_weight > 0).
    With ``nll_weight`` each pair carries its share of the batch's chosen-token mean NLL, -log pi(y_w|x) B / N
    (N the batch's chosen tokens), so the mean over the pairs is the token mean."""
    chosen_ratio = chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = rejected_logps - ref_rejected_logps  # (B,)
    if loss == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the reply token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise LlmlabError(f"unknown DPO loss {loss!r}: use one of {', '.join(LOSSES)}")
    if nll_weight:
        if chosen_tokens is None:
            raise ValueError("the NLL term needs the chosen replies' token counts")
        losses = losses - nll_weight * chosen_logps * (len(chosen_logps) / chosen_tokens.sum().clamp(min=1))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---- batches and sequence log-probabilities ------------------------------------------------------------


@dataclass
class SharedPrompt:
    """A ``PairBatch`` as one row per pair: the common part of chosen and rejected once, then the rest of chosen,
    then the rest of rejected (module docstring), right-padded; the N targets listed with where they are."""

    input_ids: torch.Tensor  # (B, S)
    position_ids: torch.Tensor  # (B, S): each sequence's own positions (the rejected rest restarts)
    attention_mask: torch.Tensor  # (B, S, S) bool: causal, and a rest does not see the other rest
    rows: torch.Tensor  # (N,) the row of each target
    cols: torch.Tensor  # (N,) the position whose hidden state predicts it (a shared one may predict two)
    targets: torch.Tensor  # (N,) the target token ids
    seqs: torch.Tensor  # (N,) its sequence in ``PairBatch`` order: chosen 0..B-1, rejected B..2B-1


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, T): B chosen rows, then the B rejected rows, right-padded
    labels: torch.Tensor  # (2B, T): next-token targets on the reply, IGNORE elsewhere
    shared: SharedPrompt | None = None  # the same pairs with each common part once (what the policy runs)

    def chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reply token counts of (chosen, rejected), each (B,)."""
        return (self.labels != IGNORE).sum(1).chunk(2)


def pair_batch(pairs: list[TokenizedPair], pad_id: int) -> PairBatch:
    """Stack the chosen and then the rejected sequences of ``pairs``, padded to the longest; with the
    ``SharedPrompt`` layout of the same pairs."""
    exs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    length = max(len(e.ids) for e in exs)
    rows = [make_row([e], length, pad_id) for e in exs]
    return PairBatch(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                     shared_prompt(pairs, pad_id))


def shared_prompt(pairs: list[TokenizedPair], pad_id: int) -> SharedPrompt:
    """Each pair as ``common + chosen rest + rejected rest`` (``SharedPrompt``). A sequence is cut after its last
    target's position; the common part is the longest common start of the two cut sequences."""
    B = len(pairs)
    ids, pos, part, where = [], [], [], []  # part: 0 common, 1 chosen rest, 2 rejected rest, 3 padding
    for k, p in enumerate(pairs):
        seqs = []
        for e in (p.chosen, p.rejected):
            ts = [t for t in range(len(e.ids) - 1) if e.mask[t + 1]]  # positions with a target
            seqs.append((e, ts, e.ids[:(ts[-1] if ts else 0) + 1]))
        (c, c_ts, c_ids), (r, r_ts, r_ids) = seqs
        n = next((i for i, (a, b) in enumerate(zip(c_ids, r_ids)) if a != b), min(len(c_ids), len(r_ids)))
        ids.append(c_ids + r_ids[n:])
        pos.append(list(range(len(c_ids))) + list(range(n, len(r_ids))))
        part.append([0] * n + [1] * (len(c_ids) - n) + [2] * (len(r_ids) - n))
        where += [(k, t, c.ids[t + 1], k) for t in c_ts]
        where += [(k, t if t < n else len(c_ids) + t - n, r.ids[t + 1], B + k) for t in r_ts]
    S = max(len(row) for row in ids)
    pad = [S - len(row) for row in ids]
    part_t = torch.tensor([pt + [3] * m for pt, m in zip(part, pad)])  # (B, S)
    causal = torch.ones(S, S, dtype=torch.bool).tril()  # (S, S)
    key_part, query_part = part_t[:, None, :], part_t[:, :, None]  # (B, 1, S), (B, S, 1)
    mask = causal & ((key_part == 0) | (key_part == query_part))  # (B, S, S); padding sees itself
    rows, cols, targets, seq = (torch.tensor(c, dtype=torch.long).reshape(-1) for c in zip(*where)) if where \
        else (torch.zeros(0, dtype=torch.long),) * 4
    return SharedPrompt(torch.tensor([row + [pad_id] * m for row, m in zip(ids, pad)]),
                        torch.tensor([pt + [0] * m for pt, m in zip(pos, pad)]), mask, rows, cols, targets, seq)


def target_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target) at every position with a target, right-padded rows (causal: no mask needed): (N,) float32
    (float64 for a float64 model), the selection ``labels != IGNORE`` (B, keep) and the hidden states at the
    selected positions (N, D), for a head of the caller's (PPO's value head)."""
    device = next(model.parameters()).device
    ids, labels = input_ids.to(device), labels.to(device)
    has_target = (labels != IGNORE).any(0)  # (T,)
    keep = int(has_target.nonzero().max()) + 1
    ids, labels = ids[:, :keep], labels[:, :keep]  # (B, keep): nothing after the last target matters
    hidden, weight = model(ids, return_hidden=True, return_head_weight=True)  # (B, keep, D), plain causal attention
    sel = labels != IGNORE  # (B, keep)
    h = hidden[sel]  # (N, D)
    return head_logps(model, h, labels[sel], weight), sel, h  # (N,): the head only where there is a target


def head_logps(model: nn.Module, h: torch.Tensor, targets: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) (N,) from the hidden states h (N, D): float32 (float64 for a float64 model). A plain linear
    head goes through the chunked ``linear_cross_entropy`` (no (N, vocab) logits held), with ``weight`` (the
    forward's ``return_head_weight``: a tied table's gradients then meet in place) in place of its own; any other
    head (a quantized or adapted one) through its full logits."""
    head = output_head(model)
    if type(head) is nn.Linear:
        w = head.weight if weight is None else weight  # (V, D)
        return -linear_cross_entropy(h, w, targets, head.bias, reduction="none", chunk_rows=256)
    logits = head(h)  # (N, V)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return -F.cross_entropy(logits.to(dtype), targets, reduction="none")


def sequence_logps(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Sum of the reply tokens' log-probabilities per sequence, (2B,) float32 (float64 for a float64 model),
    from one forward of the ``SharedPrompt`` rows (the plain (2B, T) rows when the batch has none, or when a
    packed row would be longer than the model's context)."""
    sp = batch.shared
    config = getattr(getattr(model, "module", model), "config", None)
    if sp is None or (config is not None and sp.input_ids.shape[1] > config.max_seq_len):
        token_logps, sel, _ = target_logps(model, batch.input_ids, batch.labels)  # (N,)
        seqs = sel.nonzero()[:, 0]  # (N,) the row of each target
    else:
        device = next(model.parameters()).device
        sp = SharedPrompt(*(getattr(sp, f).to(device) for f in SharedPrompt.__dataclass_fields__))
        hidden, weight = model(sp.input_ids, attention_mask=sp.attention_mask, position_ids=sp.position_ids,
                               return_hidden=True, return_head_weight=True)  # (B, S, D), (V, D)
        token_logps, seqs = head_logps(model, hidden[sp.rows, sp.cols], sp.targets, weight), sp.seqs  # (N,), (N,)
    return torch.zeros(batch.input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, seqs, token_logps)  # (2B,)


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list[TokenizedPair], pad_id: int, dtype: str,
                    batch_size: int = 8) -> torch.Tensor:
    """log ref(chosen), log ref(rejected) of every pair under ``model`` as it is now: (N, 2) float32 (float64 for
    a float64 model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        with autocast(device, dtype):
            lp = sequence_logps(model, pair_batch(pairs[i:i + batch_size], pad_id))
        out.append(torch.stack(lp.chunk(2), dim=1))  # (b, 2)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


# ---- the Task -------------------------------------------------------------------------------------------


class DPOTask(SFTTask):
    """Preference pairs -> ``dpo_loss``. Checkpoints as ``SFTTask`` (only the trainable tensors for LoRA)."""

    name = "dpo"

    def __init__(self, model: nn.Module, loaded: Loaded, pairs: dict[str, list[TokenizedPair]],
                 ref: dict[str, torch.Tensor] | None, cfg: DPOConfig, seed: int, pad_id: int,
                 tokenizer_files: tuple[str, dict] | None = None):
        super().__init__(model, loaded, None, seed, cfg.method, tokenizer_files)
        self.pairs, self.ref, self.cfg, self.pad_id = pairs, ref, cfg, pad_id
        self._sums: dict[str, float] = {}
        self._step = -1

    def pair_loss(self, model: nn.Module, idx: list[int], split: str = "train"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PairBatch]:
        """Per-pair losses and rewards (B,) of the pairs ``idx`` of ``split``, and their batch."""
        batch = pair_batch([self.pairs[split][i] for i in idx], self.pad_id)
        chosen, rejected = sequence_logps(model, batch).chunk(2)  # (B,), (B,)
        if self.ref is not None:
            ref = self.ref[split][idx].to(chosen)  # (B, 2)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:
            from llmlab.nn.lora import lora_disabled

            with torch.no_grad(), lora_disabled(self.model):
                ref_chosen, ref_rejected = sequence_logps(model, batch).chunk(2)
        n_chosen, n_rejected = (n.to(chosen.device) for n in batch.chunk())
        losses, r_w, r_l = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.cfg.beta, loss=self.cfg.loss,
                                    label_smoothing=self.cfg.label_smoothing, chosen_tokens=n_chosen,
                                    rejected_tokens=n_rejected, nll_weight=self.cfg.nll_weight)
        return losses, r_w, r_l, batch

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        idx = epoch_order(len(self.pairs[split]), step, rows, seed=self.seed, val=split == "val", first_row=first_row,
                          total_rows=total_rows)
        losses, r_w, r_l, _ = self.pair_loss(model, idx, split)
        if split == "train":
            if step != self._step:
                self._sums, self._step = {}, step
            for key, values in (("rewards_chosen", r_w), ("rewards_rejected", r_l), ("margin", r_w - r_l),
                                ("accuracy", (r_w > r_l).float())):
                self._sums[key] = self._sums.get(key, 0.0) + float(values.sum())
            self._sums["pairs"] = self._sums.get("pairs", 0.0) + len(idx)
        pairs = self.pairs[split]
        return losses.mean(), sum(len(pairs[i].chosen.ids) + len(pairs[i].rejected.ids) for i in idx)  # no padding

    def aux_stats(self) -> dict:
        n = self._sums.get("pairs", 0.0)
        return {k: v / n for k, v in self._sums.items() if k != "pairs"} if n else {}

    @torch.no_grad()
    def evaluate_pairs(self, split: str = "val", batch_size: int = 8) -> dict:
        """Mean loss, rewards, margin and accuracy over every pair of ``split`` (the model in eval mode)."""
        was_training = self.model.training
        self.model.eval()
        sums = {"loss": 0.0, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "margin": 0.0, "accuracy": 0.0}
        n = len(self.pairs[split])
        for i in range(0, n, batch_size):
            losses, r_w, r_l, _ = self.pair_loss(self.model, list(range(i, min(n, i + batch_size))), split)
            for key, values in (("loss", losses), ("rewards_chosen", r_w), ("rewards_rejected", r_l),
                                ("margin", r_w - r_l), ("accuracy", (r_w > r_l).float())):
                sums[key] += float(values.sum())
        self.model.train(was_training)
        return {k: v / n for k, v in sums.items()} if n else {}


# ---- the command ----------------------------------------------------------------------------------------


def tokenize_pairs(pairs, tokenizer, template, seq_len: int) -> tuple[list[TokenizedPair], int]:
    out, cut = [], 0
    for p in pairs:
        tp, was_cut = tokenize_pair(p, tokenizer, template, seq_len)
        out.append(tp)
        cut += was_cut
    return out, cut


def stored_reference(path: Path, model: nn.Module, pairs: dict[str, list[TokenizedPair]], pad_id: int, dtype: str,
                     reuse: bool) -> dict[str, torch.Tensor]:
    """The reference log-probabilities of every split: read from ``path`` when ``reuse`` and it was written for
    the same token ids, else computed by ``reference_logps`` and written there."""
    digest = hashlib.sha256(json.dumps({s: [(p.chosen.ids, p.rejected.ids) for p in ps] for s, ps in pairs.items()},
                                       sort_keys=True).encode()).hexdigest()
    if reuse and path.exists():
        header = safetensors.read_header(path)[0]
        if header.get("__metadata__", {}).get("pairs_sha256") == digest:
            tensors = safetensors.load(path)
            if set(tensors) == set(pairs):
                return tensors
    ref = {split: reference_logps(model, ps, pad_id, dtype) for split, ps in pairs.items()}
    safetensors.save(ref, path, metadata={"pairs_sha256": digest})
    return ref


class PairData(NamedTuple):
    """What DPO and the reward model start from (``load_model_and_pairs``)."""
    loaded: Loaded
    pairs: dict[str, list[TokenizedPair]]  # "train", "val" (the first train pair when the split gave none)
    val_given: list[TokenizedPair]  # the validation pairs as split (maybe none)
    pad_id: int
    where: str  # where the pairs came from


def load_model_and_pairs(cfg, tcfg, paths: list[str], who: str) -> PairData:
    """The model (packed for a packed QLoRA base), its preference pairs from ``paths`` or ``cfg.task`` split into
    train / validation and tokenized through its chat template, and the pad id."""
    loaded = load_model(cfg.model, packed=cfg.method == "qlora" and cfg.qlora_base == "packed")
    if not loaded.config.is_causal or loaded.tokenizer is None:
        raise LlmlabError(f"{cfg.model}: {who} needs a causal language model with a tokenizer")
    seq_len = min(tcfg.seq_len, loaded.config.max_seq_len)
    template, tok = chat_template_of(loaded), loaded.tokenizer
    raw_train, raw_val, where = train_val_pairs(paths, cfg.task, cfg.pairs, cfg.val_pairs, tcfg.seed)
    train_pairs, cut = tokenize_pairs(raw_train, tok, template, seq_len)
    val_pairs, cut_val = tokenize_pairs(raw_val, tok, template, seq_len)
    print(f"llmlab: {len(train_pairs)} training and {len(val_pairs)} validation pairs from {where}"
          + (f" ({cut + cut_val} replies cut to {seq_len} tokens)" if cut + cut_val else ""), flush=True)
    return PairData(loaded, {"train": train_pairs, "val": val_pairs or train_pairs[:1]}, val_pairs, pad_id_of(tok),
                    where)


def run_dpo(cfg: DPOConfig, tcfg: DPOTrainConfig, paths: list[str] | None = None) -> dict:
    """Load the model, build and check the pairs, score, add LoRA, store the reference, train, save, score
    again; returns the summary (also ``summary.json``)."""
    cfg.validate()
    lr_given = tcfg.lr != 0.0
    tcfg.validate()
    if not lr_given:
        tcfg.lr = DEFAULT_LR[cfg.method]
    paths = list(paths or [])
    run_dir = Path(cfg.out)
    seed_everything(tcfg.seed)
    t0 = time.perf_counter()
    loaded, pairs, val_pairs, pad_id, where = load_model_and_pairs(cfg, tcfg, paths, "DPO")
    tok, train_pairs = loaded.tokenizer, pairs["train"]
    scored = cfg.task if (cfg.task and cfg.eval_examples) else None
    before = None
    if scored:
        before, _ = exact_match(loaded.model, loaded, scored, cfg.eval_examples, tcfg.seed, cfg.eval_tokens)
        print(f"llmlab: held-out exact match before: {100 * before:.1f}% ({cfg.eval_examples} {scored} questions)",
              flush=True)
    n_base = weight_count(loaded.model, tied_head=loaded.config.tie_embeddings)
    fingerprint = base_fingerprint(loaded.model, loaded.config, loaded.tokenizer)
    sft_cfg = cfg.sft_config()
    model = apply_method(loaded.model, sft_cfg, tok).to(pick_device(tcfg.device))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = n_base if cfg.method == "full" else n_base + n_train
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "sft_config.json", json.dumps(
        {**to_dict(sft_cfg), "dpo": to_dict(cfg), "train": to_dict(tcfg), "data": paths}, indent=2) + "\n")
    ref, t_ref = None, time.perf_counter()
    if cfg.reference == "precompute":
        ref = stored_reference(run_dir / REF_FILE, model, pairs, pad_id, tcfg.dtype, reuse=cfg.resume)
        print(f"llmlab: reference log-probabilities of {sum(len(p) for p in pairs.values())} pairs stored in "
              f"{time.perf_counter() - t_ref:.1f} s ({run_dir / REF_FILE})", flush=True)
    t_ref = time.perf_counter() - t_ref
    tok_files = (tok.to_hf_json(), {"chat_template": loaded.chat_template}) if hasattr(tok, "to_hf_json") else None
    task = DPOTask(model, loaded, pairs, ref, cfg, tcfg.seed, pad_id, tok_files if cfg.method == "full" else None)
    print(f"llmlab: dpo ({cfg.loss}, beta {cfg.beta:g}, {cfg.method}): {human_count(n_train)} of "
          f"{human_count(n_total)} parameters train -> {run_dir}", flush=True)
    result: TrainResult = train(task, tcfg, run_dir, resume=cfg.resume)
    done = result.stopped != "interrupted"
    saved = save_result(model, sft_cfg, loaded, run_dir, fingerprint) if done else None
    val_metrics = task.evaluate_pairs("val") if done and val_pairs else {}
    after, rows = None, []
    if scored and done:
        after, rows = exact_match(model, loaded, scored, cfg.eval_examples, tcfg.seed, cfg.eval_tokens)
        print(f"llmlab: held-out exact match after: {100 * after:.1f}%", flush=True)
    import resource

    last = next((r for r in reversed(_read_metrics(run_dir)) if r.get("kind") == "train"), {})
    summary = {"method": cfg.method, "loss": cfg.loss, "beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
               "nll_weight": cfg.nll_weight, "reference": cfg.reference, "model": cfg.model, "data": where,
               "task": scored, "steps": result.step,
               "stopped": result.stopped, "pairs": len(train_pairs), "trainable_params": n_train,
               "total_params": n_total, "accuracy_before": before, "accuracy_after": after,
               "train_loss": result.train_loss, "val_loss": result.val_loss,
               "train_last_step": {k: last[k] for k in ("rewards_chosen", "rewards_rejected", "margin", "accuracy")
                                   if k in last},
               "val_pairs": val_metrics, "train_seconds": result.seconds,
               "reference_seconds": t_ref,
               "total_seconds": time.perf_counter() - t0, "tokens": result.tokens,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "saved": str(saved) if saved else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if rows:
        write_text_atomic(run_dir / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if before is not None and after is not None:
        plot_accuracy(run_dir / "accuracy.png", scored, f"dpo {cfg.loss}", before, after)
    _write_summary_md(run_dir, summary, tcfg)
    return summary


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _write_summary_md(run_dir: Path, s: dict, tcfg: DPOTrainConfig) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    v = s["val_pairs"]
    lines = [f"# DPO ({s['loss']}, beta {s['beta']:g}, label smoothing {s['label_smoothing']:g}, "
             f"NLL weight {s.get('nll_weight', 0.0):g}): {s['method']} on "
             f"{s['model']}", "",
             f"- data: {s['data']} ({s['pairs']} training pairs); reference: {s['reference']}",
             f"- steps: {s['steps']} ({s['stopped']}), {tcfg.batch_size} pairs per step, lr {tcfg.lr:g}, "
             f"{s['train_seconds'] / 60:.1f} min training, {s['total_seconds'] / 60:.1f} min in all",
             f"- trainable parameters: {s['trainable_params']:,} of {s['total_params']:,}",
             f"- peak RSS: {s['peak_rss_mb']:.0f} MB",
             f"- final train loss: {s['train_loss']:.4f}" if s["train_loss"] is not None else "",
             (f"- validation pairs after training: loss {v['loss']:.4f}, reward accuracy {100 * v['accuracy']:.1f}%, "
              f"margin {v['margin']:.3f} (chosen {v['rewards_chosen']:.3f}, rejected {v['rewards_rejected']:.3f})")
             if v else "",
             f"- saved: {s['saved']}", ""]
    if s["task"]:
        lines += [f"## Held-out exact match ({s['task']})", "", "| before | after |", "|---|---|",
                  f"| {pct(s['accuracy_before'])} | {pct(s['accuracy_after'])} |", "", "![accuracy](accuracy.png)", ""]
    lines += ["![loss](loss.png)"]
    write_summary(run_dir / "summary.md", lines)
