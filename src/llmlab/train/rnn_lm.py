"""Recurrent language models on the one training loop (docs/architecture.md, "One training loop"): ``llmlab rnn
train`` (a forward LSTM / GRU / RNN LM, ``models/lstm_lm.py``) and ``llmlab elmo train`` (ELMo's bidirectional
LSTM LM, Peters et al. 2018, arXiv:1802.05365), both one ``RecurrentLMTask`` on the token shards that
``llmlab pretrain`` reads (default: the Python standard library, prepared on first use), so a Transformer trained
by ``llmlab pretrain`` on the same shards, seed, batch and steps sees exactly the same windows.

Loss on a window w_0..w_T (B, T+1):
    forward:        mean_t -log p(w_{t+1} | w_0..w_t)                  t = 0..T-1 (inputs w_0..w_{T-1})
    bidirectional:  1/2 (forward + mean_t -log p_bwd(w_{t-1} | w_t..w_T)),  t = 1..T  (the whole window read)
(ELMo maximises the sum of the two log-likelihoods; the half keeps the loss on the scale of one LM.)

Checkpoints: the model is no Transformer that a Hugging Face ``config.json`` can describe, so the loop's model
folder holds a placeholder config (gpt2-shaped: vocab, width, layers) with no weights, and every tensor is in
``recurrent_lm.safetensors`` beside it; the run folder's ``config.json`` says which cell, width and layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError, human_count, read_json, seed_everything, write_text_atomic
from llmlab.data.shards import load_tokenizer
from llmlab.dataclass_io import to_dict
from llmlab.formats import checkpoint as ckpt
from llmlab.formats import safetensors
from llmlab.models.config import ModelConfig
from llmlab.models.lstm_lm import RecurrentLM
from llmlab.nn.rnn import CELLS
from llmlab.train.loop import TrainConfig, TrainResult, train
from llmlab.train.pretrain import DEFAULT_DATA, CausalLMTask, open_shards
from llmlab.train.report import write_summary

WEIGHTS = "recurrent_lm.safetensors"
INIT_ONLY = ("forget_bias",)  # flags that only shape the initialisation: a resumed run may differ in them


@dataclass
class RNNFlags:
    cell: str = field(default="lstm", metadata={"help": "recurrent cell", "choices": tuple(CELLS)})
    dim: int = field(default=256, metadata={"help": "embedding and hidden width (the softmax is tied to the "
                                                    "embedding)"})
    n_layers: int = field(default=2, metadata={"help": "recurrent layers (per direction)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the embedding, between layers and before "
                                                          "the softmax"})
    forget_bias: float = field(default=1.0, metadata={
        "help": "LSTM: the forget gate's bias starts at this value (Jozefowicz et al. 2015; 0 = a zero bias, "
                "PyTorch's initialisation in expectation); ignored by the other cells"})


@dataclass
class RNNRunConfig:
    data: str = field(default=DEFAULT_DATA, metadata={
        "help": "shard folder from 'llmlab data prepare' (the default is prepared from the Python stdlib if missing)"})
    out: str = field(default="runs/rnn", metadata={"help": "run folder (resumes when it has checkpoints)"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})


@dataclass
class ELMoRunConfig(RNNRunConfig):
    out: str = field(default="runs/elmo", metadata={"help": "run folder (resumes when it has checkpoints)"})


@dataclass
class RNNTrainConfig(TrainConfig):
    """The loop's flags with recurrent-LM defaults (the default LSTM: about 1 s a step on one thread of the shared
    2-core machine at load 19, so about 5 minutes)."""

    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    seq_len: int = field(default=64, metadata={"help": "tokens per training sequence (backpropagation through "
                                                       "time over the whole window)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps; 0 = only at the end"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only"})


class RecurrentLMTask(CausalLMTask):
    """Next-token (and, for ELMo, previous-token) cross-entropy of a ``RecurrentLM`` on shard windows."""

    def __init__(self, model: RecurrentLM, cfg: ModelConfig, shards, seq_len: int, seed: int):
        super().__init__(model, cfg, shards, seq_len, seed, fused_head=False)
        self.name = "elmo" if model.bidirectional else f"{model.cell}-lm"

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        x, y = self.shards.batch(step, rows, self.seq_len, seed=self.seed, split=split, first_row=first_row,
                                 total_rows=total_rows)  # (rows, T) each; y = x shifted by one
        device = self.model.embed_tokens.weight.device
        x, y = x.to(device), y.to(device)
        if not self.model.bidirectional:
            logits, _ = model(x)  # (B, T, V)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), x.numel()
        w = torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1): the whole window
        fwd, bwd = self.model.bidirectional_logits(w)  # (B, T+1, V) each
        lf = F.cross_entropy(fwd[:, :-1].float().flatten(0, 1), w[:, 1:].flatten())
        lb = F.cross_entropy(bwd[:, 1:].float().flatten(0, 1), w[:, :-1].flatten())
        return 0.5 * (lf + lb), x.numel()

    def aux_stats(self) -> dict:
        return {}

    def split_state(self, sd):
        return {}, {WEIGHTS: dict(sd)}

    def join_state(self, core, extras):
        return dict(extras[WEIGHTS])

    def extra_files(self):
        return [WEIGHTS]


def placeholder_config(vocab_size: int, flags: RNNFlags, seq_len: int, sep_id: int | None) -> ModelConfig:
    """What the loop's checkpoint folder and its resume check see: vocabulary, width and depth (see the module
    docstring); the cell and direction are checked against the run folder's config.json."""
    return ModelConfig(arch="gpt2", vocab_size=vocab_size, dim=flags.dim, n_layers=flags.n_layers, n_heads=1,
                       ffn_dim=flags.dim, max_seq_len=seq_len, tie_embeddings=False, bos_token_id=sep_id,
                       eos_token_id=sep_id)


def _check_same_model(out: Path, model: dict) -> dict | None:
    """Resuming a run with another cell, width, depth or direction is an error, not a shape crash. Returns the
    saved model record when there is a run to resume."""
    if not ckpt.list_checkpoints(out / "checkpoints") or not (out / "config.json").exists():
        return None
    saved = read_json(out / "config.json").get("model", {})
    diff = [f"{k}: checkpoint {saved.get(k)} vs now {v}" for k, v in model.items()
            if saved.get(k) != v and k not in INIT_ONLY]
    if diff:
        raise LlmlabError(f"cannot resume {out}: the model differs ({'; '.join(diff)}); use the same model flags "
                          "or a new --out folder")
    return saved


def run_recurrent(rcfg: RNNRunConfig, flags: RNNFlags, tcfg: TrainConfig, bidirectional: bool) -> TrainResult:
    """``llmlab rnn train`` (forward LM) or ``llmlab elmo train`` (``bidirectional``)."""
    tcfg.validate()
    if tcfg.seq_len < 2:
        raise LlmlabError(f"--seq-len must be >= 2 for a recurrent LM (a window of context and a target), got "
                          f"{tcfg.seq_len}")
    if flags.cell not in CELLS:
        raise LlmlabError(f"unknown --cell {flags.cell!r}: choose one of {', '.join(CELLS)}")
    if bidirectional and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the biLM's loss calls model.bidirectional_logits, outside a DDP wrapper's forward (no gradient sync)
        raise LlmlabError("'llmlab elmo train' runs on one process: start it without torchrun")
    if bidirectional and flags.cell != "lstm":
        raise LlmlabError(f"ELMo is a bidirectional LSTM LM: --cell {flags.cell} is for 'llmlab rnn train'")
    shards = open_shards(rcfg.data)
    shards.check_fits(tcfg.seq_len + bidirectional, "train")
    shards.check_fits(tcfg.seq_len + bidirectional, "val")
    sep = shards.meta.get("separator_id")
    cfg = placeholder_config(shards.vocab_size, flags, tcfg.seq_len, sep)
    out = Path(rcfg.out)
    model_record = {**to_dict(flags), "bidirectional": bidirectional, "vocab_size": shards.vocab_size}
    if flags.cell != "lstm":
        model_record["forget_bias"] = None
    saved = _check_same_model(out, model_record)
    if saved is not None and rcfg.resume:  # the weights come from the checkpoint: the first run's initialisation
        model_record.update({k: saved.get(k) for k in INIT_ONLY})
    seed_everything(tcfg.seed)
    model = RecurrentLM(flags.cell, shards.vocab_size, flags.dim, flags.n_layers, bidirectional, flags.dropout,
                        forget_bias=flags.forget_bias if flags.cell == "lstm" else None)
    task = RecurrentLMTask(model, cfg, shards, tcfg.seq_len, tcfg.seed)
    n = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps({"run": to_dict(rcfg), "model": model_record,
                                                       "train": to_dict(tcfg), "data": str(shards.folder)},
                                                      indent=2) + "\n")
    print(f"llmlab: {task.name} {human_count(n)} parameters ({flags.n_layers} x {flags.dim} {flags.cell}"
          f"{', both directions' if bidirectional else ''}), {shards.tokens('train'):,} training tokens, "
          f"{tcfg.steps} steps x {tcfg.batch_size} x {tcfg.seq_len} tokens -> {out}", flush=True)
    result = train(task, tcfg, out, resume=rcfg.resume)
    ppl = f" (perplexity {torch.tensor(result.val_loss).exp():.2f})" if result.val_loss is not None else ""
    write_summary(out / "summary.md", [
        f"# {task.name}: {human_count(n)} parameters", "",
        f"- steps: {result.step} ({result.stopped}), tokens: {result.tokens:,}, time: {result.seconds / 60:.1f} min",
        f"- final train loss: {result.train_loss}",
        f"- validation loss{' (mean of the two directions)' if bidirectional else ''}: {result.val_loss}{ppl}",
        f"- checkpoint: {result.checkpoint}", "", "![loss](loss.png)"])
    return result


@dataclass
class LoadedRNN:
    model: RecurrentLM
    tokenizer: object  # ByteBPE
    separator_id: int | None
    checkpoint: Path
    forget_bias: float | None = None  # the run's initial forget-gate bias (None: PyTorch's initialisation)


def load_run(run: str | Path) -> LoadedRNN:
    """A run folder of ``llmlab rnn train`` / ``elmo train`` -> its newest checkpoint's model (eval mode)."""
    out = Path(run)
    found = ckpt.list_checkpoints(out / "checkpoints")
    if not found or not (out / "config.json").exists():
        raise LlmlabError(f"{run}: no recurrent LM run with a checkpoint here (run 'llmlab rnn train --out {run}' "
                          "or 'llmlab elmo train --out RUN' first)")
    m = read_json(out / "config.json").get("model")
    if not isinstance(m, dict) or "cell" not in m:
        raise LlmlabError(f"{out / 'config.json'}: not written by 'llmlab rnn train' or 'llmlab elmo train'")
    model = RecurrentLM(m["cell"], m["vocab_size"], m["dim"], m["n_layers"], m["bidirectional"], m["dropout"])
    model.load_state_dict(safetensors.load(found[0] / WEIGHTS))
    tok = load_tokenizer(str(found[0]))
    sep = read_json(found[0] / "config.json").get("eos_token_id")
    forget_bias = m.get("forget_bias") if m["cell"] == "lstm" else None  # absent in runs before the flag
    return LoadedRNN(model.eval(), tok, sep, found[0], forget_bias)


@torch.no_grad()
def generate_text(loaded: LoadedRNN, prompt: str, n_tokens: int, sampling) -> str:
    """Continue ``prompt`` by ``n_tokens`` tokens with the forward LM, carrying the recurrent state (one step per
    token after the prompt); ``sampling`` is an ``infer.sample.SamplingParams``."""
    from llmlab.infer.sample import make_generator, select

    if n_tokens < 1:
        raise LlmlabError(f"--max-new-tokens must be >= 1, got {n_tokens}")
    sampling.validate()
    ids = loaded.tokenizer.encode(prompt) or ([loaded.separator_id] if loaded.separator_id is not None else [])
    if not ids:
        raise LlmlabError("the prompt is empty and the tokenizer has no separator to start from: give a prompt")
    g = make_generator(sampling.seed, torch.device("cpu"))
    logits, states = loaded.model(torch.tensor([ids]))  # (1, T, V)
    out: list[int] = []
    for _ in range(n_tokens):
        nxt = int(select(logits[:, -1], sampling, g)[0])
        if nxt == loaded.separator_id:
            break
        out.append(nxt)
        logits, states = loaded.model(torch.tensor([[nxt]]), states)
    return prompt + loaded.tokenizer.decode(out, skip_special=True)
