"""benchmarks/alignment_table.py (the README's RLHF results table): its code path (sft, merge, dpo on the task's
pairs, ppo, grpo, the one held-out scorer, the curves, --reuse) on the tiny random chat model with tiny budgets, in
this process. The on-policy pairs are left out: a random model samples no right answer, so no pair."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from test_sft import tiny_folder, tiny_tokenizer  # noqa: F401  (tiny_folder: a fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "alignment_table.py"


def test_alignment_table_runs_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    spec = importlib.util.spec_from_file_location("alignment_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, docs = tmp_path / "runs", tmp_path / "docs"
    monkeypatch.setattr(sys, "argv", [
        str(SCRIPT), "--model", str(tiny_folder), "--sft-steps", "1", "--pairs", "task", "--pair-prompts", "4",
        "--dpo-steps", "1", "--rl-steps", "2", "--rollout-batch", "4", "--group-size", "2", "--max-new-tokens", "3",
        "--eval-examples", "2", "--extra", "--batch-size 2", "--out", str(out), "--docs", str(docs), "--in-process"])
    mod.main()
    res = json.loads((docs / "results.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["SFT (LoRA)", "SFT → DPO (task pairs)", "SFT → PPO",
                                                 "SFT → GRPO"]
    sft, *aligned = res["rows"]
    assert sft["heldout"]["kl"] == 0.0 and sft["heldout"]["kl_k3"] == 0.0  # the reference is the SFT model
    for r in res["rows"]:
        assert set(r["heldout"]) >= {"accuracy", "reward", "kl", "kl_k3", "sampled_reward"}
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
    assert aligned[0]["heldout"]["kl_k3"] > 0  # DPO's LoRA moved the policy off the SFT reference (PPO and GRPO
    # get no reward from a random model: no advantage, no move)
    assert (docs / "curves.png").stat().st_size > 0 and (docs / "results.md").read_text().count("| SFT") == 4
    assert json.loads((out / "ppo" / "summary.json").read_text())["steps"] == 2
    # --reuse: every finished stage is kept, the rows are scored again
    before = (out / "sft" / "stage.json").read_text()
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--reuse"])
    mod.main()
    assert (out / "sft" / "stage.json").read_text() == before


def test_readme_has_the_table_command():
    """The README's RLHF table line is the script with its defaults (the test above runs that code path)."""
    readme = (SCRIPT.parents[1] / "README.md").read_text()
    assert any(x.split("#")[0].strip() == "python benchmarks/alignment_table.py" for x in readme.splitlines())
