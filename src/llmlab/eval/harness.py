"""``llmlab eval``: run tasks on language models and encoders, print one table, write one JSON file.

Per task kind (``eval/tasks.py`` names the tasks):

- perplexity: ``eval/perplexity.py`` on the first ``ppl_tokens`` tokens, non-overlapping windows of ``window``
  tokens (stride = window), every token but each window's first predicted; bits per byte over the scored text.
- multiple choice: each choice's log-likelihood given the context (``eval/loglik.py``). ``acc``: the argmax;
  ``acc_norm``: the argmax of log-likelihood / the choice's length in characters (lm-evaluation-harness's
  ``acc_norm``). With ``calibrate``, contextual calibration (Zhao et al. 2021, "Calibrate Before Use",
  arXiv:2102.09690): the choice probabilities p (a softmax over the choices) are divided by those the same prompt
  gives with the example's text replaced by "N/A" (W = diag(p_cf)^-1, b = 0), ``acc_calibrated`` the argmax.
- generate-until: greedy decoding of the prompt (in the model's chat template unless ``chat`` is off; then the
  raw prompt and a stop at a blank line). Few-shot examples are earlier turns (chat) or "prompt\\nanswer" blocks
  (raw). With ``cot`` (chain of thought, Wei et al. 2022, arXiv:2201.11903) the prompt asks for steps and a
  final "Answer:" line, and the answer is extracted by ``data/tasks.extract_answer``. Built-in verifiable tasks
  score by their own scorer (exact match); a JSONL task gets exact match, F1, BLEU, chrF and ROUGE
  (``eval/text_metrics.py``).
- code (``humaneval``): completions executed against unit tests in sandboxed subprocesses, pass@k
  (``eval/humaneval.py``, ``eval/sandbox.py``, ``eval/pass_at_k.py``); each problem's samples, results and error
  lines go to the JSON output under ``details``.
- retrieval and STS (encoders): nDCG@10 / recall@10 / MRR@10 (``eval/retrieval.py``); Spearman's rho x 100 of
  the cosine similarity against the gold scores.

Few-shot examples are drawn with a fixed seed per item (``tasks.fewshot``), so a run is reproducible.

Weights per task (the table's ``weights`` column): the scored tasks (perplexity, multiple choice) run the model as
loaded (``--dtype``, float32 by default: for a GGUF file its blocks dequantized), so their numbers are the reference
ones. On a CPU, the generation tasks (generate-until, code) run a second copy loaded with ``packed=True``
(``nn/packed_linear.py``: the GGUF's own blocks, Q8_0 for other models; int8 dot products on 8-bit activations and
the decode step in C, ``models/native_step.py``): a few times faster per token; the activations' rounding can
change a greedy token now and then (README, Evaluation). Encoders embed in ``encoder_precision`` (``auto``: bf16
matrix products on a CPU with bf16 units, ``infer/embed.embed_dtype``).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmlab.common import LlmlabError, write_text_atomic
from llmlab.eval import humaneval
from llmlab.eval import tasks as T
from llmlab.eval import text_metrics as M
from llmlab.eval.loglik import check_scorer, loglikelihoods
from llmlab.eval.perplexity import perplexity
from llmlab.infer.embed import PRECISIONS, embed_dtype

COT_SUFFIX = "\nThink step by step, then give the final answer on a last line that starts with \"Answer:\"."
DEFAULT_LIMITS = {"choice": 100, "generate": 40, "code": 0, "retrieval": 0, "sts": 0, "perplexity": 0}  # 0 = all


@dataclass
class EvalConfig:
    tasks: str = field(default="", metadata={
        "help": "comma-separated tasks: heldout-ppl, stdlib-mc, addition, reversal, letter_count, unit_conversion, "
                "json_format, humaneval, retrieval, "
                "or ppl:FILE, hellaswag:FILE, arc:FILE, mmlu:FILE, gen:FILE, sts:FILE; "
                f"empty = {','.join(T.DEFAULT_LM_TASKS)} for a language model, "
                f"{','.join(T.DEFAULT_ENCODER_TASKS)} for an encoder"})
    limit: int = field(default=-1, metadata={
        "help": "items per task; -1 = each kind's default (multiple choice 100, generation 40, the rest, "
                "humaneval's 164 problems included, all), 0 = all"})
    num_fewshot: int = field(default=0, metadata={"help": "few-shot examples before each item"})
    seed: int = field(default=1234, metadata={"help": "seed of the few-shot draws and the generated tasks"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    max_new_tokens: int = field(default=0, metadata={
        "help": "generation budget; 0 = 32, 256 with --cot, 384 for humaneval"})
    cot: bool = field(default=False, metadata={"help": "chain-of-thought prompting with answer extraction"})
    calibrate: bool = field(default=False, metadata={
        "help": "contextual calibration of multiple-choice scores (adds acc_calibrated)"})
    chat: bool = field(default=True, metadata={
        "help": "generation prompts in the model's chat template; --no-chat: raw prompts, stop at a blank line "
                "(humaneval: at the paper's stop sequences)"})
    samples: int = field(default=1, metadata={"help": "humaneval: completions per problem (n of pass@k)"})
    temperature: float = field(default=0.0, metadata={
        "help": "humaneval: sampling temperature; 0 = greedy (one sample: pass@1)"})
    top_p: float = field(default=0.95, metadata={"help": "humaneval: nucleus top-p when --temperature > 0"})
    pass_k: str = field(default="", metadata={
        "help": "humaneval: comma-separated k of pass@k, each <= --samples; empty = those of 1,10,100 that fit"})
    exec_timeout: float = field(default=10.0, metadata={
        "help": "humaneval: wall-clock seconds (and CPU seconds) per executed sample"})
    ppl_tokens: int = field(default=2048, metadata={"help": "tokens scored by perplexity tasks; 0 = the whole text"})
    window: int = field(default=512, metadata={"help": "perplexity window (= stride: windows do not overlap)"})
    packed: bool = field(default=True, metadata={
        "help": "on a CPU, generation tasks (generate-until, humaneval) run on packed weights with int8 kernels and "
                "the decode step in C (a GGUF's own blocks, Q8_0 for other models); perplexity and multiple choice "
                "keep the --dtype weights; --no-packed: every task on the --dtype weights"})
    encoder_precision: str = field(default="auto", metadata={
        "help": "encoder tasks' matrix products: auto (bfloat16 on a CPU with bf16 units, else float32), float32 "
                "or bfloat16", "choices": list(PRECISIONS)})
    output: str = field(default="", metadata={
        "help": "write the results as JSON to this file and the table as Markdown beside it (.md), atomically; "
                "empty: llmlab eval writes runs/eval/<UTC time>.json and .md"})

    def validate(self) -> EvalConfig:
        for name in ("num_fewshot", "max_new_tokens", "ppl_tokens"):
            if getattr(self, name) < 0:
                raise LlmlabError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.limit < -1:
            raise LlmlabError(f"--limit must be -1 (defaults), 0 (all) or a count, got {self.limit}")
        if self.batch_size < 1:
            raise LlmlabError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.samples < 1:
            raise LlmlabError(f"--samples must be >= 1, got {self.samples}")
        if self.samples > 1 and self.temperature == 0:
            raise LlmlabError(f"--samples {self.samples} with greedy decoding gives {self.samples} identical "
                              "samples: give --temperature > 0 (e.g. 0.8), or --samples 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LlmlabError(f"--temperature must be >= 0 and --top-p in (0, 1]; got {self.temperature}, "
                              f"{self.top_p}")
        if not self.exec_timeout > 0:
            raise LlmlabError(f"--exec-timeout must be > 0 seconds, got {self.exec_timeout}")
        if self.window < 2:
            raise LlmlabError(f"--window must be >= 2 tokens, got {self.window}")
        if self.encoder_precision not in PRECISIONS:
            raise LlmlabError(f"--encoder-precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{self.encoder_precision!r}")
        if self.output and Path(self.output).suffix == ".md":
            raise LlmlabError(f"--output {self.output}: name the JSON file (e.g. results.json); the Markdown table "
                              "goes beside it as .md")
        return self

    def limit_for(self, kind: str) -> int:
        return DEFAULT_LIMITS[kind] if self.limit == -1 else self.limit


def _cut(items: list, limit: int) -> list:
    return items[:limit] if limit else items


# ---- one task on one model ------------------------------------------------------------------------------------


def run_perplexity(loaded, spec: T.TaskSpec, cfg: EvalConfig) -> tuple[dict, int, dict]:
    tok = loaded.tokenizer
    ids = tok.encode(T.perplexity_text(spec), add_bos=False)
    ids = torch.tensor(ids[:cfg.ppl_tokens] if cfg.ppl_tokens else ids, dtype=torch.long)
    window = min(cfg.window, loaded.config.max_seq_len, len(ids))
    if len(ids) < 2:
        raise LlmlabError(f"{spec.name}: the text is {len(ids)} token long; perplexity needs at least 2")
    n_bytes = len(tok.decode(ids[: len(ids) // window * window].tolist()).encode())
    r = perplexity(loaded.model, ids, window=window, n_bytes=n_bytes, batch=max(1, cfg.batch_size // 4))
    return ({"perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte}, r.tokens,
            {"window": window, "stride": window, "tokens": r.tokens})


def choice_requests(items: list, pool: list | None, cfg: EvalConfig) -> list[tuple[str, str]]:
    """Per item: (context, choice) for each choice, then (content-free context, choice) with ``calibrate``; the
    few-shot examples (context + right choice, blank line between) go after the item's description."""
    requests = []
    for i, item in enumerate(items):
        shots = T.fewshot(pool, items, i, cfg.num_fewshot, cfg.seed)
        prefix = item.description + "".join(s.context + s.choices[s.gold] + "\n\n" for s in shots)
        requests += [(prefix + item.context, c) for c in item.choices]
        if cfg.calibrate:
            requests += [(prefix + item.content_free, c) for c in item.choices]
    return requests


def choose(ll: torch.Tensor, lengths: torch.Tensor, cf: torch.Tensor | None = None) -> dict[str, int]:
    """One item's picks from its choices' log-likelihoods ll (n,), their lengths in characters (n,) and, for
    calibration, the content-free log-likelihoods cf (n,)."""
    picks = {"acc": int(ll.argmax()), "acc_norm": int((ll / lengths).argmax())}
    if cf is not None:
        # q = W p with W = diag(p_cf)^-1; p and p_cf are softmaxes over the choices, whose normalisers are
        # constants, so argmax q = argmax (log p - log p_cf) = argmax (ll - cf)
        picks["acc_calibrated"] = int((ll - cf).argmax())
    return picks


def run_choice(loaded, spec: T.TaskSpec, cfg: EvalConfig) -> tuple[dict, int, dict]:
    items, pool = T.choice_items(spec)
    items = _cut(items, cfg.limit_for("choice"))
    scored = loglikelihoods(loaded.model, loaded.tokenizer, choice_requests(items, pool, cfg), cfg.batch_size)
    hits: dict[str, int] = {}
    at = 0
    for item in items:
        n = len(item.choices)
        ll = torch.tensor([s.logprob for s in scored[at:at + n]], dtype=torch.float64)  # (n,)
        cf = (torch.tensor([s.logprob for s in scored[at + n:at + 2 * n]], dtype=torch.float64)
              if cfg.calibrate else None)  # (n,)
        at += 2 * n if cfg.calibrate else n
        for k, pick in choose(ll, torch.tensor([len(c) for c in item.choices], dtype=torch.float64), cf).items():
            hits[k] = hits.get(k, 0) + (pick == item.gold)
    return ({k: v / len(items) for k, v in hits.items()}, len(items),
            {"num_fewshot": cfg.num_fewshot, "choices": sorted({len(i.choices) for i in items})})


def _gen_prompt(loaded, template, item, shots, cfg: EvalConfig) -> str:
    suffix = COT_SUFFIX if cfg.cot else ""

    def shown(answer: str) -> str:
        return f"Answer: {answer}" if cfg.cot else answer

    if template is not None:
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": s.prompt + suffix},
                         {"role": "assistant", "content": shown(s.answers[0])}]
        messages.append({"role": "user", "content": item.prompt + suffix})
        return template.render(messages, add_generation_prompt=True)
    return "".join(f"{s.prompt}{suffix}\n{shown(s.answers[0])}\n\n" for s in shots) + item.prompt + suffix + "\n"


def run_generate(loaded, spec: T.TaskSpec, cfg: EvalConfig) -> tuple[dict, int, dict]:
    from llmlab.data.tasks import extract_answer
    from llmlab.formats.load import chat_template_of
    from llmlab.infer.generate import chat_stop_ids, generate
    from llmlab.infer.sample import SamplingParams

    check_scorer(loaded.model, spec.name)
    limit = cfg.limit_for("generate")
    data = T.gen_items(spec, limit or 100, max(4 * cfg.num_fewshot, 16) if cfg.num_fewshot else 0, cfg.seed)
    items = _cut(data.items, limit)
    tok, template = loaded.tokenizer, chat_template_of(loaded) if cfg.chat else None
    budget = cfg.max_new_tokens or (256 if cfg.cot else 32)
    keep = loaded.config.max_seq_len - budget
    if keep < 1:
        raise LlmlabError(f"--max-new-tokens {budget} fills the model's {loaded.config.max_seq_len}-token context")
    prompts = [tok.encode(_gen_prompt(loaded, template, item, T.fewshot(data.pool, items, i, cfg.num_fewshot,
                                                                        cfg.seed), cfg))[-keep:]
               for i, item in enumerate(items)]
    stops = chat_stop_ids(loaded.config, tok)
    replies = []
    for s in range(0, len(prompts), cfg.batch_size):
        done = generate(loaded.model, prompts[s:s + cfg.batch_size], budget, SamplingParams(), stop_ids=stops,
                        stop_strings=None if template is not None else ["\n\n"], tokenizer=tok)
        replies += [c.text for c in done]
    settings = {"num_fewshot": cfg.num_fewshot, "chat": template is not None, "cot": cfg.cot,
                "max_new_tokens": budget}
    if data.verifiable is not None:
        return {"exact_match": 100.0 * data.verifiable.accuracy(replies, [i.answers[0] for i in items])}, len(items), \
            settings
    preds = [extract_answer(r) if cfg.cot else r.strip() for r in replies]
    refs = [i.answers for i in items]
    metrics = {"exact_match": sum(map(M.exact_match, preds, refs)) / len(preds),
               "f1": sum(map(M.token_f1, preds, refs)) / len(preds),
               "bleu": M.corpus_bleu(preds, refs), "chrf": M.corpus_chrf(preds, refs),
               **{k: M.rouge(preds, refs, k) for k in ("rouge1", "rouge2", "rougeL")}}
    return metrics, len(items), settings


def _check_encoder(loaded, spec: T.TaskSpec) -> None:
    if loaded.config.is_causal or loaded.tokenizer is None:
        raise LlmlabError(f"{spec.name}: needs an encoder (e.g. all-minilm-l6-v2); {loaded.source} is a causal "
                          "language model: give it perplexity, multiple-choice or generation tasks")


def run_retrieval(loaded, spec: T.TaskSpec, cfg: EvalConfig) -> tuple[dict, int, dict]:
    from llmlab.eval.retrieval import evaluate_model
    from llmlab.text.retrieval_set import RetrievalSet, builtin_test_set

    _check_encoder(loaded, spec)
    rset = builtin_test_set()
    limit = cfg.limit_for("retrieval")
    if limit:
        qids = list(rset.queries)[:limit]
        rset = RetrievalSet({q: rset.queries[q] for q in qids}, rset.corpus, {q: rset.relevant[q] for q in qids})
    m = evaluate_model(loaded.model.eval(), loaded.tokenizer, rset, [loaded.config.dim],
                       batch_size=2 * cfg.batch_size, precision=cfg.encoder_precision)[loaded.config.dim]
    return ({k: m[k] for k in ("ndcg@10", "recall@10", "mrr@10")}, len(rset.queries),
            {"documents": len(rset.corpus)})


def run_sts(loaded, spec: T.TaskSpec, cfg: EvalConfig) -> tuple[dict, int, dict]:
    from llmlab.infer.embed import embed_texts

    _check_encoder(loaded, spec)
    pairs = _cut(T.sts_pairs(spec), cfg.limit_for("sts"))
    a, b = (embed_texts(loaded.model.eval(), loaded.tokenizer, [p[i] for p in pairs], batch_size=2 * cfg.batch_size,
                        precision=cfg.encoder_precision) for i in (0, 1))  # (N, dim) each
    cosine = (a * b).sum(-1)  # (N,): the embeddings are unit vectors
    return {"spearman": 100.0 * M.spearman(cosine, torch.tensor([p[2] for p in pairs]))}, len(pairs), {}


def run_code(loaded, spec: T.TaskSpec, cfg: EvalConfig) -> tuple[dict, int, dict]:
    return humaneval.run(loaded, cfg)


RUNNERS = {"perplexity": run_perplexity, "choice": run_choice, "generate": run_generate, "code": run_code,
           "retrieval": run_retrieval, "sts": run_sts}
GENERATING = ("generate", "code")  # the kinds that decode: on the packed copy with --packed


def weights_of(loaded, cfg: EvalConfig) -> str:
    """What a task's numbers came from: "float32" (the dtype as loaded), "packed Q4_1+Q8_0, int8" (the GGML types
    of the packed layers and their kernel), or for an encoder "float32, bfloat16 matmuls" (the autocast dtype)."""
    from llmlab.nn.ggml_quants import type_name
    from llmlab.nn.packed_linear import PackedLinear

    param = next(loaded.model.parameters())
    packed = {m for m in loaded.model.modules() if isinstance(m, PackedLinear)}
    if packed:
        types = "+".join(sorted({type_name(m.ggml_type) for m in packed}))
        return f"packed {types}, {'/'.join(sorted({m.impl for m in packed}))}"
    dtype = str(param.dtype).removeprefix("torch.")
    if not loaded.config.is_causal:
        products = str(embed_dtype(cfg.encoder_precision, param.device)).removeprefix("torch.")
        if products != dtype:
            return f"{dtype}, {products} matmuls"
    return dtype


# ---- the whole run ------------------------------------------------------------------------------------------


def tasks_for(loaded, specs: list[T.TaskSpec] | None, explicit_model: bool) -> list[T.TaskSpec]:
    """The tasks one model runs: its kind's defaults, or the given ones (with a default model: those it can
    run; with a model the user named: all of them, else a one-line error)."""
    encoder = not loaded.config.is_causal
    if specs is None:
        return T.parse_tasks(",".join(T.DEFAULT_ENCODER_TASKS if encoder else T.DEFAULT_LM_TASKS))
    fits = [s for s in specs if s.for_encoder == encoder]
    if explicit_model and len(fits) < len(specs):
        bad = next(s for s in specs if s.for_encoder != encoder)
        if encoder:
            check_scorer(loaded.model, f"task {bad.name} on {loaded.source}")
        _check_encoder(loaded, bad)
    return fits


def run_eval(models: list[str], cfg: EvalConfig, *, load_kwargs: dict | None = None, log=None) -> dict:
    """Evaluate each model on its tasks -> {"config", "machine", "results": [{model, task, n, seconds, metrics,
    settings}]}. Every task and model is checked before the first one runs."""
    from llmlab.formats.load import DEFAULT_CHAT, DEFAULT_EMBED, load_model

    cfg.validate()
    humaneval.pass_ks(cfg.pass_k, cfg.samples)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    specs = T.parse_tasks(cfg.tasks) if cfg.tasks.strip() else None
    explicit = bool(models)
    if not models:
        wanted = {s.for_encoder for s in specs} if specs else {False, True}
        models = [m for m, enc in ((DEFAULT_CHAT, False), (DEFAULT_EMBED, True)) if enc in wanted]
    plan = []
    for source in models:
        loaded = load_model(source, **(load_kwargs or {}))
        if loaded.tokenizer is None:
            raise LlmlabError(f"{source}: has no tokenizer; evaluate a model file or folder that brings one")
        loaded.model.eval()
        run_specs = tasks_for(loaded, specs, explicit)
        generator = loaded
        if cfg.packed and any(s.kind in GENERATING for s in run_specs) and \
                next(loaded.model.parameters()).device.type == "cpu":
            generator = load_model(source, **{**(load_kwargs or {}), "dtype": torch.float32, "packed": True})
            generator.model.eval()
        plan.append((source, loaded, generator, run_specs))
    for *_, run_specs in plan:  # read every file before the first task runs: a bad line fails fast
        for s in run_specs:
            if s.kind == "choice" and s.path:
                T.choice_items(s)
            elif s.kind == "generate" and s.path:
                T.gen_items(s, 0, 0, cfg.seed)
            elif s.kind == "sts":
                T.sts_pairs(s)
            elif s.kind == "perplexity":
                T.perplexity_text(s)
            elif s.kind == "code":
                humaneval.load_problems()
    rows = []
    for source, loaded, generator, run_specs in plan:
        for spec in run_specs:
            model = generator if spec.kind in GENERATING else loaded
            t0 = time.perf_counter()
            metrics, n, settings = RUNNERS[spec.kind](model, spec, cfg)
            seconds = time.perf_counter() - t0
            details = settings.pop("details", None)  # per-item records (humaneval): JSON only, not the table
            rows.append({"model": source, "task": spec.name, "kind": spec.kind, "n": n,
                         "seconds": round(seconds, 2), "metrics": metrics,
                         "settings": {**settings, "weights": weights_of(model, cfg)},
                         **({"details": details} if details is not None else {})})
            log(f"llmlab eval: {source} {spec.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                + f" (n {n}, {seconds:.1f} s)")
    result = {"config": asdict(cfg), "models": models,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "processor": platform.machine()},
              "results": rows}
    if cfg.output:
        write_text_atomic(cfg.output, json.dumps(result, indent=2) + "\n")
        write_text_atomic(Path(cfg.output).with_suffix(".md"), format_table(result) + "\n")
    return result


def format_table(result: dict) -> str:
    """A Markdown table: one row per (model, task), the metrics in one cell; n counts items (tokens for perplexity,
    queries for retrieval)."""
    lines = ["| model | task | n | metrics | weights | seconds |", "|---|---|---:|---|---|---:|"]
    for r in result["results"]:
        metrics = ", ".join(f"{k} {v:.4f}" if abs(v) < 10 else f"{k} {v:.2f}" for k, v in r["metrics"].items())
        weights = r["settings"].get("weights", "")
        lines.append(f"| {r['model']} | {r['task']} | {r['n']} | {metrics} | {weights} | {r['seconds']:.1f} |")
    return "\n".join(lines)
