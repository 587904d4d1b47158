"""Contrastive fine-tuning of a sentence encoder, with in-batch negatives and optionally Matryoshka dimensions.

MultipleNegativesRankingLoss (Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart
Reply", arXiv:1705.00652; sentence-transformers' name): for a batch of (anchor a_i, positive p_i) pairs, every
other positive (and any hard negative) is a negative for a_i:

    S = scale * cos(a, [p; n])          (B, B + B_neg)
    L = mean_i ( logsumexp_j S_ij - S_ii )   = cross-entropy with label i for row i

Matryoshka Representation Learning (Kusupati et al. 2022, arXiv:2205.13147): the same loss on the first m
coordinates of each embedding (re-normalised), summed over nested sizes m in M (e.g. 384/256/128/64/32) with
weights c_m: L_MRL = sum_m c_m L(a[:, :m], p[:, :m]). The encoder runs once; only the truncation repeats.

Both equal sentence-transformers' ``MultipleNegativesRankingLoss`` (scale 20, cosine) and ``MatryoshkaLoss`` in
value and gradient (tests/test_retrieval.py). ``PairTask`` hands them to the one training loop (``train/loop.py``):
each step draws a batch of (query, document) pairs from the built-in set's train split (``text/retrieval_set.py``),
with ``--extra-pairs`` more of the same kind (``text/extra_pairs.py``), or from a JSONL file of pairs, in an order
fixed by (seed, step). ``--projection pca`` puts a trainable rotation
between pooling and the truncations, initialised by PCA (``train/pca_rotation.py``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError, human_count, read_jsonl_objects, seed_everything, write_text_atomic
from llmlab.dataclass_io import to_dict
from llmlab.formats.load import DEFAULT_EMBED, load_model
from llmlab.formats.st_modules import projection_state
from llmlab.infer.embed import MAX_TOKENS, check_texts, embed_batch, parse_dims
from llmlab.models.bert import POOLINGS
from llmlab.text.extra_pairs import SOURCES, extra_train_pairs, source_modules
from llmlab.text.retrieval_set import Pair, builtin_split, is_dev
from llmlab.train.loop import TrainConfig, TrainResult, train
from llmlab.train.pca_rotation import attach_pca_projection_

LOSSES = ("matryoshka", "mnrl")
PROJECTIONS = ("none", "pca")
MATRYOSHKA_DIMS = "384,256,128,64,32"
PROJ_FILE = "projection.safetensors"  # a checkpoint's --projection tensors


def mnrl_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
              scale: float = 20.0) -> torch.Tensor:
    """anchors, positives (B, D), optional hard negatives (B_neg, D) -> the mean in-batch softmax loss."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])  # (B + B_neg, D)
    scores = scale * F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T  # (B, B + B_neg)
    return F.cross_entropy(scores, torch.arange(len(anchors), device=anchors.device))


def matryoshka_loss(anchors: torch.Tensor, positives: torch.Tensor, dims: list[int],
                    weights: list[float] | None = None, negatives: torch.Tensor | None = None,
                    scale: float = 20.0) -> torch.Tensor:
    """sum_m weight_m * mnrl_loss of the first m coordinates of each embedding, for m in ``dims``."""
    weights = [1.0] * len(dims) if weights is None else weights
    total = anchors.new_zeros(())
    for m, w in zip(dims, weights):
        neg = None if negatives is None else negatives[:, :m]
        total = total + w * mnrl_loss(anchors[:, :m], positives[:, :m], neg, scale)
    return total


@dataclass
class EmbedConfig:
    model: str = field(default=DEFAULT_EMBED, metadata={
        "help": "the encoder to fine-tune: an embedded name or a Hugging Face BERT folder"})
    out: str = field(default="runs/embed", metadata={"help": "run folder; the fine-tuned model goes to OUT/model"})
    loss: str = field(default="matryoshka", metadata={
        "help": "mnrl: in-batch negatives at the full size; matryoshka: the same summed over --matryoshka-dims",
        "choices": LOSSES})
    matryoshka_dims: str = field(default=MATRYOSHKA_DIMS, metadata={"help": "nested sizes for --loss matryoshka"})
    matryoshka_weights: str = field(default="", metadata={
        "help": "loss weight of each --matryoshka-dims size, in the same order; empty = 1 each (the paper's)"})
    scale: float = field(default=20.0, metadata={"help": "similarity scale (1 / temperature) of the softmax"})
    pooling: str = field(default="mean", metadata={"help": "token states -> sentence vector", "choices": POOLINGS})
    projection: str = field(default="none", metadata={
        "help": "none, or pca: a dim x dim Linear after pooling, initialised as the PCA rotation of the train "
                "texts' embeddings (first coordinates = top components), trained with the encoder; saved as "
                "sentence-transformers' Dense module", "choices": PROJECTIONS})
    max_tokens: int = field(default=MAX_TOKENS, metadata={"help": "tokens per text in training and evaluation"})
    pairs: str = field(default="", metadata={
        "help": "a JSONL file of {\"query\": ..., \"document\": ...} pairs to train on; empty = the built-in train "
                "split"})
    extra_pairs: str = field(default="none", metadata={
        "help": "more training pairs of the built-in kind, none of them a dev or test text: stdlib (docstrings of "
                "the standard-library modules the built-in set does not read) or stdlib+torch (and torch's); "
                "none = the built-in train split alone", "choices": SOURCES})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> EmbedConfig:
        if self.loss not in LOSSES:
            raise LlmlabError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.projection not in PROJECTIONS:
            raise LlmlabError(f"--projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        if self.pooling not in POOLINGS:
            raise LlmlabError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not self.scale > 0:
            raise LlmlabError(f"--scale must be > 0, got {self.scale}")
        if self.extra_pairs not in SOURCES:
            raise LlmlabError(f"--extra-pairs must be one of {', '.join(SOURCES)}, got {self.extra_pairs!r}")
        if self.pairs and self.extra_pairs != "none":
            raise LlmlabError("--extra-pairs adds to the built-in train split, not to a --pairs file: give one of "
                              "them")
        if self.max_tokens < 3:
            raise LlmlabError(f"--max-tokens must be >= 3 ([CLS], a token, [SEP]), got {self.max_tokens}")
        return self


@dataclass
class EmbedTrainConfig(TrainConfig):
    """The training loop's flags with sentence-encoder fine-tuning defaults (a few minutes on 2 CPU cores)."""

    steps: int = field(default=30, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "pairs per step: each query's negatives are the batch's "
                                                          "other documents"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    warmup: int = field(default=3, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    eval_every: int = field(default=0, metadata={"help": "validation loss every N steps; 0 = only at the end"})
    eval_batches: int = field(default=2, metadata={"help": "validation batches per evaluation"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only"})
    keep_checkpoints: int = field(default=1, metadata={"help": "checkpoints kept"})
    log_every: int = field(default=5, metadata={"help": "progress-bar refresh / metrics line every N steps"})


def parse_weights(text: str, dims_text: str, dims: list[int]) -> list[float]:
    """--matryoshka-weights "1,1,1,2,4" for --matryoshka-dims "384,256,128,64,32" -> one weight per size of
    ``dims`` (the parsed sizes, largest first); empty -> 1.0 each."""
    if not text.strip():
        return [1.0] * len(dims)
    written = [int(d) for d in dims_text.split(",") if d.strip()]
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise LlmlabError(f"--matryoshka-weights {text!r}: give comma-separated numbers, e.g. 1,1,1,2,4") from None
    if len(weights) != len(written) or len(set(written)) != len(written):
        raise LlmlabError(f"--matryoshka-weights {text!r}: give one weight per --matryoshka-dims size "
                          f"({len(written)}: {dims_text})")
    if not all(w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise LlmlabError(f"--matryoshka-weights {text!r}: weights must be >= 0, at least one > 0")
    by_dim = dict(zip(written, weights))
    return [by_dim[d] for d in dims]


def read_pairs(path: str) -> list[Pair]:
    """Training pairs from JSONL: ``{"query": ..., "document": ...}`` per line."""
    pairs = []
    for n, row in read_jsonl_objects(path, ("query", "document")):
        for f in ("query", "document"):
            if not isinstance(row[f], str) or not row[f].strip():
                raise LlmlabError(f"{path}:{n}: empty {f}: give every pair some text")
        pairs.append(Pair(f"{path}:{n}", row["query"], row["document"]))
    return pairs


def epoch_rows(pool: list, seed: int, split: str, step: int, first_row: int, rows: int, total_rows: int) -> list:
    """Rows [step * total_rows + first_row, ... + rows) of ``pool`` shuffled once per epoch by (seed, epoch,
    split): a batch is a function of (seed, step), so a resumed run sees the same batches."""
    out = []
    for r in range(step * total_rows + first_row, step * total_rows + first_row + rows):
        epoch, i = divmod(r, len(pool))
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + (split == "val") * 10**9)
        out.append(pool[int(torch.randperm(len(pool), generator=g)[i])])
    return out


class PairTask:
    """(query, document) pairs -> MNRL or Matryoshka loss on the encoder's pooled embeddings. The pairs of a step
    are rows [step * batch, (step + 1) * batch) of the split's pairs shuffled once per epoch by (seed, epoch)."""

    name = "embed"

    def __init__(self, model: nn.Module, cfg, tokenizer, pairs: dict[str, list[Pair]], ecfg: EmbedConfig,
                 dims: list[int], seed: int):
        self.model, self.model_config, self.tokenizer = model, cfg, tokenizer
        self.pairs, self.ecfg, self.dims, self.seed = pairs, ecfg, dims, seed
        self.weights = parse_weights(ecfg.matryoshka_weights, ecfg.matryoshka_dims, dims)
        for split, rows in pairs.items():
            if len(rows) < 2:
                raise LlmlabError(f"{len(rows)} {split} pairs: in-batch negatives need at least 2")
            check_texts([p.query for p in rows], "query")
            check_texts([p.document for p in rows], "document")

    def rows(self, split: str, step: int, first_row: int, rows: int, total_rows: int) -> list[Pair]:
        return epoch_rows(self.pairs[split], self.seed, split, step, first_row, rows, total_rows)

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        batch = self.rows(split, step, first_row, rows, total_rows)
        kw = dict(pooling=self.ecfg.pooling, normalize=False, max_tokens=self.ecfg.max_tokens)
        a = embed_batch(model, self.tokenizer, [p.query for p in batch], **kw)  # (B, D)
        d = embed_batch(model, self.tokenizer, [p.document for p in batch], **kw)  # (B, D)
        if self.ecfg.loss == "mnrl":
            loss = mnrl_loss(a.float(), d.float(), scale=self.ecfg.scale)
        else:
            loss = matryoshka_loss(a.float(), d.float(), self.dims, self.weights, scale=self.ecfg.scale)
        return loss, len(batch)

    def split_state(self, sd):
        core, proj = projection_state(sd)  # a --projection's tensors go to their own file
        return core, ({PROJ_FILE: proj} if proj else {})

    def join_state(self, core, extras):
        return {**core, **{f"projection.{k}": v for k, v in extras.get(PROJ_FILE, {}).items()}}

    def extra_files(self):
        return [PROJ_FILE] if self.model.projection is not None else []

    def aux_stats(self) -> dict:
        return {}

    def tokenizer_files(self):
        return None  # WordPiece: the final model folder copies the original tokenizer files


def run_embed_train(ecfg: EmbedConfig, tcfg: EmbedTrainConfig) -> dict:
    """Load the encoder, fine-tune it on the pairs, save OUT/model. Returns the summary (also summary.json)."""
    from llmlab.formats.convert import write_loaded

    ecfg.validate()
    tcfg.validate()
    seed_everything(tcfg.seed)
    source = read_pairs(ecfg.pairs) if ecfg.pairs else builtin_split()[0]  # bad pairs fail before the model loads
    loaded = load_model(ecfg.model)
    if loaded.config.arch != "bert" or loaded.tokenizer is None:
        raise LlmlabError(f"{ecfg.model}: not an encoder with a tokenizer (e.g. {DEFAULT_EMBED})")
    full = loaded.config.dim
    dims = parse_dims(ecfg.matryoshka_dims, full, "--matryoshka-dims") if ecfg.loss == "matryoshka" else [full]
    if ecfg.max_tokens > loaded.config.max_seq_len:
        raise LlmlabError(f"--max-tokens {ecfg.max_tokens} is more than the model's {loaded.config.max_seq_len}")
    extra, dropped = extra_train_pairs(source_modules(ecfg.extra_pairs))  # never in dev or test: all train
    pairs = {"train": [p for p in source if not is_dev(p.key)] + extra,
             "val": [p for p in source if is_dev(p.key)]}
    if extra:
        print(f"llmlab: --extra-pairs {ecfg.extra_pairs}: {len(extra)} pairs added ({dropped['read']} read; "
              f"dropped as possible leaks: " + ", ".join(f"{dropped[r]} {r}" for r in dropped if r != "read") + ")",
              flush=True)
    if len(pairs["val"]) < 2:  # a small pairs file: the validation loss is then a training loss
        pairs = {"train": source, "val": source}
    model = loaded.model.train()
    # BERT's tanh pooler is not part of a sentence embedding (mean / CLS pooling): left trainable it would get no
    # gradient, hence no optimizer state, and resuming the run would find that state missing
    if hasattr(model, "pooler"):
        model.pooler.requires_grad_(False)
    if ecfg.projection == "pca":
        texts = [p.query for p in pairs["train"]] + [p.document for p in pairs["train"]]
        attach_pca_projection_(model, loaded.tokenizer, texts, pooling=ecfg.pooling, max_tokens=ecfg.max_tokens)
    task = PairTask(model, loaded.config, loaded.tokenizer, pairs, ecfg, dims, tcfg.seed)
    run_dir = Path(ecfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "embed_config.json", json.dumps({**to_dict(ecfg), "train": to_dict(tcfg)},
                                                                indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"llmlab: {ecfg.loss} ({', '.join(map(str, dims))}) on {len(pairs['train'])} pairs "
          f"({len(pairs['val'])} for validation), {human_count(n_params)} parameters -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    result: TrainResult = train(task, tcfg, run_dir, resume=ecfg.resume)
    saved = None
    if result.stopped != "interrupted":
        saved = run_dir / "model"
        write_loaded(dataclasses.replace(loaded, model=model.eval()), saved, pooling=ecfg.pooling)
    summary = {"model": ecfg.model, "loss": ecfg.loss, "dims": dims, "steps": result.step, "stopped": result.stopped,
               "train_pairs": len(pairs["train"]),
               "extra_pairs": {"source": ecfg.extra_pairs, "added": len(extra), **dropped},
               "train_loss": result.train_loss, "val_loss": result.val_loss,
               "train_seconds": result.seconds, "total_seconds": time.perf_counter() - t0,
               "saved": str(saved) if saved else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
