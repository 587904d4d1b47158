"""``llmlab eval``'s defaults (issue 18): generation on the packed copy while the scored tasks keep the loaded
weights (their numbers equal a --no-packed run's exactly), encoder tasks at --encoder-precision, and the results
saved as JSON and Markdown with no --output (a real subprocess). Tiny random models, module-scoped runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.eval.harness import EvalConfig, run_eval
from llmlab.nn.autocast import cpu_has_native
from llmlab.text.retrieval_set import RetrievalSet


@pytest.fixture(scope="module")
def both_ways(tiny_chat, tmp_path_factory):
    """The same perplexity, multiple-choice and generation tasks with --packed (the default) and --no-packed."""
    text = tmp_path_factory.mktemp("ppl") / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    cfg = dict(tasks=f"ppl:{text},stdlib-mc,addition", limit=3, max_new_tokens=4, window=32, ppl_tokens=96)
    return [run_eval([str(tiny_chat)], EvalConfig(**cfg, packed=packed), log=lambda _: None)["results"]
            for packed in (True, False)]


def test_scored_tasks_keep_the_loaded_weights_generation_runs_packed(both_ways):
    packed, reference = both_ways
    for a, b in zip(packed[:2], reference[:2]):  # perplexity, multiple choice: the same numbers, bit for bit
        assert a["metrics"] == b["metrics"] and a["settings"]["weights"] == b["settings"]["weights"] == "float32"
    assert packed[0]["metrics"]["perplexity"] > 1 and packed[1]["n"] == 3
    # the tiny model is a float folder: its packed copy is Q8_0 (a GGUF keeps its own blocks)
    assert packed[2]["settings"]["weights"] == "packed Q8_0, int8" and reference[2]["settings"]["weights"] == "float32"
    assert packed[2]["n"] == reference[2]["n"] == 3


def test_encoder_precision(tiny_encoder, small_retrieval_set, monkeypatch):
    import llmlab.eval.retrieval as R
    from llmlab.formats.load import load_model

    asked = []  # the precision each embedding call got: bf16 moves no top-10 ranking of these small sets
    real = R.embed_texts
    monkeypatch.setattr(R, "embed_texts", lambda *a, **kw: asked.append(kw["precision"]) or real(*a, **kw))
    rows = {p: run_eval([tiny_encoder], EvalConfig(tasks="retrieval", limit=4, encoder_precision=p),
                        log=lambda _: None)["results"][0] for p in ("float32", "auto")}
    assert asked == ["float32", "float32", "auto", "auto"]  # queries, then documents
    loaded = load_model(tiny_encoder)
    four = RetrievalSet(dict(list(small_retrieval_set.queries.items())[:4]), small_retrieval_set.corpus,
                        small_retrieval_set.relevant)  # --limit 4: the first four queries, the whole corpus
    for p, row in rows.items():
        want = R.evaluate_model(loaded.model, loaded.tokenizer, four, [32], precision=p)[32]
        assert row["metrics"] == {k: want[k] for k in ("ndcg@10", "recall@10", "mrr@10")}, p
    bf16 = cpu_has_native(torch.bfloat16)  # auto: bf16 products where the CPU has bf16 units
    assert rows["auto"]["settings"]["weights"] == ("float32, bfloat16 matmuls" if bf16 else "float32")
    assert rows["float32"]["settings"]["weights"] == "float32"
    with pytest.raises(LlmlabError, match="--encoder-precision must be one of auto, float32, bfloat16"):
        EvalConfig(encoder_precision="fp8").validate()


def test_cli_saves_json_and_markdown_by_default(tiny_chat, tmp_path, capsys):
    """No --output: the table printed is also runs/eval/<UTC time>.md, the JSON beside it; stderr says where."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "llmlab", "eval", str(tiny_chat), "--tasks", "stdlib-mc", "--limit", "2",
                        "--threads", "1"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    saved = sorted((tmp_path / "runs" / "eval").iterdir())
    assert [p.suffix for p in saved] == [".json", ".md"] and saved[0].stem == saved[1].stem
    assert re.fullmatch(r"\d{8}-\d{6}", saved[0].stem)
    assert f"llmlab: wrote runs/eval/{saved[0].name} and runs/eval/{saved[1].name}" in r.stderr
    assert saved[1].read_text() == r.stdout and r.stdout.startswith("| model | task | n | metrics | weights |")
    result = json.loads(saved[0].read_text())
    assert result["results"][0]["task"] == "stdlib-mc" and result["config"]["output"] == f"runs/eval/{saved[0].name}"
    # an explicit --output: that JSON file and the .md beside it; a .md name is a one-line error, exit 2
    out = tmp_path / "mine" / "r.json"
    assert main(["eval", str(tiny_chat), "--tasks", "stdlib-mc", "--limit", "1", "--output", str(out)]) == 0
    assert out.with_suffix(".md").read_text().startswith("| model | task |") and json.loads(out.read_text())
    capsys.readouterr()
    assert main(["eval", str(tiny_chat), "--output", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "name the JSON file" in err
    assert not (tmp_path / "r.md").exists()


def test_help_says_where_results_go(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs/eval/<UTC time>.json and .md" in text and "--no-packed" in text and "--encoder-precision" in text
