"""``llmlab distill``: train a student language model on a teacher's next-token distributions, as a ``Task`` for
the one training loop (docs/architecture.md, "One training loop"). The formulas are in ``train/distill_losses.py``.

Losses (``--loss``), on windows of token shards (``llmlab data prepare`` with the teacher's tokenizer):

=============  ==================================================================================================
kd             Hinton et al. 2015 (arXiv:1503.02531): tau^2 KL(p_T^tau || p_S^tau) at every position of the data
               windows, plus ``--ce-weight`` x next-token cross-entropy on the data (the hard labels)
reverse-kl     MiniLLM (Gu et al. 2023, arXiv:2306.08543), reduced to its single-step term: the student samples a
               continuation of ``--gen-tokens`` tokens after each window's prefix, and the loss is the exact
               per-position KL(p_S || p_T) over the vocabulary at the sampled positions (the ablation of minillm)
minillm        MiniLLM's full objective (``train/minillm.py``): the continuation is sampled from the mixture
               ``--teacher-mix`` alpha p_T + (1 - alpha) p_S, and the loss is the single-step term plus the
               policy-gradient term through later tokens (REINFORCE on the later tokens' rewards log p_T - log
               p_S, ``--length-norm``: their mean), both weighted by the importance weights p_S / mixture
gkd            GKD (Agarwal et al. 2023, arXiv:2306.13649): generalized JSD(``--beta``); with probability
               ``--lmbda`` a step trains on the student's own sampled continuations (on-policy, loss on the
               sampled positions), otherwise on the data windows (every position), TRL's per-batch choice
hidden         TinyBERT (Jiao et al. 2020, arXiv:1909.10351): the kd term plus ``--hidden-weight`` x the mean,
               over the student's embedding output and every block output m, of the (normalised) MSE between
               W_m h_S^m and the teacher's hidden state after block g(m) = round(m L_T / L_S); W_m (d_S x d_T)
               are learned projections (trained with the student, saved in the checkpoints, dropped at the end)
ce             no teacher: plain next-token cross-entropy on the same windows, the from-scratch baseline
=============  ==================================================================================================

Teacher and student may differ in width and depth; they must share the tokenizer (checked: the same
vocabulary, and the shards' tokenizer too). The student is a preset (random weights, e.g. ``smollm2-tiny``: a
4-block, 256-wide Llama over SmolLM2's vocabulary), or a model folder: a pruned folder (``llmlab prune``: weights
that are exactly zero keep a zero gradient, so the sparsity survives training) or a low-rank folder (``llmlab
lowrank``: the factors train). The teacher runs every step under no grad (its logits are not cached: one
teacher forward per window is what the data needs once).

The validation loss the loop reports is the student's plain next-token cross-entropy on the held-out split,
whatever the loss, so ``val_ppl`` compares runs with different losses. The run folder: ``distill_config.json``,
``checkpoints/`` (the student's and projections' tensors: exact resume), ``metrics.jsonl``, ``loss.png``,
``model/`` (the student as a Hugging Face folder with the tokenizer: ``llmlab.load(RUN/model)``),
``summary.json``, ``summary.md``.

Shapes: windows x (B, T) int64; logits (B, T, V); hidden states (B, T, D).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError, human_count, seed_everything, write_text_atomic
from llmlab.data.shards import PrepareConfig, TokenShards, load_tokenizer, prepare
from llmlab.dataclass_io import to_dict
from llmlab.formats.load import Loaded, load_model
from llmlab.formats.lowrank import lowrank_config
from llmlab.infer.generate import generate
from llmlab.infer.sample import SamplingParams
from llmlab.train import distill_losses as losses
from llmlab.train import minillm
from llmlab.train.loop import TrainConfig, TrainResult, train
from llmlab.train.report import write_summary

LOSSES = ("kd", "reverse-kl", "minillm", "gkd", "hidden", "ce")
ON_POLICY = ("reverse-kl", "minillm", "gkd")
DEFAULT_DATA = "data/stdlib-smollm2"
STUDENT_FILE = "student.safetensors"  # the student's tensors inside a checkpoint
PROJ_FILE = "projections.safetensors"  # the hidden loss's W_m


@dataclass
class DistillConfig:
    teacher: str = field(default="smollm2-135m-instruct", metadata={
        "help": "teacher: an embedded name, a GGUF file or a Hugging Face folder"})
    student: str = field(default="smollm2-tiny", metadata={
        "help": "student: a preset (random weights, its vocabulary the teacher's), or a model folder (e.g. from "
                "llmlab prune or llmlab lowrank)"})
    loss: str = field(default="kd", metadata={
        "help": "kd: forward KL at --temperature (Hinton); reverse-kl: KL(student || teacher) on the student's own "
                "samples (MiniLLM's single-step term); minillm: MiniLLM's full objective (single-step + "
                "policy-gradient term through later tokens, teacher-mixed sampling, length normalisation); gkd: "
                "generalized JSD, on-policy with probability --lmbda; "
                "hidden: kd + projected hidden-state MSE (TinyBERT); ce: no teacher, the from-scratch baseline",
        "choices": LOSSES})
    data: str = field(default=DEFAULT_DATA, metadata={
        "help": "token shards (llmlab data prepare --tokenizer <teacher>); the default is prepared from the Python "
                "stdlib with the teacher's tokenizer if missing"})
    out: str = field(default="runs/distill", metadata={"help": "run folder (resumes when it has checkpoints)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both distributions (> 0)"})
    ce_weight: float = field(default=0.0, metadata={
        "help": "kd / hidden / minillm: weight of the next-token cross-entropy on the data windows added to the "
                "distillation loss (minillm: the paper's pretraining loss L_PT)"})
    beta: float = field(default=0.5, metadata={"help": "gkd: JSD interpolation in [0, 1] (0 forward KL, 1 reverse KL)"})
    lmbda: float = field(default=0.5, metadata={
        "help": "gkd: probability that a step trains on the student's own samples, in [0, 1]"})
    gen_tokens: int = field(default=32, metadata={
        "help": "reverse-kl / minillm / gkd on-policy: tokens the student samples after the first seq_len - N of a "
                "window"})
    teacher_mix: float = field(default=0.2, metadata={
        "help": "minillm: the teacher's share alpha of the sampling mixture alpha p_T + (1 - alpha) p_S, in [0, 1) "
                "(0.2 in the paper; 0 samples from the student alone)"})
    length_norm: bool = field(default=True, metadata={
        "help": "minillm: the long-term reward is the mean, not the sum, of the later tokens' rewards"})
    importance: str = field(default="token", metadata={
        "help": "minillm: importance weights of the mixed samples: token (the paper's per-token ratio p_S / "
                "mixture) or sequence (the product over the continuation: unbiased, high variance)",
        "choices": minillm.IMPORTANCE})
    baseline: bool = field(default=True, metadata={
        "help": "minillm: subtract from each row's long-term reward the mean of the other rows' at the same position "
                "(leave-one-out; unbiased, lower variance)"})
    whiten: bool = field(default=False, metadata={
        "help": "minillm: whiten the long-term rewards over the batch (minus their mean, over their standard "
                "deviation; after --baseline), as the authors' code does with its advantages"})
    hidden_weight: float = field(default=1.0, metadata={"help": "hidden: weight of the hidden-state term"})
    keep_zeros: bool = field(default=True, metadata={
        "help": "student weights that are exactly zero at the start (a pruned model) stay zero"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> DistillConfig:
        if self.loss not in LOSSES:
            raise LlmlabError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        losses.check_temperature(self.temperature)
        losses.check_beta(self.beta)
        minillm.check_alpha(self.teacher_mix)
        if self.importance not in minillm.IMPORTANCE:
            raise LlmlabError(f"--importance {self.importance!r}: use one of {', '.join(minillm.IMPORTANCE)}")
        if self.loss == "minillm" and self.temperature != 1.0:
            raise LlmlabError(f"--temperature {self.temperature:g} with --loss minillm: MiniLLM samples and scores at "
                              "temperature 1; drop --temperature")
        if self.whiten and self.loss != "minillm":
            raise LlmlabError(f"--whiten with --loss {self.loss}: it whitens MiniLLM's long-term rewards; use --loss "
                              "minillm or drop --whiten")
        if not 0.0 <= self.lmbda <= 1.0:
            raise LlmlabError(f"--lmbda {self.lmbda} is outside [0, 1]: it is the probability of an on-policy step")
        if self.gen_tokens < 1:
            raise LlmlabError(f"--gen-tokens must be >= 1, got {self.gen_tokens}")
        for name in ("ce_weight", "hidden_weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise LlmlabError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
        return self


@dataclass
class DistillTrainConfig(TrainConfig):
    """The training loop's flags with distillation defaults: 15,360 tokens (the README's comparison; 15 minutes
    for kd, 9 for ce on two heavily loaded CPU cores)."""

    steps: int = field(default=30, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "global batch: windows per optimizer step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per window"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=5, metadata={"help": "linear warmup steps"})
    eval_every: int = field(default=0, metadata={"help": "validation loss every N steps; 0 = only at the end"})
    eval_batches: int = field(default=8, metadata={"help": "validation batches (of --batch-size windows)"})
    save_every: int = field(default=25, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only"})
    log_every: int = field(default=5, metadata={"help": "progress-bar refresh / metrics line every N steps"})


def check_same_tokenizer(teacher: Loaded, student: Loaded, shards_tok=None) -> None:
    """Distillation compares distributions id by id: the student (and the shards) must use the teacher's
    vocabulary. A student without a tokenizer (a preset) needs only the same vocabulary size."""
    if teacher.tokenizer is None:
        raise LlmlabError(f"teacher {teacher.source}: no tokenizer found; use a GGUF file or a folder with "
                          "tokenizer.json")
    t_vocab = teacher.tokenizer.vocab
    if student.config.vocab_size != teacher.config.vocab_size:
        raise LlmlabError(f"student {student.source} has a vocabulary of {student.config.vocab_size} tokens, the "
                          f"teacher {teacher.config.vocab_size}: teacher and student must share the tokenizer")
    if student.tokenizer is not None and student.tokenizer.vocab != t_vocab:
        raise LlmlabError(f"student {student.source} uses a different tokenizer than the teacher {teacher.source}: "
                          "teacher and student must share the tokenizer")
    if shards_tok is not None and shards_tok.vocab != t_vocab:
        raise LlmlabError("the --data shards were tokenized with a different tokenizer than the teacher's: prepare "
                          f"them with 'llmlab data prepare --tokenizer {teacher.source} --out DIR FILES...'")


class HiddenStates:
    """Forward hooks that keep the embedding output and every block's output of a decoder (or of ``modules``, e.g.
    a BERT's ``embed_norm`` and blocks), (B, T, D) each."""

    def __init__(self, model: nn.Module, modules: list[nn.Module] | None = None):
        self.states: list[torch.Tensor] = []
        mods = [model.embed_tokens, *model.layers] if modules is None else modules
        self._hooks = [m.register_forward_hook(lambda _m, _i, out: self.states.append(out)) for m in mods]

    def take(self) -> list[torch.Tensor]:
        out, self.states = self.states, []
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class Student(nn.Module):
    """The student and, for the hidden loss, one projection d_S -> d_T per matched hidden state. ``forward``
    returns the logits and the projected hidden states (none without projections)."""

    def __init__(self, student: nn.Module, student_dim: int = 0, teacher_dim: int = 0, n_proj: int = 0):
        super().__init__()
        self.student = student
        self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(n_proj))
        self._hidden = HiddenStates(student) if n_proj else None

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._hidden is not None:
            self._hidden.take()  # drop states of forwards outside this one (sampling)
        logits = self.student(input_ids)  # (B, T, V)
        if self._hidden is None:
            return logits, []
        return logits, [p(h) for p, h in zip(self.proj, self._hidden.take())]  # each (B, T, D_T)


def keep_zeros_(model: nn.Module) -> int:
    """Mask the gradient of every block matrix where its weight is exactly zero (a pruned model); AdamW then
    leaves those entries at zero (zero moments, and decoupled decay of zero is zero). Returns how many matrices
    were masked."""
    n = 0
    for name, p in model.named_parameters():
        if p.ndim == 2 and name.startswith("layers.") and p.requires_grad:
            mask = p.detach() != 0
            if not bool(mask.all()):
                p.register_hook(lambda g, mask=mask: g * mask)
                n += 1
    return n


class DistillTask:
    """Windows of the shards -> the chosen loss. Validation: the student's plain next-token cross-entropy."""

    name = "distill"

    def __init__(self, student: Student, cfg: DistillConfig, student_config, teacher: nn.Module | None,
                 shards: TokenShards, seq_len: int, seed: int):
        self.model, self.cfg, self.model_config, self.teacher = student, cfg, student_config, teacher
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.teacher_layers = layer_targets(cfg, student_config, teacher)
        self._last: dict = {}
        self.zero_masked = 0  # block matrices whose zeros are kept (keep_zeros_)

    # ---- the batch ----

    def on_policy(self, step: int) -> bool:
        """reverse-kl, minillm: every step; gkd: with probability lmbda, a function of (seed, step) for exact resume."""
        if self.cfg.loss in ("reverse-kl", "minillm"):
            return True
        if self.cfg.loss != "gkd":
            return False
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        return float(torch.rand((), generator=g)) < self.cfg.lmbda

    @torch.no_grad()
    def sample_continuations(self, x: torch.Tensor, step: int, first_row: int) -> torch.Tensor:
        """Each window's first T - gen_tokens ids, then the student's own continuation sampled at temperature
        1 (minillm: from the teacher-mixed distribution), seeded by seed, step and row: the same on resume, (B, T)."""
        student = self.model.student
        keep = self.seq_len - self.cfg.gen_tokens
        seed = self.seed * 1_000_003 + step * 1009 + first_row
        was = student.training
        student.eval()
        try:
            if self.cfg.loss == "minillm" and self.cfg.teacher_mix > 0:  # MiniLLM: from alpha p_T + (1 - alpha) p_S
                return minillm.sample_mixed(student, self.teacher, x[:, :keep], self.cfg.gen_tokens,
                                            self.cfg.teacher_mix, torch.Generator(x.device).manual_seed(seed))
            done = generate(student, x[:, :keep].tolist(), self.cfg.gen_tokens,
                            SamplingParams(temperature=1.0, seed=seed))
        finally:
            student.train(was)
        rows = [list(p) + c.ids for p, c in zip(x[:, :keep].tolist(), done)]
        return torch.tensor(rows, dtype=torch.long, device=x.device)  # (B, T)

    # ---- the loss ----

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        x, y = self.shards.batch(step, rows, self.seq_len, seed=self.seed, split=split, first_row=first_row,
                                 total_rows=total_rows)
        device = next(self.model.parameters()).device
        x, y = x.to(device), y.to(device)
        cfg = self.cfg
        if split != "train" or cfg.loss == "ce":
            logits, _ = model(x)  # (B, T, V)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)), x.numel()
        on_policy = self.on_policy(step)
        first = 0  # the first scored position
        data = x  # the window itself (minillm's --ce-weight term)
        teacher = self.teacher.to(device)  # before sampling: minillm's samples mix in the teacher's distribution
        if on_policy:
            x = self.sample_continuations(x, step, first_row)
            first = self.seq_len - cfg.gen_tokens - 1  # the logits that predicted the first sampled token
        logits, projected = model(x)  # (B, T, V), [(B, T, D_T)]
        hooks = HiddenStates(teacher) if cfg.loss == "hidden" else None
        try:
            with torch.no_grad():
                t_logits = teacher(x)  # (B, T, V)
        finally:
            t_hidden = hooks.take() if hooks is not None else []  # [(B, T, D_T)] per teacher hidden state
            if hooks is not None:
                hooks.remove()
        last = x.shape[1] - 1 if on_policy else x.shape[1]  # on-policy: the last logits predict nothing sampled
        s = logits[:, first:last].reshape(-1, logits.shape[-1])  # (N, V)
        t = t_logits[:, first:last].reshape(-1, t_logits.shape[-1])  # (N, V)
        stats = {"on_policy": on_policy}
        if cfg.loss in ("kd", "hidden"):
            loss = losses.forward_kl(s, t, cfg.temperature)
        elif cfg.loss == "reverse-kl":
            loss = losses.reverse_kl(s, t, cfg.temperature)
        elif cfg.loss == "minillm":
            terms = minillm.minillm_loss(logits[:, first:last], t_logits[:, first:last], x[:, first + 1:],
                                         cfg.teacher_mix, cfg.length_norm, cfg.importance, cfg.baseline,
                                         cfg.whiten)
            loss = terms.loss
            stats.update(single_step=terms.single, long_term=terms.long, reward=terms.reward,
                         weight_mean=terms.weight_mean, weight_min=terms.weight_min, weight_max=terms.weight_max)
        else:
            loss = losses.generalized_jsd(s, t, cfg.beta, cfg.temperature)
        stats["distill"] = float(loss.detach())
        if cfg.loss == "hidden":
            terms = [losses.hidden_mse(p, t_hidden[j]) for p, j in zip(projected, self.teacher_layers)]
            hidden = torch.stack(terms).mean()
            stats["hidden"] = float(hidden.detach())
            loss = loss + cfg.hidden_weight * hidden
        if cfg.ce_weight and (not on_policy or cfg.loss == "minillm"):  # minillm: the paper's L_PT on the window
            data_logits = logits if not on_policy else model(data)[0]  # (B, T, V)
            ce = F.cross_entropy(data_logits.float().reshape(-1, data_logits.shape[-1]), y.reshape(-1))
            stats["ce"] = float(ce.detach())
            loss = loss + cfg.ce_weight * ce
        self._last = stats
        return loss, x.numel()

    def aux_stats(self) -> dict:
        return dict(self._last)

    # ---- checkpoints: the student's and the projections' tensors ----

    def split_state(self, sd):
        student = {k.removeprefix("student."): v for k, v in sd.items() if k.startswith("student.")}
        if self.model_config.tie_embeddings:
            student.pop("lm_head.weight", None)  # one tensor under two names
        proj = {k.removeprefix("proj."): v for k, v in sd.items() if k.startswith("proj.")}
        return {}, {STUDENT_FILE: student, PROJ_FILE: proj}

    def join_state(self, core, extras):
        sd = {f"student.{k}": v for k, v in extras[STUDENT_FILE].items()}
        if self.model_config.tie_embeddings:
            sd["student.lm_head.weight"] = sd["student.embed_tokens.weight"]
        sd.update({f"proj.{k}": v for k, v in extras[PROJ_FILE].items()})
        return sd

    def extra_files(self):
        return [STUDENT_FILE, PROJ_FILE]

    def tokenizer_files(self):
        return None


def layer_targets(cfg: DistillConfig, student_config, teacher: nn.Module | None) -> list[int]:
    """hidden: the teacher hidden-state index (0 = embeddings, i = after block i) each student state is matched to."""
    if cfg.loss != "hidden":
        return []
    return losses.layer_map(student_config.n_layers, len(teacher.layers))


def open_shards(path: str, teacher: Loaded) -> TokenShards:
    """The shards at ``path``; the default folder is prepared from the Python stdlib with the teacher's tokenizer
    when it does not exist yet."""
    folder = Path(path)
    if not (folder / "meta.json").exists():
        if path != DEFAULT_DATA:
            raise LlmlabError(f"{path}: no prepared shards here (run 'llmlab data prepare --tokenizer "
                              f"{teacher.source} --out {path} FILES...')")
        print(f"llmlab: preparing the default corpus (Python standard library) with the teacher's tokenizer into "
              f"{path} ...", flush=True)
        prepare(PrepareConfig(out=path, tokenizer=teacher.source))
    return TokenShards(folder)


def load_student(source: str, teacher: Loaded, seed: int) -> Loaded:
    """A preset gets SmolLM2-style special ids from the teacher and a seeded random initialisation."""
    seed_everything(seed)
    student = load_model(source)
    if student.file_format == "preset":
        student.config.bos_token_id = teacher.config.bos_token_id
        student.config.eos_token_id = teacher.config.eos_token_id
    if not student.config.is_causal:
        raise LlmlabError(f"student {source}: distillation here trains causal language models (llama, gpt2)")
    return student


def build_task(cfg: DistillConfig, tcfg: TrainConfig, teacher: Loaded, student: Loaded,
               shards: TokenShards) -> DistillTask:
    """The task for the loop: the student wrapped with its projections (hidden: one per student hidden state,
    seeded by --seed), the student trainable (its zeros kept with --keep-zeros), the teacher frozen."""
    scfg = student.config
    if tcfg.seq_len > scfg.max_seq_len:
        raise LlmlabError(f"--seq-len {tcfg.seq_len} is longer than the student's context ({scfg.max_seq_len})")
    n_proj = scfg.n_layers + 1 if cfg.loss == "hidden" else 0
    torch.manual_seed(tcfg.seed)
    wrapped = Student(student.model, scfg.dim, teacher.config.dim, n_proj)
    student.model.train().requires_grad_(True)
    teacher.model.eval().requires_grad_(False)
    task = DistillTask(wrapped, cfg, scfg, None if cfg.loss == "ce" else teacher.model, shards, tcfg.seq_len,
                       tcfg.seed)
    task.zero_masked = keep_zeros_(student.model) if cfg.keep_zeros else 0
    return task


def run_distill(cfg: DistillConfig, tcfg: DistillTrainConfig) -> dict:
    """Load the teacher and the student, check they share the tokenizer, train, save the student, summarise.
    Returns the summary (also written as ``summary.json``)."""
    cfg.validate()
    tcfg.validate()
    if cfg.loss in ON_POLICY and cfg.gen_tokens >= tcfg.seq_len:
        raise LlmlabError(f"--gen-tokens {cfg.gen_tokens} must be smaller than --seq-len {tcfg.seq_len}: the "
                          "student continues the first seq_len - gen_tokens tokens of each window")
    t0 = time.perf_counter()
    teacher = load_model(cfg.teacher)
    if not teacher.config.is_causal:
        raise LlmlabError(f"teacher {cfg.teacher}: distillation here needs a causal language model; for an encoder "
                          "(BERT) teacher use 'llmlab embed distill --teacher ...'")
    student = load_student(cfg.student, teacher, tcfg.seed)
    check_same_tokenizer(teacher, student)
    shards = open_shards(cfg.data, teacher)
    check_same_tokenizer(teacher, student, load_tokenizer(str(shards.folder / "tokenizer.json")))
    for split in ("train", "val"):
        shards.check_fits(tcfg.seq_len, split)
    task = build_task(cfg, tcfg, teacher, student, shards)
    scfg, wrapped = student.config, task.model
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "distill_config.json", json.dumps(
        {**to_dict(cfg), "train": to_dict(tcfg), "student_config": to_dict(scfg)}, indent=2) + "\n")
    n_student = sum(p.numel() for p in student.model.parameters())
    n_teacher = sum(p.numel() for p in teacher.model.parameters())
    print(f"llmlab: {cfg.loss}: student {cfg.student} ({human_count(n_student)} parameters, {scfg.n_layers} blocks "
          f"x {scfg.dim}) from teacher {cfg.teacher} ({human_count(n_teacher)}, {teacher.config.n_layers} x "
          f"{teacher.config.dim}); {tcfg.steps} steps x {tcfg.batch_size} x {tcfg.seq_len} tokens -> {run_dir}",
          flush=True)
    result: TrainResult = train(task, tcfg, run_dir, resume=cfg.resume)
    saved = None
    if result.stopped != "interrupted":
        saved = run_dir / "model"
        lc = lowrank_config(Path(student.source)) if student.file_format == "hf" else None
        spec = None if lc is None else {"method": lc.get("method"), "modules": lc["modules"],
                                        "factor_bits": lc.get("factor_bits", 0)}
        from llmlab.formats.convert import write_loaded

        if wrapped._hidden is not None:
            wrapped._hidden.remove()
        write_loaded(dataclasses.replace(student, model=student.model.eval(), tokenizer=teacher.tokenizer,
                                         chat_template=teacher.chat_template), saved, lowrank_spec=spec)
    val = result.val_loss
    masked = task.zero_masked
    summary = {"loss": cfg.loss, "teacher": cfg.teacher, "student": cfg.student, "steps": result.step,
               "stopped": result.stopped, "tokens": result.tokens, "student_params": n_student,
               "teacher_params": n_teacher, "val_loss": val, "val_ppl": math.exp(min(val, 50)) if val is not None
               else None, "val_tokens": tcfg.eval_batches * tcfg.batch_size * tcfg.seq_len,
               "train_loss": result.train_loss, "zero_masked_matrices": masked, "train_seconds": result.seconds,
               "total_seconds": time.perf_counter() - t0, "saved": str(saved) if saved else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_summary(run_dir / "summary.md", [
        f"# distill ({cfg.loss}): {cfg.student} from {cfg.teacher}", "",
        f"- steps: {result.step} ({result.stopped}), {result.tokens:,} tokens, batch {tcfg.batch_size} x "
        f"{tcfg.seq_len}, lr {tcfg.lr:g}, {result.seconds / 60:.1f} min training",
        f"- student: {n_student:,} parameters; teacher: {n_teacher:,}",
        f"- held-out next-token loss {val:.4f}, perplexity {summary['val_ppl']:.2f} over {summary['val_tokens']:,} "
        "tokens of the validation split" if val is not None else "- held-out loss: not measured",
        f"- saved: {saved}", "", "![loss](loss.png)"])
    return summary
