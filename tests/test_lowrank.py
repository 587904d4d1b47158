"""Low-rank factorisation: truncated SVD, SVD-LLM whitening, the low-rank folder, recovery and ``llmlab lowrank``.

Parity: plain SVD reaches the Eckart-Young bound (||W - B A||_F^2 = the sum of the dropped sigma^2); SVD-LLM's
whitened truncation reaches its Theorem 3.2 bound (||(W - B A) X||_F^2 = n/2 x the dropped sigma^2 of W L) and,
on a real SmolLM2 layer and real calibration activations, a lower output error than plain SVD at the same rank.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import script_env
from llmlab.common import LlmlabError
from llmlab.compress.calibrate import calibration_text, token_windows
from llmlab.compress.hessian import HessianAccumulator, dampened_cholesky
from llmlab.compress.lowrank import (
    LowRankConfig,
    check_model,
    choose_rank,
    factorize,
    lowrank,
    lowrank_model_,
    quantize_model_factors_,
    select_layers,
)
from llmlab.formats.convert import write_loaded
from llmlab.formats.load import load_model
from llmlab.models.registry import build_model, get_preset
from llmlab.nn.lowrank import LowRankLinear
from llmlab.nn.quant_linear import QuantLinear


def run_cli(*args, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, timeout=timeout)


def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("llama-tiny")).eval()  # dim 64, FFN 172, 2 blocks


# ---- parity: the error bounds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,rank", [((96, 64), 1), ((96, 64), 17), ((64, 160), 40), ((64, 160), 64)])
def test_svd_error_is_the_eckart_young_bound(shape, rank):
    torch.manual_seed(1)
    W = torch.randn(*shape) * torch.logspace(0, -2, shape[1])  # decaying column scales: a spread spectrum
    A, B, st = factorize(W, rank=rank)
    s = torch.linalg.svdvals(W.double())
    err = (W.double() - B.double() @ A.double()).pow(2).sum()
    bound = s[rank:].pow(2).sum()
    assert A.shape == (rank, shape[1]) and B.shape == (shape[0], rank) and st["rank"] == rank
    assert torch.allclose(err, bound, rtol=1e-4, atol=1e-6 * float(s.pow(2).sum())), (float(err), float(bound))
    assert st["dropped"] == pytest.approx(float(bound), rel=1e-5)
    # no other rank-r matrix does better: the bound is below the truncation of a perturbed SVD
    U, S, Vh = torch.linalg.svd(W.double() + 0.01 * torch.randn(*shape, dtype=torch.float64), full_matrices=False)
    other = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    assert (W.double() - other).pow(2).sum() > bound


def test_svd_llm_output_error_is_its_whitened_bound():
    """SVD-LLM Theorem 3.2: with L L^T = H = 2 X^T X (undampened), ||(W - B A) X^T||_F^2 equals half the sum of
    the dropped singular values^2 of W L, and beats plain SVD's output error at the same rank."""
    torch.manual_seed(2)
    X = torch.randn(400, 48) * torch.logspace(0, -1.5, 48)  # (tokens, K): unequal input channels
    W = torch.randn(80, 48)
    acc = HessianAccumulator(48, X.device)
    acc.add(X)  # a 2-D input counts as one sample: H = 2 X^T X
    L, damp = dampened_cholesky(acc.H.double(), 0.0, "test")
    assert damp == 0.0
    for rank in (4, 12, 30):
        A, B, st = factorize(W, rank=rank, L=L)
        out_err = ((W.double() - B.double() @ A.double()) @ X.double().t()).pow(2).sum()
        assert float(out_err) == pytest.approx(st["dropped"] / 2, rel=1e-4)
        A0, B0, _ = factorize(W, rank=rank)
        plain = ((W.double() - B0.double() @ A0.double()) @ X.double().t()).pow(2).sum()
        assert out_err < plain


@pytest.mark.slow
def test_svd_llm_beats_svd_on_a_real_smollm_layer(smollm):
    """Layer 3's gate_proj of SmolLM2-135M-Instruct on 8 x 128 tokens of the builtin calibration text: at the same
    rank the whitened factors give a lower output error on those inputs than the truncated SVD (and the same
    holds on held-out windows of that text, which the factors never saw)."""
    model, tok = smollm.model, smollm.tokenizer
    windows = token_windows(tok, calibration_text("builtin"), 12, 128, seed=0)  # (12, 128)
    layer = model.layers[3].mlp.gate_proj  # (1536, 576)
    seen: list[torch.Tensor] = []
    h = layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    try:
        with torch.no_grad():
            model(windows)
    finally:
        h.remove()
    X = torch.cat(seen)  # (12 * 128, 576)
    calib, held = X[:1024], X[1024:]
    acc = HessianAccumulator(576, X.device)
    acc.add(calib)
    L, _ = dampened_cholesky(acc.H.double(), 0.01, "test")
    W = layer.weight.detach()

    def out_err(A, B, x):
        x = x.double().t()  # (K, tokens)
        return float(((W.double() - B.double() @ A.double()) @ x).norm() / (W.double() @ x).norm())

    for rank in (64, 192):
        A0, B0, _ = factorize(W, rank=rank)
        A1, B1, _ = factorize(W, rank=rank, L=L)
        plain, whitened = out_err(A0, B0, calib), out_err(A1, B1, calib)
        assert whitened < 0.9 * plain, (rank, plain, whitened)
        assert out_err(A1, B1, held) < out_err(A0, B0, held), rank


# ---- rank choice -----------------------------------------------------------------------------------------------------
def test_choose_rank_by_energy_is_the_smallest_rank_that_keeps_it():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert choose_rank(s, None, 16 / 22) == 1
    assert choose_rank(s, None, 16 / 22 + 1e-6) == 2
    assert choose_rank(s, None, 0.95) == 3  # 21 / 22 = 0.9545
    assert choose_rank(s, None, 1.0) == 4
    assert choose_rank(s, 3, None) == 3
    A, B, st = factorize(torch.diag(s), energy=0.95)
    assert st["rank"] == 3 and st["energy"] == pytest.approx(21 / 22)
    assert factorize(torch.diag(s), energy=0.7, even=True)[2]["rank"] == 2


def test_layer_without_saving_stays_dense_and_is_reported():
    model = tiny()
    # rank 32: q/o 64 x 64 need r < 32, k/v 32 x 64 r < 21.3 -> dense; gate/up/down 172 x 64 r < 46.6 -> factored
    report = lowrank_model_(model, LowRankConfig("svd", rank=32), progress=False)
    dense = sorted({n.rpartition(".")[2] for n, st in report.items() if st["dense"]})
    assert dense == ["k_proj", "o_proj", "q_proj", "v_proj"]
    for name, st in report.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, nn.Linear if st["dense"] else LowRankLinear), name
        assert st["params_after"] == (st["params"] if st["dense"] else 32 * (st["in"] + st["out"]))


def test_select_layers():
    model = tiny()
    names = [n for n, _ in select_layers(model, "mlp")]
    assert names == [f"layers.{b}.mlp.{p}" for b in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert len(select_layers(model, "attn")) == 8 and len(select_layers(model, "all")) == 14
    assert [n for n, _ in select_layers(model, "layers.1.mlp.up_proj,q_proj")] == [
        "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"]
    with pytest.raises(LlmlabError, match=r"no linear layer inside the blocks is named 'w1': use all, mlp, attn, "
                                          r"down_proj, gate_proj"):
        select_layers(model, "mlp,w1")


# ---- bad input (Python API) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,message", [
    (LowRankConfig(rank=0), "--rank 0: use a positive whole number"),
    (LowRankConfig(rank=-3), "--rank -3"),
    (LowRankConfig(energy=0.0), "--energy 0.0: use a share of the squared singular values in (0, 1]"),
    (LowRankConfig(energy=1.5), "--energy 1.5"),
    (LowRankConfig(), "give exactly one of --rank R"),
    (LowRankConfig(rank=8, energy=0.9), "give exactly one of --rank R"),
    (LowRankConfig("asvd", rank=8), "unknown method 'asvd'"),
    (LowRankConfig(rank=8, factor_bits=3), "--factor-bits 3"),
    (LowRankConfig(rank=7, factor_bits=4), "use an even --rank"),
    (LowRankConfig("svd-llm", rank=8, damp=1.0), "--damp 1.0"),
    (LowRankConfig(rank=8, layers=" "), "--layers is empty"),
])
def test_bad_config(config, message):
    with pytest.raises(LlmlabError) as e:
        config.resolved()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rank_larger_than_the_matrix_changes_nothing():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LlmlabError, match=r"--rank 33 is larger than layers\.0\.self_attn\.k_proj's 32 x 64 matrix "
                                          r"allows \(at most 32\)"):
        lowrank_model_(model, LowRankConfig(rank=33), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert check_model(model, LowRankConfig(rank=33, layers="mlp"))  # the MLP alone allows it
    with pytest.raises(LlmlabError, match="needs calibration windows"):
        lowrank_model_(model, LowRankConfig("svd-llm", rank=8), None, progress=False)


# ---- the low-rank folder ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_lowrank_folder_round_trips_to_the_same_logits(tmp_path, tiny_chat, bits):
    from llmlab.api import load

    ld = load_model(str(tiny_chat))
    cfg = LowRankConfig("svd", energy=0.8, factor_bits=bits).resolved()
    report = lowrank_model_(ld.model, cfg, progress=False)
    if bits:
        quantize_model_factors_(ld.model, report, bits)
        assert all(st["factor_quant_error"] < (0.02 if bits == 8 else 0.3) for st in report.values() if not st["dense"])
    modules = {n: st["rank"] for n, st in report.items() if not st["dense"]}
    assert modules and (bits != 4 or all(r % 2 == 0 for r in modules.values()))
    write_loaded(ld, tmp_path / "lr", lowrank_spec={"method": "svd", "modules": modules, "factor_bits": bits})
    back = load_model(str(tmp_path / "lr"))
    for name in modules:
        layer = back.model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == modules[name]
        assert isinstance(layer.down, QuantLinear if bits else nn.Linear)
    x = torch.randint(0, ld.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(back.model(x), ld.model(x))
    assert back.tensor_types == {f"rank-r factors ({f'{bits}-bit' if bits else 'float'})": len(modules)}
    factored = sum(t.numel() for k, t in back.model.state_dict().items() if ".down." in k or ".up." in k)
    assert factored < sum(st["params"] for n, st in report.items() if n in modules)
    for packed in (False, True):  # packed: the float factors as Q8_0 blocks where their width allows
        llm = load(str(tmp_path / "lr"), packed=packed)
        assert isinstance(llm.generate("Hello", max_new_tokens=3), str)


def test_broken_lowrank_folder_is_a_one_line_error(tmp_path, tiny_chat):
    from llmlab.formats import safetensors

    ld = load_model(str(tiny_chat))
    report = lowrank_model_(ld.model, LowRankConfig("svd", rank=16, layers="mlp"), progress=False)
    modules = {n: st["rank"] for n, st in report.items()}
    write_loaded(ld, tmp_path / "lr", lowrank_spec={"method": "svd", "modules": modules, "factor_bits": 0})
    path = tmp_path / "lr" / "model.safetensors"
    tensors = safetensors.load(path)
    del tensors["model.layers.1.mlp.up_proj.down.weight"]
    safetensors.save(tensors, path)
    with pytest.raises(LlmlabError, match=r"up_proj\.down\.weight is missing \(a truncated or partial folder\?\)"):
        load_model(str(tmp_path / "lr"))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # cut in the middle of the tensor data
    r = run_cli("generate", "--model", str(tmp_path / "lr"), "Hello", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "model.safetensors" in r.stderr, r.stderr
    config = json.loads((tmp_path / "lr" / "config.json").read_text())
    config["lowrank_config"]["modules"]["layers.0.mlp.up_proj"] = 0
    (tmp_path / "lr" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmlabError, match="lowrank_config needs modules"):
        load_model(str(tmp_path / "lr"))


def test_lowrank_writes_report_and_summary(tmp_path, tiny_chat):
    out = tmp_path / "lr"
    report = lowrank(str(tiny_chat), out, LowRankConfig("svd-llm", energy=0.9, layers="mlp"), calib_samples=2,
                     calib_len=32, progress=False)
    assert json.loads((out / "lowrank_report.json").read_text()) == json.loads(json.dumps(report))
    assert report["config"] == {"method": "svd-llm", "rank": None, "energy": 0.9, "layers": "mlp", "damp": 0.01,
                                "factor_bits": 0}
    assert report["calibration"] == {"source": "builtin", "samples": 2, "tokens": 32, "seed": 0}
    assert len(report["layers"]) == 6 and all(st["energy"] >= 0.9 for st in report["layers"].values())
    p = report["parameters"]
    assert p["layer_parameters_after"] < p["layer_parameters"] and p["dense_layers"] == []
    config = json.loads((out / "config.json").read_text())
    assert config["lowrank_config"]["modules"] == {n: st["rank"] for n, st in report["layers"].items()}
    assert "| layers.1.mlp.down_proj | 64 x 128 |" in (out / "summary.md").read_text()
    with pytest.raises(LlmlabError, match="already exists"):
        lowrank(str(tiny_chat), out, LowRankConfig(rank=4), progress=False)
    with pytest.raises(LlmlabError, match="no layer would save parameters"):
        lowrank(str(tiny_chat), tmp_path / "none", LowRankConfig(energy=1.0), progress=False)
    assert not (tmp_path / "none").exists()


# ---- recovery --------------------------------------------------------------------------------------------------------
def test_recovery_trains_only_the_factors_and_lowers_the_loss(tiny_chat):
    from llmlab.train.recover import factor_parameters, recover_

    ld = load_model(str(tiny_chat))
    lowrank_model_(ld.model, LowRankConfig("svd", rank=8, layers="mlp"), progress=False)
    windows = token_windows(ld.tokenizer, calibration_text("builtin"), 4, 32, seed=0)
    frozen = {k: v.clone() for k, v in ld.model.state_dict().items() if ".down." not in k and ".up." not in k}
    factors = {k: v.detach().clone() for k, v in factor_parameters(ld.model).items()}
    assert len(factors) == 12
    flags = {n: p.requires_grad for n, p in ld.model.named_parameters()}
    rec = recover_(ld.model, ld.config, windows, windows, 8, lr=5e-3, batch_size=2, progress=False)
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"] - 0.02, rec
    assert rec["perplexity_after"] < rec["perplexity_before"] and rec["tokens"] == 8 * 2 * 31
    sd = ld.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in frozen.items())
    assert all(not torch.equal(v, sd[k]) for k, v in factors.items())
    assert {n: p.requires_grad for n, p in ld.model.named_parameters()} == flags  # restored
    with pytest.raises(LlmlabError, match="--recover-steps 0"):
        recover_(ld.model, ld.config, windows, windows, 0)


# ---- the command line ------------------------------------------------------------------------------------------------
def test_cli_lowrank_end_to_end(tmp_path, tiny_chat):
    out = tmp_path / "lr"
    r = run_cli("lowrank", str(tiny_chat), "--method", "svd-llm", "--energy", "0.8", "--factor-bits", "8",
                "--recover-steps", "2", "--recover-batch", "2", "--ppl-tokens", "64", "--calib-samples", "2",
                "--calib-len", "32", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "svd-llm energy 0.8 (all), 8-bit factors: " in r.stderr and "recovery 2 steps" in r.stderr, r.stderr
    report = json.loads((out / "lowrank_report.json").read_text())
    assert report["recovery"]["steps"] == 2 and report["recovery"]["heldout_tokens"] == 64
    r = run_cli("generate", "--model", str(out), "Hello", "--max-new-tokens", "3", "--raw")
    assert r.returncode == 0, r.stderr
    probe = ("import sys\nfrom llmlab.cli import main\ntry:\n    main(['lowrank', '--help'])\nexcept SystemExit:\n"
             "    pass\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("False"), r.stderr  # --help loads no torch
    for flag in ("--method", "--rank", "--energy", "--layers", "--damp", "--factor-bits", "--recover-steps",
                 "--recover-lr", "--recover-batch", "--ppl-tokens", "--calib", "--calib-samples", "--calib-len",
                 "--seed", "--dtype", "--out", "--force", "--no-progress"):
        assert flag in r.stdout, flag
    assert r.stdout.count("(default:") >= 17


def test_cli_bad_input(tmp_path, tiny_chat, capsys):
    """``llmlab.cli.main`` in process (one line, exit 2), then one case through a real subprocess for the exit
    code and the absence of a traceback."""
    from llmlab.cli import main

    out = tmp_path / "x"
    for args, message in ((["--rank", "0"], "--rank 0: use a positive whole number"),
                          (["--rank", "-2"], "--rank -2"),
                          (["--rank", "65"], "--rank 65 is larger than layers.0.self_attn.q_proj's 64 x 64"),
                          (["--energy", "0"], "--energy 0.0: use a share of the squared singular values in (0, 1]"),
                          (["--energy", "1.01"], "in (0, 1]"),
                          ([], "give exactly one of --rank R"),
                          (["--rank", "4", "--energy", "0.5"], "give exactly one of"),
                          (["--rank", "4", "--layers", "mlp,qproj"], "no linear layer inside the blocks is named "
                                                                     "'qproj'"),
                          (["--rank", "4", "--recover-steps", "-1"], "--recover-steps -1"),
                          (["--rank", "4", "--method", "svd-llm", "--calib", str(tmp_path / "missing.txt")],
                           "no such file")):
        assert main(["lowrank", str(tiny_chat), *args, "--out", str(out), "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
    r = run_cli("lowrank", str(tiny_chat), "--rank", "100", "--layers", "down_proj", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--rank 100 is larger than layers.0.mlp.down_proj's 64 x 128 matrix allows (at most 64)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


# ---- the README's commands -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_readme_lowrank_commands(tmp_path, smollm_path):
    """The README's lowrank lines as written (a small perplexity budget appended, and to the calibrated one a small
    calibration and recovery budget), then generate from the low-rank folder."""
    r = run_cli("lowrank", "--rank", "256", "--layers", "mlp", "--out", str(tmp_path / "smol-r256"), "--ppl-tokens",
                "512", "--no-progress", timeout=1200)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "smol-r256" / "lowrank_report.json").read_text())
    assert report["parameters"]["factored_layers"] == 90 and report["parameters"]["share_kept"] < 0.62
    r = run_cli("lowrank", "--method", "svd-llm", "--rank", "128", "--layers", "mlp", "--factor-bits", "8",
                "--recover-steps", "40", "--out", str(tmp_path / "smol-r128"), "--calib-samples", "2", "--calib-len",
                "64", "--recover-steps", "1", "--recover-batch", "1", "--ppl-tokens", "512", "--no-progress",
                timeout=1200)
    assert r.returncode == 0, r.stderr
    assert "recovery 1 steps" in r.stderr and "8-bit factors" in r.stderr, r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "smol-r128"), "The capital of France is", "--max-new-tokens",
                "4")
    assert r.returncode == 0 and r.stdout, r.stderr  # 4 tokens (this damaged a model may write only newlines)


@pytest.mark.slow
def test_readme_lowrank_table_command(tmp_path, smollm_path):
    """The README's results-table command with the smoke budget appended (--quick) and one row (plain SVD of the
    MLP layers at rank 256: no calibration): the JSON and Markdown it writes."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lowrank_table.py"
    r = subprocess.run([sys.executable, str(script), "--calib-samples", "16", "--calib-len", "512", "--quick",
                        "--only", "svd rank 256 (mlp)", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=1200, env=script_env())
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [x["label"] for x in rows] == ["dense (GGUF dequantized)", "svd rank 256 (mlp)"]
    assert rows[1]["kept"] < 0.62 and rows[1]["file_mb"] < rows[0]["file_mb"]
    assert rows[1]["perplexity"] > rows[0]["perplexity"]
    assert "| svd rank 256 (mlp) | 61.1% | 0 |" in (tmp_path / "results.md").read_text()
