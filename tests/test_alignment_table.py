"""benchmarks/alignment_table.py (the README's RLHF results table): its code path (sft, merge, the dev-split
search --tune, dpo on the task's pairs, ppo, grpo, the one scorer on held-out and dev prompts and its kept
scores, the curves, --reuse, --only, an interrupted stage resumed) on the tiny random chat model with tiny
budgets, in this process; the standard errors against hand values and scipy. The on-policy pairs are left out: a
random model samples no right answer, so no pair."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.data.tasks import get_task
from test_sft import tiny_folder, tiny_tokenizer  # noqa: F401  (tiny_folder: a fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "alignment_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("alignment_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_alignment_table_runs_on_a_tiny_model(table, tiny_folder, tmp_path, monkeypatch, capsys):  # noqa: F811
    out, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["--model", str(tiny_folder), "--sft-steps", "1", "--pairs", "task", "--pair-prompts", "4",
            "--dpo-epochs", "1", "--rl-steps", "2", "--rollout-batch", "4", "--group-size", "2",
            "--max-new-tokens", "3", "--eval-examples", "2", "--dev-examples", "3", "--extra", "--batch-size 2",
            "--out", str(out), "--docs", str(docs), "--in-process", "--reuse"]
    # the search first: two DPO candidates (the second the defaults), one PPO and one GRPO (the defaults)
    monkeypatch.setattr(table, "GRID", {"dpo": [{"beta": 0.5}, {}], "ppo": [{}], "grpo": [{}]})
    table.main([*argv, "--tune"])
    tuned = json.loads((docs / "tuning.json").read_text())
    assert [r["method"] for r in tuned["rows"]] == ["sft", "dpo", "ppo", "grpo", "dpo"]  # in rounds
    assert all(set(r["dev"]) >= {"accuracy", "sampled_reward", "kl", "kl_k3"} for r in tuned["rows"])
    assert tuned["rows"][1]["tag"] == "dpo-task4-lr5e-05-beta0.5-ep1"
    assert set(tuned["best"]) == {"dpo", "ppo", "grpo"}
    assert (docs / "tuning.md").read_text().count("| dpo |") == 2 and not (docs / "results.json").exists()
    dpo_stage = (out / "dpo-task4-lr5e-05-beta0.1-ep1" / "stage.json").read_text()
    table.main([*argv, "--tune"])  # again: every run reused, and so its dev score
    assert json.loads((docs / "tuning.json").read_text())["rows"] == tuned["rows"]

    # the table: the defaults' runs are the search's (reused), every row scored on held-out and dev prompts
    table.main(argv)
    res = json.loads((docs / "results.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["SFT (LoRA)", "SFT → DPO (task pairs)", "SFT → PPO",
                                                 "SFT → GRPO"]
    assert (out / "dpo-task4-lr5e-05-beta0.1-ep1" / "stage.json").read_text() == dpo_stage
    sft, *aligned = res["rows"]
    assert sft["heldout"]["kl"] == 0.0 and sft["heldout"]["kl_k3"] == 0.0  # the reference is the SFT model
    assert sft["dev"] == tuned["rows"][0]["dev"]  # one scorer, the same dev prompts
    for r in res["rows"]:
        assert set(r["heldout"]) >= {"accuracy", "reward", "kl", "kl_k3", "sampled_reward"}
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0 and not r["resumed"]
        assert len(r["heldout"]["correct"]) == 2 and sum(r["heldout"]["correct"]) / 2 == r["heldout"]["accuracy"]
        assert len(r["dev"]["correct"]) == 3
        kept = json.loads((Path(r["run"]) / "scores.json").read_text())
        assert sorted(k.split("/")[1] for k in kept) == ["dev", "heldout"]
    assert aligned[0]["heldout"]["kl_k3"] > 0  # DPO's LoRA moved the policy off the SFT reference (PPO and GRPO
    # get no reward from a random model: no advantage, no move)
    assert (docs / "curves.png").stat().st_size > 0 and (docs / "results.md").read_text().count("| SFT") == 4
    ppo = out / "ppo-lr0.0001-kl0.05-ep1-s2x4"
    assert json.loads((ppo / "summary.json").read_text())["steps"] == 2
    assert json.loads((ppo / "sft_config.json").read_text())["ppo"]["ppo_epochs"] == 1
    table_md = (docs / "results.md").read_text()
    assert "(greedy, 2) ± SE" in table_md and "| SFT (LoRA) | 0.0% ± 0.0 | - |" in table_md
    assert res["rollout_trends"] == {"ppo": None, "grpo": None}  # 1 rollout each: too few for a trend

    # --only: one row's run and its scores, no table; its stage interrupted (no stage.json) goes on from its
    # checkpoints; a model trained again (newer files) is scored again, an unchanged one read back
    only = [*argv, "--only", "grpo", "--rl-steps", "4"]
    table.main(only)
    grpo = out / "grpo-lr3e-05-kl0.05-ep1-s4x4g2"
    assert json.loads((grpo / "summary.json").read_text())["steps"] == 4
    assert json.loads((docs / "results.json").read_text()) == res
    table.main([*only[:-4], "--rl-steps", "4", "--rows", "grpo"])  # a table of SFT and this GRPO: all reused
    assert [r["label"] for r in json.loads((docs / "results.json").read_text())["rows"]] == ["SFT (LoRA)",
                                                                                            "SFT → GRPO"]
    with pytest.raises(SystemExit) as stop:
        table.parse_args(["--rows", "ppo,sft"])
    assert stop.value.code == 2
    (grpo / "stage.json").unlink()
    table.main(only)
    assert json.loads((grpo / "stage.json").read_text())["resumed"] is True
    assert json.loads((grpo / "summary.json").read_text())["steps"] == 4  # resumed at its end, not trained again
    capsys.readouterr()
    table.main(only)
    assert f"{grpo.name}: heldout score reused" in capsys.readouterr().out
    weights = next(grpo.rglob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    table.main(only)
    assert f"{grpo.name}: heldout score reused" not in capsys.readouterr().out

def test_standard_errors_against_hand_values_and_scipy(table):
    """binomial_se: sqrt(p (1 - p) / n); paired_gain: the mean difference and its standard error, which is the
    one scipy's paired t-test divides by (statistic = mean / se)."""
    stats = pytest.importorskip("scipy.stats")
    assert table.binomial_se(0.3, 50) == pytest.approx(0.0648, abs=1e-4)  # the README's "about 6.5 points"
    assert table.binomial_se(0.3, 200) == pytest.approx(math.sqrt(0.21 / 200))
    base = [1, 0, 0, 1, 1, 0, 0, 0, 1, 0]
    other = [1, 1, 0, 1, 0, 1, 1, 0, 1, 0]
    mean, se = table.paired_gain(base, other)
    assert mean == pytest.approx(0.2)  # 3 questions gained, 1 lost, of 10
    # d = (0, 1, 0, 0, -1, 1, 1, 0, 0, 0): squared deviations 3 x 0.8^2 + 1.2^2 + 6 x 0.2^2 = 3.6, sd^2 = 3.6 / 9
    assert se == pytest.approx(math.sqrt(0.4 / 10))
    assert mean / se == pytest.approx(stats.ttest_rel(other, base).statistic)
    with pytest.raises(LlmlabError, match="same questions"):
        table.paired_gain([1, 0], [1, 0, 1])


def test_rollout_trend_by_hand(table):
    """Six rollouts of 2 steps each (a train line per step, the rollout's reward on both): first third 0.1, 0.3,
    last third 0.5, 0.5 -> +0.3, SE sqrt(0.02 / 2 + 0 / 2) = 0.1; other lines ignored; under 6 rollouts: None."""
    rewards = [0.1, 0.3, 0.2, 0.9, 0.5, 0.5]
    records = [{"kind": "setup", "step": 0}] + [{"kind": "train", "step": s, "reward": rewards[(s - 1) // 2]}
                                                for s in range(1, 13)] + [{"kind": "eval", "step": 12}]
    t = table.rollout_trend(records, 2)
    assert t["rollouts"] == 6 and t["per_third"] == 2
    assert (t["first_third"], t["last_third"]) == pytest.approx((0.2, 0.5))
    assert (t["gain"], t["gain_se"]) == pytest.approx((0.3, 0.1))
    assert table.rollout_trend(records[:11], 2) is None


def test_dev_prompts_are_training_side_and_unseen_in_training(table):
    """The dev split: training-side questions (never a held-out one), none of them among the prompts the
    default stages train on (sft and preferences draw with seed 0, ppo with 1337, the largest draws here)."""
    task = get_task("addition")
    dev = {e.prompt for e in table.dev_examples("addition", 100, 320)}
    assert len(dev) == 100 and all(task.split_of(p) == "train" for p in dev)
    trained = {e.prompt for seed, n in ((0, 1000), (0, 320), (1337, 256)) for e in task.examples("train", n, seed)}
    assert not dev & trained  # (the plain seed-2 draw of 100 shares some two-digit sums with them)
    assert dev & {e.prompt for e in task.examples("train", 300, table.DEV_SEED)} == dev
    assert not dev & {e.prompt for e in task.examples("heldout", 50, table.HELDOUT_SEED)}
    with pytest.raises(SystemExit) as stop:  # argparse's one line, exit 2
        table.parse_args(["--dev-examples", "0"])
    assert stop.value.code == 2


def test_readme_has_the_table_command(table):
    """The README's RLHF table lines are the script with its defaults, and the dev-split search (the test above
    runs both code paths); every line of the script the README shows parses (the 500-question GRPO runs too)."""
    lines = {x.split("#")[0].strip() for x in (SCRIPT.parents[1] / "README.md").read_text().splitlines()}
    script = "python benchmarks/alignment_table.py"
    assert {f"{script} --reuse", f"{script} --tune --reuse", f"{script} --reuse --only ppo",
            f"{script} --reuse --only grpo"} <= lines
    shown = [x for x in lines if x.startswith(script)]
    assert any("--eval-examples 500" in x for x in shown)
    for line in shown:
        table.parse_args(line.split()[2:])
