"""The lm-evaluation-harness backend (eval/lm_eval_backend.py) against lm-eval's own reference backend, HFLM, on
the same weights: the same log-likelihoods, rolling log-likelihoods and greedy generations, so the same metrics;
and lm-eval's accuracy on the built-in task equal to ``llmlab eval``'s on the same items."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import need

# the first two are longer than the tiny model's 1024-token context: several rolling windows each
TEXTS = ["def add(a, b):\n    return a + b\n" * 150, "The quick brown fox jumps over the lazy dog. " * 140, "x"]
PROMPTS = ["def main():\n", "Q: 2 + 2 =", "The capital of France is"]


def _tasks(folder):
    """Three local tasks, one per request type lm-eval has (the built-in multiple choice is written by the
    backend): rolling log-likelihood (word perplexity) and greedy generation until a newline."""
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (folder / "roll.yaml").write_text(f"""task: t_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(folder / "texts.jsonl"))}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""")
    (folder / "gen.yaml").write_text(f"""task: t_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(folder / "prompts.jsonl"))}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def both(tiny_chat, tmp_path_factory):
    """lm-eval run twice on the same tasks and weights: through llmlab, and through HFLM (transformers)."""
    lm_eval = need("lm_eval")
    need("transformers")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmlab.eval.lm_eval_backend import BUILTIN_TASK, LlmlabLM, write_builtin_task

    folder = _tasks(tmp_path_factory.mktemp("lm_eval_tasks"))
    write_builtin_task(folder)
    manager = TaskManager(include_path=str(folder))
    tasks = [BUILTIN_TASK, "t_roll", "t_gen"]
    ours = LlmlabLM(str(tiny_chat), batch_size=4)
    ref = HFLM(pretrained=str(tiny_chat), batch_size=4, device="cpu", dtype="float32")
    run = dict(tasks=tasks, limit=6, task_manager=manager, log_samples=True, random_seed=0, numpy_random_seed=0,
               torch_random_seed=0, fewshot_random_seed=0)
    return lm_eval.simple_evaluate(model=ours, **run), lm_eval.simple_evaluate(model=ref, **run), ours


def _resps(result, task):
    return [s["filtered_resps"] for s in result["samples"][task]]


def test_loglikelihoods_equal_hflm(both):
    from llmlab.eval.lm_eval_backend import BUILTIN_TASK

    ours, ref, _ = both
    a, b = _resps(ours, BUILTIN_TASK), _resps(ref, BUILTIN_TASK)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert [g for _, g in x] == [g for _, g in y]  # the greedy flags
        assert [lp for lp, _ in x] == pytest.approx([lp for lp, _ in y], abs=2e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][BUILTIN_TASK][metric] == ref["results"][BUILTIN_TASK][metric]


def test_rolling_loglikelihoods_equal_hflm(both):
    ours, ref, _ = both
    a, b = [x for (x,) in _resps(ours, "t_roll")], [x for (x,) in _resps(ref, "t_roll")]
    assert a[0] < -1000 and a == pytest.approx(b, rel=1e-5)  # the long texts span several 1024-token windows
    assert ours["results"]["t_roll"]["word_perplexity,none"] == pytest.approx(
        ref["results"]["t_roll"]["word_perplexity,none"], rel=1e-5)


def test_generate_until_equal_hflm(both):
    ours, ref, _ = both
    a, b = [x for (x,) in _resps(ours, "t_gen")], [x for (x,) in _resps(ref, "t_gen")]
    assert a == b and all("\n" not in x for x in a)


def test_accuracy_equals_llmlab_eval(both):
    """The same items through both harnesses: lm-eval's acc / acc_norm = llmlab eval's on stdlib-mc."""
    from llmlab.eval.harness import EvalConfig, run_choice
    from llmlab.eval.lm_eval_backend import BUILTIN_TASK
    from llmlab.eval.tasks import parse_tasks

    ours, _, lm = both
    metrics, n, _ = run_choice(lm.loaded, parse_tasks("stdlib-mc")[0], EvalConfig(limit=6, num_fewshot=0))
    assert n == 6
    assert metrics["acc"] == ours["results"][BUILTIN_TASK]["acc,none"]
    assert metrics["acc_norm"] == ours["results"][BUILTIN_TASK]["acc_norm,none"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_cli_bad_input(tmp_path, tiny_chat, capsys):
    """One-line errors, exit 2 (in-process: the command's error path, not its start-up)."""
    need("lm_eval")
    from llmlab.cli import main

    for args, words in [(["--tasks", "no_such_task_xyz"], "no task no_such_task_xyz"), (["--limit", "0"], "--limit"),
                        (["--include-path", str(tmp_path / "missing")], "no such folder")]:
        assert main(["lm-eval", str(tiny_chat), *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_readme_command(tmp_path):
    """The README's line as written: SmolLM2 on 8 items of the built-in task, JSON out."""
    need("lm_eval")
    r = _cli("lm-eval", "--limit", "8", "--output", "lm_eval.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "llmlab_stdlib_mc" in r.stdout and "acc_norm" in r.stdout
    result = json.loads((tmp_path / "lm_eval.json").read_text())["results"]["llmlab_stdlib_mc"]
    assert result["acc,none"] >= 0.75  # SmolLM2 picks the right module for at least 6 of these 8 docstrings
