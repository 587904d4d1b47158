"""THE training loop. Pretraining, MLM, and later SFT, LoRA, DPO and distillation are all a ``Task``
(a model, a loss, and which parameters train) handed to ``train`` (docs/architecture.md, "One training loop").

One optimizer step:

    for each of ``accum`` micro-batches (rows of this rank's share of the global batch):
        with autocast(dtype): loss = task.loss(model, step, rows) / accum;  backward
    unscale (fp16), clip the global gradient norm, check loss and norm are finite, AdamW step

- ``optimizer_in_backward``: each parameter's AdamW update runs during backward as soon as its gradient is
  complete, and the gradient is freed (``train/optim_in_backward.py``): the same step without clipping,
  accumulation, fp16 scaling or more than one process (those are refused).
- Gradient accumulation: global batch = micro_batch x accum x world_size rows; DDP syncs only on the
  last micro-batch.
- Mixed precision: bf16 or fp16 autocast (fp16 with dynamic loss scaling, Micikevicius et al. 2018,
  arXiv:1710.03740); weights and optimizer state stay float32. On CPUs without bf16/fp16 matmul units
  the same rounding is emulated on fp32 units (``nn/autocast.py``), 8x+ faster than oneDNN's fallback.
- Activation checkpointing (Chen et al. 2016, arXiv:1604.06174): each block's activations are
  recomputed in backward instead of stored.
- NaN/inf: detected before the optimizer step; stop with a message naming the step (the last good
  checkpoint is kept), or skip the step with ``on_nan="skip"``.
- Exact resume: model, AdamW state, GradScaler, RNG and the step (the data position: batches are a
  function of (seed, step)) are checkpointed; SIGTERM / Ctrl-C finish the current step, save, and exit.
  Resumed runs reproduce the uninterrupted loss curve bit for bit on CPU (tested).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from llmlab.common import LlmlabError, human_count, log, write_text_atomic
from llmlab.dataclass_io import to_dict
from llmlab.formats import checkpoint as ckpt
from llmlab.formats import hf
from llmlab.models.config import ModelConfig
from llmlab.nn.autocast import autocast, cpu_has_native
from llmlab.train import distributed as dist_
from llmlab.train.html_report import write_run_report
from llmlab.train.optim import OPTIMIZERS, SCHEDULES, build_adamw, lr_at
from llmlab.train.optim_in_backward import OptimizerInBackward
from llmlab.train.report import Metrics, plot_curves


@dataclass
class TrainConfig:
    steps: int = field(default=400, metadata={"help": "optimizer steps (the default is ~10 minutes on 2 CPU cores)"})
    batch_size: int = field(default=16, metadata={"help": "global batch: sequences per optimizer step"})
    micro_batch: int = field(default=0, metadata={"help": "sequences per forward pass per process; 0 = batch_size "
                                                          "/ processes (no accumulation)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr"})
    warmup: int = field(default=40, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "decay after warmup", "choices": SCHEDULES})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off"})
    dtype: str = field(default="float32", metadata={"help": "autocast dtype",
                                                    "choices": ("float32", "bfloat16", "float16")})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute block activations in "
                                                                            "backward to save memory"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (with its loss in one graph "
                                                           "where the task can)"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps; 0 = only at the end"})
    eval_batches: int = field(default=8, metadata={"help": "validation batches per evaluation"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept"})
    on_nan: str = field(default="stop", metadata={"help": "on a non-finite loss or gradient: stop or skip the step",
                                                  "choices": ("stop", "skip")})
    seed: int = field(default=1337, metadata={"help": "seed for initialisation and batches"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop (with a checkpoint) after this many minutes; "
                                                              "0 = no limit"})
    log_every: int = field(default=10, metadata={"help": "progress-bar refresh / metrics line every N steps"})
    parallel: str = field(default="ddp", metadata={"help": "under torchrun: ddp or fsdp (full sharding)",
                                                   "choices": dist_.PARALLEL})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw (fp32 moments, 8 bytes of state per parameter) or adamw8bit (blockwise 8-bit moments, "
                "about 2 bytes; train/adamw8bit.py)", "choices": OPTIMIZERS})
    optimizer_in_backward: bool = field(default=False, metadata={
        "help": "update each weight during backward as soon as its gradient is ready and free the gradient, so "
                "the gradients never all exist at once (the same update; needs --grad-clip 0, no gradient "
                "accumulation, one process; train/optim_in_backward.py)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, mps or auto"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> TrainConfig:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch", "warmup", "eval_every", "save_every", "grad_clip", "weight_decay", "max_minutes"):
            if getattr(self, name) < 0:
                raise LlmlabError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LlmlabError(f"--lr must be a positive number, got {self.lr}")
        if self.keep_checkpoints < 1 or self.eval_batches < 1 or self.log_every < 1:
            raise LlmlabError("--keep-checkpoints, --eval-batches and --log-every must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise LlmlabError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer_in_backward:
            self._check_in_backward()
        return self

    def _check_in_backward(self) -> None:
        """Where a step fused into backward would not be the plain step (train/optim_in_backward.py)."""
        why = "each weight is updated as soon as its own gradient is ready"
        if self.grad_clip > 0:
            raise LlmlabError(f"--optimizer-in-backward cannot clip the global gradient norm ({why}, before the "
                              "norm over all of them is known): add --grad-clip 0")
        if self.micro_batch and self.micro_batch < self.batch_size:
            raise LlmlabError(f"--optimizer-in-backward cannot accumulate gradients over micro-batches ({why}): "
                              f"drop --micro-batch {self.micro_batch} or --optimizer-in-backward")
        if self.on_nan == "skip":
            raise LlmlabError(f"--optimizer-in-backward cannot skip a step after a non-finite gradient ({why}, "
                              "so earlier ones are already updated): use --on-nan stop")
        if self.dtype == "float16":
            raise LlmlabError(f"--optimizer-in-backward cannot check float16 loss scaling over all gradients first "
                              f"({why}): use --dtype bfloat16 or float32")


class Task(Protocol):
    """What the loop trains. ``model`` holds every parameter; ``loss`` builds its own batch."""

    model: nn.Module
    model_config: ModelConfig
    name: str

    def loss(self, model: nn.Module, step: int, first_row: int, rows: int, total_rows: int,
             split: str = "train") -> tuple[torch.Tensor, int]:
        """Mean loss over the batch rows [first_row, first_row+rows) of step ``step``, and its token count."""

    def split_state(self, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """Full state -> (the core model's state in our names, extra tensor files)."""

    def join_state(self, core: dict[str, torch.Tensor], extras: dict[str, dict]) -> dict[str, torch.Tensor]:
        """The inverse of ``split_state``."""

    def extra_files(self) -> list[str]:
        """Names of the extra tensor files ``split_state`` writes."""

    def aux_stats(self) -> dict:
        """Extra numbers for the metrics line of the last step (e.g. MoE load balance)."""

    def tokenizer_files(self) -> tuple[str, dict] | None:
        """(tokenizer.json text, tokenizer_config dict) saved with each checkpoint, or None."""


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    train_loss: float | None
    val_loss: float | None
    tokens: int
    seconds: float
    stopped: str  # "done", "interrupted", "time limit"
    checkpoint: Path | None
    resumed_from: int | None = None


def enable_activation_checkpointing_(model: nn.Module) -> int:
    """Wrap the forward of every Transformer block with non-reentrant checkpointing."""
    from torch.utils.checkpoint import checkpoint

    blocks = dist_.transformer_blocks(model)
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.reason: str | None = None
        self._saved = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.reason = "interrupted"

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _check_compatible(folder: Path, task: Task, cfg: TrainConfig) -> None:
    saved_cfg = hf.read_config(folder)
    ours = task.model_config
    fields = ("arch", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_experts")
    diff = [f"{f}: checkpoint {getattr(saved_cfg, f)} vs now {getattr(ours, f)}" for f in fields
            if getattr(saved_cfg, f) != getattr(ours, f)]
    if diff:
        raise LlmlabError(f"cannot resume from {folder}: the model config differs ({'; '.join(diff)}); use the "
                          "same model flags or a new --out folder")


@dataclass
class _Run:
    """One call of ``train``: what it set up, and the counters that the step / evaluate / save functions
    below read and update. Nothing here outlives the call."""

    task: Task
    cfg: TrainConfig
    run_dir: Path
    world: dist_.World
    micro: int  # rows per forward pass on this process
    accum: int  # micro-batches per optimizer step
    wrapped: nn.Module  # the model under DDP / FSDP (or the model itself on one process)
    forward_model: nn.Module  # ``wrapped``, compiled with --compile (unless the task compiled its loss)
    optimizer: torch.optim.Optimizer | OptimizerInBackward
    scaler: torch.amp.GradScaler
    metrics: Metrics
    checkpointed_blocks: int = 0
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds spent by earlier runs this one resumed
    t_start: float = 0.0
    resumed_from: int | None = None
    last_loss: float | None = None
    last_val: float | None = None
    last_ckpt: Path | None = None
    skipped_steps: int = 0
    tokenizer_files: tuple[str, dict] | None = None

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def say(self, message: str) -> None:
        if self.world.is_main:
            print(f"llmlab: {message}", flush=True)


def _setup(task: Task, cfg: TrainConfig, run_dir: Path) -> _Run:
    """Join the process group, split the global batch into micro-batches, wrap the model, build AdamW."""
    from llmlab.common import pick_device

    world = dist_.setup(pick_device(cfg.device))
    device = world.device
    per_rank_rows = cfg.batch_size // world.world_size
    if cfg.batch_size % world.world_size:
        raise LlmlabError(f"--batch-size {cfg.batch_size} is not divisible by {world.world_size} processes")
    micro = cfg.micro_batch or per_rank_rows
    if per_rank_rows % micro:
        raise LlmlabError(f"--micro-batch {micro} must divide the per-process batch {per_rank_rows} "
                          f"(--batch-size {cfg.batch_size} / {world.world_size} processes)")
    if cfg.dtype == "float16" and device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
        raise LlmlabError("float16 training needs torch.amp.GradScaler: use --dtype bfloat16")

    model = task.model.to(device)
    if cfg.dtype != "float32" and device.type == "cpu" and world.is_main \
            and not cpu_has_native(getattr(torch, cfg.dtype)):
        print(f"llmlab: this CPU has no {cfg.dtype} matmul units; {cfg.dtype} autocast is emulated on float32 "
              "units (operands and results rounded to the same precision, see llmlab.nn.autocast)", flush=True)
    checkpointed = enable_activation_checkpointing_(model) if cfg.activation_checkpointing else 0
    wrapped = dist_.wrap(model, world, cfg.parallel)
    if cfg.optimizer == "adamw8bit" and world.distributed and cfg.parallel == "fsdp":
        raise LlmlabError("--optimizer adamw8bit does not take FSDP-sharded parameters yet: use --parallel ddp")
    if cfg.optimizer_in_backward and (world.distributed or per_rank_rows != micro):
        raise LlmlabError("--optimizer-in-backward runs on one process without gradient accumulation (DDP / FSDP "
                          "average each gradient after its update would have used it): drop it under torchrun")
    optimizer = build_adamw(wrapped, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                            eight_bit=cfg.optimizer == "adamw8bit", in_backward=cfg.optimizer_in_backward)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    forward_model = wrapped
    if cfg.compile:  # a task may compile its forward + loss as one graph; otherwise the model alone
        compile_loss = getattr(task, "compile_loss_", None)
        forward_model = wrapped if compile_loss is not None and compile_loss() else torch.compile(wrapped)
    return _Run(task=task, cfg=cfg, run_dir=run_dir, world=world, micro=micro, accum=per_rank_rows // micro,
                wrapped=wrapped, forward_model=forward_model,
                optimizer=optimizer, scaler=scaler, metrics=Metrics(run_dir / "metrics.jsonl", enabled=world.is_main),
                checkpointed_blocks=checkpointed)


def _resume(run: _Run, resume: bool) -> None:
    """Restore model, optimizer, scaler, RNG, step and counters from the newest checkpoint that verifies,
    and cut metrics.jsonl back to that step; without one, start a fresh metrics file."""
    found = None
    if resume:
        found, skipped = ckpt.latest(run.ckpt_root)
        for msg in skipped:
            run.say(msg)
    run.last_ckpt = found
    if found is None:
        run.metrics.reset()
        return
    _check_compatible(found, run.task, run.cfg)
    _, core = ckpt.load_model_state(found)
    extras = {name: ckpt.safetensors.load(found / name) for name in run.task.extra_files()}
    state = ckpt.load_training_state(found)
    dist_.load_full_state(run.wrapped, _optimizers(run), run.task.join_state(core, extras), state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    run.step = run.resumed_from = int(state["step"])
    run.tokens_seen = int(state["tokens"])
    run.elapsed_before = float(state.get("elapsed", 0.0))
    run.metrics.truncate_after(run.step)
    run.say(f"resuming from {found} (step {run.step})")


def _optimizers(run: _Run):
    """What torch.distributed.checkpoint saves and loads: the optimizer, or the per-parameter ones of
    --optimizer-in-backward (keyed by parameter name either way)."""
    return run.optimizer.optimizers if isinstance(run.optimizer, OptimizerInBackward) else run.optimizer


def _train_step(run: _Run, params: list[nn.Parameter]) -> dict:
    """One optimizer step (see the module docstring); returns its metrics record. A non-finite loss or
    gradient stops the run (``on_nan="stop"``) or skips the update (``"skip"``)."""
    cfg, world, optimizer, scaler = run.cfg, run.world, run.optimizer, run.scaler
    in_backward = isinstance(optimizer, OptimizerInBackward)
    step = run.step
    lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, total=cfg.steps, schedule=cfg.schedule,
               min_lr_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss, step_tokens = 0.0, 0
    for m in range(run.accum):
        first_row = (m * world.world_size + world.rank) * run.micro
        # DDP all-reduces gradients on the last micro-batch only.
        sync = m == run.accum - 1 or not hasattr(run.wrapped, "no_sync")
        with (contextlib.nullcontext() if sync else run.wrapped.no_sync()), autocast(run.device, cfg.dtype):
            loss, n_tok = run.task.loss(run.forward_model, step, first_row, run.micro, cfg.batch_size)
            loss = loss / run.accum
        step_loss += float(loss.detach())
        step_tokens += n_tok
        if in_backward and not math.isfinite(step_loss):
            break  # its backward would update the weights: no step at all
        scaler.scale(loss).backward()
    if in_backward:  # the weights were updated during backward (optimizer.step() does nothing)
        gnorm = optimizer.pop_grad_norm()
    else:
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    step_loss = dist_.all_mean(step_loss, world)
    # With fp16 loss scaling an inf gradient is expected now and then: the scaler skips that step itself.
    finite = math.isfinite(step_loss) and (math.isfinite(gnorm) or scaler.is_enabled())
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        if cfg.on_nan == "stop":
            where = f"; the last good checkpoint is {run.last_ckpt}" if run.last_ckpt else ""
            raise LlmlabError(f"non-finite {'loss' if not math.isfinite(step_loss) else 'gradient'} at "
                              f"step {step + 1} (loss {step_loss}, grad norm {gnorm}){where}: lower "
                              "--lr, use --dtype bfloat16, or --on-nan skip"
                              + (" (without --optimizer-in-backward)" if in_backward else ""))
        run.skipped_steps += 1
        if world.is_main:
            log.warning("step %d: non-finite loss or gradient, step skipped", step + 1)
    else:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    run.step = step + 1
    tokens = step_tokens * world.world_size
    run.tokens_seen += tokens
    run.last_loss = step_loss
    record = {"kind": "train", "step": run.step, "loss": step_loss, "lr": lr, "grad_norm": gnorm,
              "tokens": run.tokens_seen, "seconds": round(run.elapsed_before + time.perf_counter() - run.t_start, 3),
              **run.task.aux_stats()}
    if not finite:
        record["skipped"] = True
    run.metrics.log(record)
    return record


def _evaluate(run: _Run) -> float:
    """Mean validation loss over ``eval_batches`` batches (averaged over processes), logged."""
    cfg, world, micro = run.cfg, run.world, run.micro
    run.wrapped.eval()
    losses = []
    with torch.no_grad(), autocast(run.device, cfg.dtype):
        for i in range(cfg.eval_batches):
            loss, _ = run.task.loss(run.forward_model, i, world.rank * micro, micro, micro * world.world_size, "val")
            losses.append(float(loss))
    run.wrapped.train()
    val = dist_.all_mean(sum(losses) / len(losses), world)
    run.metrics.log({"kind": "eval", "step": run.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
    run.last_val = val
    return val


def _save(run: _Run) -> Path | None:
    """Checkpoint the current step (model, optimizer, scaler, RNG, counters); every process takes part
    in gathering the state, rank 0 writes it. Returns the folder (None on other ranks)."""
    msd, osd = dist_.full_state(run.wrapped, _optimizers(run))
    path = None
    if run.world.is_main:
        core, extras = run.task.split_state(msd)
        scaler = run.scaler
        path = ckpt.save(run.ckpt_root, run.step, run.task.model_config, core, extra_tensors=extras,
                         training_state={"optimizer": osd, "scaler": scaler.state_dict() if scaler.is_enabled()
                                         else None, "rng": torch.get_rng_state(), "step": run.step,
                                         "tokens": run.tokens_seen,
                                         "elapsed": run.elapsed_before + time.perf_counter() - run.t_start},
                         trainer_state={"tokens": run.tokens_seen, "train_loss": run.last_loss,
                                        "val_loss": run.last_val},
                         tokenizer=run.tokenizer_files,
                         keep=run.cfg.keep_checkpoints)
    dist_.barrier(run.world)
    run.last_ckpt = path or run.last_ckpt
    return path


def train(task: Task, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = True) -> TrainResult:
    """Train ``task`` for ``cfg.steps`` optimizer steps (from the newest checkpoint under ``run_dir`` when
    ``resume``), evaluating and checkpointing on schedule; Ctrl-C / SIGTERM / --max-minutes stop after a step
    with a checkpoint."""
    from tqdm import tqdm

    cfg.validate()
    run_dir = Path(run_dir)
    run = _setup(task, cfg, run_dir)
    world = run.world
    _resume(run, resume)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "train_config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    # what this (re)start actually set up, so a run folder shows it (and tests can check it)
    run.metrics.log({"kind": "setup", "step": run.step, **dist_.describe(run.wrapped), "micro_batch": run.micro,
                     "accum": run.accum, "checkpointed_blocks": run.checkpointed_blocks})

    params = [p for p in run.wrapped.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in task.model.parameters())
    stopped = "done"
    run.t_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=run.step, desc=task.name, unit="step",
               disable=not (cfg.progress and world.is_main), dynamic_ncols=True)
    window_tokens, window_t0 = 0, time.perf_counter()  # tokens/s over the last log_every steps
    run.tokenizer_files = task.tokenizer_files() if world.is_main else None
    run.wrapped.train()
    with _StopFlag() as stop:
        try:
            while run.step < cfg.steps:
                tokens_before = run.tokens_seen
                record = _train_step(run, params)
                step = run.step
                window_tokens += run.tokens_seen - tokens_before
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    tps = window_tokens / max(1e-9, now - window_t0)
                    window_tokens, window_t0 = 0, now
                    bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} {human_count(tps)} tok/s"
                                        + (f" val {run.last_val:.3f}" if run.last_val is not None else ""),
                                        refresh=False)
                bar.update(1)
                elapsed = time.perf_counter() - run.t_start
                over_time = cfg.max_minutes > 0 and run.elapsed_before + elapsed >= cfg.max_minutes * 60
                stop_now = stop.reason is not None
                if world.distributed:  # every process stops at the same step
                    stop_now = dist_.all_mean(float(stop_now or over_time), world) > 0
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    _evaluate(run)
                if stop_now or over_time:
                    stopped = "interrupted" if stop.reason else "time limit"
                    break
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    _save(run)
        finally:
            bar.close()
            if isinstance(run.optimizer, OptimizerInBackward):
                run.optimizer.remove_hooks()  # the model outlives the run (evaluation, saving, a later run)
    if stopped == "done" or stopped == "time limit":
        _evaluate(run)
    _save(run)
    if world.is_main:
        plot_curves(run.metrics.read(), run_dir / "loss.png", title=f"{task.name}: {human_count(n_params)} parameters")
        write_run_report(run_dir)
    result = TrainResult(step=run.step, run_dir=run_dir, train_loss=run.last_loss, val_loss=run.last_val,
                         tokens=run.tokens_seen, seconds=run.elapsed_before + time.perf_counter() - run.t_start,
                         stopped=stopped, checkpoint=run.last_ckpt, resumed_from=run.resumed_from)
    if run.skipped_steps and world.is_main:
        print(f"llmlab: {run.skipped_steps} step(s) skipped for non-finite values", flush=True)
    return result
