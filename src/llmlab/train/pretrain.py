"""Pretraining from scratch: a model built from flags, token shards, and one of two objectives handed
to the training loop as a ``Task``:

- ``clm``: next-token prediction for the GPT-2 and Llama families (with an optional mixture of
  experts, whose load-balancing loss is added with weight ``moe_aux_weight``);
- ``mlm``: BERT masked-LM (``train/mlm.py``).

``llmlab pretrain`` with no flags prepares the default corpus (the Python standard library) if
``data/stdlib`` does not exist yet, trains a small Llama for about ten minutes on two CPU cores, writes
checkpoints, metrics, the loss curve and a sample to ``runs/pretrain``, and resumes there if stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError, human_count, seed_everything, write_text_atomic
from llmlab.data.shards import PrepareConfig, TokenShards, prepare
from llmlab.dataclass_io import to_dict
from llmlab.formats import checkpoint as ckpt
from llmlab.formats.load import model_from_state
from llmlab.models.config import ModelConfig
from llmlab.models.registry import build_model
from llmlab.nn.linear_ce import linear_cross_entropy
from llmlab.nn.moe import MoEFeedForward, moe_aux_loss, moe_dropped
from llmlab.train import distributed as dist_
from llmlab.train.loop import TrainConfig, TrainResult, train
from llmlab.train.mlm import IGNORE, MaskedLM, mask_tokens, mlm_loss
from llmlab.train.report import write_summary

DEFAULT_DATA = "data/stdlib"


@dataclass
class ModelFlags:
    arch: str = field(default="auto", metadata={"help": "model family; auto = llama for clm, bert for mlm",
                                                "choices": ("auto", "llama", "gpt2", "bert")})
    dim: int = field(default=256, metadata={"help": "model width"})
    n_layers: int = field(default=6, metadata={"help": "Transformer blocks"})
    n_heads: int = field(default=8, metadata={"help": "attention heads"})
    n_kv_heads: int = field(default=0, metadata={"help": "key/value heads (GQA); 0 = n_heads"})
    ffn_dim: int = field(default=0, metadata={"help": "feed-forward width; 0 = 8/3 dim (llama, rounded to 32) "
                                                      "or 4 dim"})
    n_experts: int = field(default=0, metadata={"help": "llama: experts per MoE layer; 0 = dense"})
    experts_per_token: int = field(default=2, metadata={"help": "MoE: experts each token is routed to (top-k)"})
    moe_capacity_factor: float = field(default=1.25, metadata={"help": "MoE: expert capacity factor; 0 = no drops"})
    moe_aux_weight: float = field(default=0.01, metadata={"help": "MoE: load-balancing loss weight"})

    def to_config(self, vocab_size: int, seq_len: int, sep_id: int | None, pad_id: int | None) -> ModelConfig:
        if self.dim <= 0 or self.n_heads <= 0 or self.dim % self.n_heads:
            raise LlmlabError(f"--dim {self.dim} must be a positive multiple of --n-heads {self.n_heads}")
        ffn = self.ffn_dim or (32 * round(8 * self.dim / 3 / 32) if self.arch == "llama" else 4 * self.dim)
        bert = self.arch == "bert"
        return ModelConfig(
            arch=self.arch, vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads or None, ffn_dim=ffn, max_seq_len=seq_len, norm_eps=1e-12 if bert else 1e-5,
            tie_embeddings=not bert, attn_bias=self.arch != "llama", mlp_bias=self.arch != "llama",
            n_experts=self.n_experts, experts_per_token=self.experts_per_token,
            moe_capacity_factor=self.moe_capacity_factor, moe_aux_weight=self.moe_aux_weight,
            bos_token_id=None if bert else sep_id, eos_token_id=None if bert else sep_id,
            pad_token_id=pad_id).validate()


@dataclass
class PretrainConfig:
    data: str = field(default=DEFAULT_DATA, metadata={
        "help": "shard folder from 'llmlab data prepare' (the default is prepared from the Python stdlib if missing)"})
    out: str = field(default="runs/pretrain", metadata={"help": "run folder (resumes when it has checkpoints)"})
    objective: str = field(default="clm", metadata={"help": "clm: next token (llama/gpt2); mlm: masked LM (bert)",
                                                    "choices": ("clm", "mlm")})
    sample_prompt: str = field(default="def ", metadata={"help": "prompt for the sample printed at the end"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens in the final sample; 0 = none"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})


class WholeModelState:
    """The checkpoint hooks of a Task whose model is saved whole, in one tensor file: no extra files, and a tied
    output head rebuilt from the embedding on load (the file holds the shared tensor once)."""

    model_config: ModelConfig

    def split_state(self, sd):
        return dict(sd), {}

    def join_state(self, core, extras):
        core = dict(core)
        if self.model_config.tie_embeddings:
            core["lm_head.weight"] = core["embed_tokens.weight"]
        return core

    def extra_files(self):
        return []


class CausalLMTask(WholeModelState):
    """Next-token cross-entropy (+ MoE load-balancing loss) on shard windows. With ``fused_head`` the output
    head and the cross-entropy run as one chunked operation (``nn/linear_ce.py``: the same loss and gradients,
    no (B, T, vocab) logits in memory). ``None`` (the default) fuses on CPUs only: there it is faster (GPT-2
    6L/384, 2-core AVX2: 711 vs 627 tok/s) and halves the step's peak memory; on an H100 the plain head was
    faster (GPT-2 124M, bf16, batch 32 x 1024: 307K vs 254K tok/s, ``benchmarks/train.py``). With the loop's
    ``--compile`` the plain head is compiled with the forward instead (``compile_loss_``)."""

    name = "pretrain"

    def __init__(self, model, cfg: ModelConfig, shards: TokenShards, seq_len: int, seed: int,
                 fused_head: bool | None = None):
        self.model, self.model_config, self.shards, self.seq_len, self.seed = model, cfg, shards, seq_len, seed
        self.fused_head = fused_head
        self._loss_compiled = False  # --compile: the plain head, compiled with the forward

    def _fused(self) -> bool:
        if self._loss_compiled:
            return False
        device = next(self.model.parameters()).device
        fused = device.type == "cpu" if self.fused_head is None else self.fused_head
        return fused and not dist_.is_shard(self.model.lm_head.weight)  # FSDP's head is a shard outside forward

    def compile_loss_(self) -> bool:
        """``--compile``: compile the forward and the plain head's cross-entropy as one graph, so Inductor fuses
        the float32 cast, log-softmax and loss over the (B, T, V) logits rather than writing them out. Faster than
        the model compiled alone and than the chunked head, on GPUs and CPUs alike (``benchmarks/train.py
        --compile``): GPT-2 124M on an H100, 468K vs 363K tok/s (model alone); GPT-2 6L/384 on 2 AVX512-BF16
        cores, 1351 vs 958 tok/s (model alone) and 1062 (chunked head). False (the loop compiles the model) for a
        subclass with its own loss, when the chunked head was asked for, or when the head is an FSDP shard."""
        if type(self).loss is not CausalLMTask.loss or self.fused_head or dist_.is_shard(self.model.lm_head.weight):
            return False  # a subclass with its own loss (MLM, recurrent LMs), or the chunked head asked for
        self._loss_compiled = True
        self._plain_loss = torch.compile(self._plain_loss)
        return True

    @staticmethod
    def _plain_loss(model, x, y):
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        x, y = self.shards.batch(step, rows, self.seq_len, seed=self.seed, split=split, first_row=first_row,
                                 total_rows=total_rows)
        device = next(self.model.parameters()).device
        x, y = x.to(device), y.to(device)
        head = self.model.lm_head
        if self._fused():
            h = model(x, return_hidden=True)  # (B, T, D): the final norm applied, the head not
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, y.reshape(-1), head.bias)
        else:
            loss = self._plain_loss(model, x, y)
        aux = moe_aux_loss(self.model)
        if aux is not None and split == "train":
            loss = loss + self.model_config.moe_aux_weight * aux
        return loss, x.numel()

    def aux_stats(self) -> dict:
        aux = moe_aux_loss(self.model)
        if aux is None:
            return {}
        loads = [m.last_load for m in self.model.modules() if isinstance(m, MoEFeedForward)]
        load = torch.stack(loads).sum(0)
        return {"moe_aux": float(aux.detach()), "moe_dropped": moe_dropped(self.model),
                "moe_max_load": float(load.max() / load.mean())}

    def tokenizer_files(self):
        from llmlab.data.shards import EOT, PAD, load_tokenizer

        tok = load_tokenizer(str(self.shards.folder / "tokenizer.json"))
        config = {"eos_token": EOT if EOT in tok.special_tokens else None,
                  "pad_token": PAD if PAD in tok.special_tokens else None, "add_bos_token": False}
        return tok.to_hf_json(), config


class MaskedLMTask(CausalLMTask):
    """BERT MLM: 15% of positions predicted, 80/10/10 mask/random/keep."""

    name = "pretrain-mlm"
    HEAD = "mlm_head.safetensors"

    def __init__(self, model, cfg, shards, seq_len, seed):
        super().__init__(model, cfg, shards, seq_len, seed)
        mask_id = shards.meta.get("mask_id")
        if mask_id is None:
            raise LlmlabError(f"{shards.folder}: the tokenizer has no <|mask|> token; prepare the shards with a "
                              "tokenizer trained by llmlab (the default)")
        self.mask_id, self.sep_id = int(mask_id), int(shards.meta["separator_id"])

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        x, _ = self.shards.batch(step, rows, self.seq_len, seed=self.seed, split=split, first_row=first_row,
                                 total_rows=total_rows)
        g = torch.Generator().manual_seed(self.seed * 7919 + step * 1000 + first_row + (split == "val") * 10**9)
        inputs, labels = mask_tokens(x, mask_id=self.mask_id, vocab_size=self.model_config.vocab_size, generator=g,
                                     protect=(self.sep_id,))
        device = next(self.model.parameters()).device
        logits = model(inputs.to(device))
        return mlm_loss(logits, labels.to(device)), int((labels != IGNORE).sum())

    def aux_stats(self) -> dict:
        return {}

    def split_state(self, sd):
        core = {k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")}
        head = {k.removeprefix("mlm_head."): v for k, v in sd.items() if k.startswith("mlm_head.")}
        return core, {self.HEAD: head}

    def join_state(self, core, extras):
        sd = {f"bert.{k}": v for k, v in core.items()}
        sd.update({f"mlm_head.{k}": v for k, v in extras[self.HEAD].items()})
        return sd

    def extra_files(self):
        return [self.HEAD]


def open_shards(path: str) -> TokenShards:
    folder = Path(path)
    if not (folder / "meta.json").exists():
        if path != DEFAULT_DATA:
            raise LlmlabError(f"{path}: no prepared shards here (run 'llmlab data prepare --out {path} FILES...')")
        print(f"llmlab: preparing the default corpus (Python standard library) into {path} ...", flush=True)
        meta = prepare(PrepareConfig(out=path))
        print(f"llmlab: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens, "
              f"{meta['bytes_per_token']} bytes/token", flush=True)
    return TokenShards(folder)


def build_task(pcfg: PretrainConfig, mflags: ModelFlags, tcfg: TrainConfig):
    if mflags.arch == "auto":
        mflags = replace(mflags, arch="bert" if pcfg.objective == "mlm" else "llama")
    if (pcfg.objective == "mlm") != (mflags.arch == "bert"):
        raise LlmlabError(f"--objective {pcfg.objective} does not fit --arch {mflags.arch}: mlm trains bert, "
                          "clm trains llama or gpt2")
    shards = open_shards(pcfg.data)
    shards.check_fits(tcfg.seq_len, "train")
    shards.check_fits(tcfg.seq_len, "val")
    per_step, available = tcfg.batch_size * tcfg.seq_len, shards.tokens("train")
    if per_step > available:
        raise LlmlabError(f"a batch of --batch-size {tcfg.batch_size} x --seq-len {tcfg.seq_len} = {per_step:,} tokens "
                          f"is larger than the {available:,} training tokens: use a smaller batch or more data")
    meta = shards.meta
    cfg = mflags.to_config(shards.vocab_size, tcfg.seq_len, meta.get("separator_id"), meta.get("pad_id"))
    seed_everything(tcfg.seed)
    if pcfg.objective == "mlm":
        return MaskedLMTask(MaskedLM(cfg), cfg, shards, tcfg.seq_len, tcfg.seed)
    return CausalLMTask(build_model(cfg), cfg, shards, tcfg.seq_len, tcfg.seed)


def sample_text(task: CausalLMTask, checkpoint: Path | None, prompt: str, n_tokens: int,
                seed: int = 0) -> str | None:
    """A sampled continuation (temperature 0.8, top-k 40) from the saved checkpoint.

    The sample is drawn from a fresh single-process model loaded from ``checkpoint``, not from
    ``task.model``: under FSDP the trained model is sharded across ranks, and rank 0 alone cannot run
    it (the other ranks have left the collective). It also shows the checkpoint loads and runs."""
    from llmlab.data.shards import load_tokenizer
    from llmlab.infer.generate import generate
    from llmlab.infer.sample import SamplingParams

    if n_tokens <= 0 or isinstance(task, MaskedLMTask) or checkpoint is None:
        return None
    tok = load_tokenizer(str(task.shards.folder / "tokenizer.json"))
    ids = tok.encode(prompt) or [int(task.shards.meta["separator_id"])]
    cfg, state = ckpt.load_model_state(checkpoint)
    model = model_from_state(cfg, state, where=str(checkpoint)).eval()
    n = min(n_tokens, task.model_config.max_seq_len - len(ids))
    if n < 1:
        return None
    out = generate(model, [ids], n, SamplingParams(temperature=0.8, top_k=40, seed=seed),
                   stop_ids={int(task.shards.meta["separator_id"])})[0]
    return prompt + tok.decode(out.ids, skip_special=True)


def run_pretrain(pcfg: PretrainConfig, mflags: ModelFlags, tcfg: TrainConfig) -> TrainResult:
    task = build_task(pcfg, mflags, tcfg)
    out = Path(pcfg.out)
    n_params = sum(p.numel() for p in task.model.parameters())
    world_rank = int(os.environ.get("RANK", "0"))
    if world_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"pretrain": to_dict(pcfg), "model": to_dict(task.model_config), "train": to_dict(tcfg)}
        write_text_atomic(out / "config.json", json.dumps(resolved, indent=2) + "\n")
        print(f"llmlab: {task.model_config.arch} {human_count(n_params)} parameters, "
              f"{task.shards.tokens('train'):,} training tokens, {tcfg.steps} steps x {tcfg.batch_size} x "
              f"{tcfg.seq_len} tokens -> {out}", flush=True)
    try:
        result = train(task, tcfg, out, resume=pcfg.resume)
        if world_rank == 0:
            text = sample_text(task, result.checkpoint, pcfg.sample_prompt, pcfg.sample_tokens, seed=tcfg.seed) \
                if result.stopped != "interrupted" else None
            lines = [f"# {task.name}: {task.model_config.arch}, {human_count(n_params)} parameters", "",
                     f"- steps: {result.step} ({result.stopped}), tokens: {result.tokens:,}, "
                     f"time: {result.seconds / 60:.1f} min",
                     f"- final train loss: {result.train_loss:.4f}" if result.train_loss is not None else "",
                     f"- final validation loss: {result.val_loss:.4f}" if result.val_loss is not None else "",
                     f"- checkpoint: {result.checkpoint}", "", "![loss](loss.png)"]
            if text is not None:
                write_text_atomic(out / "sample.txt", text + "\n")
                lines += ["", "## Sample", "", "```python", text, "```"]
            write_summary(out / "summary.md", lines)
            if text is not None:
                print(text, flush=True)
        return result
    finally:
        dist_.teardown(dist_.World(world_size=int(os.environ.get("WORLD_SIZE", "1"))))
