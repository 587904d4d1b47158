"""benchmarks/decode.py's paired goal rounds as the README runs them with AVX2 only, with a tiny budget: one round,
2 new tokens, one thread. A peer that is not installed is skipped and said so; the rest still runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AVX2_LINE = ("LLMLAB_CPU_VARIANT=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2 "
             "PYTHONPATH=/tmp/lcpp_avx2 python benchmarks/decode.py --goals-only")


def test_readme_avx2_goals_line_runs_with_a_tiny_budget(smollm_path):
    """The README's emulated-AVX2 line as written (its environment, its command) plus --pairs 1 --new-tokens 2
    --threads 1: the kernels report the avx2 variant, and every goal whose peer is here gets its round and its
    median line; with neither peer, the rounds say they were skipped."""
    readme = (ROOT / "README.md").read_text()
    assert AVX2_LINE in readme
    *assignments, _python, script, flag = AVX2_LINE.split()
    env = dict(os.environ, **dict(a.split("=", 1) for a in assignments))
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(ROOT / "src")])  # /tmp/lcpp_avx2 may not exist
    r = subprocess.run([sys.executable, script, flag, "--pairs", "1", "--new-tokens", "2", "--threads", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "int8 kernel variant: avx2" in out
    hf, lc = "transformers: skipped" not in out, "llama-cpp-python: skipped" not in out
    if not (hf or lc):
        assert "paired goals: skipped (neither peer is installed)" in out
        return
    assert "paired goals, 1 rounds" in out
    medians = re.findall(r"median (\d+\.\d+)x \(range .*\), goal >= [145]x met in [01] of 1 rounds", out)
    assert len(medians) == 3 * lc + hf and all(float(m) > 0 for m in medians), out


@pytest.mark.slow
def test_readme_full_table_line_runs_with_a_tiny_budget(smollm_path):
    """The README's full decode table (`python benchmarks/decode.py --runs 3`) plus --runs 1 --new-tokens 2
    --threads 1: every row of ours and of the installed peers, the step's breakdown, the native step equal to the
    eager blocks, speculation with the same output as plain greedy, and the ratios it ends with."""
    line = "python benchmarks/decode.py --runs 3"
    assert f"`{line}`" in (ROOT / "README.md").read_text()
    r = subprocess.run([sys.executable, *line.split()[1:], "--runs", "1", "--new-tokens", "2", "--threads", "1"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    out = r.stdout
    rows = dict(re.findall(r"^(llmlab [\w. -]+?|transformers[\w ]*?|llama\.cpp[\w ]*?) +(\d+\.\d)$", out, re.M))
    for name in ("llmlab packed b1", "llmlab packed b8 distinct", "llmlab packed b32 decode",
                 "llmlab packed prefill512", "llmlab packed kv16 b32 decode", "llmlab packed int8 b32 decode",
                 "llmlab packed int8x2 prefill512", "llmlab fp32 b8"):
        assert float(rows.get(name, 0)) > 0, (name, out[-3000:])
    if "transformers: skipped" not in out:
        assert float(rows.get("transformers b8", 0)) > 0 and "llmlab packed b8 distinct / transformers b8:" in out
    assert "native step greedy (32 tokens) identical to the eager int8 blocks: True" in out
    assert re.search(r"acceptance \d+%, identical output: True", out), out[-2000:]
    assert re.search(r"speculative / plain greedy \(packed path\): \d+\.\d\dx$", out.rstrip()), out[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--runs", "0"], "--runs must be >= 1, got 0"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2, got 1"),
    (["--pairs", "-1"], "--pairs must be >= 0, got -1"),
    (["--threads", "-2"], "--threads must be >= 0, got -2 (0: the physical cores)"),
])
def test_bad_flags_are_usage_errors(args, message):
    r = subprocess.run([sys.executable, "benchmarks/decode.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
