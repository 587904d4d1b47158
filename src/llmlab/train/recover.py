"""Recovery fine-tune of a low-rank model: train only the factors, briefly, on the calibration text.

Truncating a layer's SVD loses what the dropped singular directions carried; a short fine-tune of what is left
wins part of it back. LLM-Pruner (Ma, Fang, Wang, "LLM-Pruner: On the Structural Pruning of Large Language
Models", 2023, arXiv:2305.11627, Section 3.3) recovers a compressed model with LoRA for a few hundred steps, and
SVD-LLM (arXiv:2403.07378) updates its two factors with a LoRA-style fine-tune. Here both factors of every
``LowRankLinear`` (``nn/lowrank.py``) train together and every other weight stays frozen: a factored layer *is* a
LoRA-shaped pair, so no adapter is added on top.

The task is next-token cross-entropy on the calibration windows (the rows of step s are windows
(s x batch + i) mod n), run by THE training loop (``train/loop.py``: AdamW, warmup + cosine, gradient
clipping, NaN checks) with its checkpoints in a temporary folder. The held-out loss before and after is the
mean next-token loss over held-out windows (``perplexity`` = exp of it).

Shapes: windows (n, T) int64; logits (B, T, V).
"""

from __future__ import annotations

import math
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import heldout_text
from llmlab.models.config import ModelConfig
from llmlab.nn.lora import LoRAConfig, apply_lora_, lora_modules, remove_lora_
from llmlab.nn.lowrank import LowRankLinear
from llmlab.train.loop import TrainConfig, train

FACTORS = "factors.safetensors"  # the trainable tensors inside a checkpoint


def factor_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the float factor weights of every ``LowRankLinear`` in ``model``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            for part in ("down", "up"):
                w = getattr(m, part).weight
                if isinstance(w, nn.Parameter):
                    out[f"{name}.{part}.weight"] = w
    return out


class RecoveryTask:
    """Causal-LM loss on calibration windows; validation on held-out windows. Only the factors train."""

    name = "recover"

    def __init__(self, model: nn.Module, cfg: ModelConfig, windows: torch.Tensor, heldout: torch.Tensor,
                 trainable: dict[str, nn.Parameter] | None = None):
        self.model, self.model_config, self.windows, self.heldout = model, cfg, windows, heldout
        self.trainable = set(factor_parameters(model) if trainable is None else trainable)

    def _rows(self, step: int, first_row: int, rows: int, total_rows: int, split: str) -> torch.Tensor:
        src = self.windows if split == "train" else self.heldout
        idx = [(step * total_rows + first_row + i) % src.shape[0] for i in range(rows)]
        return src[idx]  # (rows, T)

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        x = self._rows(step, first_row, rows, total_rows, split)
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        return loss, x[:, 1:].numel()

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean next-token loss over every held-out window."""
        was = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for s in range(self.heldout.shape[0]):
            loss, n = self.loss(self.model, s, 0, 1, 1, "val")
            total, count = total + float(loss) * n, count + n
        self.model.train(was)
        return total / count

    def split_state(self, sd):
        return {}, {FACTORS: {k: v for k, v in sd.items() if k in self.trainable}}

    def join_state(self, core, extras):
        return {**self.model.state_dict(), **extras[FACTORS]}

    def extra_files(self):
        return [FACTORS]

    def aux_stats(self) -> dict:
        return {}

    def tokenizer_files(self):
        return None


def recover_(model: nn.Module, cfg: ModelConfig, windows: torch.Tensor, heldout: torch.Tensor, steps: int, *,
             lr: float = 1e-4, batch_size: int = 4, progress: bool = True,
             params: dict[str, nn.Parameter] | None = None, task: RecoveryTask | None = None) -> dict:
    """Train the factors of ``model`` (or ``params``: {state-dict name: parameter}, e.g. LoRA's A and B; ``task``:
    a ``RecoveryTask`` subclass built on them) for ``steps`` optimizer steps on ``windows`` (n, T); returns {"steps",
    "lr", "batch_size", "train_loss" (last step), "heldout_loss_before" / "_after", "perplexity_before" /
    "_after", "seconds"}. The other parameters' ``requires_grad`` are restored afterwards."""
    if steps < 1:
        raise LlmlabError(f"--recover-steps {steps}: use a positive number of steps (0 = no recovery)")
    if not (lr > 0 and math.isfinite(lr)):
        raise LlmlabError(f"--recover-lr {lr}: use a positive learning rate, e.g. 1e-4")
    factors = factor_parameters(model) if params is None else params
    if not factors:
        raise LlmlabError("recovery needs float low-rank factors, and the model has none")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in factors.values():
        p.requires_grad_(True)
    task = task or RecoveryTask(model, cfg, windows, heldout, factors)
    before = task.heldout_loss()
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=windows.shape[1], lr=lr, warmup=max(1, steps // 10),
                       weight_decay=0.0, eval_every=0, eval_batches=1, save_every=0, keep_checkpoints=1,
                       log_every=max(1, steps // 10), device="cpu", progress=progress)
    try:
        with tempfile.TemporaryDirectory(prefix="llmlab-recover-") as run_dir:
            result = train(task, tcfg, run_dir, resume=False)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        model.eval()
    after = task.heldout_loss()
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "tokens": result.tokens,
            "train_loss": result.train_loss, "heldout_loss_before": before, "heldout_loss_after": after,
            "perplexity_before": math.exp(before), "perplexity_after": math.exp(after),
            "seconds": round(result.seconds, 2)}


def heldout_windows(tokenizer, n_tokens: int, window: int) -> torch.Tensor:
    """The first ``n_tokens`` of the fixed held-out text (``compress/calibrate.heldout_text``) as consecutive
    windows of ``window`` tokens, (n, window); a last partial window is dropped."""
    if n_tokens < window or window < 2:
        raise LlmlabError(f"--ppl-tokens {n_tokens}: score at least one window of {window} tokens")
    ids = torch.tensor(tokenizer.encode(heldout_text())[:n_tokens], dtype=torch.long)
    n = ids.numel() // window
    return ids[: n * window].reshape(n, window)  # (n, window)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{state-dict name: parameter} of every LoRA A and B in ``model``."""
    return {f"{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight
            for name, m in lora_modules(model).items() for ab in ("A", "B")}


def recovery(steps: int, *, lr: float = 1e-4, batch_size: int = 4, ppl_tokens: int = 4096, window: int = 512,
             progress: bool = True, lora_rank: int = 0, lora_alpha: float = 16.0):
    """The ``recover`` step of ``compress.lowrank.lowrank`` and ``compress.structured.prune_structured``: (model,
    loaded, calibration windows) -> the report of ``recover_``, the held-out loss measured on ``ppl_tokens``
    tokens of the held-out text. ``lora_rank`` > 0: LoRA of that rank on every linear layer of the blocks is
    trained instead of low-rank factors and merged into the weights afterwards (LLM-Pruner's recovery)."""
    if steps < 1:
        raise LlmlabError(f"--recover-steps {steps}: use a positive number of steps (0 = no recovery)")
    if batch_size < 1:
        raise LlmlabError(f"--recover-batch {batch_size}: use at least 1 window per step")

    def run(model: nn.Module, loaded, windows: torch.Tensor) -> dict:
        heldout = heldout_windows(loaded.tokenizer, ppl_tokens, window)
        params = None
        if lora_rank:
            apply_lora_(model, LoRAConfig(r=lora_rank, alpha=lora_alpha, target_modules="all-linear").validate())
            params = lora_parameters(model)
        try:
            rec = recover_(model, loaded.config, windows, heldout, steps, lr=lr, batch_size=batch_size,
                           progress=progress, params=params)
        finally:
            if lora_rank:
                remove_lora_(model, merge=True)
        return {**rec, "heldout_tokens": heldout.numel(), **({"lora_rank": lora_rank} if lora_rank else {})}

    return run
