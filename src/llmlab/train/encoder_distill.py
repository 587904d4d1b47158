"""``llmlab embed distill``: distil a BERT sentence encoder (all-MiniLM-L6-v2 by default) into a smaller one, as a
``Task`` for the one training loop (docs/architecture.md, "One training loop"). The formulas are
``train/distill_losses.py``'s, shared with the decoder's ``llmlab distill`` (``train/distill.py``).

The student (``--student``): by default the teacher itself with only the blocks ``--layers`` (0,3,5 of 6),
embeddings and pooler copied: DistilBERT's initialisation from the teacher's blocks (Sanh et al. 2019,
arXiv:1910.01108, section 3; its 6 of 12 were 0,2,4,7,9,11, first and last kept). For all-MiniLM-L6-v2, keeping
the last block matters: 0,3,5 starts at nDCG@10 0.77 and cosine 0.65 to the teacher, 0,2,4 at 0.52 and 0.36
(README, "Distilling the encoder"); or a preset (random weights) or BERT folder with the teacher's tokenizer
(checked). The data: the texts (queries and documents) of the built-in retrieval set's train split
(``text/retrieval_set.py``; the test split, which the report scores, is never trained on), a tenth of them held out
for the validation loss.

Losses (``--loss``); e = the mean-pooled sentence embedding (Sentence-BERT), h^m the embedding output (m = 0) and
block outputs, A^m the attention scores Q K^T / sqrt(d) of block m, per head:

==========  ===================================================================================================
embed       L_emb = mean_i (1 - cos(e_S^i, e_T^i)) over the batch's texts: the student's sentence embeddings
            aligned with the teacher's (cosine; what the report's "cosine to teacher" measures)
tinybert    TinyBERT (Jiao et al. 2019, arXiv:1909.10351, eqs. 6-9), intermediate and prediction layers:
            ``--hidden-weight`` x mean_m MSE(h_S^m W_m, h_T^g(m)) / mean(h_T^2) over the embedding layer and
            every block (W_m d_S x d_T learned, identity at the start when the widths agree, dropped at the end;
            real tokens only) + ``--attn-weight`` x mean_m 1/h sum_i MSE(A_S^m_i, A_T^g(m)_i) + L_emb as the
            prediction layer of a sentence encoder (through W_L when the student is narrower). g(m) is
            ``--layer-map``, by default TinyBERT's uniform g(m) = round(m L_T / L_S)
distilbert  DistilBERT's triple loss (section 3) on masked inputs (15%, BERT's 80/10/10, ``train/mlm.py``):
            ``--kd-weight`` tau^2 KL(p_T^tau || p_S^tau) at the masked positions + ``--mlm-weight`` x the MLM
            cross-entropy there + ``--cos-weight`` x mean (1 - cos(h_S^L, h_T^L)) over the real tokens (defaults
            5, 2, 1, tau 2: the weights of DistilBERT's training script). all-MiniLM-L6-v2 ships no MLM head
            (sentence-transformers drops ``cls.predictions``), so each model's vocabulary logits are its last
            hidden states times its own (tied) token embeddings: BERT's decoder without the dense + LayerNorm
            transform
==========  ===================================================================================================

The validation loss is L_emb on the held-out texts whatever the loss, so runs compare. The report (``score``, a
function the caller passes: ``cli.py`` scores the built-in retrieval test set) measures the teacher, the student
before and after training: nDCG@10, the mean cosine of the student's to the teacher's embedding of each test text,
and encoding speed. Run folder: ``encoder_distill_config.json``, ``checkpoints/``, ``metrics.jsonl``,
``loss.png``, ``model/`` (the student as a Hugging Face BERT folder with the teacher's tokenizer files),
``summary.json``, ``summary.md``.

Shapes: texts (B,) -> ids, mask (B, T); hidden states (B, T, D); attention scores (B, H, T, T); embeddings (B, D).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError, human_count, seed_everything, write_text_atomic
from llmlab.dataclass_io import to_dict
from llmlab.formats.load import DEFAULT_EMBED, Loaded, load_model, model_from_state
from llmlab.infer.embed import MAX_TOKENS, embed_texts, tokenize_batch
from llmlab.models.bert import pool
from llmlab.nn.attention import attention_scores
from llmlab.text.retrieval_set import builtin_split, is_dev
from llmlab.train import distill_losses as losses
from llmlab.train.contrastive import epoch_rows
from llmlab.train.distill import HiddenStates, check_same_tokenizer
from llmlab.train.loop import TrainConfig, TrainResult, train
from llmlab.train.mlm import IGNORE, mask_tokens, mlm_loss
from llmlab.train.report import write_summary

LOSSES = ("tinybert", "distilbert", "embed")
PROJ_FILE = "projections.safetensors"  # TinyBERT's W_m


@dataclass
class EncoderDistillConfig:
    teacher: str = field(default=DEFAULT_EMBED, metadata={
        "help": "the teacher encoder: an embedded name or a Hugging Face BERT folder"})
    student: str = field(default="", metadata={
        "help": "the student: empty = the teacher's blocks --layers (DistilBERT's initialisation), or a preset "
                "(random weights, e.g. minilm-l6) or a BERT folder with the teacher's tokenizer"})
    layers: str = field(default="0,3,5", metadata={
        "help": "with the default --student: the teacher blocks (0-based) the student keeps, in order"})
    loss: str = field(default="tinybert", metadata={
        "help": "embed: cosine to the teacher's sentence embeddings; tinybert: + hidden states through learned "
                "projections + attention scores (TinyBERT); distilbert: soft-target MLM KD + MLM + cosine of the "
                "last hidden states (DistilBERT's triple loss)", "choices": LOSSES})
    layer_map: str = field(default="", metadata={
        "help": "tinybert: the teacher block (1-based, 1..L_T) matched to each student block, e.g. 2,4,6; empty = "
                "TinyBERT's uniform g(m) = round(m L_T / L_S)"})
    hidden_weight: float = field(default=1.0, metadata={"help": "tinybert: weight of the hidden-state MSE"})
    attn_weight: float = field(default=1.0, metadata={"help": "tinybert: weight of the attention-score MSE"})
    kd_weight: float = field(default=5.0, metadata={"help": "distilbert: weight of the soft-target KL"})
    mlm_weight: float = field(default=2.0, metadata={"help": "distilbert: weight of the MLM cross-entropy"})
    cos_weight: float = field(default=1.0, metadata={"help": "distilbert: weight of the hidden-state cosine loss"})
    temperature: float = field(default=2.0, metadata={"help": "distilbert: softmax temperature of the KL (> 0)"})
    max_tokens: int = field(default=MAX_TOKENS, metadata={"help": "tokens per text in training and evaluation"})
    out: str = field(default="runs/embed-distill", metadata={
        "help": "run folder; the student goes to OUT/model"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> EncoderDistillConfig:
        if self.loss not in LOSSES:
            raise LlmlabError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        losses.check_temperature(self.temperature)
        for name in ("hidden_weight", "attn_weight", "kd_weight", "mlm_weight", "cos_weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise LlmlabError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
        if self.max_tokens < 3:
            raise LlmlabError(f"--max-tokens must be >= 3 ([CLS], a token, [SEP]), got {self.max_tokens}")
        return self


@dataclass
class EncoderDistillTrainConfig(TrainConfig):
    """The training loop's flags with encoder-distillation defaults (a few minutes on 2 loaded CPU cores)."""

    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "texts per step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    warmup: int = field(default=6, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    eval_every: int = field(default=0, metadata={"help": "validation loss every N steps; 0 = only at the end"})
    eval_batches: int = field(default=4, metadata={"help": "validation batches (of --batch-size texts)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only"})
    keep_checkpoints: int = field(default=1, metadata={"help": "checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "progress-bar refresh / metrics line every N steps"})


# ---- the student --------------------------------------------------------------------------------------------------


def parse_indices(text: str, lo: int, hi: int, flag: str) -> list[int]:
    """"0,2,4" -> [0, 2, 4], each in lo..hi (the message names the range)."""
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LlmlabError(f"{flag} {text!r}: give comma-separated integers, e.g. 0,2,4") from None
    if not out:
        raise LlmlabError(f"{flag} {text!r}: give at least one block, e.g. 0,2,4")
    for i in out:
        if not lo <= i <= hi:
            raise LlmlabError(f"{flag}: block {i} is out of range: the teacher's blocks are {lo}..{hi}")
    return out


def layer_subset(teacher: Loaded, layers: list[int]) -> Loaded:
    """The teacher with only the blocks ``layers`` (student block i = teacher block layers[i], copied), its
    embeddings, embedding norm and pooler copied (DistilBERT's initialisation)."""
    if len(set(layers)) != len(layers):
        raise LlmlabError(f"--layers {','.join(map(str, layers))}: each teacher block at most once")
    cfg = dataclasses.replace(teacher.config, n_layers=len(layers), extra=dict(teacher.config.extra))
    sd = {}
    for k, v in teacher.model.state_dict().items():
        if not k.startswith(("layers.", "projection.")):
            sd[k] = v.detach().clone()
    for i, j in enumerate(layers):
        prefix = f"layers.{j}."
        sd.update({f"layers.{i}.{k[len(prefix):]}": v.detach().clone()
                   for k, v in teacher.model.state_dict().items() if k.startswith(prefix)})
    model = model_from_state(cfg, sd, where=f"{teacher.source} blocks {layers}")
    if teacher.model.projection is not None:  # a Dense module after pooling (--projection pca): copied too
        model.projection = copy.deepcopy(teacher.model.projection)
    return dataclasses.replace(teacher, model=model, config=cfg)


def load_student(cfg: EncoderDistillConfig, teacher: Loaded, seed: int) -> Loaded:
    """The student the flags name: a block subset of the teacher, or a model checked to share its tokenizer. Its
    ``source`` is the teacher's, so the saved folder gets the teacher's tokenizer files."""
    if not cfg.student:
        return layer_subset(teacher, parse_indices(cfg.layers, 0, teacher.config.n_layers - 1, "--layers"))
    seed_everything(seed)
    student = load_model(cfg.student)
    if student.config.arch != "bert":
        raise LlmlabError(f"student {cfg.student}: not a BERT encoder (arch {student.config.arch}); give a BERT "
                          "preset or folder, or leave --student empty for a block subset of the teacher")
    check_same_tokenizer(teacher, student)
    return dataclasses.replace(student, tokenizer=teacher.tokenizer, source=teacher.source)


def check_layer_map(mapping: list[int], student_layers: int, teacher_layers: int) -> list[int]:
    """The full map g(0) = 0 (embeddings), g(1..L_S) = each student block's teacher block (1..L_T)."""
    if len(mapping) != student_layers:
        raise LlmlabError(f"--layer-map gives {len(mapping)} teacher blocks for a student of {student_layers}: one "
                          "per student block")
    return [0, *mapping]


# ---- hidden states and attention scores ---------------------------------------------------------------------------


def probe(bert: nn.Module, ids: torch.Tensor, mask: torch.Tensor, scores: bool) -> tuple[list, list]:
    """One forward of a ``BertModel`` -> (hidden states [embedding output, block 1 .. L], each (B, T, D); with
    ``scores`` the attention scores of blocks 1 .. L, each (B, H, T, T)). Hooks live for this forward only."""
    hidden = HiddenStates(bert, [bert.embed_norm, *bert.layers])
    found: list[torch.Tensor] = []
    hooks = [block.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: found.append(attention_scores(m, args[0])), with_kwargs=True)
        for block in bert.layers] if scores else []
    try:
        bert(ids, mask)
    finally:
        for h in hooks:
            h.remove()
        hidden.remove()
    return hidden.take(), found


class EncoderStudent(nn.Module):
    """The student BERT and TinyBERT's projections W_m (d_S -> d_T), one per matched hidden state; a projection
    starts as the identity when the widths agree (the block-subset student then starts at its own loss)."""

    def __init__(self, bert: nn.Module, teacher_dim: int, n_proj: int):
        super().__init__()
        self.bert = bert
        dim = bert.config.dim
        self.narrow = dim != teacher_dim  # only tinybert allows it (build_task)
        self.proj = nn.ModuleList(nn.Linear(dim, teacher_dim, bias=False) for _ in range(n_proj))
        if dim == teacher_dim:
            for p in self.proj:
                nn.init.eye_(p.weight)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, scores: bool = False) -> tuple[list, list]:
        return probe(self.bert, ids, mask, scores)

    def to_teacher(self, x: torch.Tensor, m: int = -1) -> torch.Tensor:
        """A student vector (..., d_S) in the teacher's width: through W_m when the student is narrower."""
        return self.proj[m](x) if self.narrow else x


class EncoderDistillTask:
    """Texts of the built-in train split -> the chosen loss; validation: L_emb on the held-out texts."""

    name = "embed-distill"

    def __init__(self, student: EncoderStudent, cfg: EncoderDistillConfig, student_config, teacher: nn.Module,
                 tokenizer, texts: dict[str, list[str]], layer_map: list[int], seed: int):
        self.model, self.cfg, self.model_config, self.teacher = student, cfg, student_config, teacher
        self.tokenizer, self.texts, self.layer_map, self.seed = tokenizer, texts, layer_map, seed
        self.mask_id = tokenizer.vocab.get("[MASK]") if cfg.loss == "distilbert" else None
        if cfg.loss == "distilbert" and self.mask_id is None:
            raise LlmlabError("--loss distilbert: the tokenizer has no [MASK] token to mask inputs with")
        self._last: dict = {}

    def _embedding(self, hidden: torch.Tensor, mask: torch.Tensor, student: bool) -> torch.Tensor:
        """The sentence embedding as ``BertModel.embed`` makes it, before normalisation: mean pooling, then the
        model's projection after pooling if it has one; the student's is then mapped to the teacher's width."""
        e = pool(hidden.float(), mask)  # (B, D)
        model = self.model.bert if student else self.teacher
        if model.projection is not None:
            e = model.projection(e)  # (B, D)
        return self.model.to_teacher(e) if student else e

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        cfg = self.cfg
        texts = epoch_rows(self.texts[split], self.seed, split, step, first_row, rows, total_rows)
        ids, mask = tokenize_batch(self.tokenizer, texts, cfg.max_tokens)  # (B, T) each
        device = next(self.model.parameters()).device
        labels = None
        if cfg.loss == "distilbert" and split == "train":
            g = torch.Generator().manual_seed(self.seed * 7919 + step * 1000 + first_row)
            specials = tuple(self.tokenizer.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]") if t in self.tokenizer.vocab)
            ids, labels = mask_tokens(ids, mask_id=self.mask_id, vocab_size=self.model_config.vocab_size,
                                      generator=g, protect=specials)
            labels = labels.to(device)
        ids, mask = ids.to(device), mask.to(device)
        want_scores = cfg.loss == "tinybert" and split == "train"
        hs, ss = model(ids, mask, want_scores)  # [(B, T, D_S)], [(B, H, T, T)]
        teacher = self.teacher.to(device)
        with torch.no_grad():
            ht, st = probe(teacher, ids, mask, want_scores)
        real = mask.bool()  # (B, T)
        emb = losses.cosine_embedding(self._embedding(hs[-1], mask, True), self._embedding(ht[-1], mask, False))
        stats = {"embed": float(emb.detach())}
        if split != "train" or cfg.loss == "embed":
            self._last = stats
            return emb, len(texts)
        if cfg.loss == "tinybert":
            g = self.layer_map
            hidden = torch.stack([losses.hidden_mse(self.model.proj[m](hs[m][real]), ht[g[m]][real])
                                  for m in range(len(hs))]).mean()
            attn = torch.stack([losses.attention_mse(ss[m - 1], st[g[m] - 1], mask)
                                for m in range(1, len(hs))]).mean()
            stats.update(hidden=float(hidden.detach()), attn=float(attn.detach()))
            loss = cfg.hidden_weight * hidden + cfg.attn_weight * attn + emb
        else:  # distilbert
            at = labels != IGNORE  # (B, T): the masked positions
            s_logits = hs[-1][at].float() @ model_tokens(self.model.bert).float().T  # (N, V)
            with torch.no_grad():
                t_logits = ht[-1][at].float() @ model_tokens(teacher).float().T  # (N, V)
            kd = losses.forward_kl(s_logits, t_logits, cfg.temperature)
            mlm = mlm_loss(s_logits, labels[at])
            cos = losses.cosine_embedding(hs[-1][real], ht[-1][real])
            stats.update(kd=float(kd.detach()), mlm=float(mlm.detach()), cos=float(cos.detach()))
            loss = cfg.kd_weight * kd + cfg.mlm_weight * mlm + cfg.cos_weight * cos
        self._last = stats
        return loss, len(texts)

    def aux_stats(self) -> dict:
        return dict(self._last)

    # ---- checkpoints: the student BERT's and the projections' tensors ----

    def split_state(self, sd):
        core = {k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")}
        return core, {PROJ_FILE: {k.removeprefix("proj."): v for k, v in sd.items() if k.startswith("proj.")}}

    def join_state(self, core, extras):
        sd = {f"bert.{k}": v for k, v in core.items()}
        sd.update({f"proj.{k}": v for k, v in extras[PROJ_FILE].items()})
        return sd

    def extra_files(self):
        return [PROJ_FILE]

    def tokenizer_files(self):
        return None  # WordPiece: the final model folder copies the teacher's tokenizer files


def model_tokens(bert: nn.Module) -> torch.Tensor:
    """The token-embedding matrix (V, D): BERT's tied MLM decoder."""
    return bert.embed_tokens.weight


def builtin_texts() -> dict[str, list[str]]:
    """{"train": texts, "val": texts}: each train pair's query and document, a tenth of the pairs (by the CRC of
    the name, ``retrieval_set.is_dev``) held out."""
    pairs = builtin_split()[0]
    return {split: [t for p in pairs if is_dev(p.key) == (split == "val") for t in (p.query, p.document)]
            for split in ("train", "val")}


# ---- the run ------------------------------------------------------------------------------------------------------


def build_task(cfg: EncoderDistillConfig, tcfg: TrainConfig, teacher: Loaded, student: Loaded,
               texts: dict[str, list[str]]) -> EncoderDistillTask:
    """Check that the pair fits the loss, wrap the student with its projections (tinybert), freeze the teacher."""
    s, t = student.config, teacher.config
    if cfg.max_tokens > min(s.max_seq_len, t.max_seq_len):
        raise LlmlabError(f"--max-tokens {cfg.max_tokens} is more than the models' {min(s.max_seq_len, t.max_seq_len)}")
    if cfg.loss != "tinybert" and s.dim != t.dim:
        raise LlmlabError(f"--loss {cfg.loss} compares {s.dim}- and {t.dim}-wide vectors: use --loss tinybert, "
                          "whose learned projections map a narrower student to the teacher's width")
    layer_map = []
    if cfg.loss == "tinybert":
        if tcfg.activation_checkpointing:  # the recomputed forward would record every block's scores twice
            raise LlmlabError("--loss tinybert records attention scores in the forward pass: drop "
                              "--activation-checkpointing (a 3-block student needs little memory)")
        if s.n_heads != t.n_heads:
            raise LlmlabError(f"--loss tinybert matches attention per head: the student has {s.n_heads} heads, the "
                              f"teacher {t.n_heads}; give the student {t.n_heads} heads")
        mapping = (parse_indices(cfg.layer_map, 1, t.n_layers, "--layer-map") if cfg.layer_map
                   else losses.layer_map(s.n_layers, t.n_layers)[1:])
        layer_map = check_layer_map(mapping, s.n_layers, t.n_layers)
    torch.manual_seed(tcfg.seed)
    wrapped = EncoderStudent(student.model, t.dim, s.n_layers + 1 if cfg.loss == "tinybert" else 0)
    student.model.train().requires_grad_(True)
    teacher.model.eval().requires_grad_(False)
    return EncoderDistillTask(wrapped, cfg, s, teacher.model, teacher.tokenizer, texts, layer_map, tcfg.seed)


Score = Callable[[nn.Module, object], tuple[dict, torch.Tensor]]  # (model, tokenizer) -> (metrics, embeddings)


def measure(name: str, model: nn.Module, tokenizer, score: Score, reference: torch.Tensor | None) -> dict:
    """One row of the report: ``score``'s retrieval metrics, the encoding speed over its texts, and the mean
    cosine of each text's embedding to ``reference``'s (the teacher's; None when the widths differ)."""
    embed_texts(model.eval(), tokenizer, ["a warm-up text"] * 4)  # first-call costs out of the timing
    t0 = time.perf_counter()
    metrics, emb = score(model, tokenizer)
    seconds = time.perf_counter() - t0
    cos = None
    if reference is not None and reference.shape == emb.shape:
        cos = float(F.cosine_similarity(emb.float(), reference.float(), dim=-1).mean())
    return {"name": name, "params": sum(p.numel() for p in model.parameters()), "layers": model.config.n_layers,
            "dim": model.config.dim, "metrics": metrics, "cosine_to_teacher": cos, "texts": len(emb),
            "sentences_per_s": len(emb) / seconds, "_emb": emb}


def report_table(rows: list[dict]) -> str:
    """The report rows -> a Markdown table."""
    lines = ["| model | blocks x dim | params | nDCG@10 | recall@10 | cosine to teacher | sentences/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, cos = r["metrics"], r["cosine_to_teacher"]
        lines.append(f"| {r['name']} | {r['layers']} x {r['dim']} | {human_count(r['params'])} | {m['ndcg@10']:.4f} "
                     f"| {m['recall@10']:.4f} | {'-' if cos is None else f'{cos:.4f}'} | {r['sentences_per_s']:.0f} |")
    return "\n".join(lines)


def run_encoder_distill(cfg: EncoderDistillConfig, tcfg: EncoderDistillTrainConfig, score: Score | None = None) -> dict:
    """Load the teacher, build the student, (score both), train, save the student, (score it again), summarise.
    Returns the summary (also ``summary.json``; ``report`` holds the scored rows when ``score`` is given)."""
    cfg.validate()
    tcfg.validate()
    t0 = time.perf_counter()
    teacher = load_model(cfg.teacher)
    if teacher.config.arch != "bert" or teacher.tokenizer is None:
        raise LlmlabError(f"teacher {cfg.teacher}: not an encoder with a tokenizer (e.g. {DEFAULT_EMBED}); a causal "
                          "language model is distilled by 'llmlab distill'")
    student = load_student(cfg, teacher, tcfg.seed)
    texts = builtin_texts()
    task = build_task(cfg, tcfg, teacher, student, texts)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "encoder_distill_config.json", json.dumps(
        {**to_dict(cfg), "train": to_dict(tcfg), "student_config": to_dict(student.config)}, indent=2) + "\n")
    rows = []
    if score is not None:
        rows.append(measure(f"teacher {cfg.teacher}", teacher.model, teacher.tokenizer, score, None))
        rows.append(measure("student before", student.model, teacher.tokenizer, score, rows[0]["_emb"]))
    n_student = sum(p.numel() for p in student.model.parameters())
    n_teacher = sum(p.numel() for p in teacher.model.parameters())
    print(f"llmlab: {cfg.loss}: student {cfg.student or 'teacher blocks ' + cfg.layers} ({human_count(n_student)} "
          f"parameters, {student.config.n_layers} x {student.config.dim}) from {cfg.teacher} "
          f"({human_count(n_teacher)}, {teacher.config.n_layers} x {teacher.config.dim}); {tcfg.steps} steps x "
          f"{tcfg.batch_size} of {len(texts['train'])} texts -> {run_dir}", flush=True)
    result: TrainResult = train(task, tcfg, run_dir, resume=cfg.resume)
    saved = None
    if result.stopped != "interrupted":
        from llmlab.formats.convert import write_loaded

        saved = run_dir / "model"
        write_loaded(dataclasses.replace(student, model=student.model.eval()), saved)
        if score is not None:
            rows.append(measure("student after", student.model, teacher.tokenizer, score, rows[0]["_emb"]))
    report = [{k: v for k, v in r.items() if k != "_emb"} for r in rows]
    summary = {"loss": cfg.loss, "teacher": cfg.teacher, "student": cfg.student or f"teacher blocks {cfg.layers}",
               "layer_map": task.layer_map[1:], "steps": result.step, "stopped": result.stopped,
               "student_params": n_student, "teacher_params": n_teacher, "val_loss": result.val_loss,
               "train_loss": result.train_loss, "train_seconds": result.seconds,
               "total_seconds": time.perf_counter() - t0, "saved": str(saved) if saved else None, "report": report}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_summary(run_dir / "summary.md", [
        f"# embed distill ({cfg.loss}): {summary['student']} from {cfg.teacher}", "",
        f"- steps: {result.step} ({result.stopped}), batch {tcfg.batch_size} texts, lr {tcfg.lr:g}, "
        f"{result.seconds / 60:.1f} min training",
        f"- student: {n_student:,} parameters; teacher: {n_teacher:,}",
        f"- held-out 1 - cos(e_S, e_T): {result.val_loss:.4f}" if result.val_loss is not None
        else "- held-out loss: not measured", f"- saved: {saved}", "",
        *([report_table(report), ""] if report else []), "![loss](loss.png)"])
    return summary
