"""An lm-evaluation-harness backend: any llmlab model (GGUF file, Hugging Face folder, run or quantized folder)
as an ``lm_eval`` model, so the harness's own task definitions, prompts and metrics run on it.

lm-evaluation-harness (Gao et al. 2023, "A framework for few-shot language model evaluation", Zenodo
10.5281/zenodo.10256836) asks a model three things; each maps onto the module ``llmlab eval`` already uses:

- ``loglikelihood(context, continuation) -> (sum_t log p(cont_t | ...), greedy)``: ``eval/loglik.py``, which
  splits the pair into tokens as the harness's HFLM does (trailing context spaces move to the continuation);
- ``loglikelihood_rolling(text) -> sum_t log p(x_t | x_<t)``: the text's tokens (no BOS) cut by the harness's
  ``get_rolling_token_windows`` into disjoint windows of the model's context, the first token predicted from
  the BOS (else EOS) token, each window scored by ``eval/loglik.token_loglikelihoods``;
- ``generate_until(context, {until, max_gen_toks, do_sample, temperature, top_p, top_k})``: ``infer/generate.py``,
  the prompt's last ``max_seq_len - max_gen_toks`` tokens, cut before the first ``until`` string or EOS.

Use it from ``llmlab lm-eval [MODEL] --tasks NAMES [--include-path DIR]``, or from Python:

    import lm_eval
    from llmlab.eval.lm_eval_backend import LlmlabLM
    lm_eval.simple_evaluate(model=LlmlabLM("model.gguf"), tasks=["my_task"], task_manager=...)

Importing this module registers the model under the name ``llmlab`` (``--model llmlab --model_args
pretrained=PATH`` wherever lm_eval's registry is read after the import). It needs the ``lm_eval`` package (the
test extra); without it, ``LlmlabLM`` is a one-line error.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llmlab.common import LlmlabError, write_text_atomic

try:  # the optional peer: the base class and registry come from it
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - exercised where lm_eval is missing
    LM, register_model = object, None

MISSING = "the lm-evaluation-harness backend needs the lm_eval package: pip install lm-eval (or '.[test]')"


class LlmlabLM(LM):
    """An llmlab causal LM in lm-evaluation-harness. ``pretrained``: a path ``formats.load.load_model`` reads
    (default: the embedded SmolLM2-135M-Instruct), or an already loaded model (``Loaded``). The model's context
    is its ``max_length``."""

    def __init__(self, pretrained=None, batch_size: int | str = 16, max_gen_toks: int = 256, **_ignored):
        if register_model is None:
            raise LlmlabError(MISSING)
        super().__init__()
        from llmlab.eval.loglik import check_scorer
        from llmlab.formats.load import load_model

        self.loaded = pretrained if hasattr(pretrained, "model") else load_model(pretrained)
        check_scorer(self.loaded.model, "lm-eval")
        self.model, self.tok = self.loaded.model.eval(), self.loaded.tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise LlmlabError(f"lm-eval: batch_size {batch_size} and max_gen_toks {max_gen_toks} must be >= 1")
        prefix = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        if prefix is None:
            raise LlmlabError("lm-eval: the tokenizer has no BOS or EOS token to start a rolling window with")
        self.prefix_id = prefix

    # ---- the three request types ----
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from llmlab.eval.loglik import loglikelihoods

        scored = loglikelihoods(self.model, self.tok, [tuple(r.args) for r in requests], self.batch_size)
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from llmlab.eval.loglik import token_loglikelihoods

        totals = []
        for r in requests:
            (text,) = r.args
            ids = self.tok.encode(text, add_bos=False)
            if not ids:
                totals.append(0.0)
                continue
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_id, max_seq_len=self.model.config.max_seq_len,
                context_len=1)]  # (context ids, continuation ids), continuations tiling the text
            totals.append(sum(s.logprob for s in token_loglikelihoods(self.model, windows, self.batch_size)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from llmlab.infer.generate import chat_stop_ids, generate

        out = []
        for r in requests:  # one at a time: each request may carry its own stop strings and sampling settings
            context, kwargs = r.args
            params, until, budget = self._gen_settings(kwargs)
            keep = self.model.config.max_seq_len - budget
            if keep < 1:
                raise LlmlabError(f"lm-eval: max_gen_toks {budget} fills the model's "
                                  f"{self.model.config.max_seq_len}-token context")
            prompt = self.tok.encode(context, add_bos=False)[-keep:] or [self.prefix_id]
            done = generate(self.model, [prompt], budget, params, stop_ids=chat_stop_ids(self.model.config, self.tok),
                            stop_strings=until, tokenizer=self.tok)
            out.append(done[0].text)
        return out

    def _gen_settings(self, kwargs: dict):
        from llmlab.infer.sample import SamplingParams

        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        params = SamplingParams(temperature=temperature if sample or temperature > 0 else 0.0,
                                top_p=float(kwargs.pop("top_p", 1.0)), top_k=int(kwargs.pop("top_k", 0) or 0),
                                seed=kwargs.pop("seed", None))
        return params.validate(), until, budget

    # ---- chat templates (--apply_chat_template) ----
    @property
    def tokenizer_name(self) -> str:
        return Path(str(self.loaded.source)).name.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from llmlab.formats.load import chat_template_of

        template = chat_template_of(self.loaded)
        if template is None:
            raise LlmlabError("lm-eval: this model has no chat template; leave out --apply-chat-template")
        return template.render(chat_history, add_generation_prompt=add_generation_prompt)


if register_model is not None:
    register_model("llmlab")(LlmlabLM)


BUILTIN_TASK = "llmlab_stdlib_mc"
BUILTIN_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_builtin_task(folder: Path) -> Path:
    """``llmlab eval``'s built-in ``stdlib-mc`` items (which module a standard-library docstring comes from) as an
    lm-eval multiple-choice task: a JSONL of {context, choices, gold} and its YAML, so both harnesses score the
    same requests. Returns the folder."""
    from llmlab.eval import tasks as T

    folder.mkdir(parents=True, exist_ok=True)
    items, _ = T.choice_items(T.parse_tasks("stdlib-mc")[0])
    data = folder / "stdlib_mc.jsonl"
    write_text_atomic(data, "".join(json.dumps({"context": i.context, "choices": i.choices, "gold": i.gold}) + "\n"
                                    for i in items))
    write_text_atomic(folder / f"{BUILTIN_TASK}.yaml", BUILTIN_YAML.format(task=BUILTIN_TASK, data=json.dumps(
        str(data.resolve()))))
    return folder


def run_lm_eval(model: str | None, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                limit: float | None = None, batch_size: int = 16, seed: int = 1234, output: str | None = None,
                log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on an llmlab model; the results dict (JSON-safe) and, with ``output``, the same
    written atomically."""
    if register_model is None:
        raise LlmlabError(MISSING)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files never need the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise LlmlabError(f"--tasks is empty: name lm-eval tasks, e.g. --tasks {BUILTIN_TASK}")
    if include_path is not None and not Path(include_path).is_dir():
        raise LlmlabError(f"--include-path {include_path}: no such folder of lm-eval task YAML files")
    paths = [include_path] if include_path else []
    if BUILTIN_TASK in tasks:
        paths.append(str(write_builtin_task(Path(tempfile.mkdtemp(prefix="llmlab-lm-eval-")))))
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LlmlabError(f"lm-eval has no task {', '.join(unknown)}: check the name, or give --include-path DIR "
                          "with its YAML file")
    lm = LlmlabLM(model, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=log_samples, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:  # a hub dataset on an offline machine
        raise LlmlabError(f"lm-eval could not read a task's data ({type(e).__name__}): offline, use a task whose "
                          "dataset is a local file (dataset_path: json, data_files in its YAML)") from e
    if output:
        write_text_atomic(Path(output), json.dumps(results, indent=2, default=str) + "\n")
    return results
