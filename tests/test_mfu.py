"""MFU is measured against the peak of the units a run uses, and is never reported above 100%."""

from __future__ import annotations

import pytest
import torch

from llmlab.models.config import ModelConfig
from llmlab.nn import cpu_kernels
from llmlab.train import mfu as mfu_mod
from llmlab.train.mfu import flops_per_token, matmul_path, measure_peak, mfu


@pytest.mark.parametrize("native,want", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_bf16_path_follows_the_units(monkeypatch, native, want):
    monkeypatch.setattr(mfu_mod, "cpu_has_native", lambda dtype: native)
    path = matmul_path(torch.device("cpu"), torch.bfloat16)
    assert path.dtype == want
    assert ("emulated" in path.label) == (not native)


def test_float32_and_gpu_paths():
    assert matmul_path(torch.device("cpu"), torch.float32).dtype == torch.float32
    assert matmul_path(torch.device("cuda"), torch.bfloat16).dtype == torch.bfloat16  # no CUDA call is made
    assert matmul_path(torch.device("cuda"), torch.float32).dtype == torch.float32


def test_flops_per_token_by_hand():
    gpt2 = ModelConfig(arch="gpt2", vocab_size=1000, dim=64, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=128,
                       attn_bias=True, mlp_bias=True, tie_embeddings=True)
    n = gpt2.num_params() - 128 * 64  # the learned positions are looked up
    assert flops_per_token(gpt2, 100) == 6 * n + 12 * 2 * 100 * 64
    llama = ModelConfig(arch="llama", vocab_size=1000, dim=64, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=128,
                        tie_embeddings=False)
    n = llama.num_params() - 1000 * 64  # an untied input embedding is looked up; the head multiplies
    assert flops_per_token(llama, 128) == 6 * n + 12 * 2 * 128 * 64
    moe = ModelConfig(arch="llama", vocab_size=1000, dim=64, n_layers=2, n_heads=4, ffn_dim=256, n_experts=4,
                      experts_per_token=2)
    with pytest.raises(ValueError, match="dense models"):
        flops_per_token(moe, 16)


def test_mfu_is_a_fraction_and_refuses_more_than_the_peak():
    assert mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="above 100%"):
        mfu(2000.0, 1e7, 1e10)
    with pytest.raises(ValueError, match="peak must be positive"):
        mfu(1.0, 1.0, 0.0)


def test_measure_peak_is_a_rate():
    peak = measure_peak(torch.device("cpu"), torch.float32, sizes=(128,), repeats=2)
    assert 1e6 < peak < 1e14  # FLOP/s of a real matmul: not seconds, not FLOPs


def test_speed_flags_in_order(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"sse2", "avx512_bf16", "avx2", "fma"}))
    assert cpu_kernels.speed_flags() == "avx2 fma avx512_bf16"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset())
    assert cpu_kernels.speed_flags().startswith("none of avx2")
    assert "flags: none of" in cpu_kernels.cpu_description()


def test_train_benchmark_runs_and_names_the_peak():
    """benchmarks/train.py as the README runs it, with a tiny budget and without the peer."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "train.py"), "--skip-peer", "--batch", "1", "--seq",
                        "32", "--steps", "1", "--runs", "1", "--warmup", "0", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CPU: " in r.stdout and "flags: " in r.stdout
    assert "measured matmul peak" in r.stdout and "of float32 matmuls" in r.stdout
    assert "llmlab DecoderLM fused head" in r.stdout and "llmlab fused head: " in r.stdout
