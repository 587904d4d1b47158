"""Structured pruning: LLM-Pruner's Taylor importance, LoRAPrune's LoRA-gradient importance, the smaller dense
model and ``llmlab prune --method llm-pruner|loraprune``.

Parity: the Taylor scores equal |W * dL/dW| from a hand-written ``torch.autograd.grad`` of the loss over every
calibration window at once (ours accumulates over micro-batches), and the group sums equal explicit loops over the
heads and channels; the shrunk model's logits equal those of the original with the removed heads' and channels'
weights zeroed by hand (query heads, KV groups, FFN channels); LoRAPrune's formula gives hand-computed values on a
2 x 2 example, its gradient estimate is the change of B A under an SGD step of the factors (the paper's
derivation), and the cubic schedule gives the reference code's values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import script_env
from llmlab.api import parameter_count
from llmlab.compress.loraprune import lora_weight_gradient, loraprune_scores, moving_average, scheduled_sparsity
from llmlab.compress.structured import (
    StructuredConfig,
    UnitMasks,
    llm_pruner_keep,
    plan,
    prune_structured,
    select_units,
    shrink,
    taylor_scores,
    unit_scores,
)
from llmlab.formats.load import load_model
from llmlab.models.registry import build_model, get_preset

CFG = replace(get_preset("llama-tiny"), n_heads=6, n_kv_heads=2, head_dim=16, ffn_dim=48)  # 3 query heads per group


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    windows = torch.randint(0, CFG.vocab_size, (3, 12))
    return model, windows


def run_cli(*args, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, timeout=timeout)


# ---- parity: LLM-Pruner's importance ---------------------------------------------------------------------------------
def test_taylor_scores_equal_a_hand_written_autograd(tiny):
    model, windows = tiny
    names = [f"layers.{i}.{k}" for i in range(CFG.n_layers) for k in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    logits = model(windows)  # every window in one batch: the mean loss over all of them
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), windows[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, weights)
    ours = taylor_scores(model, windows, batch=2, progress=False)  # micro-batches of 2 and 1
    assert set(ours) == set(names)
    for n, w, g in zip(names, weights, grads):
        assert torch.allclose(ours[n], (w.detach() * g).abs(), rtol=1e-4, atol=1e-9), n
    assert all(w.grad is None for w in weights)

    # the group sums, by explicit loops over heads, KV groups and channels
    blk = {n.rpartition(".")[2]: ours[n] for n in names if n.startswith("layers.1.")}
    units = unit_scores(blk, CFG)
    d, hpg = CFG.head_dim, CFG.n_heads // CFG.n_kv_heads
    for h in range(CFG.n_heads):
        want = blk["q_proj"][h * d:(h + 1) * d].sum() + blk["o_proj"][:, h * d:(h + 1) * d].sum()
        assert torch.allclose(units["heads"][h], want, rtol=1e-5)
    for g in range(CFG.n_kv_heads):
        want = (sum(units["heads"][g * hpg + j] for j in range(hpg)) + blk["k_proj"][g * d:(g + 1) * d].sum()
                + blk["v_proj"][g * d:(g + 1) * d].sum())
        assert torch.allclose(units["kv"][g], want, rtol=1e-5)
    for j in range(CFG.ffn_dim):
        want = blk["gate_proj"][j].sum() + blk["up_proj"][j].sum() + blk["down_proj"][:, j].sum()
        assert torch.allclose(units["ffn"][j], want, rtol=1e-5)


def test_select_units_removes_the_lowest_per_kv_group():
    cfg = CFG
    units = {"heads": torch.tensor([3.0, 1.0, 2.0, 0.5, 9.0, 0.7]), "kv": torch.tensor([5.0, 4.0]),
             "ffn": torch.arange(48.0).flip(0)}
    p = plan(cfg, StructuredConfig("llm-pruner", 0.4, "query"))  # round(1.2) = 1 head per group, 19 channels
    keep = select_units(units, cfg, p)
    assert keep["heads"].tolist() == [True, False, True, False, True, True] and keep["kv"].all()
    assert keep["ffn"].tolist() == [True] * 29 + [False] * 19
    keep = select_units(units, cfg, plan(cfg, StructuredConfig("llm-pruner", 0.4, "kv")))  # round(0.8) = 1 group
    assert keep["kv"].tolist() == [True, False] and keep["heads"].tolist() == [True] * 3 + [False] * 3


# ---- parity: the smaller model is the original with the removed units zeroed ----------------------------------------
@pytest.mark.parametrize("heads,sparsity", [("query", 0.4), ("kv", 0.5), ("none", 0.3)])
def test_shrunk_model_equals_the_original_with_removed_units_zeroed(tiny, heads, sparsity):
    model, windows = tiny
    config = StructuredConfig("llm-pruner", sparsity, heads).resolved()
    keep = llm_pruner_keep(model, CFG, config, windows, progress=False)
    small, cfg = shrink(model, CFG, keep)
    p = plan(CFG, config)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (p.config.n_heads, p.config.n_kv_heads, p.config.ffn_dim)
    assert small.layers[0].mlp.down_proj.weight.shape == (CFG.dim, cfg.ffn_dim)
    zeroed = build_model(CFG).eval()
    zeroed.load_state_dict(model.state_dict())
    d = CFG.head_dim
    with torch.no_grad():
        for blk, k in zip(zeroed.layers, keep):
            for h in (~k["heads"]).nonzero().flatten().tolist():
                blk.self_attn.q_proj.weight[h * d:(h + 1) * d] = 0
                blk.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            for g in (~k["kv"]).nonzero().flatten().tolist():
                blk.self_attn.k_proj.weight[g * d:(g + 1) * d] = 0
                blk.self_attn.v_proj.weight[g * d:(g + 1) * d] = 0
            for j in (~k["ffn"]).nonzero().flatten().tolist():
                blk.mlp.gate_proj.weight[j] = 0
                blk.mlp.up_proj.weight[j] = 0
                blk.mlp.down_proj.weight[:, j] = 0
        want = zeroed(windows)
        got = small(windows)
        masks = UnitMasks(model, CFG)
        masks.set(keep)
        masked = model(windows)
        masks.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    assert torch.allclose(masked, want, atol=1e-5, rtol=0)
    assert not torch.allclose(model(windows), want, atol=1e-3)  # the hooks are gone: the full model again


# ---- parity: LoRAPrune -----------------------------------------------------------------------------------------------
def test_loraprune_importance_hand_values():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]])  # A (1, 2), B (2, 1)
    ga, gb = torch.tensor([[0.5, 0.0]]), torch.tensor([[1.0], [2.0]])
    # G = gB A + B gA - gB gA = [[1, 2], [2, 4]] + [[0.5, 0], [0, 0]] - [[0.5, 0], [1, 0]]
    assert lora_weight_gradient(a, b, ga, gb).tolist() == [[1.0, 2.0], [1.0, 4.0]]
    # W + 2 B A = [[3, 4], [0, 1]]; |G * that| = [[3, 8], [0, 4]]
    assert loraprune_scores(w, a, b, ga, gb, 2.0).tolist() == [[3.0, 8.0], [0.0, 4.0]]
    # the paper's derivation: an SGD step of the factors (lr 1) moves B A by -G
    torch.manual_seed(0)
    a, b, ga, gb = torch.randn(4, 7), torch.randn(5, 4), torch.randn(4, 7), torch.randn(5, 4)
    assert torch.allclose((b - gb) @ (a - ga) - b @ a, -lora_weight_gradient(a, b, ga, gb), atol=1e-5)
    first = moving_average(None, torch.tensor([10.0]))
    assert first.tolist() == pytest.approx([1.0]) and moving_average(first, torch.tensor([20.0])).item() == \
        pytest.approx(2.9)
    # the reference's schedule_sparsity_ratio(step, 100, 0.1, 0.2, 0, 0.5)
    assert [scheduled_sparsity(s, 100, 0.5) for s in (0, 10, 45, 79, 80, 100)] == pytest.approx(
        [0, 0, 0.5 * (1 - 0.5 ** 3), 0.5 * (1 - (1 / 70) ** 3), 0.5, 0.5])


def test_loraprune_group_scores_are_normalized_per_projection():
    torch.manual_seed(1)
    blk = {leaf: torch.rand(*shape) for leaf, shape in
           (("q_proj", (96, 64)), ("k_proj", (32, 64)), ("v_proj", (32, 64)), ("o_proj", (64, 96)),
            ("gate_proj", (48, 64)), ("up_proj", (48, 64)), ("down_proj", (64, 48)))}
    units = unit_scores(blk, CFG, normalize=True)
    q = blk["q_proj"].reshape(6, -1).sum(1)
    o = blk["o_proj"].t().reshape(6, -1).sum(1)
    assert torch.allclose(units["heads"], q / q.norm() + o / o.norm(), atol=1e-6)


# ---- the command: folders, LoRA, bad input ---------------------------------------------------------------------------
def test_loraprune_writes_a_smaller_model_that_loads_and_runs(tmp_path, tiny_chat):
    """LoRAPrune end to end (LLM-Pruner with LoRA recovery runs through the command line below)."""
    from llmlab.train.loraprune import loraprune_select

    config = StructuredConfig("loraprune", 0.5, "query").resolved()
    opts = {"lr": 1e-3, "batch_size": 2, "ppl_tokens": 32, "window": 32, "progress": False}
    out = tmp_path / "lp"
    report = prune_structured(str(tiny_chat), out, config, calib_samples=4, calib_len=32, progress=False,
                              select=loraprune_select(config, 4, rank=4, **opts))
    lp = report["loraprune"]
    assert [(p["heads"], p["ffn"]) for p in lp["prunings"]][-1] == (2, 64) and lp["steps"] == 4
    assert report["shape"] == {"n_heads": 2, "n_kv_heads": 2, "head_dim": 16, "ffn_dim": 64}
    loaded = load_model(str(out))
    assert loaded.config.n_heads == 2 and loaded.config.ffn_dim == 64
    assert parameter_count(loaded.model) == report["parameters"]["after"] < report["parameters"]["before"]
    x = torch.randint(0, 1000, (1, 8))
    assert torch.isfinite(loaded.model(x)).all()
    assert "loraprune 50% structured" in (out / "summary.md").read_text()


def test_cli_structured_and_bad_input(tmp_path, tiny_chat, capsys):
    """LLM-Pruner with LoRA recovery through a real subprocess once (exit 0, the report), then bad input in
    process (one line, exit 2) and once through a subprocess (no traceback)."""
    from llmlab.cli import main

    out = tmp_path / "x"
    r = run_cli("prune", str(tiny_chat), "--method", "llm-pruner", "--sparsity", "0.25", "--recover-steps", "1",
                "--recover-batch", "1", "--ppl-tokens", "32", "--calib-samples", "1", "--calib-len", "32", "--out",
                str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "llm-pruner 25% structured (heads: query): 2 heads, 2 KV heads, FFN 96" in r.stderr, r.stderr
    assert "LoRA recovery 1 steps" in r.stderr
    report = json.loads((out / "prune_report.json").read_text())
    assert report["removed_per_block"] == {"query_heads_per_kv_group": 1, "kv_groups": 0, "ffn_channels": 32}
    for args, message in ((["--sparsity", "1"], "--sparsity 1.0: use the fraction"),
                          (["--sparsity", "-0.1"], "--sparsity -0.1"),
                          (["--sparsity", "0.9"], "--sparsity 0.9 would remove all 2 query heads of each KV group "
                                                  "of every block: use --sparsity below 0.750 or --heads none"),
                          (["--sparsity", "0.8", "--heads", "kv"], "would remove all 2 KV groups"),
                          (["--sparsity", "0.9999", "--heads", "none"], "would remove all 128 FFN channels"),
                          (["--pattern", "2:4"], "--pattern is for unstructured / N:M pruning"),
                          (["--lora-rank", "0"], "--lora-rank 0"),
                          (["--recover-steps", "1", "--method", "loraprune"], "--recover-steps 1: LoRAPrune")):
        argv = ["prune", str(tiny_chat), "--method", "llm-pruner", *args, "--out", str(tmp_path / "bad"),
                "--no-progress", "--calib-samples", "1", "--calib-len", "32"]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "bad").exists()
    r = run_cli("prune", str(tiny_chat), "--method", "loraprune", "--sparsity", "0.9", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "would remove all" in r.stderr, r.stderr


# ---- the README's commands -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_readme_structured_commands(tmp_path, smollm_path):
    """The README's structured-pruning lines as written, a small calibration / LoRA / perplexity budget appended,
    then generate from the smaller folder."""
    budget = ["--calib-samples", "1", "--calib-len", "64", "--recover-batch", "1", "--ppl-tokens", "64",
              "--no-progress"]
    r = run_cli("prune", "--method", "llm-pruner", "--sparsity", "0.2", "--recover-steps", "20", "--out",
                str(tmp_path / "smol-lp20"), *budget, "--recover-steps", "1", timeout=1200)
    assert r.returncode == 0, r.stderr
    assert "llm-pruner 20% structured (heads: query): 6 heads, 3 KV heads, FFN 1229" in r.stderr, r.stderr
    r = run_cli("prune", "--method", "loraprune", "--sparsity", "0.2", "--out", str(tmp_path / "smol-lrp20"), *budget,
                "--recover-steps", "2", timeout=1200)
    assert r.returncode == 0, r.stderr
    assert "LoRAPrune fine-tune 2 steps" in r.stderr, r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "smol-lp20"), "The capital of France is", "--max-new-tokens",
                "4")
    assert r.returncode == 0 and r.stdout, r.stderr


@pytest.mark.slow
def test_readme_structured_table_command(tmp_path, smollm_path):
    """The README's results-table command with the smoke budget appended (--quick) and one row: the JSON and
    Markdown it writes."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "structured_table.py"
    r = subprocess.run([sys.executable, str(script), "--calib-samples", "8", "--calib-len", "256", "--steps", "10",
                        "--ppl-tokens", "2048", "--new-tokens", "16", "--runs", "1", "--quick", "--only",
                        "llm-pruner 20% + LoRA", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800,
                       env=script_env())
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [x["label"] for x in rows] == ["dense (GGUF dequantized)", "llm-pruner 20% + LoRA"]
    assert rows[1]["n_heads"] == 6 and rows[1]["parameters"] < rows[0]["parameters"]
    assert "| llm-pruner 20% + LoRA | 6 / 3 / 1229 |" in (tmp_path / "results.md").read_text()
