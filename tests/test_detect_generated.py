"""Detection of generated text (eval/detect_generated.py): Fast-DetectGPT's analytic mean and variance against an
exact enumeration of every sequence, a Monte-Carlo estimate and Bao et al.'s reference code written out; log-rank
against a brute-force rank; ROC-AUC and the ROC curve against scikit-learn, ties included; `llmlab detect` end to
end (the README's lines, on a tiny random model with SmolLM2's tokenizer) and its bad input (one line, exit 2)."""

from __future__ import annotations

import itertools
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import need
from llmlab.eval.detect_generated import (
    analytic_moments,
    best_threshold,
    log_ranks,
    roc_auc,
    roc_curve,
    score_ids,
    statistics,
)

README = Path(__file__).resolve().parents[1] / "README.md"


# ---- Bao et al.'s reference code (fast-detect-gpt, scripts/fast_detect_gpt.py and scripts/baselines.py), written
# out here as the repository has it: logits (1, T, V) of the rows that predict labels (1, T) -------------------

def get_sampling_discrepancy_analytic(logits_ref, logits_score, labels):
    labels = labels.unsqueeze(-1) if labels.ndim == logits_score.ndim - 1 else labels
    lprobs_score = torch.log_softmax(logits_score, dim=-1)
    probs_ref = torch.softmax(logits_ref, dim=-1)
    log_likelihood = lprobs_score.gather(dim=-1, index=labels).squeeze(-1)
    mean_ref = (probs_ref * lprobs_score).sum(dim=-1)
    var_ref = (probs_ref * torch.square(lprobs_score)).sum(dim=-1) - torch.square(mean_ref)
    discrepancy = (log_likelihood.sum(dim=-1) - mean_ref.sum(dim=-1)) / var_ref.sum(dim=-1).sqrt()
    return discrepancy.mean().item()


def get_likelihood(logits, labels):
    labels = labels.unsqueeze(-1) if labels.ndim == logits.ndim - 1 else labels
    lprobs = torch.log_softmax(logits, dim=-1)
    return lprobs.gather(dim=-1, index=labels).squeeze(-1).mean().item()


def get_logrank(logits, labels):
    matches = (logits.argsort(-1, descending=True) == labels.unsqueeze(-1)).nonzero()
    ranks = matches[:, -1].float() + 1
    return -torch.log(ranks).mean().item()


def get_entropy(logits, labels):
    entropy = torch.softmax(logits, dim=-1) * torch.log_softmax(logits, dim=-1)
    return -entropy.sum(-1).mean().item()


def test_analytic_moments_equal_enumeration_monte_carlo_and_reference():
    g = torch.Generator().manual_seed(0)
    T, V = 5, 4
    logits = torch.randn(T, V, generator=g, dtype=torch.float64) * 2
    logp = logits.log_softmax(-1)
    target = torch.randint(0, V, (T,), generator=g)
    mu, var = analytic_moments(logp)
    # exact: every one of the V^T sequences x~, each token drawn from its row (the prefix is the observed one)
    mean = second = 0.0
    for seq in itertools.product(range(V), repeat=T):
        lp = sum(float(logp[t, v]) for t, v in enumerate(seq))
        mean += math.exp(lp) * lp
        second += math.exp(lp) * lp * lp
    assert float(mu.sum()) == pytest.approx(mean, abs=1e-10)
    assert float(var.sum()) == pytest.approx(second - mean ** 2, abs=1e-10)
    # Monte Carlo: 200k sampled sequences, within 4 standard errors
    draws = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)  # (T, S)
    sums = logp.gather(1, draws).sum(0)  # (S,)
    se = float(sums.std()) / math.sqrt(sums.numel())
    assert abs(float(sums.mean()) - float(mu.sum())) < 4 * se
    assert float(sums.var()) == pytest.approx(float(var.sum()), rel=0.02)
    # the reference code, and the other statistics as its baselines compute them
    ours = statistics(logp, target)
    ref_logits, ref_labels = logits[None], target[None]
    assert ours["fast-detectgpt"] == pytest.approx(
        get_sampling_discrepancy_analytic(ref_logits, ref_logits, ref_labels), abs=1e-10)
    assert ours["likelihood"] == pytest.approx(get_likelihood(ref_logits, ref_labels), abs=1e-10)
    assert ours["log-rank"] == pytest.approx(get_logrank(ref_logits, ref_labels), abs=1e-6)
    assert ours["entropy"] == pytest.approx(get_entropy(ref_logits, ref_labels), abs=1e-10)


def test_log_rank_equals_brute_force_rank():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(30, 50, generator=g, dtype=torch.float64).log_softmax(-1)
    target = torch.randint(0, 50, (30,), generator=g)
    for t in range(30):
        order = sorted(range(50), key=lambda v: -float(logp[t, v]))
        assert float(log_ranks(logp, target)[t]) == pytest.approx(math.log(order.index(int(target[t])) + 1))


def test_statistics_of_a_tiny_model_equal_the_reference_on_its_logits():
    """score_ids takes the rows that predict the scored tokens, after the context: Bao et al.'s code on the
    model's own logits of the same rows gives the same four numbers."""
    from llmlab.models.registry import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("llama-tiny")).eval()
    ids = torch.randint(0, 512, (40,)).tolist()
    ours = score_ids(model, ids[:7], ids[7:])
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[:, 6:-1].double()  # (1, 33, V): the rows that predict ids[7:]
    labels = torch.tensor([ids[7:]])
    assert ours["tokens"] == 33
    assert ours["fast-detectgpt"] == pytest.approx(get_sampling_discrepancy_analytic(logits, logits, labels), abs=1e-4)
    assert ours["likelihood"] == pytest.approx(get_likelihood(logits, labels), abs=1e-5)
    assert ours["log-rank"] == pytest.approx(get_logrank(logits, labels), abs=1e-5)
    assert ours["entropy"] == pytest.approx(get_entropy(logits, labels), abs=1e-5)


def test_roc_auc_and_curve_equal_sklearn_with_ties():
    metrics = need("sklearn.metrics")
    g = torch.Generator().manual_seed(2)
    cases = [([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), ([1, 1, 1, 1], [0, 1, 0, 1]), ([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1])]
    for n, levels in ((50, 5), (200, 1000), (31, 2)):
        labels = torch.randint(0, 2, (n,), generator=g)
        labels[:2] = torch.tensor([0, 1])
        scores = (torch.randn(n, generator=g) + labels).mul(levels / 4).round()  # few levels: many ties
        cases.append((scores.tolist(), labels.tolist()))
    for scores, labels in cases:
        assert roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
        fpr, tpr, thr = roc_curve(scores, labels)
        ref_fpr, ref_tpr, ref_thr = metrics.roc_curve(labels, scores, drop_intermediate=False)
        assert fpr == pytest.approx(ref_fpr.tolist()) and tpr == pytest.approx(ref_tpr.tolist())
        assert thr[1:] == pytest.approx(ref_thr[1:].tolist())
        cut, acc = best_threshold(scores, labels)
        assert acc == max(sum((s >= c) == y for s, y in zip(scores, labels)) for c in [*scores, math.inf]) / len(labels)
        assert sum((s >= cut) == y for s, y in zip(scores, labels)) / len(labels) == acc


# ---- the command line ------------------------------------------------------------------------------------------

def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "detect", *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_readme_commands_end_to_end(tiny_chat, tmp_path, capsys):
    """The README's detect lines as written, on the tiny model: --eval on 3 short passages in a real subprocess;
    its cached continuations are read back, not sampled again; the single text is judged by that run's
    thresholds."""
    from llmlab.api import load
    from llmlab.cli import main
    from llmlab.common import LlmlabError
    from llmlab.eval.detect_generated import LABELS, SampleConfig, eval_passages, machine_continuations

    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("llmlab detect ")]
    assert len(lines) == 2 and "--eval" in lines[1]
    small = ["--n", "3", "--prefix-tokens", "8", "--new-tokens", "12"]
    r = cli(*shlex.split(lines[1].split(" #")[0])[2:], "--model", str(tiny_chat), *small, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| Fast-DetectGPT curvature |" in r.stdout and "passage" in r.stderr  # the table, the progress bar
    out = tmp_path / "detect-eval"
    result = json.loads((out / "detect.json").read_text())
    assert result["n"] == 3 and len(result["texts"]) == 6 and set(result["auc"]) == set(LABELS)
    assert all(0 <= a <= 1 for a in result["auc"].values())
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    cached = (out / "continuations.jsonl").read_text()
    rows = [json.loads(x) for x in cached.splitlines()]
    assert len(rows) == 3 and all(x["new_tokens"] == 12 and x["machine"] for x in rows)
    llm = load(tiny_chat, packed=True)
    cfg = SampleConfig(prefix_tokens=8, new_tokens=12)
    got = machine_continuations(llm.model, llm.tokenizer, eval_passages(llm.tokenizer, 3, cfg), cfg,
                                out / "continuations.jsonl", str(tiny_chat))
    assert got == [x["machine"] for x in rows] and (out / "continuations.jsonl").read_text() == cached
    with pytest.raises(LlmlabError, match="the built-in set has 0 passages of at least 100008 tokens"):
        eval_passages(llm.tokenizer, 2, SampleConfig(prefix_tokens=8, new_tokens=100000))
    # the single text, in this process (a subprocess costs seconds of torch import on a loaded machine)
    assert main(shlex.split(lines[0].split(" #")[0])[1:] + ["--model", str(tiny_chat), "--prefix-tokens", "8",
                                                            "--thresholds", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    for (s, label), line in zip(LABELS.items(), table):
        cut, (value, verdict) = result["thresholds"][s], (float(line.split()[-3]), line.split()[-1])
        assert line.startswith(label)
        assert verdict == ("-" if cut is None else "machine" if value >= cut else "human"), line


def test_bad_input_one_line_exit_2(tiny_chat, tiny_encoder, tmp_path, capsys):
    from llmlab.cli import main

    model = ["--model", str(tiny_chat)]
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "bad.json").write_text("{}")
    for args, message in [(["", *model], "the text is empty"),
                          (["--file", str(tmp_path / "empty.txt"), *model], "the text is empty"),
                          (["--file", str(tmp_path / "none.txt"), *model], "no such file"),
                          (["Hi", *model], "the statistics need at least 2"),
                          (["--eval", "--n", "0", *model], "--n 0: give a number of passages >= 1"),
                          (["--eval", "--n", "-3", *model], "--n -3"),
                          (["--eval", "--top-p", "0", *model], "--top-p 0.0"),
                          (["x", "--thresholds", str(tmp_path / "bad.json"), *model], "no 'thresholds' object"),
                          (["Some text here.", "--model", tiny_encoder], "this model is an encoder")]:
        assert main(["detect", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "out").exists()
