"""T5 recipes on the one training loop (docs/architecture.md, "One training loop"): two ``Task``s.

- ``SpanCorruptionTask``: pretraining on token shards (the default corpus: the Python standard library) with
  T5's span corruption (``data/span_corruption.py``; Raffel et al. 2020, arXiv:1910.10683). The vocabulary is
  the shards' tokenizer plus ``n_sentinels`` ids on top for the sentinels; EOS is the corpus separator and the
  pad token (also the decoder's start token, as in T5) is the tokenizer's ``<|pad|>``.
- ``TextToTextTask``: fine-tuning on a built-in verifiable task (``data/tasks.py``): the question is the
  encoder's input, the answer the decoder's target. ``method`` full trains every weight; prefix trains only a
  key/value prefix per attention (``models/t5.add_prefix_``; Li & Liang 2021, arXiv:2101.00190), the base frozen.
  Exact match on held-out questions (greedy decoding through ``infer/generate.py``) is measured before and after.

Shapes: encoder inputs (B, S), decoder inputs and targets (B, T) (targets -100 where padded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError, human_count, seed_everything, write_text_atomic
from llmlab.data.shards import PAD, TokenShards, load_tokenizer
from llmlab.data.span_corruption import corrupt_batch, corrupted_lengths
from llmlab.data.tasks import TASKS, get_task
from llmlab.dataclass_io import to_dict
from llmlab.formats import checkpoint as ckpt
from llmlab.formats.load import load_model
from llmlab.infer.generate import generate
from llmlab.models.config import ModelConfig
from llmlab.models.registry import build_model
from llmlab.models.t5 import Seq2SeqDecoder, T5Model, add_prefix_, shift_right
from llmlab.train.loop import TrainConfig, TrainResult, train
from llmlab.train.pretrain import DEFAULT_DATA, WholeModelState, open_shards
from llmlab.train.report import write_summary

IGNORE = -100
PREFIX_FILE = "prefix.safetensors"


@dataclass
class T5Flags:
    dim: int = field(default=128, metadata={"help": "model width (d_model)"})
    n_layers: int = field(default=2, metadata={"help": "encoder blocks (the decoder has as many)"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    head_dim: int = field(default=32, metadata={"help": "width of each head (d_kv)"})
    ffn_dim: int = field(default=512, metadata={"help": "feed-forward width (d_ff)"})
    ffn_act: str = field(default="relu", metadata={"help": "relu (T5 v1.0, tied head) or gated-gelu (v1.1, "
                                                          "untied head)", "choices": ("relu", "gated-gelu")})
    n_sentinels: int = field(default=32, metadata={"help": "sentinel ids added on top of the vocabulary"})
    noise_density: float = field(default=0.15, metadata={"help": "fraction of tokens dropped in spans"})
    mean_span: float = field(default=3.0, metadata={"help": "mean length of a dropped span"})

    def to_config(self, vocab: int, pad_id: int, eos_id: int, seq_len: int) -> ModelConfig:
        if not 0 < self.noise_density < 1 or self.mean_span < 1:
            raise LlmlabError(f"--noise-density must be in (0, 1) and --mean-span >= 1, got {self.noise_density}, "
                              f"{self.mean_span}")
        return ModelConfig(arch="t5", vocab_size=vocab + self.n_sentinels, dim=self.dim, n_layers=self.n_layers,
                           n_heads=self.n_heads, head_dim=self.head_dim, ffn_dim=self.ffn_dim, max_seq_len=seq_len,
                           norm_eps=1e-6, tie_embeddings=self.ffn_act == "relu", ffn_act=self.ffn_act,
                           pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=eos_id,
                           extra={"n_sentinels": self.n_sentinels}).validate()


class _T5TaskBase(WholeModelState):
    model: T5Model
    model_config: ModelConfig

    def aux_stats(self) -> dict:
        return {}

    def seq2seq_loss(self, model, inputs, targets, mask=None) -> torch.Tensor:
        cfg = self.model_config
        logits = model(inputs, shift_right(targets, cfg.bos_token_id, cfg.pad_token_id), mask)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


class SpanCorruptionTask(_T5TaskBase):
    name = "t5-span-corruption"

    def __init__(self, model: T5Model, cfg: ModelConfig, shards: TokenShards, seq_len: int, seed: int,
                 noise_density: float = 0.15, mean_span: float = 3.0):
        self.model, self.model_config, self.shards, self.seq_len, self.seed = model, cfg, shards, seq_len, seed
        self.noise_density, self.mean_span = noise_density, mean_span

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        x, _ = self.shards.batch(step, rows, self.seq_len, seed=self.seed, split=split, first_row=first_row,
                                 total_rows=total_rows)  # (rows, seq_len) raw windows
        g = torch.Generator().manual_seed(self.seed * 7919 + step * 1000 + first_row + (split == "val") * 10**9)
        cfg = self.model_config
        inputs, targets = corrupt_batch(x, cfg.vocab_size, cfg.eos_token_id, g, self.noise_density, self.mean_span)
        device = next(self.model.parameters()).device
        return self.seq2seq_loss(model, inputs.to(device), targets.to(device)), targets.numel()

    def tokenizer_files(self):
        tok = load_tokenizer(str(self.shards.folder / "tokenizer.json"))
        return tok.to_hf_json(), {"eos_token": None, "pad_token": PAD, "add_bos_token": False}


def encode_pairs(tok, pairs: list[tuple[str, str]], eos: int, pad: int) -> tuple[torch.Tensor, ...]:
    """(question, answer) texts -> inputs (B, S) padded with ``pad``, their mask (B, S), targets (B, T) padded with
    -100; each side ends with EOS."""
    src = [tok.encode(q) + [eos] for q, _ in pairs]
    tgt = [tok.encode(a) + [eos] for _, a in pairs]
    S, T = max(map(len, src)), max(map(len, tgt))
    inputs = torch.tensor([s + [pad] * (S - len(s)) for s in src])
    mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in src], dtype=torch.bool)
    targets = torch.tensor([t + [IGNORE] * (T - len(t)) for t in tgt])
    return inputs, mask, targets


class TextToTextTask(_T5TaskBase):
    name = "t5-text-to-text"

    def __init__(self, model: T5Model, cfg: ModelConfig, tok, task_name: str, n_train: int, seed: int,
                 method: str = "full", prefix_tokens: int = 10):
        self.model, self.model_config, self.tok, self.seed, self.method = model, cfg, tok, seed, method
        self.task = get_task(task_name)
        self.train_examples = self.task.examples("train", n_train, seed)
        self.val_examples = self.task.examples("heldout", 64, seed + 1)
        self.prefix = add_prefix_(model, prefix_tokens, torch.Generator().manual_seed(seed)) \
            if method == "prefix" else []

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        pool = self.train_examples if split == "train" else self.val_examples
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 2 + (split == "val"))
        picks = torch.randint(0, len(pool), (total_rows,), generator=g)[first_row:first_row + rows].tolist()
        cfg = self.model_config
        inputs, mask, targets = encode_pairs(self.tok, [pool[i] for i in picks], cfg.eos_token_id, cfg.pad_token_id)
        device = next(self.model.parameters()).device
        loss = self.seq2seq_loss(model, inputs.to(device), targets.to(device), mask.to(device))
        return loss, int((targets != IGNORE).sum())

    def split_state(self, sd):
        """Prefix runs checkpoint the base as a model folder and the prefix beside it (``prefix.safetensors``)."""
        core = {k: v for k, v in sd.items() if ".prefix_" not in k}
        return core, ({PREFIX_FILE: {k: v for k, v in sd.items() if ".prefix_" in k}} if self.prefix else {})

    def join_state(self, core, extras):
        return {**super().join_state(core, extras), **extras.get(PREFIX_FILE, {})}

    def extra_files(self):
        return [PREFIX_FILE] if self.prefix else []

    def tokenizer_files(self):
        return self.tok.to_hf_json(), {"eos_token": None, "pad_token": PAD, "add_bos_token": False}


@torch.inference_mode()
def answer(model: T5Model, tok, questions: list[str], max_new_tokens: int = 16, batch: int = 16) -> list[str]:
    """Greedy answers to ``questions``, decoded through ``infer/generate.py`` on the encoder-side cache."""
    cfg, out = model.config, []
    was_training = model.training
    model.eval()
    for i in range(0, len(questions), batch):
        chunk = [(q, "") for q in questions[i:i + batch]]
        inputs, mask, _ = encode_pairs(tok, chunk, cfg.eos_token_id, cfg.pad_token_id)
        device = next(model.parameters()).device
        dec = Seq2SeqDecoder(model, inputs.to(device), mask.to(device), max_target_len=max_new_tokens)
        done = generate(dec, [[cfg.bos_token_id]] * len(chunk), max_new_tokens, stop_ids={cfg.eos_token_id})
        out += [tok.decode([t for t in c.ids if t < tok.vocab_size and t != cfg.eos_token_id], skip_special=True)
                for c in done]
    model.train(was_training)
    return out


def exact_match(model: T5Model, tok, task_name: str, n: int, seed: int = 0) -> tuple[float, list[dict]]:
    task = get_task(task_name)
    examples = task.examples("heldout", n, seed)
    replies = answer(model, tok, [e.prompt for e in examples])
    rows = [{"question": e.prompt, "answer": e.answer, "reply": r, "correct": task.score(r, e.answer)}
            for e, r in zip(examples, replies)]
    return sum(r["correct"] for r in rows) / max(1, len(rows)), rows


# ---- the commands ------------------------------------------------------------------------------------------


@dataclass
class T5PretrainConfig:
    data: str = field(default=DEFAULT_DATA, metadata={
        "help": "shard folder from 'llmlab data prepare' (the default is prepared from the Python stdlib if missing)"})
    out: str = field(default="runs/t5-pretrain", metadata={"help": "run folder (resumes when it has checkpoints)"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})


@dataclass
class T5FinetuneConfig:
    base: str = field(default="runs/t5-pretrain", metadata={"help": "a T5 run folder (its newest checkpoint) or "
                                                                     "T5 model folder with a tokenizer.json"})
    out: str = field(default="runs/t5-finetune", metadata={"help": "run folder"})
    task: str = field(default="letter_count", metadata={"help": "built-in task", "choices": tuple(TASKS)})
    method: str = field(default="full", metadata={"help": "full: every weight; prefix: a key/value prefix per "
                                                          "attention, base frozen", "choices": ("full", "prefix")})
    prefix_tokens: int = field(default=10, metadata={"help": "prefix length (method prefix)"})
    train_examples: int = field(default=2000, metadata={"help": "distinct training questions"})
    eval_examples: int = field(default=50, metadata={"help": "held-out questions scored before and after"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})


def _write_header(out: Path, name: str, resolved: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / name, json.dumps(resolved, indent=2) + "\n")


def run_t5_pretrain(pcfg: T5PretrainConfig, flags: T5Flags, tcfg: TrainConfig) -> TrainResult:
    shards = open_shards(pcfg.data)
    meta = shards.meta
    if meta.get("pad_id") is None:
        raise LlmlabError(f"{pcfg.data}: the tokenizer has no {PAD} token; prepare the shards with a tokenizer "
                          "trained by llmlab (the default)")
    cfg = flags.to_config(shards.vocab_size, int(meta["pad_id"]), int(meta["separator_id"]), tcfg.seq_len)
    shards.check_fits(tcfg.seq_len, "train")
    shards.check_fits(tcfg.seq_len, "val")
    seed_everything(tcfg.seed)
    task = SpanCorruptionTask(build_model(cfg), cfg, shards, tcfg.seq_len, tcfg.seed, flags.noise_density,
                              flags.mean_span)
    out = Path(pcfg.out)
    _write_header(out, "config.json", {"t5_pretrain": to_dict(pcfg), "model": to_dict(cfg), "train": to_dict(tcfg)})
    n = sum(p.numel() for p in task.model.parameters())
    enc_len, dec_len = corrupted_lengths(tcfg.seq_len, flags.noise_density, flags.mean_span)
    print(f"llmlab: t5 {human_count(n)} parameters, span corruption of {tcfg.seq_len}-token windows "
          f"({enc_len} input / {dec_len} target tokens), {tcfg.steps} steps x {tcfg.batch_size} -> {out}", flush=True)
    result = train(task, tcfg, out, resume=pcfg.resume)
    write_summary(out / "summary.md", [
        f"# {task.name}: {human_count(n)} parameters", "",
        f"- steps: {result.step} ({result.stopped}), time: {result.seconds / 60:.1f} min",
        f"- final train loss: {result.train_loss}", f"- validation loss: {result.val_loss}",
        f"- checkpoint: {result.checkpoint}", "", "![loss](loss.png)"])
    return result


def resolve_base(path: str) -> Path:
    """A run folder -> its newest checkpoint; a model folder as it is."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        found = ckpt.list_checkpoints(p / "checkpoints")
        if not found:
            raise LlmlabError(f"{path}: the run has no complete checkpoint yet (run 'llmlab t5 pretrain' first)")
        return found[0]
    if not (p / "config.json").exists():
        raise LlmlabError(f"{path}: neither a T5 run folder nor a model folder (run 'llmlab t5 pretrain --out "
                          f"{path}' first, or name a folder with config.json)")
    return p


def load_t5(path: str | Path):
    """A T5 model folder (with its tokenizer) -> Loaded; a ``prefix.safetensors`` beside the weights is applied."""
    loaded = load_model(path)
    if loaded.config.arch != "t5":
        raise LlmlabError(f"{path}: a {loaded.config.arch} model, not T5 (llmlab t5 takes T5 folders)")
    if loaded.tokenizer is None:
        raise LlmlabError(f"{path}: no tokenizer.json beside the weights; T5 text needs the tokenizer it was "
                          "trained with")
    prefix = Path(path) / PREFIX_FILE
    if prefix.exists():
        from llmlab.formats import safetensors

        sd = safetensors.load(prefix)
        n = next(iter(sd.values())).shape[1] if sd else 0
        add_prefix_(loaded.model, n)
        missing = loaded.model.load_state_dict(sd, strict=False).missing_keys
        if any(".prefix_" in k for k in missing):
            raise LlmlabError(f"{prefix}: prefix tensors do not cover every attention of the model")
    return loaded


def run_t5_finetune(fcfg: T5FinetuneConfig, tcfg: TrainConfig) -> dict:
    base = resolve_base(fcfg.base)
    loaded = load_t5(base)
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    seed_everything(tcfg.seed)
    before, _ = exact_match(model, tok, fcfg.task, fcfg.eval_examples)
    model.train()
    task = TextToTextTask(model, cfg, tok, fcfg.task, fcfg.train_examples, tcfg.seed, fcfg.method,
                          fcfg.prefix_tokens)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = Path(fcfg.out)
    _write_header(out, "t5_finetune_config.json", {"t5_finetune": to_dict(fcfg), "base": str(base),
                                                   "train": to_dict(tcfg)})
    print(f"llmlab: t5 {fcfg.method} fine-tuning on {fcfg.task}: {human_count(trainable)} trainable parameters, "
          f"held-out exact match before {before:.1%} -> {out}", flush=True)
    result = train(task, tcfg, out, resume=fcfg.resume)
    after, rows = exact_match(model, tok, fcfg.task, fcfg.eval_examples)
    summary = {"task": fcfg.task, "method": fcfg.method, "trainable_parameters": trainable,
               "exact_match_before": before, "exact_match_after": after, "steps": result.step,
               "train_loss": result.train_loss, "val_loss": result.val_loss, "seconds": round(result.seconds, 1),
               "checkpoint": str(result.checkpoint)}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_summary(out / "summary.md", [f"# T5 {fcfg.method} fine-tuning on {fcfg.task}", "",
                                       f"- trainable parameters: {trainable:,}",
                                       f"- held-out exact match: {before:.1%} before, {after:.1%} after "
                                       f"({fcfg.eval_examples} questions)",
                                       f"- steps: {result.step}, final train loss {result.train_loss}",
                                       "", "![loss](loss.png)"])
    print(f"llmlab: held-out exact match {before:.1%} -> {after:.1%}", flush=True)
    return summary
