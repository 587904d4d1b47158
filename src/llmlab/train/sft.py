"""Supervised fine-tuning (SFT) of a chat model on conversations or a built-in verifiable task, with one of
eight methods, each a ``Task`` handed to the one training loop (docs/architecture.md, "One training loop").

Instruction tuning on demonstrations: Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155), Wei et al. 2022
(FLAN, arXiv:2109.01652), Taori et al. 2023 (Alpaca). A method is a model transform (which modules are
wrapped or added) plus which parameters train; the loss is the same for all of them (``sft_loss``):

==========  =====================================================================  ============================
method      transform                                                              trains
==========  =====================================================================  ============================
full        none                                                                   every parameter
lora        ``nn/lora.py``: a rank-r update beside each targeted linear layer      A, B (Hu et al. 2021)
            (Hu et al. 2021, arXiv:2106.09685)
qlora       the linear layers' frozen base stored 4-bit (``nn/qlora.py``: NF4 with  A, B
            double quantization, or the GGUF's own Q4_1/Q8_0 blocks, ``--qlora-base
            packed``), LoRA on top (Dettmers et al. 2023, arXiv:2305.14314)
adapter     ``nn/bottleneck.py``: a bottleneck MLP after each attention and MLP     adapters (+ norms)
            sublayer (Houlsby et al. 2019, arXiv:1902.00751)
prefix      ``nn/prompt_tuning.py``: learned keys/values prepended in every layer   the prefix
            (Li & Liang 2021, arXiv:2101.00190)
prompt      ``nn/prompt_tuning.py``: learned input embeddings prepended             the virtual tokens
            (Lester et al. 2021, arXiv:2104.08691)
qat         ``nn/fake_quant.py``: each linear layer of the blocks computes with    those weights (+ norms)
            its weight rounded onto a b-bit grid, straight-through gradients
            (Jacob et al. 2018, arXiv:1712.05877; LLM-QAT, Liu et al. 2023,
            arXiv:2305.17888)
peqa        the blocks' linear layers quantized once (round-to-nearest), integer   the scales
            codes frozen (``QuantLinear.train_scales_``; PEQA, Kim et al. 2023,
            arXiv:2305.14152)
==========  =====================================================================  ============================

Quantized methods: QAT as in ``nn/fake_quant.py`` (Jacob et al., "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference"; Liu et al., "LLM-QAT: Data-Free Quantization Aware Training
for Large Language Models"); PEQA (Kim et al., "Memory-Efficient Fine-Tuning of Compressed Large Language Models
via sub-4-bit Integer Quantization", 2023): W = s * (q - z) with q and z frozen, s trained. The grid is
``--quant-bits`` (4), ``--quant-group-size`` (0: one scale per output channel, both papers' choice) and
``--quant-symmetric`` (default off: min/max with zero points, PEQA's grid and round-to-nearest's, so RTN, PEQA
and QAT start from the very same quantized model; LLM-QAT's symmetric MinMax is ``--quant-symmetric``). Targets
are ``compress.spec.target_linears`` (every linear layer inside the blocks; the embedding and head stay float,
as every method of ``llmlab quantize`` leaves them). QAT trains the float weights behind the fake-quantized ones
and the norms (vectors, kept float in the result); the embedding (and tied head) stays frozen: it is not
quantized, so training it would be full fine-tuning, not QAT. ``--qat-act-bits 8`` also fake-quantizes each
token's activations (LLM-QAT's W4A8). ``--qat-data self`` is LLM-QAT's data-free variant on this run's prompts:
the training replies are the float model's own (``self_generated_data``), so QAT learns to imitate the
unquantized model rather than the references. Both methods round the frozen float matrices (the embedding) to
float16 before training, as the quantized folder stores them, so what trains, what is scored and what
``llmlab.load(RUN)`` gives are the same model. The summary also scores the quantized model before training
(``accuracy_quantized``: the RTN baseline).

``llmlab sft`` with no flags fine-tunes SmolLM2-135M-Instruct with LoRA on the built-in ``addition`` task,
scoring held-out exact match before and after (``data/tasks.py``) into ``summary.md`` and ``accuracy.png``.

The run folder (``--out``, default ``runs/sft``): ``sft_config.json`` (this run's settings, base model
source included), ``adapter/`` (a PEFT adapter folder: lora, qlora, adapter, prefix, prompt) or ``model/`` (a
Hugging Face folder: full; a quantized folder, ``formats/quantized.py``: qat, peqa), ``checkpoints/`` (exact
resume: only the trainable tensors and their optimizer state are saved for every method but full; the frozen
rest is rebuilt from the base), ``metrics.jsonl``, ``loss.png``, ``summary.md``, ``accuracy.png``
(``qat_self_data.jsonl``: the generated replies of ``--qat-data self``, reused on resume).
``llmlab.load(RUN)`` / ``llmlab chat --model RUN`` use the result; ``llmlab merge RUN`` folds LoRA in.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError, human_count, save_png, seed_everything, write_text_atomic
from llmlab.data.sft import IGNORE, SFTBatch, SFTData, SFTDataConfig, TokenizedExample, build_sft_data
from llmlab.data.tasks import get_task
from llmlab.dataclass_io import to_dict
from llmlab.formats.load import Loaded, chat_template_of, load_model
from llmlab.formats.peft import base_fingerprint
from llmlab.infer.generate import chat_stop_ids, generate
from llmlab.infer.sample import SamplingParams
from llmlab.train.loop import TrainConfig, TrainResult, train
from llmlab.train.report import write_summary

METHODS = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "qat", "peqa")
QUANTIZED = ("qat", "peqa")  # methods whose result is a quantized model folder
# Peak learning rates that work for each method on small chat models (the usual values of the papers'
# recipes and of peft's examples: few trainable parameters take a larger step). QAT's and PEQA's come from
# 10-step probes on SmolLM2-135M-Instruct's addition task, 4-bit per channel (train loss from 4.15 on the RTN
# model): PEQA 1e-3 reached 1.67 (1e-4: 2.03); QAT 3e-4 reached 1.68 after a spike in warmup (2.6 -> 4.3),
# 5e-5 (full fine-tuning's) 1.84, so QAT takes 1e-4 between them.
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "adapter": 1e-3, "prefix": 1e-2, "prompt": 3e-2,
              "qat": 1e-4, "peqa": 1e-3}
ADAPTER_WEIGHTS = "adapter.safetensors"  # the trainable tensors inside a checkpoint (every method but full)
SELF_GREEDY_TOKENS = 3  # LLM-QAT's generation: the first 3-5 tokens greedy, the rest sampled


@dataclass
class SFTConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "base model: an embedded name, a GGUF file or a Hugging Face folder"})
    method: str = field(default="lora", metadata={
        "help": "full: every weight; lora: low-rank updates; qlora: LoRA on a 4-bit frozen base; adapter: "
                "Houlsby bottleneck adapters; prefix: per-layer learned keys/values; prompt: learned input "
                "embeddings; qat: quantization-aware training, saved as a --quant-bits model; peqa: the model "
                "quantized, only its scales train",
                                                  "choices": METHODS})
    out: str = field(default="runs/sft", metadata={"help": "run folder (resumes when it has checkpoints)"})
    eval_examples: int = field(default=50, metadata={
        "help": "held-out task examples scored (exact match) before and after training; 0 = skip"})
    eval_tokens: int = field(default=16, metadata={"help": "new tokens generated per scored answer"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default="all-linear", metadata={
        "help": "modules LoRA wraps: all-linear, comma-separated names (q_proj,v_proj) or a regex"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    qlora_base: str = field(default="nf4", metadata={
        "help": "qlora: the frozen base as NF4 (double-quantized) or the GGUF's own packed blocks",
        "choices": ("nf4", "packed")})
    adapter_dim: int = field(default=64, metadata={"help": "adapter: bottleneck width"})
    virtual_tokens: int = field(default=20, metadata={"help": "prefix / prompt: learned virtual tokens"})
    init_text: str = field(default="Answer with the final answer only, exactly as asked.", metadata={
        "help": "prefix / prompt: the words the virtual tokens start from (cut or repeated to --virtual-tokens)"})
    quant_bits: int = field(default=4, metadata={"help": "qat / peqa: weight bits (2..8)"})
    quant_group_size: int = field(default=0, metadata={
        "help": "qat / peqa: input columns per scale; 0 = one scale per output channel, -1 = per tensor; a group "
                "must divide every layer's width (SmolLM2: 32, 64 or 192)"})
    quant_symmetric: bool = field(default=False, metadata={
        "help": "qat / peqa: symmetric grid without zero points (LLM-QAT's) instead of min/max with zero points "
                "(PEQA's, and round-to-nearest's)"})
    qat_act_bits: int = field(default=0, metadata={
        "help": "qat: also fake-quantize each token's activations to this many bits (8: LLM-QAT's W4A8); "
                "0 = weights only"})
    qat_data: str = field(default="task", metadata={
        "help": "qat: train on the data's replies (task), or on the model's own replies to its prompts (self: "
                "LLM-QAT's data-free distillation)", "choices": ("task", "self")})
    qat_self_examples: int = field(default=128, metadata={
        "help": "qat --qat-data self: prompts answered by the model (the first of the training examples)"})
    qat_self_tokens: int = field(default=48, metadata={"help": "qat --qat-data self: new tokens per reply, at most"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in --out"})

    def validate(self) -> SFTConfig:
        if self.method not in METHODS:
            raise LlmlabError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        if not 2 <= self.quant_bits <= 8:
            raise LlmlabError(f"--quant-bits must be 2..8, got {self.quant_bits}")
        if self.quant_group_size < -1:
            raise LlmlabError(f"--quant-group-size {self.quant_group_size}: use a positive group, 0 (per channel) "
                              "or -1 (per tensor)")
        if self.qat_act_bits and not 2 <= self.qat_act_bits <= 8:
            raise LlmlabError(f"--qat-act-bits must be 0 (off) or 2..8, got {self.qat_act_bits}")
        if self.qat_data not in ("task", "self"):
            raise LlmlabError(f"--qat-data {self.qat_data!r}: use task or self")
        if self.qat_self_examples < 1 or self.qat_self_tokens < 1:
            raise LlmlabError("--qat-self-examples and --qat-self-tokens must be >= 1")
        if self.lora_r <= 0:
            raise LlmlabError(f"--lora-r must be a positive integer, got {self.lora_r}")
        if self.adapter_dim <= 0 or self.virtual_tokens <= 0:
            raise LlmlabError("--adapter-dim and --virtual-tokens must be >= 1")
        if self.eval_examples < 0 or self.eval_tokens < 1:
            raise LlmlabError("--eval-examples must be >= 0 and --eval-tokens >= 1")
        return self


@dataclass
class SFTTrainConfig(TrainConfig):
    """The training loop's flags with fine-tuning defaults (about 7 minutes on 2 CPU cores for LoRA)."""

    steps: int = field(default=55, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "global batch: rows (of packed examples) per step"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate; 0 = the method's default "
                                                     f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})"})
    warmup: int = field(default=6, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    eval_every: int = field(default=20, metadata={"help": "validation loss every N steps; 0 = only at the end"})
    eval_batches: int = field(default=2, metadata={"help": "validation batches per evaluation"})
    save_every: int = field(default=20, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only"})
    log_every: int = field(default=5, metadata={"help": "progress-bar refresh / metrics line every N steps"})

    def validate(self) -> SFTTrainConfig:
        if self.lr == 0.0:
            self.lr = 1e-3  # replaced by the method's default in run_sft / run_dpo; here only to pass the check
        return super().validate()


def output_head(model: nn.Module) -> nn.Module:
    """The model's ``lm_head`` (through DDP / FSDP / compile wrappers)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return inner.lm_head


def sft_loss(model: nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the assistant tokens of ``batch``, and their count.

    The output head runs only on the positions that have a target: in chat data most positions are
    prompt (system, user, template tokens), and the head is the widest matmul of a small model
    (SmolLM2-135M: 576 x 49152), so this skips most of its forward and backward work and the
    (B, T, vocab) logits tensor. Columns after the last target of every row are cut off first: attention
    is causal (within each packed example too), so no target depends on them (trailing padding, the end of
    a row's last example)."""
    device = next(model.parameters()).device
    b = batch.to(device)
    has_target = (b.labels != IGNORE).any(0)  # (T,)
    keep = int(has_target.nonzero().max()) + 1 if bool(has_target.any()) else 1
    if keep < b.input_ids.shape[1]:
        b = SFTBatch(*(t[:, :keep] for t in (b.input_ids, b.labels, b.position_ids, b.doc_ids)))  # (B, keep)
    one_doc = bool((b.doc_ids == 0).all())  # one example per row, no padding: plain causal attention
    mask = None if one_doc else b.attention_mask()  # (B, T, T)
    hidden = model(b.input_ids, attention_mask=mask, position_ids=b.position_ids, return_hidden=True)  # (B, T, D)
    sel = b.labels != IGNORE  # (B, T)
    n = int(sel.sum())
    if n == 0:  # a batch with nothing to learn (every reply truncated away): zero loss, graph intact
        return hidden.sum() * 0.0, 0
    logits = output_head(model)(hidden[sel])  # (N, V)
    return F.cross_entropy(logits.float(), b.labels[sel]), n


# ---- methods: transform the model, say what trains ---------------------------------------------------


def weight_count(model: nn.Module, tied_head: bool = False) -> int:
    """Parameters, counting a quantized layer's weight (held in buffers: NF4, packed GGML blocks) as the
    in x out numbers it stands for; a packed copy of a tied ``lm_head`` is the embedding, counted once."""
    n = sum(p.numel() for p in model.parameters())
    for name, m in model.named_modules():
        if tied_head and name.split(".")[-1] == "lm_head":
            continue
        if not any(True for _ in m.parameters(recurse=False)) and hasattr(m, "in_features") \
                and any(True for _ in m.buffers(recurse=False)):
            n += m.in_features * m.out_features
    return n


def apply_method(model: nn.Module, cfg: SFTConfig, tokenizer=None) -> nn.Module:
    """Apply ``cfg.method``'s transform; returns the model to train (a wrapper for prefix / prompt) with
    ``requires_grad`` set on exactly the trainable parameters. Prefix and prompt start from the words of
    ``cfg.init_text`` (their keys/values, or their embeddings), not from noise."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    if cfg.method in QUANTIZED:
        quantize_for_training_(model, cfg)
        return model
    if cfg.method in ("lora", "qlora"):
        from llmlab.nn.lora import apply_lora_, mark_only_lora_trainable_

        if cfg.method == "qlora":
            from llmlab.nn.qlora import prepare_qlora_

            prepare_qlora_(model, base=cfg.qlora_base)
        apply_lora_(model, lora_config(cfg))
        mark_only_lora_trainable_(model)
        return model
    if cfg.method == "adapter":
        from llmlab.nn.bottleneck import BottleneckConfig, apply_bottleneck_, mark_only_bottleneck_trainable_

        apply_bottleneck_(model, BottleneckConfig(dim=cfg.adapter_dim))
        mark_only_bottleneck_trainable_(model)
        return model
    from llmlab.nn import prompt_tuning as pt

    if cfg.method == "prefix":
        wrapped = pt.apply_prefix_tuning(model, pt.PrefixTuningConfig(
            num_virtual_tokens=cfg.virtual_tokens, init="text", init_text=cfg.init_text), tokenizer=tokenizer)
    else:
        wrapped = pt.apply_prompt_tuning(model, pt.PromptTuningConfig(
            num_virtual_tokens=cfg.virtual_tokens, init="text", init_text=cfg.init_text), tokenizer=tokenizer)
    pt.mark_only_prompt_trainable_(wrapped)
    return wrapped


def check_quant_groups(model: nn.Module, cfg: SFTConfig) -> None:
    """--quant-group-size must divide the width of every layer it quantizes."""
    from llmlab.compress.spec import target_linears

    g = cfg.quant_group_size
    for name, layer in target_linears(model):
        if g > 0 and layer.in_features % g:
            raise LlmlabError(f"--quant-group-size {g} does not divide {name}'s {layer.in_features} input features: "
                              "use a divisor of every layer's width, 0 (per channel) or -1 (per tensor)")


def quantize_for_training_(model: nn.Module, cfg: SFTConfig) -> None:
    """qat: every target linear becomes a ``FakeQuantLinear`` (its float weight and bias train, and so do the
    norms: every other vector parameter); peqa: every target linear is quantized by round-to-nearest
    (``quantize_rtn_layer``) and only its scales train. Either way the frozen float matrices (embedding,
    untied head) are rounded to float16 first, as the quantized folder stores them (module docstring)."""
    from llmlab.compress.quantize import quantize_rtn_layer
    from llmlab.compress.spec import replace_module_, target_linears
    from llmlab.nn.fake_quant import FakeQuantLinear

    check_quant_groups(model, cfg)
    model.requires_grad_(False)
    grid = {"bits": cfg.quant_bits, "group_size": cfg.quant_group_size, "symmetric": cfg.quant_symmetric}
    for name, layer in target_linears(model):
        if cfg.method == "qat":
            new = FakeQuantLinear.from_linear(layer, **grid, act_bits=cfg.qat_act_bits)  # trainable
        else:
            new = quantize_rtn_layer(layer.weight.detach(), cfg.quant_bits, cfg.quant_group_size, cfg.quant_symmetric,
                                     layer.bias).train_scales_()  # only the scales are parameters that train
        replace_module_(model, name, new)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and cfg.method == "qat":
                p.requires_grad_(True)  # norms (and biases)
            elif not p.requires_grad and p.ndim >= 2 and p.is_floating_point():
                p.copy_(p.half().float())  # the embedding, as the folder will hold it


def finish_quantized_(model: nn.Module, cfg: SFTConfig) -> dict:
    """After qat / peqa training: each ``FakeQuantLinear`` becomes the ``QuantLinear`` with the codes and scales
    its forward pass used, PEQA's scales become float16 buffers again (packable); returns the folder's
    ``quantization_config``. ``model`` is then exactly the model the quantized folder holds."""
    from llmlab.compress.spec import QuantSpec, replace_module_
    from llmlab.nn.fake_quant import FakeQuantLinear
    from llmlab.nn.quant_linear import QuantLinear

    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            replace_module_(model, name, m.to_quant_linear())
        elif isinstance(m, QuantLinear):
            m.freeze_scales_(torch.float16)
        else:
            continue
        names.append(name)
    act = {"act": "token", "act_bits": cfg.qat_act_bits} if cfg.method == "qat" and cfg.qat_act_bits else {}
    return QuantSpec(cfg.method, cfg.quant_bits, cfg.quant_group_size, cfg.quant_symmetric, modules=names,
                     **act).to_json()


def lora_config(cfg: SFTConfig):
    from llmlab.nn.lora import LoRAConfig

    targets: list[str] | str = cfg.lora_targets  # "all-linear" and regexes stay strings
    names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    if names and all(n.replace(".", "_").isidentifier() for n in names):  # q_proj,v_proj or layers.0.mlp.up_proj
        targets = names
    return LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                      use_rslora=cfg.rslora).validate()


def save_result(model: nn.Module, cfg: SFTConfig, loaded: Loaded, run_dir: Path, fingerprint: str | None) -> Path:
    """The fine-tuned result in the run folder: ``adapter/`` (PEFT folder, with the base's fingerprint,
    ``formats/peft.py``) or ``model/`` (full FT: a float folder; qat, peqa: a quantized folder, ``model``
    turned into its ``QuantLinear`` form first by ``finish_quantized_``)."""
    if cfg.method == "full" or cfg.method in QUANTIZED:  # the same atomic HF-folder writer as llmlab convert / merge
        import dataclasses

        from llmlab.formats.convert import write_loaded

        folder = run_dir / "model"
        if cfg.method == "full":
            write_loaded(dataclasses.replace(loaded, model=model), folder)
        else:  # float tensors in float16, as llmlab quantize writes them
            write_loaded(dataclasses.replace(loaded, model=model), folder, quant_spec=finish_quantized_(model, cfg),
                         dtype="float16")
        return folder
    folder = run_dir / "adapter"
    if cfg.method in ("lora", "qlora"):
        from llmlab.formats.peft import save_adapter

        return save_adapter(folder, model, lora_config(cfg), loaded.config, base_model=cfg.model,
                            base_fingerprint=fingerprint)
    from llmlab.formats.peft_prompt import save_prompt_adapter

    return save_prompt_adapter(folder, model, loaded.config, cfg.model, base_fingerprint=fingerprint)


# ---- the Task -----------------------------------------------------------------------------------------


class SFTTask:
    """SFT rows -> ``sft_loss``. Checkpoints of the adapter methods hold only the trainable tensors (the
    frozen base is the model file); a full fine-tune checkpoints the whole model."""

    name = "sft"

    def __init__(self, model: nn.Module, loaded: Loaded, data: SFTData, seed: int, method: str,
                 tokenizer_files: tuple[str, dict] | None):
        self.model, self.model_config, self.data, self.seed = model, loaded.config, data, seed
        self.method = method
        self._tokenizer_files = tokenizer_files
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise LlmlabError(f"--method {method}: nothing to train (no parameter requires a gradient)")

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        batch = self.data.batch(step, rows, seed=self.seed, split=split, first_row=first_row, total_rows=total_rows)
        loss, _ = sft_loss(model, batch)
        return loss, int((batch.doc_ids >= 0).sum())  # tokens processed (padding excluded), for tokens/s

    def split_state(self, sd):
        if self.method == "full":
            tied = self.model_config.tie_embeddings
            return {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}, {}
        return {}, {ADAPTER_WEIGHTS: {k: v for k, v in sd.items() if k in self.trainable}}

    def join_state(self, core, extras):
        if self.method == "full":
            core = dict(core)
            if self.model_config.tie_embeddings:
                core["lm_head.weight"] = core["embed_tokens.weight"]
            return core
        return {**self.model.state_dict(), **extras[ADAPTER_WEIGHTS]}

    def extra_files(self):
        return [] if self.method == "full" else [ADAPTER_WEIGHTS]

    def aux_stats(self) -> dict:
        return {}

    def tokenizer_files(self):
        return self._tokenizer_files


# ---- held-out exact match -------------------------------------------------------------------------------


@torch.no_grad()
def exact_match(model: nn.Module, loaded: Loaded, task_name: str, n: int, seed: int, max_new_tokens: int,
                batch_size: int = 16) -> tuple[float, list[dict]]:
    """Greedy answers to ``n`` held-out questions of a built-in task, scored by the task; (accuracy, rows)."""
    task = get_task(task_name)
    examples = task.examples("heldout", n, seed=seed)
    template, tok = chat_template_of(loaded), loaded.tokenizer
    stops = chat_stop_ids(loaded.config, tok)
    was_training = model.training
    model.eval()
    rows = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [tok.encode(template.render([{"role": "user", "content": e.prompt}], add_generation_prompt=True))
                   for e in chunk]
        done = generate(model, prompts, max_new_tokens, SamplingParams(), stop_ids=stops)
        for e, c in zip(chunk, done):
            reply = tok.decode([t for t in c.ids if t not in stops], skip_special=True)
            rows.append({"prompt": e.prompt, "answer": e.answer, "reply": reply,
                         "correct": task.score(reply, e.answer)})
    model.train(was_training)
    return (sum(r["correct"] for r in rows) / len(rows) if rows else 0.0), rows


# ---- qat --qat-data self: the model's own replies ------------------------------------------------------


@torch.no_grad()
def self_replies(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stops: set[int],
                 batch_size: int = 16) -> list[list[int]]:
    """LLM-QAT's generation (Liu et al. 2023, section 2.1): the first ``SELF_GREEDY_TOKENS`` new tokens greedy,
    the rest sampled from the full distribution (temperature 1), so the replies are likely at the start and
    still diverse. Uses (and advances) the global torch RNG; ids include the stop token when one came."""
    was_training = model.training
    model.eval()
    replies = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        head = generate(model, chunk, min(SELF_GREEDY_TOKENS, max_new_tokens), SamplingParams(), stop_ids=stops)
        out = [c.ids for c in head]
        going = [j for j, c in enumerate(head) if c.finish_reason == "length"]
        if going and max_new_tokens > SELF_GREEDY_TOKENS:
            tail = generate(model, [chunk[j] + out[j] for j in going], max_new_tokens - SELF_GREEDY_TOKENS,
                            SamplingParams(temperature=1.0), stop_ids=stops)
            for j, c in zip(going, tail):
                out[j] = out[j] + c.ids
        replies += out
    model.train(was_training)
    return replies


def self_generated_data(model: nn.Module, loaded: Loaded, data: SFTData, cfg: SFTConfig, seed: int, path: Path,
                        reuse: bool) -> SFTData:
    """LLM-QAT's data-free QAT on this run's prompts: the first ``cfg.qat_self_examples`` training examples keep
    their prompt (up to the first assistant token) and get the float model's own reply (``self_replies``) as
    the target. The paper distills the teacher's logits on such text; here the sampled tokens are the labels
    (sequence-level distillation, Kim & Rush 2016, arXiv:1606.07947), so every method keeps one loss. The
    validation examples keep their references. The replies go to ``path`` (JSONL: the settings, then one
    line per prompt) and are read back from there when ``reuse`` and the settings match (a resumed run trains
    on the same data, even on another machine)."""
    settings = {"model": cfg.model, "examples": cfg.qat_self_examples, "tokens": cfg.qat_self_tokens, "seed": seed,
                "greedy_tokens": SELF_GREEDY_TOKENS}
    lines = path.read_text().splitlines() if reuse and path.exists() else []
    if lines and json.loads(lines[0]) == {"settings": settings}:
        rows = [json.loads(line) for line in lines[1:]]
    else:
        chosen = data.examples["train"][:cfg.qat_self_examples]
        prompts = [ex.ids[:ex.mask.index(True)] for ex in chosen]  # the masks mark the assistant tokens
        with torch.random.fork_rng(devices=[]):  # the sampling draws leave the run's RNG stream alone
            torch.manual_seed(seed)
            replies = self_replies(model, prompts, cfg.qat_self_tokens, chat_stop_ids(loaded.config, loaded.tokenizer))
        rows = [{"where": ex.where, "prompt": p, "reply": r} for ex, p, r in zip(chosen, prompts, replies)]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in [{"settings": settings}, *rows]))
    train = []
    for r in rows:
        ids = (r["prompt"] + r["reply"])[:data.seq_len]
        mask = ([False] * len(r["prompt"]) + [True] * len(r["reply"]))[:data.seq_len]
        if any(mask[1:]):
            train.append(TokenizedExample(ids, mask, f"{r['where']} (self)"))
    if not train:
        raise LlmlabError(f"--qat-data self: no reply left to train on ({len(rows)} prompts): raise --seq-len "
                          "or --qat-self-tokens")
    return SFTData(train, data.examples["val"], data.seq_len, data.packing, data.pad_id, data.stats)


def plot_accuracy(path: Path, task: str, method: str, before: float, after: float,
                  quantized: float | None = None) -> None:
    """Before / after bar chart (PNG); qat / peqa: the quantized model before training between them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    labels, values, colors = ["before", f"after ({method})"], [before, after], ["tab:gray", "tab:blue"]
    if quantized is not None:
        labels.insert(1, "quantized\n(RTN)")
        values.insert(1, quantized)
        colors.insert(1, "tab:orange")
    fig, ax = plt.subplots(figsize=(4.5 + 1.2 * (quantized is not None), 3.5))
    bars = ax.bar(labels, [100 * v for v in values], color=colors)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, 100 * v + 1, f"{100 * v:.0f}%", ha="center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"{task}: {method} fine-tuning")
    fig.tight_layout()
    save_png(fig, path)


# ---- the command ----------------------------------------------------------------------------------------


def run_sft(cfg: SFTConfig, data_cfg: SFTDataConfig, tcfg: SFTTrainConfig) -> dict:
    """Load the base, score it, apply the method, train, save the result, score again, write the summary.
    Returns the summary dict (also written as ``summary.json``)."""
    cfg.validate()
    lr_given = tcfg.lr != 0.0
    tcfg.validate()
    if not lr_given:
        tcfg.lr = DEFAULT_LR[cfg.method]
    if cfg.method in ("prefix", "prompt") and data_cfg.packing:
        data_cfg.packing = False  # the learned prefix belongs to one example: one example per row
    if not data_cfg.paths and not data_cfg.task:
        data_cfg.task = "addition"
    data_cfg.seq_len, data_cfg.seed = tcfg.seq_len, tcfg.seed
    run_dir = Path(cfg.out)
    seed_everything(tcfg.seed)
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, packed=cfg.method == "qlora" and cfg.qlora_base == "packed")
    if not loaded.config.is_causal or loaded.tokenizer is None:
        raise LlmlabError(f"{cfg.model}: SFT needs a causal language model with a tokenizer")
    if cfg.method in QUANTIZED:
        check_quant_groups(loaded.model, cfg)  # before any slow step
    template = chat_template_of(loaded)
    data = build_sft_data(data_cfg, loaded.tokenizer, template)
    print(f"llmlab: {data.stats.summary()}; {len(data.rows['train'])} train rows of {tcfg.seq_len} tokens "
          f"({100 * data.fill():.0f}% filled)", flush=True)
    if cfg.method == "qat" and cfg.qat_data == "self":
        run_dir.mkdir(parents=True, exist_ok=True)
        data = self_generated_data(loaded.model, loaded, data, cfg, tcfg.seed, run_dir / "qat_self_data.jsonl",
                                   reuse=cfg.resume)
        print(f"llmlab: --qat-data self: training on the model's own replies to {len(data.examples['train'])} "
              f"prompts ({len(data.rows['train'])} rows, {run_dir / 'qat_self_data.jsonl'})", flush=True)
    scored = data_cfg.task if (data_cfg.task and cfg.eval_examples) else None
    before = None
    if scored:
        before, _ = exact_match(loaded.model, loaded, scored, cfg.eval_examples, tcfg.seed, cfg.eval_tokens)
        print(f"llmlab: held-out exact match before: {100 * before:.1f}% ({cfg.eval_examples} {scored} questions)",
              flush=True)
    n_base = weight_count(loaded.model, tied_head=loaded.config.tie_embeddings)
    fingerprint = base_fingerprint(loaded.model, loaded.config, loaded.tokenizer)
    model = apply_method(loaded.model, cfg, loaded.tokenizer)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = n_base if cfg.method in ("full", "qat") else n_base + n_train  # qat trains the base's own weights
    quantized = None  # qat / peqa: the quantized model before training (QAT starts on the RTN grid too)
    if scored and cfg.method in QUANTIZED:
        quantized, _ = exact_match(model, loaded, scored, cfg.eval_examples, tcfg.seed, cfg.eval_tokens)
        print(f"llmlab: held-out exact match quantized, before training (round-to-nearest): {100 * quantized:.1f}%",
              flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "sft_config.json", json.dumps(
        {**to_dict(cfg), "data": to_dict(data_cfg), "train": to_dict(tcfg)}, indent=2) + "\n")
    tok = loaded.tokenizer
    tok_files = (tok.to_hf_json(), {"chat_template": loaded.chat_template}) if hasattr(tok, "to_hf_json") else None
    task = SFTTask(model, loaded, data, tcfg.seed, cfg.method, tok_files if cfg.method == "full" else None)
    print(f"llmlab: {cfg.method}: {human_count(n_train)} of {human_count(n_total)} parameters train "
          f"({100 * n_train / n_total:.2f}%) -> {run_dir}", flush=True)
    result: TrainResult = train(task, tcfg, run_dir, resume=cfg.resume)
    saved = save_result(model, cfg, loaded, run_dir, fingerprint) if result.stopped != "interrupted" else None
    after, rows = (None, [])
    if scored and result.stopped != "interrupted":
        after, rows = exact_match(model, loaded, scored, cfg.eval_examples, tcfg.seed, cfg.eval_tokens)
        print(f"llmlab: held-out exact match after: {100 * after:.1f}%", flush=True)
    import resource

    summary = {"method": cfg.method, "model": cfg.model, "task": scored, "steps": result.step,
               "stopped": result.stopped, "trainable_params": n_train, "total_params": n_total,
               "accuracy_before": before, "accuracy_quantized": quantized, "accuracy_after": after,
               "train_loss": result.train_loss, "val_loss": result.val_loss, "train_seconds": result.seconds,
               "total_seconds": time.perf_counter() - t0, "tokens": result.tokens,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "saved": str(saved) if saved else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if rows:
        write_text_atomic(run_dir / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if before is not None and after is not None:
        plot_accuracy(run_dir / "accuracy.png", scored, cfg.method, before, after, quantized)
    _write_summary_md(run_dir, summary, tcfg)
    return summary


def _write_summary_md(run_dir: Path, s: dict, tcfg: SFTTrainConfig) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [f"# SFT: {s['method']} on {s['model']}", "",
             f"- steps: {s['steps']} ({s['stopped']}), batch {tcfg.batch_size} x {tcfg.seq_len} tokens, "
             f"lr {tcfg.lr:g}, {s['tokens']:,} tokens, {s['train_seconds'] / 60:.1f} min training, "
             f"{s['total_seconds'] / 60:.1f} min in all",
             f"- trainable parameters: {s['trainable_params']:,} of {s['total_params']:,} "
             f"({100 * s['trainable_params'] / s['total_params']:.2f}%)",
             f"- peak RSS: {s['peak_rss_mb']:.0f} MB",
             f"- final train loss: {s['train_loss']:.4f}" if s["train_loss"] is not None else "",
             f"- final validation loss: {s['val_loss']:.4f}" if s["val_loss"] is not None else "",
             f"- saved: {s['saved']}", ""]
    if s["task"]:
        gain = (s["accuracy_after"] - s["accuracy_before"]) if s["accuracy_after"] is not None else None
        q = s["accuracy_quantized"] is not None  # qat / peqa: the RTN-quantized model before training
        lines += [f"## Held-out exact match ({s['task']})", "",
                  "| before |" + (" quantized, untrained (RTN) |" if q else "") + " after | gain |",
                  "|---|---|---|" + ("---|" if q else ""),
                  f"| {pct(s['accuracy_before'])} |" + (f" {pct(s['accuracy_quantized'])} |" if q else "")
                  + f" {pct(s['accuracy_after'])} | {'n/a' if gain is None else f'{100 * gain:+.1f} points'} |", "",
                  "![accuracy](accuracy.png)", ""]
    lines += ["![loss](loss.png)"]
    write_summary(run_dir / "summary.md", lines)
