"""Loss landscapes (eval/landscape.py, Li et al. 2018): filter-normalised directions, the centre equal to the
model's own loss with the weights restored bit for bit, an exactly quadratic case against its closed form, the
plots, and `llmlab landscape` with its bad input."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.eval.landscape import filter_normalised_direction, lm_loss_fn, loss_landscape, plot_landscape
from llmlab.models import build_model, get_preset


def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("llama-tiny")).eval()


def test_directions_are_filter_normalised():
    model = tiny()
    d = filter_normalised_direction(model, torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    assert set(d) == set(params)  # tied weights would appear once
    for name, t in d.items():
        p = params[name]
        assert t.shape == p.shape
        if p.dim() == 1:
            assert t.abs().max() == 0, name  # norm gains and biases stay put
        else:
            rows_d, rows_p = t.reshape(t.shape[0], -1).norm(dim=1), p.reshape(p.shape[0], -1).norm(dim=1)
            assert torch.allclose(rows_d, rows_p, rtol=1e-5), name
    again = filter_normalised_direction(model, torch.Generator().manual_seed(0))
    assert all(torch.equal(d[k], again[k]) for k in d)  # the seed fixes the direction


def test_centre_is_the_model_loss_and_weights_are_restored():
    model = tiny()
    windows = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = lm_loss_fn(windows, batch=2)
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(windows[:, :-1]).reshape(-1, model.config.vocab_size),
                                                           windows[:, 1:].reshape(-1)))
    g = torch.Generator().manual_seed(0)
    dirs = [filter_normalised_direction(model, g) for _ in range(2)]
    land = loss_landscape(model, loss_fn, dirs, span=0.5, points=5)
    assert land.losses.shape == (5, 5)
    assert abs(float(land.losses[2, 2]) - expected) < 1e-5 and abs(land.centre - expected) < 1e-5
    assert float(land.losses.max()) > expected + 0.01  # (a random model need not sit at a minimum)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_linear_least_squares_landscape_is_its_closed_form_parabola():
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False).double()
    X, Y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)

    def mse(m):
        return float(((m(X) - Y) ** 2).mean())

    d = filter_normalised_direction(model, torch.Generator().manual_seed(3))
    land = loss_landscape(model, mse, [d], span=2.0, points=9)
    W, D = model.weight.detach(), d["weight"]
    for a, got in zip(land.alphas.tolist(), land.losses.tolist()):
        closed = float(((X @ (W + a * D).T - Y) ** 2).mean())
        assert abs(got - closed) < 1e-9


def test_bad_grids_and_plots(tmp_path):
    model = tiny()
    d = filter_normalised_direction(model, torch.Generator().manual_seed(0))
    with pytest.raises(LlmlabError, match="1 or 2 directions"):
        loss_landscape(model, lambda m: 0.0, [d, d, d])
    with pytest.raises(LlmlabError, match="--points must be >= 2"):
        loss_landscape(model, lambda m: 0.0, [d], points=1)
    curve = loss_landscape(model, lambda m: float(m.norm.weight.sum()), [d], points=3)
    surface = loss_landscape(model, lambda m: 1.0, [d, d], points=3)
    for land, name in ((curve, "c.png"), (surface, "s.png")):
        plot_landscape(land, tmp_path / name, title="t")
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "landscape", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_readme_command_and_bad_input(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.startswith("llmlab landscape "))
    r = run_cli(*shlex.split(command.split(" #")[0])[2:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "landscape.json").read_text())
    mid = len(data["alphas"]) // 2
    assert data["alphas"][mid] == 0.0 and abs(data["losses"][mid] - data["centre"]) < 1e-4
    assert "loss at the centre" in r.stdout and (tmp_path / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    for args, message in [(("--dims", "3"), "--dims is 1 (a curve) or 2 (a surface)"),
                          (("--points", "1"), "--points must be >= 2"),
                          (("--text", str(tmp_path / "missing.txt")), "missing.txt"),
                          (("all-minilm-l6-v2",), "this model is an encoder")]:
        r = run_cli(*args, "--out", str(tmp_path / "bad.png"))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()
