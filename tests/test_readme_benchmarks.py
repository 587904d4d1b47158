"""Every `python benchmarks/NAME.py` line of the README is run by a test, as written, with a small budget.

The lines that no other test runs are here. Each is taken from the README verbatim, and flags for a small budget
are appended (argparse keeps the last value of a flag given twice): fewer runs, tokens and texts, and for the
scripts that quantize or time the whole model, ``--model`` with a tiny random Llama that has SmolLM2's tokenizer.
A peer that is not installed is skipped by the script, which says so; the test checks the line the script prints
last in either case. ``test_every_readme_benchmark_script_is_run_by_a_test`` keeps the rule: a README line whose
script no test names turns it red.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import script_env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# (the README's line, flags appended for a small budget, a regular expression its output must match).
# In the flags, {tmp} is the test's temporary folder, {tiny_chat} a tiny random Llama (conftest.tiny_chat) and
# {tiny_encoder} a tiny random BERT (conftest.tiny_encoder).
LINES = [
    ("python benchmarks/bpe_train.py", "--mb 0.05 --runs 1 --vocab-size 300",
     r"bytes per token llmlab / tokenizers: \d"),
    ("python benchmarks/dpo.py --steps 3 --warmup 1 --pairs 4 --threads 1 --variants lora",
     "--steps 1 --pairs 1 --seq 64 --model {tiny_chat}", r"lora: (\d+\.\d+x faster|no ratio \(TRL did not run\))"),
    ("python benchmarks/embed.py --texts 48 --runs 3", "--texts 8 --runs 1 --batch-sizes 8 --threads 1",
     r"ratio llmlab / sentence-transformers \(fp32, auto\): 1 thr bs 8: \d|sentence-transformers: skipped"),
    ("python benchmarks/embed_distill.py --student runs/embed-distill-embed/model --texts 256 --runs 5 --threads 1",
     "--student {tiny_encoder} --texts 8 --runs 1", r"ratio student / teacher: \d+\.\d+x"),
    ("python benchmarks/finetune.py --steps 5 --warmup 2 --bases fp32,nf4,packed",
     "--steps 1 --warmup 1 --rows 1 --seq 64 --bases fp32 --no-8bit --model {tiny_chat}",
     r"llmlab packed +\d+\.\d+ s .* loss \d"),
    ("python benchmarks/index.py", "--sizes 1000 --queries 10", r"1,000 vectors: store flat / bare flat p50 = \d"),
    ("python benchmarks/int8_kernels.py --threads 2", "--runs 1 --rows 1,8",
     r"decode logits bit-identical across variants: True"),
    ("python benchmarks/int8_kernels.py --threads 1 --rows 32 --shares 0,0.375,1", "--runs 1 --rows 8 --shares 0,1",
     r"head 576->49152 Q8_0 +portable +8 +\d+\.\d \(\d+\.\d\) +\d+\.\d \(\d+\.\d\) +\d+\.\d \(\d+\.\d\)"),
    ("python benchmarks/int8r_cost.py --runs 11 --thresholds 4", "--runs 1 --model {tiny_chat}",
     r"int8x2 +\d+\.\d+"),
    ("python benchmarks/lingua.py --items 6", "--items 1 --docs 2 --chars 150 --methods llmlingua",
     r"llmlingua +llmlab +median +\d+\.\d+ s/prompt"),
    ("python benchmarks/load_time.py", "--runs 1 --peer-runs 0", r"llmlab +: median +\d+\.\d+ s"),
    ("python benchmarks/quant_decode.py", "--runs 1 --new-tokens 2 --only Q8_0 --model {tiny_chat}",
     r"\| Q8_0 \| absmax int8 / channel \| \d+ \| \d+\.\d+ \|"),
    ("python benchmarks/quant_table.py", "--quick --only 'RTN 4-bit g32' --model {tiny_chat} --out {tmp}/table",
     r"\| RTN 4-bit g32 \| 4\.\d\d \|"),
    ("python benchmarks/quantize.py --samples 32", "--samples 2 --seq-len 32 --no-progress --model {tiny_chat}",
     r"summed error \(the reference's Losses\): \d"),
    ("python benchmarks/self_instruct_novelty.py", "--pool 20 --candidates 20 --runs 1", r"speedup: \d+\.\d+x"),
    ("python benchmarks/serve.py --concurrency 1,8,32,64 --runs 1 --max-tokens-range 32,128 "
     "--llamacpp-concurrency 1 --prefix-trials 3", "--quick --system-tokens 200 --model {tiny_gguf}",
     r"(?s)\| llmlab-http \| 4 \| 4 \| \d+\.\d \|.*prefix-cache TTFT speedup, llmlab: \d"),
    ("python benchmarks/sft_methods.py -- --steps 25", "", r"\| lora \| \d+% → \*\*\d+%\*\* \|"),
    ("python benchmarks/text_features.py", "--runs 1", r"time ratios llmlab / peer: tfidf words 1-2 \d"),
    ("python benchmarks/tokenizer_speed.py", "--runs 1", r"ratios vs tokenizers: BPE one text \d"),
    ("python benchmarks/word_vectors.py --threads 1", "--epochs 1 --methods cbow",
     r"words/s ratio llmlab / gensim: cbow \d|gensim: skipped"),
]


def command(line: str, small: str, paths: dict[str, str]) -> list[str]:
    """The README line with the small-budget flags appended; for sft_methods.py, whose flags after ``--`` go to
    every ``llmlab sft`` run, its own flags go before ``--`` and the sft budget after."""
    argv = shlex.split(line)[1:]
    if argv[0] == "benchmarks/sft_methods.py":
        cut = argv.index("--")
        return [sys.executable, *argv[:cut], "--methods", "lora", "--out", f"{paths['tmp']}/sft", *argv[cut:],
                "--steps", "1", "--batch-size", "1", "--eval-examples", "2", "--model", paths["tiny_chat"]]
    return [sys.executable, *argv, *shlex.split(small.format(**paths))]


def repo_status() -> str:
    """`git status` of the checkout (files a benchmark wrote there show up), or "" outside a git checkout."""
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                       text=True)
    return r.stdout if r.returncode == 0 else ""


@pytest.fixture(scope="module")
def tiny_gguf(tiny_chat, tmp_path_factory):
    """conftest.tiny_chat as a GGUF file (serve.py takes one)."""
    from llmlab.formats.convert import write_loaded
    from llmlab.formats.load import load_model

    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    write_loaded(load_model(str(tiny_chat)), out)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("line,small,expect", LINES, ids=[shlex.split(x[0])[1].split("/")[1] for x in LINES])
def test_readme_benchmark_line_runs_with_a_small_budget(line, small, expect, tmp_path, request):
    assert line in README, f"not in the README any more: {line}"
    paths = {"tmp": str(tmp_path)}
    for name in ("tiny_chat", "tiny_encoder", "tiny_gguf"):
        if "{" + name + "}" in small or (name == "tiny_chat" and "sft_methods" in line):
            paths[name] = str(request.getfixturevalue(name))
    before = repo_status()
    r = subprocess.run(command(line, small, paths), cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=script_env())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert re.search(expect, out), out[-3000:]
    assert repo_status() == before, "the line wrote into the repository"


def test_every_readme_benchmark_script_is_run_by_a_test():
    """Each script the README runs (`python benchmarks/NAME.py`) is run by this module or named by another test."""
    here = {shlex.split(line)[1] for line, _, _ in LINES}
    others = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    missing = []
    for script in sorted(set(re.findall(r"python (benchmarks/\w+\.py)", README))):
        name = script.split("/")[1]
        if script not in here and script not in others and f'"benchmarks" / "{name}"' not in others:
            missing.append(script)
    assert not missing, f"README benchmark lines that no test runs: {missing}"


@pytest.mark.parametrize("argv,message", [
    (["finetune.py", "--seq", "16", "--skip-peer", "--model", "{tiny_chat}"], "no usable training examples"),
    (["dpo.py", "--seq", "16", "--model", "{tiny_chat}"], "no room for a reply"),
    (["finetune.py", "--bases", "fp16"], "--bases fp16: use fp32, nf4 or packed"),
    (["embed_distill.py", "--student", "runs/no-such-run/model"], "no such folder; make it with `llmlab embed"),
    (["int8_kernels.py", "--rows", "0"], "--rows must be positive integers"),
    (["int8_kernels.py", "--shares", "0,1.5"], "--shares must be numbers in [0, 1]"),
    (["load_time.py", "--peer-runs", "-1"], "--peer-runs >= 0"),
    (["serve.py", "--quick", "--system-tokens", "2000", "--model", "{tiny_gguf}"],
     "more than the model's context of 1024; lower --system-tokens"),
    (["sft_methods.py", "--methods", "lora,nope"], "unknown method(s) nope"),
    *[([script, "--model", "runs/no-such-model.gguf"], "no-such-model.gguf: no such file or folder")
      for script in ("quant_decode.py", "quant_table.py", "quantize.py", "int8r_cost.py", "finetune.py", "dpo.py")],
    *[([script, "--model", "pyproject.toml"], "--model: pyproject.toml: not a GGUF file")
      for script in ("quant_decode.py", "quant_table.py", "quantize.py", "int8r_cost.py")],
])
def test_bad_benchmark_input_is_one_line_and_exit_2(argv, message, request):
    """Usage errors of the scripts above (flags, and a --seq no example fits): exit 2, one line, no traceback."""
    paths = {name: str(request.getfixturevalue(name)) for name in ("tiny_chat", "tiny_gguf")
             if any("{" + name + "}" in a for a in argv)}
    script, *args = [a.format(**paths) for a in argv]
    r = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=script_env())
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stdout[-1000:] + r.stderr
