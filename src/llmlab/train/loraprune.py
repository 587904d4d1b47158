"""LoRAPrune's fine-tune: LoRA trains while heads and FFN channels are removed step by step.

Zhang et al. 2023, arXiv:2305.18403 (the importance and the schedule: ``compress/loraprune.py``). LoRA (rank r on
every linear layer of the blocks) trains on the calibration text by THE training loop (``train/recover.py``'s
task: next-token loss, AdamW, warmup + cosine); after every optimizer step the LoRA-gradient importance of every
dependency group is folded into its moving average, and whenever the schedule's share of removed units grows,
each block removes its least important units (``structured.select_units``; removed units keep -inf, so they stay
removed). Removal is a mask on the forward pass (``structured.UnitMasks``), so the later steps train the smaller
model. The factors' gradients are read by a hook on each A and B after its gradient is accumulated (the loop zeroes
them after the step), together with the factors' values before the step. At the end LoRA is merged into the
weights and ``compress/structured.prune_structured`` shrinks the model.

Shapes: A (r, K); B (N, r); group scores (H,), (KV,), (F,).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.loraprune import loraprune_scores, moving_average, scheduled_sparsity
from llmlab.compress.structured import ATTN, FFN, StructuredConfig, UnitMasks, plan, select_units, unit_scores
from llmlab.nn.lora import LoRAConfig, apply_lora_, lora_modules, remove_lora_
from llmlab.train.recover import RecoveryTask, heldout_windows, lora_parameters, recover_


class LoRAPruneTask(RecoveryTask):
    """The recovery task (LoRA factors only) plus LoRAPrune's importance and progressive masks."""

    name = "loraprune"

    def __init__(self, model: nn.Module, loaded, windows: torch.Tensor, heldout: torch.Tensor, config: StructuredConfig,
                 steps: int):
        super().__init__(model, loaded.config, windows, heldout, lora_parameters(model))
        self.config, self.steps, self.step = config, steps, 0
        self.final = plan(loaded.config, config)
        self.loras = lora_modules(model)
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # param name -> (value, gradient)
        self.hooks = []
        for name, m in self.loras.items():
            for ab in ("A", "B"):
                self.hooks.append(getattr(m, f"lora_{ab}").weight.register_post_accumulate_grad_hook(
                    self._record(f"{name}.{ab}")))
        self.importance: list[dict[str, torch.Tensor] | None] = [None] * loaded.config.n_layers
        self.keep: list[dict[str, torch.Tensor]] = [
            {"heads": torch.ones(loaded.config.n_heads, dtype=torch.bool),
             "kv": torch.ones(loaded.config.n_kv_heads, dtype=torch.bool),
             "ffn": torch.ones(loaded.config.ffn_dim, dtype=torch.bool)} for _ in range(loaded.config.n_layers)]
        self.masks = UnitMasks(model, loaded.config)
        self.sparsity, self.prunings = 0.0, []

    def _record(self, key: str):
        def hook(p: torch.Tensor) -> None:
            self.seen[key] = (p.detach().clone(), p.grad.detach().clone())
        return hook

    def block_scores(self, i: int) -> dict[str, torch.Tensor]:
        """LoRAPrune's per-weight importance of block i's seven projections {leaf: (N, K)}."""
        out = {}
        for kind, leaves in (("self_attn", ATTN), ("mlp", FFN)):
            for leaf in leaves:
                name = f"layers.{i}.{kind}.{leaf}"
                m = self.loras[name]
                (a, ga), (b, gb) = self.seen[f"{name}.A"], self.seen[f"{name}.B"]
                out[leaf] = loraprune_scores(m.base_layer.weight.detach(), a, b, ga, gb, m.scaling)
        return out

    @torch.no_grad()
    def aux_stats(self) -> dict:
        """Called by the loop once after every optimizer step: update the importance, prune on schedule."""
        self.step += 1
        cfg = self.model_config
        if len(self.seen) == 2 * len(self.loras):
            for i in range(cfg.n_layers):
                units = unit_scores(self.block_scores(i), cfg, normalize=True)
                if all(torch.isfinite(u).all() for u in units.values()):  # the reference skips a NaN update
                    prev = self.importance[i]
                    self.importance[i] = {k: moving_average(None if prev is None else prev[k], v)
                                          for k, v in units.items()}
        self.seen.clear()
        target = scheduled_sparsity(self.step, self.steps, self.config.sparsity)
        p = plan(cfg, replace(self.config, sparsity=target))
        if self.step >= self.steps:
            p = self.final
        now = (int(self.keep[0]["heads"].sum()), int(self.keep[0]["kv"].sum()), int(self.keep[0]["ffn"].sum()))
        want = (p.config.n_heads, p.config.n_kv_heads, p.config.ffn_dim)
        if want != now and all(imp is not None for imp in self.importance):
            for i, imp in enumerate(self.importance):
                gone = {k: ~v for k, v in self.keep[i].items()}
                units = {k: v.masked_fill(gone[k].to(v.device), float("-inf")) for k, v in imp.items()}
                self.keep[i] = select_units(units, cfg, p)
            self.masks.set(self.keep)
            final = (self.final.config.n_heads, self.final.config.n_kv_heads, self.final.config.ffn_dim)
            self.sparsity = self.config.sparsity if want == final else target
            self.prunings.append({"step": self.step, "sparsity": round(self.sparsity, 4), "heads": want[0],
                                  "kv_heads": want[1], "ffn": want[2]})
        return {"pruned_share": self.sparsity}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.masks.remove()


def loraprune_select(config: StructuredConfig, steps: int, *, lr: float = 1e-4, batch_size: int = 4,
                     rank: int = 8, alpha: float = 16.0, ppl_tokens: int = 4096, window: int = 512,
                     progress: bool = True):
    """The ``select`` step of ``compress.structured.prune_structured`` for LoRAPrune: (model, loaded, calibration
    windows) -> (the units every block keeps, {"loraprune": the fine-tune's report}). Leaves the model with LoRA
    merged and no masks (the units to drop are then removed by shrinking)."""
    if steps < 2:
        raise LlmlabError(f"--recover-steps {steps}: LoRAPrune prunes while it fine-tunes: use at least 2 steps "
                          "(e.g. 20)")

    def run(model: nn.Module, loaded, windows: torch.Tensor):
        heldout = heldout_windows(loaded.tokenizer, ppl_tokens, window)
        apply_lora_(model, LoRAConfig(r=rank, alpha=alpha, target_modules="all-linear").validate())
        task = LoRAPruneTask(model, loaded, windows, heldout, config, steps)
        try:
            rec = recover_(model, loaded.config, windows, heldout, steps, lr=lr, batch_size=batch_size,
                           progress=progress, params=lora_parameters(model), task=task)
        finally:
            task.close()
            remove_lora_(model, merge=True)
        if task.sparsity != config.sparsity:
            raise LlmlabError(f"LoRAPrune reached only {task.sparsity:g} of --sparsity {config.sparsity:g} in "
                              f"{steps} steps: use more --recover-steps")
        return task.keep, {"loraprune": {**rec, "lora_rank": rank, "heldout_tokens": heldout.numel(),
                                         "prunings": task.prunings}}

    return run
